"""`longcot bench kernels`: each CPU op against the Python code RL frameworks run today.

Speed rows: the baseline of every row is the op's PyTorch reference, which is written the way
those frameworks write it (a per-sequence set-of-tuples loop for n-grams, a per-time-step loop
for returns and GAE); the longcot column is the public op with ``LONGCOT_KERNELS=cpu``. Both run
on the same inputs in the same process, their outputs are compared, and the ratio is baseline
time over longcot time.

Memory rows (`token_logprobs`, `linear_token_logprobs`, `linear_ppo_policy_loss`): eager
``log_softmax(logits.float()).gather`` (after ``logits = hidden @ weight.T`` for the linear ops,
then the reference PPO loss for the fused actor-update path) against the public op, each side in
a fresh subprocess so that its peak memory is its own: the peak resident set (``ru_maxrss``; on
CUDA ``max_memory_allocated``) minus what the process held once its inputs were built. Forward,
and forward + backward. The fused PPO row has a third column when Liger-Kernel is installed:
its ``LigerFusedLinearGRPOLoss`` with beta = 0 and the "bnpo" normalisation, which is the same
clipped token-mean loss (its advantages are per sequence, so the rows use per-sequence
advantages on every side). ``--device cuda`` runs them on CUDA tensors at the
GPU shapes; ``--device cuda --small`` without a GPU but with ``TRITON_INTERPRET=1`` runs the
same code path on CPU tensors through Triton's interpreter.

GPU speed rows (``--device cuda``, B = 512, T = 16,384): the Triton kernels against the
references on the same device (`gae` and `discounted_returns` per-time-step loops, `kl_penalty`,
`token_rewards`, `ppo_policy_loss` forward + backward in eager PyTorch), and `repetition_mask` /
`repetition_ratio` on the GPU against the C++ path on CPU tensors. CUDA work is synchronised
around every timed call.

Prints tables and writes JSON.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from longcot import kernels as K


@dataclass
class Case:
    op: str
    shape: str
    baseline: Callable[[], object]
    longcot: Callable[[], object]
    target: float | None  # minimum speed-up asked for at the full shapes (None: reported only)


@contextlib.contextmanager
def forced_backend(name: str) -> Iterator[None]:
    old = os.environ.get("LONGCOT_KERNELS")
    os.environ["LONGCOT_KERNELS"] = name
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("LONGCOT_KERNELS", None)
        else:
            os.environ["LONGCOT_KERNELS"] = old


def _random_lengths(gen: torch.Generator, batch: int, steps: int) -> torch.Tensor:
    # RL batches mix lengths; a quarter of the rows run to the full context.
    lengths = torch.randint(steps // 2, steps + 1, (batch,), generator=gen)
    lengths[: max(1, batch // 4)] = steps
    return lengths


def _looping_tokens(gen: torch.Generator, batch: int, steps: int) -> torch.Tensor:
    # A response that degenerates into a loop: a random prefix, then a 50-token cycle.
    prefix = min(512, steps // 4)
    tokens = torch.randint(0, 200, (batch, steps), generator=gen)
    cycle = torch.randint(0, 200, (batch, 50), generator=gen)
    idx = torch.arange(steps - prefix) % 50
    tokens[:, prefix:] = cycle[:, idx]
    return tokens


def build_cases(small: bool = False, seed: int = 0) -> list[Case]:
    """The benchmark rows; the full shapes are the foundation issue's B = 64, T = 8192."""
    batch, steps, n = (4, 256, 8) if small else (64, 8192, 40)
    gen = torch.Generator().manual_seed(seed)
    shape = f"B={batch} T={steps}"

    tokens = torch.randint(0, 200, (batch, steps), generator=gen)
    looping = _looping_tokens(gen, batch, steps)
    lengths = _random_lengths(gen, batch, steps)
    full = torch.full((batch,), steps, dtype=torch.long)
    mask = torch.arange(steps)[None, :] < lengths[:, None]
    rewards2 = torch.randn(batch, steps, 2, generator=gen)
    rewards = torch.randn(batch, steps, generator=gen)
    values = torch.randn(batch, steps, generator=gen)
    gammas = (1.0, 0.99)

    return [
        Case("repetition_mask", f"{shape} n={n} 200 ids",
             lambda: K.repetition_mask_reference(tokens, lengths, n),
             lambda: K.repetition_mask(tokens, lengths, n), 300.0),
        Case("repetition_mask", f"{shape} n={n} looping",
             lambda: K.repetition_mask_reference(looping, full, n),
             lambda: K.repetition_mask(looping, full, n), None),
        Case("repetition_ratio", f"{shape} n={n} 200 ids",
             lambda: K.repetition_ratio_reference(tokens, lengths, n),
             lambda: K.repetition_ratio(tokens, lengths, n), None),
        Case("discounted_returns", f"{shape} C=2",
             lambda: K.discounted_returns_reference(rewards2, mask, gammas),
             lambda: K.discounted_returns(rewards2, mask, gammas), 100.0),
        Case("gae", shape,
             lambda: K.gae_reference(rewards, values, mask, 1.0, 0.95),
             lambda: K.gae(rewards, values, mask, 1.0, 0.95), 50.0),
    ]



