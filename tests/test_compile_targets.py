"""Every Triton launch variant of longcot.kernels compiles for sm_80, sm_89 and sm_90, within each
target's per-block shared-memory limit, on this CPU-only machine (bench/compile.py: the public ops'
launches captured on meta tensors, compiled by ``triton.compile`` for a GPUTarget in worker
subprocesses without TRITON_INTERPRET)."""

import importlib
import inspect
import pkgutil

import pytest
import torch

pytest.importorskip("triton")

from longcot.bench import compile as cb  # noqa: E402

_PROBLEM = cb.cuda_backend_problem()
pytestmark = pytest.mark.skipif(_PROBLEM is not None, reason=f"no NVIDIA compiler here: {_PROBLEM}")


@pytest.fixture(scope="module")
def variants():
    return cb.capture(("small", "realistic"))


@pytest.fixture(scope="module")
def rows(variants):
    return cb.compile_variants(variants, tuple(cb.TARGETS))


def _kernel_functions() -> set[tuple[str, str]]:
    import longcot.kernels as pkg

    found = set()
    for info in pkgutil.iter_modules(pkg.__path__):
        if info.name == "_cpu":
            continue
        module = importlib.import_module(f"longcot.kernels.{info.name}")
        for name, fn in vars(module).items():
            if name.endswith("_kernel") and inspect.isfunction(fn) and fn.__module__ == module.__name__:
                found.add((module.__name__, name))
    return found


def test_every_variant_compiles_within_the_shared_memory_limits(rows):
    problems = cb.failures(rows)
    assert not problems, f"{len(problems)} of {len(rows)} compilations failed:\n" + "\n".join(problems)
    # ptxas' report was read for every kernel (the bench's register and spill columns)
    assert all(r["regs"] is not None and r["spills"] is not None for r in rows)
    assert {r["target"] for r in rows} == set(cb.TARGETS)


def test_linear_kernels_have_no_atomics_and_bf16_ones_do_not_spill(rows):
    linear = [r for r in rows if r["kernel"].startswith("_linear_")]
    assert {r["kernel"] for r in linear} == {"_linear_fwd_kernel", "_linear_dlogits_kernel"}
    # the backward's d hidden and d weight come from cuBLAS: no atom/red instruction in any PTX
    assert all(r["atomics"] == 0 for r in linear), [(r["kernel"], r["variant"], r["target"]) for r in linear
                                                    if r["atomics"]]
    bf16 = [r for r in linear if r["signature"]["h_ptr"] == r["signature"]["w_ptr"] == "*bf16"]
    assert bf16 and all(r["spills"] == 0 for r in bf16), [(r["kernel"], r["variant"], r["target"], r["spills"])
                                                          for r in bf16 if r["spills"]]


def test_capture_reaches_every_kernel_at_both_shapes(variants):
    for shapes in ("small", "realistic"):
        seen = {(v.module, v.kernel) for v in variants if any(u["shapes"] == shapes for u in v.uses)}
        assert seen == _kernel_functions(), shapes


