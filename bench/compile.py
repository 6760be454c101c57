"""`longcot bench compile`: every Triton launch variant of longcot.kernels, compiled ahead of time
for sm_80, sm_89 and sm_90 on a machine without a GPU.

Capture. The public ops run with ``LONGCOT_KERNELS=triton`` on ``meta`` tensors (shapes, dtypes
and strides, no storage: the realistic shapes cost nothing and no kernel runs), forward and,
through autograd, backward, while every kernel module's ``jit`` is replaced by a recorder: each
``jit(fn)[grid](*args, **kwargs)`` the wrappers make is recorded as made (pointer dtypes, integer
and float arguments, the constexpr block sizes and flags, ``num_warps``, ``num_stages``), so
the variants compiled here are the wrappers' own launches and cannot drift from them. The
wrappers choose launch parameters as on a GPU (``triton_interpreted()`` reads False during the
capture). Shapes: ``small`` (test-sized, odd sizes) and ``realistic`` (V = 151,936, H = 4,096,
16,384 tokens per log-prob call, B = 8 x T = 16,384 for the per-token ops, n = 40; ``gae`` and
``discounted_returns`` also at T = 2,053 in the small set, where their scans are chunked), fp32, bf16
and mixed (bf16 hidden states, fp32 LM head) inputs. ``linear_ppo_policy_loss`` launches no
kernel of its own: its launches are ``linear_token_logprobs``' on the masked-in rows and
``ppo_policy_loss``'s, both captured; ``repetition_mask`` / ``repetition_ratio`` are captured
through their Triton paths (their length check reads values, which meta tensors do not have);
``repetition_update`` through a ``repetition_state`` on the meta device.

Specialisation. Each non-constexpr argument is specialised as ``JITFunction.run`` does it, by
Triton's ``native_specialize_impl`` where it exists: pointers and integers divisible by 16 carry
``tt.divisibility``, an integer equal to 1 (a unit stride) becomes a constexpr. A meta tensor's
address is 0, i.e. aligned, as PyTorch's allocations are. Identical variants (same kernel,
signature, constants, attributes and options) are compiled once.

Compile. ``triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda",
arch, 32), options)`` in worker subprocesses (in parallel, one per core) whose environment has no
``TRITON_INTERPRET`` (with it, ``triton.jit`` gives interpreted functions) and a fresh Triton
cache, so that ptxas runs for every kernel and its ``-v`` report gives registers and spill bytes;
the compiled kernel's metadata gives its shared memory. A variant fails when it does not compile
or its shared memory exceeds the target's per-block limit (a launch would fail with "out of
resource: shared memory"). Occupancy is estimated as resident warps per SM from the registers
(64K per SM, allocated per warp in units of 256), the shared memory (the SM's capacity, 1 KB
reserved per block) and num_warps, against the SM's warp and block limits.

    longcot bench compile [--small] [--json PATH]

Prints a table and writes JSON (default ``bench/out/compile.json``; ``--small``:
``bench/out/compile-small.json``). Exit code 1 when a variant failed.
"""

from __future__ import annotations

import contextlib
import datetime
import importlib
import inspect
import io
import json
import os
import queue
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch


@dataclass(frozen=True)
class Target:
    name: str
    arch: int
    smem_per_block: int  # the opt-in maximum one block may use (cudaDevAttrMaxSharedMemoryPerBlockOptin)
    smem_per_sm: int
    max_warps_per_sm: int
    max_blocks_per_sm: int
    regs_per_sm: int = 65536


# A100 (sm_80), Ada / RTX 40xx / L4 / L40 (sm_89; sm_86 has the same shared memory), H100/H200
# (sm_90): CUDA C Programming Guide, "Technical Specifications per Compute Capability".
TARGETS: dict[str, Target] = {
    "sm_80": Target("sm_80", 80, 166_912, 167_936, 64, 32),
    "sm_89": Target("sm_89", 89, 101_376, 102_400, 48, 24),
    "sm_90": Target("sm_90", 90, 232_448, 233_472, 64, 32),
}
_RESERVED_SMEM_PER_BLOCK = 1024  # the system's share of each block's shared memory (sm_80 and later)