def _gpu_tensors(small: bool) -> tuple[str, str]:
    """(tensor device, LONGCOT_KERNELS for the longcot side) of the ``--device cuda`` rows: CUDA
    and ``auto``, or (``--small`` without a GPU) CPU tensors through Triton's interpreter."""
    on_gpu = torch.cuda.is_available()
    if not on_gpu and not small:
        raise SystemExit("longcot bench kernels --device cuda: no CUDA device (try --small "
                         "with TRITON_INTERPRET=1 to run the code path on the CPU)")
    if not on_gpu:
        from longcot.kernels.logprobs import triton_interpreted

        if not triton_interpreted():
            raise SystemExit("longcot bench kernels --device cuda --small without CUDA "
                             "needs TRITON_INTERPRET=1 (Triton's interpreter)")
    return ("cuda", "auto") if on_gpu else ("cpu", "triton")


def _with_backend(name: str, fn: Callable[[], object]) -> Callable[[], object]:
    def call():
        with forced_backend(name):
            return fn()

    return call


def _ppo_step(op: Callable, logp: torch.Tensor, *args) -> Callable[[], object]:
    def call():
        x = logp.detach().requires_grad_()
        loss, stats = op(x, *args)
        loss.backward()
        return loss.detach(), x.grad, *(stats[k] for k in sorted(stats))

    return call


def build_gpu_cases(small: bool = False, seed: int = 0) -> list[Case]:
    """The issue's GPU speed rows (``--device cuda``): B = 512, T = 16,384. The baselines are the
    per-time-step PyTorch references on the same device, and for `repetition_mask` the C++ path
    on the CPU (the tokens already in host memory: the round trip is not counted)."""
    device, backend = _gpu_tensors(small)
    batch, steps, n = (4, 48, 5) if small else (512, 16384, 40)
    gen = torch.Generator().manual_seed(seed)
    shape = f"B={batch} T={steps}"

    tokens_cpu = _looping_tokens(gen, batch, steps)
    lengths_cpu = _random_lengths(gen, batch, steps)
    tokens, lengths = tokens_cpu.to(device), lengths_cpu.to(device)
    mask = (torch.arange(steps)[None, :] < lengths_cpu[:, None]).to(device)

    def randn(*size):
        return torch.randn(*size, generator=gen).to(device)

    rewards, values, rewards2 = randn(batch, steps), randn(batch, steps), randn(batch, steps, 2)
    logp = -3 * torch.rand(batch, steps, generator=gen).to(device)
    ref_logp = logp + 0.1 * randn(batch, steps)
    old_logp = logp + 0.3 * randn(batch, steps)
    adv = randn(batch, steps)
    sparse, dense = randn(batch, 2), randn(batch, steps, 2)
    gammas = (1.0, 0.99)
    ppo_args = (old_logp, adv, mask, 0.2, 0.28, 3.0, "token-mean")
    fast = lambda fn: _with_backend(backend, fn)  # noqa: E731

    return [
        Case("gae", f"{shape} {device}",
             lambda: K.gae_reference(rewards, values, mask, 1.0, 0.95),
             fast(lambda: K.gae(rewards, values, mask, 1.0, 0.95)), 200.0),
        Case("repetition_mask", f"{shape} n={n} looping, vs C++ CPU",
             _with_backend("cpu", lambda: K.repetition_mask(tokens_cpu, lengths_cpu, n)),
             fast(lambda: K.repetition_mask(tokens, lengths, n)), 10.0),
        Case("repetition_ratio", f"{shape} n={n} looping, vs C++ CPU",
             _with_backend("cpu", lambda: K.repetition_ratio(tokens_cpu, lengths_cpu, n)),
             fast(lambda: K.repetition_ratio(tokens, lengths, n)), None),
        Case("discounted_returns", f"{shape} C=2 {device}",
             lambda: K.discounted_returns_reference(rewards2, mask, gammas),
             fast(lambda: K.discounted_returns(rewards2, mask, gammas)), None),
        Case("kl_penalty", f"{shape} k3 {device}",
             lambda: K.kl_penalty_reference(logp, ref_logp, "k3"),
             fast(lambda: K.kl_penalty(logp, ref_logp, "k3")), None),
        Case("token_rewards", f"{shape} C=2 k3 {device}",
             lambda: K.token_rewards_reference(sparse, dense, logp, ref_logp, mask, 0.05, "k3"),
             fast(lambda: K.token_rewards(sparse, dense, logp, ref_logp, mask, 0.05, "k3")), None),
        Case("ppo_policy_loss", f"{shape} fwd+bwd {device}",
             _ppo_step(K.ppo_policy_loss_reference, logp, *ppo_args),
             fast(_ppo_step(K.ppo_policy_loss, logp, *ppo_args)), None),
    ]

