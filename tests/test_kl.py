import math

import pytest
import torch

import longcot.kernels as K


def test_hand_values():
    logp = torch.tensor([-1.0, -2.0, -0.5])
    ref = torch.tensor([-1.5, -1.0, -0.5])
    d = [0.5, -1.0, 0.0]
    torch.testing.assert_close(K.kl_penalty(logp, ref, "k1"), torch.tensor(d))
    torch.testing.assert_close(K.kl_penalty(logp, ref, "k2"), torch.tensor([0.5 * x * x for x in d]))
    torch.testing.assert_close(
        K.kl_penalty(logp, ref, "k3"), torch.tensor([math.exp(-x) + x - 1 for x in d])
    )


def test_k3_is_non_negative_and_fp32():
    logp, ref = torch.randn(100).to(torch.bfloat16), torch.randn(100).to(torch.bfloat16)
    k3 = K.kl_penalty(logp, ref, "k3")
    assert k3.dtype == torch.float32 and (k3 >= 0).all()


def test_k1_mean_estimates_true_kl():
    p = torch.softmax(torch.randn(8), 0)
    q = torch.softmax(torch.randn(8), 0)
    samples = torch.multinomial(p, 200_000, replacement=True, generator=torch.Generator().manual_seed(0))
    logp, ref = p.log()[samples], q.log()[samples]
    true_kl = (p * (p.log() - q.log())).sum().item()
    for est in ("k1", "k3"):
        assert K.kl_penalty(logp, ref, est).mean().item() == pytest.approx(true_kl, abs=0.02)


@pytest.mark.parametrize(
    "logp, ref, est, match",
    [
        (torch.zeros(3), torch.zeros(4), "k1", r"ref_logp: expected shape \(3,\)"),
        (torch.zeros(3), torch.zeros(3), "k4", "estimator: expected one of 'k1', 'k2', 'k3'"),
        (torch.zeros(3, dtype=torch.long), torch.zeros(3), "k1", "logp: expected a floating"),
    ],
)
def test_bad_input(logp, ref, est, match):
    with pytest.raises(ValueError, match=match):
        K.kl_penalty(logp, ref, est)


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_interpreter_matches_reference(triton_interpreter, estimator, dtype):
    # 2 x 50 = 100 tokens: two 64-wide blocks, the last one partial; the ref_logp is strided.
    logp = torch.randn(2, 50).to(dtype)
    ref = torch.randn(50, 2).to(dtype).t()
    got = K.kl_penalty(logp, ref, estimator)
    assert got.dtype == torch.float32 and got.shape == (2, 50)
    torch.testing.assert_close(got, K.kl_penalty_reference(logp, ref, estimator), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("shape", [(1,), (0,), (3, 1, 2)])
def test_triton_interpreter_shapes(triton_interpreter, shape):
    logp, ref = torch.randn(shape), torch.randn(shape)
    torch.testing.assert_close(K.kl_penalty(logp, ref, "k3"), K.kl_penalty_reference(logp, ref, "k3"))
