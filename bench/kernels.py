"""`longcot bench kernels`: each CPU op against the Python code RL frameworks run today.

The baseline of every row is the op's PyTorch reference, which is written the way those
frameworks write it (a per-sequence set-of-tuples loop for n-grams, a per-time-step loop for
returns and GAE); the longcot column is the public op with ``LONGCOT_KERNELS=cpu``. Both run on
the same inputs in the same process, their outputs are compared, and the ratio is baseline time
over longcot time. Prints a table and writes JSON.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import platform
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


def time_fn(fn: Callable[[], object], min_seconds: float, min_repeats: int) -> float:
    """Best wall time of repeated calls, after one warm-up call."""
    fn()
    best, spent, repeats = float("inf"), 0.0, 0
    while repeats < min_repeats or spent < min_seconds:
        start = time.perf_counter()
        fn()
        elapsed = time.perf_counter() - start
        best, spent, repeats = min(best, elapsed), spent + elapsed, repeats + 1
    return best


def _assert_same(op: str, expected: object, got: object) -> None:
    exp = expected if isinstance(expected, tuple) else (expected,)
    out = got if isinstance(got, tuple) else (got,)
    for e, g in zip(exp, out):
        if e.dtype == torch.bool:
            ok = torch.equal(e, g)
        else:
            ok = torch.allclose(e, g, rtol=1e-6, atol=1e-6)
        if not ok:
            raise RuntimeError(f"{op}: the C++ result differs from the reference")


def _fmt_seconds(s: float) -> str:
    return f"{s * 1e3:.3f} ms" if s < 1 else f"{s:.3f} s"


def run(device: str = "cpu", small: bool = False, json_path: str | None = None) -> int:
    """Runs the suite, prints the table, writes JSON; returns 0 (1 if a full-size target failed)."""
    if device != "cpu":
        raise ValueError(f"device: only 'cpu' is benchmarked by this suite, got {device!r}")
    if not K.has_cpu_extension():
        raise SystemExit("longcot bench kernels: the C++ extension is not built (pip install -e .)")
    rows = []
    _print_header()
    with forced_backend("cpu"):
        for case in build_cases(small):
            expected, got = case.baseline(), case.longcot()
            _assert_same(case.op, expected, got)
            base = time_fn(case.baseline, min_seconds=0.5 if small else 2.0, min_repeats=3)
            fast = time_fn(case.longcot, min_seconds=0.2 if small else 1.0, min_repeats=10)
            ratio = base / fast
            met = None if case.target is None or small else ratio >= case.target
            rows.append({
                "op": case.op, "shape": case.shape, "baseline_s": base, "longcot_s": fast,
                "ratio": ratio, "target": case.target, "met": met,
            })
            mark = "" if met is None else ("ok" if met else "MISSED")
            target = f">= {case.target:g}x" if case.target else "-"
            print(f"{case.op:<20} {case.shape:<28} {_fmt_seconds(base):>12} "
                  f"{_fmt_seconds(fast):>12} {ratio:>9.1f}x {target:>9} {mark}", flush=True)

    result = {
        "suite": "kernels",
        "device": device,
        "small": small,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "processor": _cpu_name(),
            "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
        "rows": rows,
    }
    path = Path(json_path or f"bench/out/kernels-{device}{'-small' if small else ''}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {path}")
    return 1 if any(r["met"] is False for r in rows) else 0


def _print_header() -> None:
    print(f"{'op':<20} {'shape':<28} {'baseline':>12} {'longcot':>12} {'ratio':>10} {'target':>9}")
    print("-" * 96)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