@dataclass
class MemCase:
    """One memory row: an op, forward or forward + backward, eager vs longcot in subprocesses."""

    op: str  # "token_logprobs", "linear_token_logprobs" or "linear_ppo_policy_loss"
    backward: bool
    n: int
    vocab: int
    hidden: int
    dtype: str
    device: str  # where the tensors live: "cpu" or "cuda"
    longcot_backend: str  # LONGCOT_KERNELS for the longcot side
    repeats: int  # timed calls after the first (0: the first call is the timed one)
    time_target: float | None  # longcot time / eager time at most this (None: reported only)
    mem_target: float | None  # longcot extra peak / eager extra peak at most this
    batch: int = 1  # linear_ppo_policy_loss: the N tokens as [batch, N / batch] responses

    @property
    def sides(self) -> list[str]:
        """The subprocesses of the row: eager, longcot, and the installed peers."""
        peers = ["liger"] if self.op == "linear_ppo_policy_loss" and liger_available() else []
        return ["eager", "longcot", *peers]

    @property
    def mode(self) -> str:
        return "fwd+bwd" if self.backward else "fwd"

    @property
    def shape(self) -> str:
        dims = f"N={self.n} V={self.vocab}"
        if self.op != "token_logprobs":
            dims += f" H={self.hidden}"
        if self.op == "linear_ppo_policy_loss":
            dims = f"B={self.batch} " + dims
        return f"{dims} {self.dtype}"


def liger_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("liger_kernel") is not None


def logprob_cases(device: str = "cpu", small: bool = False) -> list[MemCase]:
    """The issue's memory rows: CPU at N=4096, V=151,936, H=896 (fp32); CUDA at N=16,384,
    H=4096 (bf16). ``device="cuda"`` without CUDA (small runs only) uses CPU tensors and the
    Triton interpreter."""
    if device == "cuda":
        tensors, backend = _gpu_tensors(small)
        n, vocab, hidden, dtype = (64, 300, 32, "bfloat16") if small else (16384, 151936, 4096, "bfloat16")
        return [
            MemCase("token_logprobs", False, n, vocab, hidden, dtype, tensors, backend, 1 if small else 5, 1 / 3, None),
            MemCase("token_logprobs", True, n, vocab, hidden, dtype, tensors, backend, 1 if small else 3, None, None),
            MemCase("linear_token_logprobs", False, n, vocab, hidden, dtype, tensors, backend, 1 if small else 3, None, None),
            MemCase("linear_token_logprobs", True, n, vocab, hidden, dtype, tensors, backend, 1 if small else 3, None, None),
            # the actor update's path: the targets are on this row
            MemCase("linear_ppo_policy_loss", True, n, vocab, hidden, dtype, tensors, backend,
                    1 if small else 3, 1.1, 1 / 8, batch=4 if small else 16),
        ]
    if device != "cpu":
        raise ValueError(f"device: expected 'cpu' or 'cuda', got {device!r}")
    n, vocab, hidden = (256, 4096, 64) if small else (4096, 151936, 896)
    time_t, mem_t = (None, None) if small else (1.2, 0.02)
    return [
        MemCase("token_logprobs", False, n, vocab, hidden, "float32", "cpu", "auto", 2, time_t, mem_t),
        MemCase("token_logprobs", True, n, vocab, hidden, "float32", "cpu", "auto", 1, None, None),
        MemCase("linear_token_logprobs", False, n, vocab, hidden, "float32", "cpu", "auto",
                2 if small else 1, time_t, mem_t),
        # about a minute per call at full size on one core: the first call is the timed one
        MemCase("linear_token_logprobs", True, n, vocab, hidden, "float32", "cpu", "auto",
                2 if small else 0, None, None),
        MemCase("linear_ppo_policy_loss", True, n, vocab, hidden, "float32", "cpu", "auto",
                2 if small else 0, None, None, batch=4),
    ]


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # kB on Linux