def test_capture_records_the_launch_as_the_wrapper_makes_it(variants):
    from longcot.kernels.linear_logprobs import _launch_config, _vocab_chunk

    def find(kernel, shapes, **constexprs):
        return [v for v in variants if v.kernel == kernel and any(u["shapes"] == shapes for u in v.uses)
                and all(v.constexprs.get(k) == x for k, x in constexprs.items())]

    exact = find("_linear_dlogits_kernel", "realistic", HAS_G_LOGP=True, HAS_G_ENT=False, CAST_FP32=True, IEEE=True)
    assert {v.signature["h_ptr"] for v in exact} == {"*fp32", "*bf16"}
    hidden = torch.empty(2, 2, dtype=torch.bfloat16, device="meta")
    weight = torch.empty(2, 2, dtype=torch.float32, device="meta")
    config = _launch_config(hidden, weight, True, False)
    (v,) = [v for v in exact if v.signature["h_ptr"] == "*bf16"]
    assert v.signature["dl_ptr"] == "*fp32"  # mixed inputs: fp32 d logits
    assert v.options == {k: config[k] for k in ("num_stages", "num_warps")}
    blocks = ("BLOCK_N", "BLOCK_V", "BLOCK_H", "GROUP_N")
    assert {k: v.constexprs[k] for k in blocks} == {k: config[k] for k in blocks}
    # unit strides become constants; the realistic sizes (H = 4096) are divisible by 16, small ones not
    assert v.constexprs["stride_hh"] == 1 and v.signature["stride_hh"] == "constexpr"
    assert v.attrs["H"] == "D" and v.attrs["h_ptr"] == "D"
    # one launch per vocabulary chunk: whole chunks and the tail share the variant
    n, vocab = cb.SHAPES["realistic"].tokens, cb.SHAPES["realistic"].vocab
    cols = _vocab_chunk(n, vocab, 4, config["BLOCK_V"])
    widths = {min(cols, vocab - v0) for v0 in range(0, vocab, cols)}
    assert len(widths) == 2
    assert {tuple(u["grid"]) for u in v.uses} == {(-(-n // config["BLOCK_N"]) * -(-w // config["BLOCK_V"]),)
                                                  for w in widths}
    small = find("_linear_dlogits_kernel", "small", CAST_FP32=True)
    assert small and all(v.attrs["H"] == "" for v in small)
    # bf16 inputs: bf16 d logits and tensor-core dots; TF32 launches for fp32 and mixed inputs
    assert {v.signature["dl_ptr"] for v in find("_linear_dlogits_kernel", "realistic", CAST_FP32=False)} == {"*bf16"}
    tf32 = find("_linear_dlogits_kernel", "realistic", CAST_FP32=True, IEEE=False)
    assert {v.signature["h_ptr"] for v in tf32} == {"*fp32", "*bf16"}
    assert find("_linear_fwd_kernel", "realistic", CAST_FP32=True, IEEE=False)
    # token_logprobs picks its vocabulary block from V: 64 at V = 50, 4096 at V = 151,936
    assert {v.constexprs["BLOCK_V"] for v in find("_token_logprobs_fwd_kernel", "small")} == {64}
    assert {v.constexprs["BLOCK_V"] for v in find("_token_logprobs_fwd_kernel", "realistic")} == {4096}


def test_fallback_specialisation_agrees_with_triton():
    if cb._native_specialize() is None:
        pytest.skip("this Triton has no native_specialize_impl: the fallback is what runs")
    values = [1, 0, 16, 17, -32, 2**31 - 1, 2**31, 2**40 + 16, 0.5, True, False, None]
    values += [torch.empty(3, dtype=dt, device="meta") for dt in
               (torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64, torch.int32,
                torch.uint8, torch.bool)]
    for value in values:
        assert cb.specialize_fallback(value) == cb.specialize(value), value


def test_occupancy_estimate():
    sm80, sm89, sm90 = (cb.TARGETS[t] for t in ("sm_80", "sm_89", "sm_90"))
    # 255 registers: 8,192 per warp, 8 warps fit in the register file; one 144 KB block per SM
    assert cb.estimated_warps_per_sm(sm80, 8, 255, 147_456) == 8
    assert cb.estimated_warps_per_sm(sm89, 8, 255, 147_456) == 0  # over sm_89's 99 KB per block
    # 96 registers, 4 warps, 24 KB: shared memory allows 9 blocks on sm_90, registers 5
    assert cb.estimated_warps_per_sm(sm90, 4, 96, 24_576) == 20
    # no registers or shared memory reported: the warp limit (sm_89: 48 warps per SM)
    assert cb.estimated_warps_per_sm(sm89, 1, None, 0) == 24  # and 24 blocks at most
    assert cb.estimated_warps_per_sm(sm90, 8, 32, 0) == 64