def estimated_warps_per_sm(target: Target, num_warps: int, regs: int | None, shared: int) -> int:
    """Resident warps per SM for blocks of ``num_warps`` warps using ``regs`` registers per thread
    (None: unknown, not limiting) and ``shared`` bytes of shared memory; 0 if a block cannot fit."""
    blocks = min(target.max_blocks_per_sm, target.max_warps_per_sm // num_warps)
    if regs:
        regs_per_warp = -(-regs * 32 // 256) * 256
        blocks = min(blocks, (target.regs_per_sm // regs_per_warp) // num_warps)
    if shared:
        if shared > target.smem_per_block:
            return 0
        blocks = min(blocks, target.smem_per_sm // (shared + _RESERVED_SMEM_PER_BLOCK))
    return max(0, blocks) * num_warps


# ---------------------------------------------------------------------------------------------
# Shapes and the calls that reach every launch


@dataclass(frozen=True)
class Shapes:
    name: str
    batch: int  # [B, T] per-token ops
    steps: int
    tokens: int  # rows of one log-prob call
    vocab: int
    hidden: int
    ngram: int


SHAPES = {
    "small": Shapes("small", batch=3, steps=13, tokens=37, vocab=50, hidden=24, ngram=3),
    "realistic": Shapes("realistic", batch=8, steps=16_384, tokens=16_384, vocab=151_936, hidden=4_096, ngram=40),
}

# gae / discounted_returns at the small shapes: a sequence long enough to be cut into chunks
_LONG_SCAN_STEPS = 2_053

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp64": torch.float64, "bool": torch.bool,
           "int64": torch.int64}
# hidden dtype, weight dtype: "mixed" is bf16 activations against the fp32 master LM head
_LINEAR_DTYPES = {"fp32": ("fp32", "fp32"), "bf16": ("bf16", "bf16"), "mixed": ("bf16", "fp32")}


def _meta(shape: Sequence[int], dtype: str, grad: bool = False) -> torch.Tensor:
    return torch.empty(tuple(shape), dtype=_DTYPES[dtype], device="meta", requires_grad=grad)


def _backward(outputs, which: Sequence[str], inputs: Sequence[torch.Tensor]) -> None:
    """Autograd through the outputs named in ``which`` ("logp", "ent"); the others get no gradient."""
    outs = outputs if isinstance(outputs, tuple) else (outputs,)
    chosen = [outs[0]] if "logp" in which else []
    if "ent" in which:
        chosen.append(outs[1])
    torch.autograd.grad(chosen, list(inputs), [torch.empty_like(o) for o in chosen])


def _covering(base: dict, **axes: Sequence) -> list[dict]:
    """``base``, then configurations that change every axis at once, the i-th taking each axis'
    i-th other value (or its base value when it has fewer): every value of every axis is compiled
    in 1 + (the most values one axis adds) configurations, not the full product."""
    others = {axis: [x for x in values if x != base[axis]] for axis, values in axes.items()}
    rounds = max((len(v) for v in others.values()), default=0)
    return [base] + [{**base, **{axis: v[i] for axis, v in others.items() if i < len(v)}} for i in range(rounds)]


@contextlib.contextmanager
def _allow_tf32() -> Iterator[None]:
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


def _calls(s: Shapes) -> Iterator[tuple[str, str, Callable[[], None]]]:
    """(op, description, call): the configurations whose launches differ.

    Every input dtype and every flag value of every kernel is compiled, not every combination:
    `token_logprobs` in full; `linear_token_logprobs` in each dtype with the trainer's gradients
    (to hidden states and LM head, with and without the entropy bonus), for the mixed dtype
    the trainer runs, the entropy-only gradient, a frozen LM head and detached hidden states, and
    for fp32 and mixed inputs the TF32 launches (``torch.backends.cuda.matmul.allow_tf32``); the
    per-token ops from the engine's configuration (fp32 inputs, a bool mask, k1 clamped at 10,
    two channels with a dense one, token ratios without a dual clip) plus a few that change
    every other option (`_covering`). The full product would be ~150 variants per shape set
    instead of ~50: minutes more of compiling on 2 cores for kernels that share their code."""
    from longcot import kernels as K
    from longcot.kernels.repetition import repetition_mask_triton, repetition_ratio_triton
    from longcot.kernels.repetition_update import repetition_state, repetition_update

    n, v, h, b, t = s.tokens, s.vocab, s.hidden, s.batch, s.steps
    for dt in ("fp32", "bf16"):
        for ent in (False, True):
            for grads in ([("logp",), ("ent",), ("logp", "ent")] if ent else [("logp",)]):
                def call(dt=dt, ent=ent, grads=grads):
                    logits = _meta((n, v), dt, grad=True)
                    _backward(K.token_logprobs(logits, _meta((n,), "int64"), 0.7, ent), grads, [logits])

                yield "token_logprobs", f"{dt} logits, entropy={ent}, grad of {'+'.join(grads)}", call
    # (return_entropy, gradients of, gradients to)
    trainer = [(False, ("logp",), ("hidden", "weight")), (True, ("logp", "ent"), ("hidden", "weight"))]
    others = [(True, ("ent",), ("hidden",)), (False, ("logp",), ("weight",))]
    for label, (hdt, wdt) in _LINEAR_DTYPES.items():
        for ent, grads, need in trainer + (others if label == "mixed" else []):
            def call(hdt=hdt, wdt=wdt, ent=ent, grads=grads, need=need):
                hid = _meta((n, h), hdt, grad="hidden" in need)
                wt = _meta((v, h), wdt, grad="weight" in need)
                out = K.linear_token_logprobs(hid, wt, _meta((n,), "int64"), 0.7, ent)
                _backward(out, grads, [x for x, name in ((hid, "hidden"), (wt, "weight")) if name in need])

            yield ("linear_token_logprobs",
                   f"{label}, entropy={ent}, grad of {'+'.join(grads)} to {'+'.join(need)}", call)
    # inputs with an fp32 operand take TF32 dots (other tiles) when torch allows TF32 matmuls
    for label in ("fp32", "mixed"):
        def call(hdt=_LINEAR_DTYPES[label][0], wdt=_LINEAR_DTYPES[label][1]):
            with _allow_tf32():
                hid, wt = _meta((n, h), hdt, grad=True), _meta((v, h), wdt, grad=True)
                _backward(K.linear_token_logprobs(hid, wt, _meta((n,), "int64"), 0.7, True), ("logp", "ent"),
                          [hid, wt])

        yield "linear_token_logprobs", f"{label}, TF32, entropy=True, grad of logp+ent to hidden+weight", call
    for c in _covering({"dtype": "fp32", "mask": "bool"}, dtype=("bf16", "fp64"), mask=("fp32",)):
        def call(c=c):
            K.gae(_meta((b, t), c["dtype"]), _meta((b, t), c["dtype"]), _meta((b, t), c["mask"]), 0.99, 0.95)

        yield "gae", f"{c['dtype']} rewards/values, {c['mask']} mask", call
    # The scans cut sequences longer than SINGLE_CHUNK_MAX into chunks (a second kernel adds the
    # carries): at test-sized shapes too, one call with a long odd T reaches both kernels.
    long_t = max(t, _LONG_SCAN_STEPS)
    if long_t != t:
        def call():
            K.gae(_meta((b, long_t), "fp32"), _meta((b, long_t), "fp32"), _meta((b, long_t), "bool"), 0.99, 0.95)

        yield "gae", f"fp32 rewards/values, bool mask, T={long_t} (chunked)", call
    for c in _covering({"dtype": "fp32", "mask": "bool", "channels": 2}, dtype=("bf16", "fp64"), mask=("fp32",),
                     channels=(1,)):
        def call(c=c):
            k = c["channels"]
            K.discounted_returns(_meta((b, t, k), c["dtype"]), _meta((b, t), c["mask"]), [1.0, 0.99][:k])

        yield "discounted_returns", f"{c['dtype']} rewards, {c['mask']} mask, C={c['channels']}", call
    if long_t != t:
        def call():
            K.discounted_returns(_meta((b, long_t, 2), "fp32"), _meta((b, long_t), "bool"), [1.0, 0.99])

        yield "discounted_returns", f"fp32 rewards, bool mask, C=2, T={long_t} (chunked)", call
    for c in _covering({"dtype": "fp32", "est": "k1", "clamp": 10.0}, dtype=("bf16",), est=K.ESTIMATORS,
                     clamp=(None,)):
        def call(c=c):
            logp = _meta((b, t), c["dtype"], grad=True)
            out = K.kl_penalty(logp, _meta((b, t), c["dtype"]), c["est"], c["clamp"])
            torch.autograd.grad(out, [logp], torch.empty_like(out))

        yield "kl_penalty", f"{c['dtype']}, {c['est']}, clamp={c['clamp']}", call
    for c in _covering({"mask": "bool", "channels": 2, "dense": True, "est": "k1", "clamp": 10.0}, mask=("fp32",),
                     channels=(1,), dense=(False,), est=("k2", "k3"), clamp=(None,)):
        def call(c=c):
            k = c["channels"]
            K.token_rewards(_meta((b, k), "fp32"), _meta((b, t, k), "fp32") if c["dense"] else None,
                            _meta((b, t), "fp32"), _meta((b, t), "fp32"), _meta((b, t), c["mask"]),
                            0.05, c["est"], c["clamp"])

        yield ("token_rewards", f"{c['mask']} mask, C={c['channels']}, dense={c['dense']}, {c['est']}, "
                                f"clamp={c['clamp']}", call)
    for c in _covering({"mask": "bool", "dual": None, "ratio": "token"}, mask=("fp32",), dual=(3.0,),
                     ratio=("sequence",)):
        def call(c=c):
            logp = _meta((b, t), "fp32", grad=True)
            loss, _ = K.ppo_policy_loss(logp, _meta((b, t), "fp32"), _meta((b, t), "fp32"),
                                        _meta((b, t), c["mask"]), 0.2, 0.28, c["dual"], "token-mean", c["ratio"])
            torch.autograd.grad(loss, [logp], torch.empty_like(loss))

        yield "ppo_policy_loss", f"{c['mask']} mask, dual_clip={c['dual']}, ratio={c['ratio']}", call
    for name, fn in (("repetition_mask", repetition_mask_triton), ("repetition_ratio", repetition_ratio_triton)):
        def call(fn=fn):
            fn(_meta((b, t), "int64"), _meta((b,), "int64"), s.ngram)

        yield name, f"n={s.ngram}", call
    for active in (False, True):
        def call(active=active):
            state = repetition_state(b, t, s.ngram, "meta")
            repetition_update(state, _meta((b,), "int64"), _meta((b,), "bool") if active else None)

        yield "repetition_update", f"n={s.ngram}, max_len={t}, active={'a mask' if active else None}", call


# ---------------------------------------------------------------------------------------------
# Recording launches


@dataclass
class Variant:
    """One distinct compilation: a kernel with its specialised signature, constants and options."""

    module: str
    kernel: str
    signature: dict[str, str]
    constexprs: dict[str, object]
    attrs: dict[str, str]  # parameter -> Triton's specialisation string ("D": divisible by 16)
    options: dict[str, int]
    uses: list[dict] = field(default_factory=list)  # {op, call, shapes, grid}

    def key(self) -> str:
        return json.dumps([self.module, self.kernel, self.signature, self.constexprs, self.attrs, self.options],
                          sort_keys=True)

    def describe(self) -> str:
        """The pointers that are not fp32, the constexpr flags and block sizes, the options."""
        ptrs = " ".join(f"{k.removesuffix('_ptr')}:{ty[1:]}" for k, ty in self.signature.items()
                        if ty.startswith("*") and ty != "*fp32") or "fp32"
        flags = " ".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in self.constexprs.items()
                         if k.isupper())
        opts = " ".join(f"{k}={v}" for k, v in self.options.items())
        return f"[{ptrs}] {flags} {opts}".strip()


def _native_specialize():
    for where in ("triton.runtime.jit", "triton._C.libtriton"):
        with contextlib.suppress(ImportError):
            fn = getattr(importlib.import_module(where), "native_specialize_impl", None)
            if fn is not None:
                return fn
    return None


_TRITON_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64",
                 torch.int64: "i64", torch.int32: "i32", torch.int16: "i16", torch.int8: "i8",
                 torch.uint8: "u8", torch.bool: "u1"}


def specialize_fallback(value: object) -> tuple[str, str | None]:
    """Triton 3.x's specialisation rules for one argument, for a Triton without
    ``native_specialize_impl`` (it appeared in 3.5): (type, "D" when divisible by 16, "" or None)."""
    if value is None:
        return "constexpr", None
    if isinstance(value, torch.Tensor):
        if value.dtype not in _TRITON_TYPES:
            raise ValueError(f"tensor argument: no Triton pointer type for {value.dtype}")
        aligned = value.device.type == "meta" or value.data_ptr() % 16 == 0
        return "*" + _TRITON_TYPES[value.dtype], "D" if aligned else ""
    if isinstance(value, bool):
        return "u1", None
    if isinstance(value, int):
        if value == 1:
            return "constexpr", 1
        kind = "i32" if -(2**31) <= value < 2**31 else ("u64" if value >= 2**63 else "i64")
        return kind, "D" if value % 16 == 0 else ""
    if isinstance(value, float):
        return "fp32", None
    raise ValueError(f"kernel argument: cannot specialise a {type(value).__name__}")


def specialize(value: object) -> tuple[str, object]:
    """(Triton type, specialisation) of one non-constexpr argument, as a launch would make it."""
    native = _native_specialize()
    if native is None:
        return specialize_fallback(value)
    from triton.backends.compiler import BaseBackend

    ty, spec = native(BaseBackend, value, False, True, True)
    return ty, spec


def _is_constexpr(param: inspect.Parameter) -> bool:
    ann = param.annotation
    return ann is not inspect.Parameter.empty and "constexpr" in (ann if isinstance(ann, str) else repr(ann))


class _Recorder:
    def __init__(self) -> None:
        self.variants: dict[str, Variant] = {}
        self.current: dict | None = None
        self.launches = 0

    def jit(self, fn):
        recorder = self

        class _Kernel:
            def __getitem__(self, grid):
                return lambda *args, **kwargs: recorder.record(fn, grid, args, kwargs)

        return _Kernel()

    def record(self, fn, grid, args, kwargs) -> None:
        sig = inspect.signature(fn)
        options = {k: kwargs.pop(k) for k in list(kwargs) if k not in sig.parameters}
        bound = sig.bind(*args, **kwargs)
        bound.apply_defaults()
        signature, constexprs, attrs = {}, {}, {}
        for name, value in bound.arguments.items():
            if _is_constexpr(sig.parameters[name]):
                signature[name] = "constexpr"
                constexprs[name] = value
                continue
            ty, spec = specialize(value)
            signature[name] = ty
            if ty == "constexpr":
                constexprs[name] = spec if isinstance(value, int) else value
            elif isinstance(spec, str):
                attrs[name] = spec
        variant = Variant(fn.__module__, fn.__name__, signature, constexprs, attrs,
                          {k: int(v) for k, v in sorted(options.items())})
        variant = self.variants.setdefault(variant.key(), variant)
        use = {**(self.current or {}), "grid": [int(g) for g in grid]}
        if use not in variant.uses:
            variant.uses.append(use)
        self.launches += 1


@contextlib.contextmanager
def _recording() -> Iterator[_Recorder]:
    """Every kernel module's ``jit`` records instead of compiling; launch parameters as on a GPU."""
    import pkgutil
    from unittest import mock

    import longcot.kernels as kernels_pkg
    from longcot.kernels import _backend, logprobs

    from .kernels import forced_backend

    recorder = _Recorder()
    counts = dict(_backend._dispatch_counts)
    replacements = {"jit": recorder.jit, "check_triton_device": lambda t: None, "triton_interpreted": lambda: False}
    originals = {name: getattr(logprobs, name) for name in replacements}
    with contextlib.ExitStack() as stack:
        for info in pkgutil.iter_modules(kernels_pkg.__path__):
            if info.ispkg or info.name == "_cpu":
                continue
            module = importlib.import_module(f"longcot.kernels.{info.name}")
            for name, replacement in replacements.items():
                if getattr(module, name, None) is originals[name]:
                    stack.enter_context(mock.patch.object(module, name, replacement))
        stack.enter_context(forced_backend("triton"))
        try:
            yield recorder
        finally:
            _backend._dispatch_counts.clear()
            _backend._dispatch_counts.update(counts)


def capture(shapes: Sequence[str] = ("small", "realistic")) -> list[Variant]:
    """The distinct launch variants the public ops make at the named shapes (nothing runs)."""
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        raise RuntimeError(f"longcot bench compile needs Triton: {exc}") from exc
    for name in shapes:
        if name not in SHAPES:
            raise ValueError(f"shapes: expected names from {', '.join(SHAPES)}, got {name!r}")
    with _recording() as rec:
        for name in shapes:
            for op, desc, call in _calls(SHAPES[name]):
                rec.current = {"op": op, "call": desc, "shapes": name}
                call()
    return list(rec.variants.values())


# ---------------------------------------------------------------------------------------------
# Compiling (the worker side runs in a subprocess without TRITON_INTERPRET)

_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_PTXAS_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
# atomic read-modify-write instructions in the PTX (``atom.*``, and ``red.*``, an atomic whose
# result is unused), predicated or not: a static count, one per instruction in the code
_PTX_ATOMICS = re.compile(r"^\s*(?:@!?%\w+\s+)?(?:atom|red)\.", re.M)


def _parse_ptxas(log: str) -> tuple[int | None, int | None]:
    regs = _PTXAS_REGS.findall(log)
    spills = _PTXAS_SPILLS.findall(log)
    if not regs:
        return None, None
    return int(regs[-1]), max(int(x) for x in spills[-1]) if spills else 0


def _ptxas_report(ptx: str, arch: int) -> str:
    """``ptxas -v`` on the PTX, for a Triton that does not print ptxas' log itself."""
    from triton.backends.nvidia import compiler as nv

    tool = nv.get_ptxas(arch) if hasattr(nv, "get_ptxas") else nv.knobs.nvidia.ptxas
    gpu = nv.sm_arch_from_capability(arch) if hasattr(nv, "sm_arch_from_capability") else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        proc = subprocess.run([tool.path, "-v", f"--gpu-name={gpu}", str(src), "-o", str(src) + ".o"],
                              capture_output=True, text=True)
    return proc.stderr + proc.stdout


def compile_one(job: dict) -> dict:
    """Compile one variant for one target (in a process without TRITON_INTERPRET)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend

    from longcot.kernels.logprobs import jit

    target = GPUTarget("cuda", job["arch"], 32)
    raw = getattr(importlib.import_module(job["module"]), job["kernel"])
    fn = jit(raw)
    backend = make_backend(target)
    names = list(inspect.signature(raw).parameters)
    attrs = {(names.index(k),): backend.parse_attr(v) for k, v in job["attrs"].items()}
    log = io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stdout(log):  # ptxas' -v report (TRITON_DUMP_PTXAS_LOG) is printed
        kernel = triton.compile(ASTSource(fn, job["signature"], job["constexprs"], attrs), target=target,
                                options=dict(job["options"]))
    seconds = time.perf_counter() - start
    report = log.getvalue()
    if _PTXAS_REGS.search(report) is None:
        report = _ptxas_report(kernel.asm["ptx"], job["arch"])
    regs, spills = _parse_ptxas(report)
    md = kernel.metadata
    return {"shared": int(md.shared), "num_warps": int(md.num_warps), "num_stages": int(md.num_stages),
            "regs": regs, "spills": spills, "atomics": len(_PTX_ATOMICS.findall(kernel.asm["ptx"])),
            "compile_s": round(seconds, 3)}


def _worker() -> int:
    # Results go to the original stdout; anything else that writes to fd 1 (Triton's prints,
    # native code) goes to stderr, so the protocol stays one JSON line per job.
    proto = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    for line in sys.stdin:
        job = json.loads(line)
        try:
            result = compile_one(job)
        except Exception as exc:  # reported per variant; the worker goes on
            text = f"{type(exc).__name__}: {exc}".strip()
            result = {"error": "\n".join(text.splitlines()[:12])}
        proto.write(json.dumps({"id": job["id"], **result}) + "\n")
        proto.flush()
    return 0


def cuda_backend_problem() -> str | None:
    """Why Triton cannot compile for NVIDIA targets here (None: it can)."""
    try:
        import triton  # noqa: F401
        from triton.backends import backends
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource, make_backend  # noqa: F401
    except ImportError as exc:
        return f"Triton's compiler API is not importable: {exc}"
    if "nvidia" not in backends:
        return "Triton has no NVIDIA backend installed"
    bin_dir = Path(importlib.import_module("triton.backends.nvidia").__file__).parent / "bin"
    if not any((bin_dir / name).exists() for name in ("ptxas", "ptxas-blackwell")):
        return f"Triton's NVIDIA backend ships no ptxas ({bin_dir})"
    return None


def _worker_env(cache_dir: str) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env["TRITON_CACHE_DIR"] = cache_dir
    env["TRITON_DUMP_PTXAS_LOG"] = "1"
    # Triton 3.9 warns that its default (fusion on) will change; a launch today fuses.
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    return env


def _run_jobs(jobs: list[dict], workers: int, progress: Callable[[int, int], None] | None) -> dict[int, dict]:
    """Compile jobs in ``workers`` subprocesses fed from one queue; {job id: result}."""
    todo: queue.Queue = queue.Queue()
    for job in jobs:
        todo.put(job)
    results: dict[int, dict] = {}
    lock = threading.Lock()

    def serve(cache_dir: str) -> None:
        env = _worker_env(cache_dir)
        while True:
            with tempfile.TemporaryFile("w+") as err:
                proc = subprocess.Popen([sys.executable, "-m", "longcot.bench.compile", "worker"], env=env,
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True)
                job = None
                try:
                    while True:
                        try:
                            job = todo.get_nowait()
                        except queue.Empty:
                            return
                        proc.stdin.write(json.dumps(job) + "\n")
                        proc.stdin.flush()
                        line = proc.stdout.readline()
                        if not line:  # the worker died on this job: report it, start another
                            proc.wait()
                            err.seek(0)
                            tail = "\n".join(err.read().strip().splitlines()[-8:])
                            result = {"error": f"compile worker exited with code {proc.returncode}: {tail}"}
                        else:
                            result = json.loads(line)
                        with lock:
                            results[job["id"]] = result
                            if progress:
                                progress(len(results), len(jobs))
                        if not line:
                            break
                finally:
                    if proc.poll() is None:
                        proc.stdin.close()
                        proc.wait()

    with tempfile.TemporaryDirectory(prefix="longcot-compile-") as cache_root:
        threads = [threading.Thread(target=serve, args=(os.path.join(cache_root, str(i)),), daemon=True)
                   for i in range(max(1, workers))]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
    return results


# Compile cost: the tiled tl.dot kernels take seconds, the elementwise ones a fraction; starting
# the slow ones first keeps the workers busy until the end.
def _cost(variant: Variant) -> int:
    return 0 if "linear" in variant.kernel else 1


def compile_variants(
    variants: Sequence[Variant],
    targets: Sequence[str] = tuple(TARGETS),
    workers: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> list[dict]:
    """Compile every variant for every target; one row per (variant, target)."""
    for name in targets:
        if name not in TARGETS:
            raise ValueError(f"targets: expected names from {', '.join(TARGETS)}, got {name!r}")
    problem = cuda_backend_problem()
    if problem:
        raise RuntimeError(f"cannot compile for NVIDIA targets: {problem}")
    workers = workers or max(1, min(os.cpu_count() or 1, 8))
    order = sorted(range(len(variants)), key=lambda i: _cost(variants[i]))
    jobs = []
    for i in order:
        v = variants[i]
        for name in targets:
            jobs.append({"id": len(jobs), "variant": i, "target": name, "arch": TARGETS[name].arch,
                         "module": v.module, "kernel": v.kernel, "signature": v.signature,
                         "constexprs": v.constexprs, "attrs": v.attrs, "options": v.options})
    results = _run_jobs(jobs, workers, progress)
    rows = []
    for job in jobs:
        v, target, res = variants[job["variant"]], TARGETS[job["target"]], results[job["id"]]
        row = {"kernel": v.kernel, "module": v.module, "variant": v.describe(), "target": target.name,
               "uses": v.uses, "signature": v.signature, "constexprs": v.constexprs, "attrs": v.attrs,
               "options": v.options, **res}
        if "error" not in res:
            row["smem_limit"] = target.smem_per_block
            row["over_limit"] = res["shared"] > target.smem_per_block
            row["warps_per_sm"] = estimated_warps_per_sm(target, res["num_warps"], res["regs"], res["shared"])
            row["occupancy"] = round(row["warps_per_sm"] / target.max_warps_per_sm, 3)
        rows.append(row)
    rows.sort(key=lambda r: (r["kernel"], r["variant"], r["target"]))
    return rows


def failures(rows: Sequence[dict]) -> list[str]:
    """One line per variant that did not compile or whose shared memory is over its target's limit."""
    out = []
    for r in rows:
        use = r["uses"][0]
        where = f"{r['target']} {r['kernel']} ({use['op']}: {use['call']}, {use['shapes']} shapes)"
        if "error" in r:
            out.append(f"{where}: compile error: {r['error']}")
        elif r["over_limit"]:
            out.append(f"{where}: {r['shared']} bytes of shared memory, over the limit of "
                       f"{r['smem_limit']} per block; {r['variant']}")
    return out


# ---------------------------------------------------------------------------------------------
# Report


def _cell(r: dict) -> str:
    if "error" in r:
        return "ERROR"
    regs = "?" if r["regs"] is None else r["regs"]
    spill = "" if not r["spills"] else f"+{r['spills']}s"
    over = "!" if r["over_limit"] else ""
    return f"{regs}{spill} {r['shared'] / 1024:.1f}K{over} {r['warps_per_sm']}w"


def print_table(rows: Sequence[dict], targets: Sequence[str]) -> None:
    """One line per variant: registers (+ spill bytes), shared memory (! over the per-block limit)
    and estimated resident warps per SM for each target."""
    by_variant: dict[tuple[str, str], dict[str, dict]] = {}
    for r in rows:
        by_variant.setdefault((r["kernel"], r["variant"]), {})[r["target"]] = r
    print(f"{'kernel':<28} {'variant':<84} " + " ".join(f"{t:>22}" for t in targets))
    print("-" * (114 + 23 * len(targets)))
    for (kernel, variant), cells in by_variant.items():
        shown = variant if len(variant) <= 84 else variant[:81] + "..."
        print(f"{kernel:<28} {shown:<84} " + " ".join(f"{_cell(cells[t]):>22}" for t in targets if t in cells))
    print("\ncells: registers per thread (+ spill bytes), shared memory per block (! over the per-block "
          "limit), estimated resident warps per SM")
    print(f"\n{'kernel':<28} {'target':<7} {'variants':>8} {'max regs':>9} {'spilling':>9} {'max smem':>10} "
          f"{'limit':>9} {'min warps/SM':>13} {'max atomics':>12}")
    summary: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        summary.setdefault((r["kernel"], r["target"]), []).append(r)
    for (kernel, target), group in sorted(summary.items()):
        ok = [r for r in group if "error" not in r]
        errors = len(group) - len(ok)
        regs = max((r["regs"] or 0 for r in ok), default=0)
        spilling = sum(1 for r in ok if r["spills"])
        smem = max((r["shared"] for r in ok), default=0)
        warps = min((r["warps_per_sm"] for r in ok), default=0)
        atomics = max((r.get("atomics", 0) for r in ok), default=0)
        note = f"  {errors} failed to compile" if errors else ""
        print(f"{kernel:<28} {target:<7} {len(group):>8} {regs:>9} {spilling:>9} {smem / 1024:>9.1f}K "
              f"{TARGETS[target].smem_per_block / 1024:>8.1f}K {warps:>13} {atomics:>12}{note}")


def run(small: bool = False, json_path: str | None = None, targets: Sequence[str] = tuple(TARGETS),
        workers: int | None = None) -> int:
    """Capture, compile for every target, print the tables, write JSON; 1 if a variant failed."""
    shapes = ("small",) if small else ("small", "realistic")
    import triton

    start = time.perf_counter()
    variants = capture(shapes)
    captured = time.perf_counter() - start
    print(f"{len(variants)} distinct launch variants ({', '.join(shapes)} shapes) x {len(targets)} targets, "
          f"captured in {captured:.1f} s; compiling with Triton {triton.__version__}", flush=True)

    def progress(done: int, total: int) -> None:
        if done % 50 == 0 or done == total:
            print(f"  compiled {done}/{total} ({time.perf_counter() - start:.0f} s)", flush=True)

    rows = compile_variants(variants, targets, workers, progress)
    seconds = time.perf_counter() - start
    print()
    print_table(rows, targets)
    problems = failures(rows)
    for line in problems:
        print(f"FAILED {line}")
    result = {
        "suite": "compile",
        "small": small,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "triton": triton.__version__,
        "torch": torch.__version__,
        "shapes": {name: SHAPES[name].__dict__ for name in shapes},
        "targets": {name: TARGETS[name].__dict__ for name in targets},
        "variants": len(variants),
        "seconds": round(seconds, 1),
        "failures": problems,
        "rows": rows,
    }
    path = Path(json_path or f"bench/out/compile{'-small' if small else ''}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"\n{len(rows)} compilations in {seconds:.0f} s; wrote {path}")
    return 1 if problems else 0


if __name__ == "__main__":
    if sys.argv[1:] == ["worker"]:
        sys.exit(_worker())
    raise SystemExit("usage: python -m longcot.bench.compile worker  (or: longcot bench compile)")
