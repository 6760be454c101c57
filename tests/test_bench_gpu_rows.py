"""The GPU speed rows of `longcot bench kernels --device cuda`, at the small shapes: without CUDA
they run on CPU tensors through Triton's interpreter (the code path the first GPU run takes)."""

import pytest
import torch

from longcot.bench.kernels import _assert_same, build_gpu_cases


def test_gpu_rows_small_run_and_agree(triton_interpreter):
    if torch.cuda.is_available():
        pytest.skip("compiled Triton here: the rows run at full size in `longcot bench kernels`")
    cases = build_gpu_cases(small=True)
    assert {c.op for c in cases} >= {"gae", "repetition_mask", "discounted_returns", "kl_penalty",
                                     "token_rewards", "ppo_policy_loss"}
    for case in cases:
        _assert_same(case.op, case.baseline(), case.longcot(), tol=1e-4, what="Triton")
