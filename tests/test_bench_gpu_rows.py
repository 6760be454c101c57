"""The GPU speed rows of `longcot bench kernels --device cuda`, at the small shapes: without CUDA
they run on CPU tensors through Triton's interpreter (the code path the first GPU run takes)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from longcot.bench.kernels import _assert_same, build_gpu_cases, liger_available

LONGCOT = str(Path(sys.executable).with_name("longcot"))


def test_gpu_rows_small_run_and_agree(triton_interpreter):
    if torch.cuda.is_available():
        pytest.skip("compiled Triton here: the rows run at full size in `longcot bench kernels`")
    cases = build_gpu_cases(small=True)
    assert {c.op for c in cases} >= {"gae", "repetition_mask", "discounted_returns", "kl_penalty",
                                     "token_rewards", "ppo_policy_loss"}
    for case in cases:
        _assert_same(case.op, case.baseline(), case.longcot(), tol=1e-4, what="Triton")


def test_gpu_bench_small_runs_end_to_end(triton_interpreter, tmp_path):
    """`longcot bench kernels --device cuda --small`: every row, the memory rows' subprocesses
    and the Liger-Kernel column included, as the first GPU run will take it."""
    if torch.cuda.is_available():
        pytest.skip("compiled Triton here: run `longcot bench kernels --device cuda`")
    out = tmp_path / "k.json"
    proc = subprocess.run([LONGCOT, "bench", "kernels", "--device", "cuda", "--small", "--json", str(out)],
                          capture_output=True, text=True, env={**os.environ, "TRITON_INTERPRET": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    mem = {(r["op"], r["mode"]): r for r in data["memory_rows"]}
    fused = mem[("linear_ppo_policy_loss", "fwd+bwd")]
    assert fused["time_target"] == 1.1 and fused["mem_target"] == 1 / 8
    assert fused["longcot_s"] > 0 and fused["eager_extra_peak_bytes"] > 0
    if liger_available():
        assert fused["liger_s"] > 0 and fused["liger_rel_diff"] < 1e-3
        assert "Liger-Kernel" in proc.stdout
