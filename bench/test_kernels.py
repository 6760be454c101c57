"""The kernel benchmark under pytest-benchmark: `pytest bench/test_kernels.py`.

Same rows as `longcot bench kernels`, each op timed twice (baseline and longcot) in the same
session, so pytest-benchmark's comparison table shows the pair side by side. The log-prob memory
rows run each side in a subprocess (as `longcot bench kernels` does) and record the measured
times and peaks in the benchmark's extra_info.
`LONGCOT_BENCH_SMALL=1` uses the small shapes.
"""

import os

import pytest

from longcot.bench.kernels import build_cases, forced_backend, logprob_cases, measure_in_subprocess

CASES = build_cases(small=os.environ.get("LONGCOT_BENCH_SMALL") == "1")


@pytest.mark.parametrize("side", ["baseline", "longcot"])
@pytest.mark.parametrize("case", CASES, ids=[f"{c.op}[{c.shape}]" for c in CASES])
def test_kernel(benchmark, case, side):
    benchmark.group = f"{case.op} {case.shape}"
    with forced_backend("cpu"):
        benchmark(getattr(case, side))


MEM_CASES = logprob_cases(small=os.environ.get("LONGCOT_BENCH_SMALL") == "1")


@pytest.mark.parametrize("case", MEM_CASES, ids=[f"{c.op}[{c.mode} {c.shape}]" for c in MEM_CASES])
def test_logprob_memory(benchmark, case):
    """Eager vs longcot, each in its own subprocess (for its peak memory); one round."""
    benchmark.group = f"{case.op} {case.mode} {case.shape} (subprocesses)"
    eager, fast = benchmark.pedantic(
        lambda: (measure_in_subprocess(case, "eager"), measure_in_subprocess(case, "longcot")),
        rounds=1, iterations=1,
    )
    benchmark.extra_info.update({
        "eager_s": eager["seconds"], "longcot_s": fast["seconds"],
        "time_ratio": fast["seconds"] / eager["seconds"],
        "eager_extra_peak_bytes": eager["extra_peak_bytes"],
        "longcot_extra_peak_bytes": fast["extra_peak_bytes"],
    })