def measure(spec: dict) -> dict:
    """Runs in a fresh process: builds the inputs, then times one side and takes its peak."""
    side, device, backward = spec["side"], spec["device"], spec["backward"]
    dtype = getattr(torch, spec["dtype"])
    n, vocab, hdim = spec["n"], spec["vocab"], spec["hidden"]
    gen = torch.Generator(device=device).manual_seed(0)

    ppo = spec["op"] == "linear_ppo_policy_loss"
    batch = spec.get("batch", 1)

    def make_inputs(n, vocab, hdim):
        shape = (batch, n // batch) if ppo else (n,)
        tokens = torch.randint(0, vocab, shape, generator=gen, device=device)
        g = torch.ones((), device=device) if ppo else torch.randn(n, generator=gen, device=device)
        if spec["op"] == "token_logprobs":
            inputs = [torch.randn(n, vocab, generator=gen, device=device, dtype=dtype).mul_(3)]
        else:
            inputs = [torch.randn(*shape, hdim, generator=gen, device=device, dtype=dtype),
                      torch.randn(vocab, hdim, generator=gen, device=device, dtype=dtype)
                      .mul_(hdim**-0.5)]
        ppo_args = ()
        if ppo:
            hidden, weight = inputs
            old = torch.empty(shape, device=device)
            with torch.no_grad():  # the current policy's log-probs, a few rows at a time so
                for rows in range(0, n // batch, 8):  # that this never sets the peak
                    logits = (hidden[:, rows:rows + 8] @ weight.T).float()
                    old[:, rows:rows + 8] = torch.log_softmax(logits, -1).gather(
                        -1, tokens[:, rows:rows + 8, None])[..., 0]
            old += 0.1 * torch.randn(shape, generator=gen, device=device)  # ratios near 1
            lengths = torch.randint(shape[1] // 2, shape[1] + 1, (batch,), generator=gen, device=device)
            mask = torch.arange(shape[1], device=device)[None, :] < lengths[:, None]
            ppo_args = (old, torch.randn(batch, generator=gen, device=device), mask)
        for x in inputs:
            x.requires_grad_(backward)
        return tokens, g, inputs, ppo_args

    # A first call at a tiny size loads the code, thread pools and allocator arenas the op
    # needs, so that the measured peak is the op's working memory at the real size.
    tokens, g, inputs, ppo_args = make_inputs(16 * batch, 256, 32)

    if side == "liger":
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

        # beta = 0 and "bnpo" (sum over the batch's valid tokens / their count): the same
        # clipped token-mean loss; torch.compile where Liger's users run it, on the GPU
        liger = LigerFusedLinearGRPOLoss(beta=0.0, use_ref_model=False, loss_type="bnpo",
                                         epsilon_low=0.2, epsilon_high=0.2, compiled=device == "cuda")

        def forward():
            old, adv, mask = ppo_args
            return liger(*inputs, tokens, mask.float(), adv, old_per_token_logps=old)[0]
    elif side == "eager":
        def forward():
            logits = inputs[0] if spec["op"] == "token_logprobs" else inputs[0] @ inputs[1].T
            logp = torch.log_softmax(logits.float(), -1).gather(-1, tokens[..., None])[..., 0]
            if not ppo:
                return logp
            old, adv, mask = ppo_args
            return K.ppo_policy_loss_reference(logp, old, adv[:, None].expand_as(old), mask)[0]
    else:
        op = getattr(K, spec["op"])

        def forward():
            if not ppo:
                return op(*inputs, tokens)
            old, adv, mask = ppo_args
            return op(*inputs, tokens, old, adv[:, None].expand_as(old), mask)[0]

    def step():
        for x in inputs:
            x.grad = None
        if not backward:
            with torch.no_grad():
                return forward(), []
        logp = forward()
        (logp * g).sum().backward()
        return logp.detach(), [x.grad for x in inputs]

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    step()
    tokens, g, inputs, ppo_args = make_inputs(n, vocab, hdim)
    sync()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_bytes()
    start = time.perf_counter()
    logp, grads = step()
    sync()
    times = [time.perf_counter() - start]
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else _peak_rss_bytes()
    result = {
        "extra_peak_bytes": max(0, peak - base),
        "input_bytes": sum(x.numel() * x.element_size() for x in inputs),
        "logp_sum": float(logp.double().sum()),
        "grad_norms": [float(gr.double().norm()) for gr in grads],
        "torch_threads": torch.get_num_threads(),
    }
    del logp, grads
    if spec["repeats"]:
        times = []
        for _ in range(spec["repeats"]):
            sync()
            start = time.perf_counter()
            step()
            sync()
            times.append(time.perf_counter() - start)
    result["seconds"] = min(times)
    if device == "cuda" and side == "longcot" and spec["op"] == "token_logprobs" and not backward:
        # what a device-to-device copy of the logits achieves, timed in the same process
        src = inputs[0].detach()
        dst = torch.empty_like(src)
        dst.copy_(src)
        sync()
        best = float("inf")
        for _ in range(max(3, spec["repeats"])):
            start = time.perf_counter()
            dst.copy_(src)
            sync()
            best = min(best, time.perf_counter() - start)
        nbytes = src.numel() * src.element_size()
        result["read_bandwidth"] = nbytes / result["seconds"]
        result["copy_bandwidth"] = 2 * nbytes / best  # read + write
    return result


def measure_in_subprocess(case: MemCase, side: str) -> dict:
    spec = {"op": case.op, "backward": case.backward, "n": case.n, "vocab": case.vocab,
            "hidden": case.hidden, "dtype": case.dtype, "device": case.device,
            "repeats": case.repeats, "side": side, "batch": case.batch}
    env = dict(os.environ)
    env["LONGCOT_KERNELS"] = case.longcot_backend if side == "longcot" else "reference"
    proc = subprocess.run(
        [sys.executable, "-m", "longcot.bench.kernels", "measure", json.dumps(spec)],
        env=env, capture_output=True, text=True,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{case.op} {case.mode} ({side}) failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _rel_diff(eager: dict, other: dict) -> float:
    """The largest relative difference of the loss / log-prob sum and the gradient norms."""
    pairs = [(eager["logp_sum"], other["logp_sum"])] + list(zip(eager["grad_norms"], other["grad_norms"]))
    return max(abs(e - o) / max(1.0, abs(e)) for e, o in pairs)


def _tolerance(case: MemCase) -> float:
    return 1e-3 if case.dtype != "float32" else 1e-4


def _check_same(case: MemCase, eager: dict, fast: dict) -> None:
    diff = _rel_diff(eager, fast)
    if diff > _tolerance(case):
        raise RuntimeError(f"{case.op} {case.mode}: longcot's result differs from eager's "
                           f"(relative difference {diff:.2e})")


def run_memory_rows(cases: list[MemCase], small: bool) -> list[dict]:
    rows = []
    print(f"\n{'op':<22} {'mode':<8} {'shape':<34} {'eager':>10} {'longcot':>10} {'time':>7} "
          f"{'eager +mem':>11} {'longcot +mem':>13} {'mem':>8}  targets")
    print("-" * 140)
    for case in cases:
        eager = measure_in_subprocess(case, "eager")
        fast = measure_in_subprocess(case, "longcot")
        _check_same(case, eager, fast)
        peers = {side: measure_in_subprocess(case, side) for side in case.sides[2:]}
        # a peer's result is compared and reported, not enforced: its numerics are its own
        peer_diffs = {side: _rel_diff(eager, peer) for side, peer in peers.items()}
        t_ratio = fast["seconds"] / eager["seconds"]
        m_ratio = fast["extra_peak_bytes"] / max(1, eager["extra_peak_bytes"])
        met_t = None if case.time_target is None or small else t_ratio <= case.time_target
        met_m = None if case.mem_target is None or small else m_ratio <= case.mem_target
        row = {
            "op": case.op, "mode": case.mode, "shape": case.shape, "device": case.device,
            "eager_s": eager["seconds"], "longcot_s": fast["seconds"], "time_ratio": t_ratio,
            "eager_extra_peak_bytes": eager["extra_peak_bytes"],
            "longcot_extra_peak_bytes": fast["extra_peak_bytes"], "mem_ratio": m_ratio,
            "input_bytes": eager["input_bytes"], "time_target": case.time_target,
            "mem_target": case.mem_target, "time_met": met_t, "mem_met": met_m,
            "timed_calls": max(1, case.repeats), "torch_threads": fast["torch_threads"],
        }
        for key in ("read_bandwidth", "copy_bandwidth"):
            if key in fast:
                row[key] = fast[key]
        for side, peer in peers.items():
            row.update({f"{side}_s": peer["seconds"], f"{side}_extra_peak_bytes": peer["extra_peak_bytes"],
                        f"{side}_time_ratio": peer["seconds"] / eager["seconds"],
                        f"{side}_mem_ratio": peer["extra_peak_bytes"] / max(1, eager["extra_peak_bytes"]),
                        f"{side}_rel_diff": peer_diffs[side]})
        rows.append(row)
        marks = []
        if case.time_target is not None:
            marks.append(f"time <= {case.time_target:.3g}x " + _mark(met_t))
        if case.mem_target is not None:
            marks.append(f"mem <= {case.mem_target:.3g}x " + _mark(met_m))
        if "read_bandwidth" in row:
            marks.append(f"read {row['read_bandwidth'] / 1e9:.0f} GB/s vs copy "
                         f"{row['copy_bandwidth'] / 1e9:.0f} GB/s")
        print(f"{case.op:<22} {case.mode:<8} {case.shape:<34} {_fmt_seconds(eager['seconds']):>10} "
              f"{_fmt_seconds(fast['seconds']):>10} {t_ratio:>6.2f}x "
              f"{_fmt_bytes(eager['extra_peak_bytes']):>11} {_fmt_bytes(fast['extra_peak_bytes']):>13} "
              f"{m_ratio:>7.2%}  {'; '.join(marks)}", flush=True)
        for side, peer in peers.items():
            name = {"liger": "Liger-Kernel"}.get(side, side)
            print(f"{'  ' + name:<22} {case.mode:<8} {'(same inputs; eager as above)':<34} {'':>10} "
                  f"{_fmt_seconds(peer['seconds']):>10} {row[side + '_time_ratio']:>6.2f}x {'':>11} "
                  f"{_fmt_bytes(peer['extra_peak_bytes']):>13} {row[side + '_mem_ratio']:>7.2%}  "
                  f"{'' if peer_diffs[side] <= _tolerance(case) else 'DIFFERS from eager'}", flush=True)
    return rows


def _mark(met: bool | None) -> str:
    return "" if met is None else ("ok" if met else "MISSED")


def _fmt_bytes(b: int) -> str:
    return f"{b / 2**30:.2f} GiB" if b >= 2**30 else f"{b / 2**20:.1f} MiB"


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def time_fn(fn: Callable[[], object], min_seconds: float, min_repeats: int) -> float:
    """Best wall time of repeated calls, after one warm-up call (CUDA work waited for)."""
    fn()
    best, spent, repeats = float("inf"), 0.0, 0
    while repeats < min_repeats or spent < min_seconds:
        _sync()
        start = time.perf_counter()
        fn()
        _sync()
        elapsed = time.perf_counter() - start
        best, spent, repeats = min(best, elapsed), spent + elapsed, repeats + 1
    return best


def _assert_same(op: str, expected: object, got: object, tol: float = 1e-6, what: str = "C++") -> None:
    exp = expected if isinstance(expected, tuple) else (expected,)
    out = got if isinstance(got, tuple) else (got,)
    for e, g in zip(exp, out):
        g = g.to(e.device)
        if e.dtype == torch.bool:
            ok = torch.equal(e, g)
        else:
            # Absolute error relative to the result's scale: the scans sum 16k fp32 terms, where
            # the reference's own round-off (~1e-3 at gamma 1) is above a fixed 1e-4.
            scale = max(1.0, e.abs().max().item()) if e.numel() else 1.0
            ok = torch.allclose(e, g, rtol=tol, atol=tol * scale)
        if not ok:
            raise RuntimeError(f"{op}: the {what} result differs from the baseline's")


def _fmt_seconds(s: float) -> str:
    return f"{s * 1e3:.3f} ms" if s < 1 else f"{s:.3f} s"


def run(device: str = "cpu", small: bool = False, json_path: str | None = None) -> int:
    """Runs the suite, prints the tables, writes JSON; returns 0 (1 if a full-size target failed).

    ``device="cpu"``: the C++ speed rows and the log-prob memory rows on CPU tensors.
    ``device="cuda"``: the GPU speed rows (`build_gpu_cases`: the Triton kernels against the
    references on the same device, `repetition_mask` against the C++ CPU path) and the log-prob
    rows, on CUDA tensors (or, small and without a GPU, on CPU tensors through Triton's
    interpreter)."""
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device: expected 'cpu' or 'cuda', got {device!r}")
    rows = []
    if device == "cpu":
        if not K.has_cpu_extension():
            raise SystemExit("longcot bench kernels: the C++ extension is not built (pip install -e .)")
        _print_header()
        with forced_backend("cpu"):
            for case in build_cases(small):
                expected, got = case.baseline(), case.longcot()
                _assert_same(case.op, expected, got)
                base = time_fn(case.baseline, min_seconds=0.5 if small else 2.0, min_repeats=3)
                fast = time_fn(case.longcot, min_seconds=0.2 if small else 1.0, min_repeats=10)
                rows.append(_speed_row(case, base, fast, small, 28))
    else:
        # Fused multiply-adds and reduction order differ from the references' separate ops.
        _print_header(40)
        for case in build_gpu_cases(small):
            _assert_same(case.op, case.baseline(), case.longcot(), tol=1e-4, what="Triton")
            base = time_fn(case.baseline, min_seconds=0.0 if small else 2.0, min_repeats=1 if small else 3)
            fast = time_fn(case.longcot, min_seconds=0.0 if small else 1.0, min_repeats=1 if small else 10)
            rows.append(_speed_row(case, base, fast, small, 40))
    memory_rows = run_memory_rows(logprob_cases(device, small), small)

    result = {
        "suite": "kernels",
        "device": device,
        "small": small,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "processor": _cpu_name(),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
        "rows": rows,
        "memory_rows": memory_rows,
    }
    path = Path(json_path or f"bench/out/kernels-{device}{'-small' if small else ''}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {path}")
    failed = any(r["met"] is False for r in rows) or any(
        r["time_met"] is False or r["mem_met"] is False for r in memory_rows
    )
    return 1 if failed else 0


def _speed_row(case, base: float, fast: float, small: bool, shape_width: int) -> dict:
    """Print one table row and return it for the JSON; targets are judged at full size only."""
    ratio = base / fast
    met = None if case.target is None or small else ratio >= case.target
    mark = "" if met is None else ("ok" if met else "MISSED")
    target = f">= {case.target:g}x" if case.target else "-"
    print(f"{case.op:<20} {case.shape:<{shape_width}} {_fmt_seconds(base):>12} "
          f"{_fmt_seconds(fast):>12} {ratio:>9.1f}x {target:>9} {mark}", flush=True)
    return {"op": case.op, "shape": case.shape, "baseline_s": base, "longcot_s": fast,
            "ratio": ratio, "target": case.target, "met": met}


def _print_header(shape_width: int = 28) -> None:
    print(f"{'op':<20} {'shape':<{shape_width}} {'baseline':>12} {'longcot':>12} {'ratio':>10} {'target':>9}")
    print("-" * (68 + shape_width))


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


if __name__ == "__main__":  # the subprocess side of the memory rows
    if len(sys.argv) != 3 or sys.argv[1] != "measure":
        raise SystemExit("usage: python -m longcot.bench.kernels measure SPEC_JSON")
    print(json.dumps(measure(json.loads(sys.argv[2]))))
