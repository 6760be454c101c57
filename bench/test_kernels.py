"""The kernel benchmark under pytest-benchmark: `pytest bench/test_kernels.py`.

Same rows as `longcot bench kernels`, each op timed twice (baseline and longcot) in the same
session, so pytest-benchmark's comparison table shows the pair side by side.
`LONGCOT_BENCH_SMALL=1` uses the small shapes.
"""

import os

import pytest

from longcot.bench.kernels import build_cases, forced_backend

CASES = build_cases(small=os.environ.get("LONGCOT_BENCH_SMALL") == "1")


@pytest.mark.parametrize("side", ["baseline", "longcot"])
@pytest.mark.parametrize("case", CASES, ids=[f"{c.op}[{c.shape}]" for c in CASES])
def test_kernel(benchmark, case, side):
    benchmark.group = f"{case.op} {case.shape}"
    with forced_backend("cpu"):
        benchmark(getattr(case, side))
