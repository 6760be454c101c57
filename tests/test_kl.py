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


def _grads(fn, logp, ref, *args):
    x, y = logp.clone().requires_grad_(), ref.clone().requires_grad_()
    out = fn(x, y, *args)
    # Distinct weights per token, so that a gradient landing on the wrong token shows.
    (out * torch.linspace(0.5, 1.5, out.numel()).reshape(out.shape)).sum().backward()
    return out.detach(), x.grad, y.grad


def test_straight_through_values_and_k2_gradient():
    logp = torch.tensor([-1.0, -2.0, -0.5, -3.0])
    ref = torch.tensor([-1.5, -1.0, -0.5, -0.2])
    d = logp - ref
    w = torch.linspace(0.5, 1.5, 4)
    for est, base in (("k1+", "k1"), ("k3+", "k3")):
        value, g_logp, g_ref = _grads(K.kl_penalty, logp, ref, est)
        torch.testing.assert_close(value, K.kl_penalty(logp, ref, base))  # the base estimator's value
        torch.testing.assert_close(g_logp, w * d)  # k2's gradient: d (d^2 / 2) / d logp = d
        torch.testing.assert_close(g_ref, -w * d)
    # the plain estimators keep their own gradients
    torch.testing.assert_close(_grads(K.kl_penalty, logp, ref, "k1")[1], w)
    torch.testing.assert_close(_grads(K.kl_penalty, logp, ref, "k3")[1], w * (1 - torch.exp(-d)))


def test_clamp_bounds_values_and_zeroes_their_gradient():
    # logp - ref = -5: k3 = e^5 - 6 = 142.4 unclamped (the figure); k1 = -15 and k2 = 12.5
    # lie past 10 too; d = 0.5 stays inside; d = -100 overflows exp(-d) to inf.
    logp = torch.tensor([-6.0, -16.0, -1.0, -100.5])
    ref = torch.tensor([-1.0, -1.0, -1.5, -0.5])
    assert K.kl_penalty(logp, ref, "k3")[0].item() == pytest.approx(math.exp(5) - 6, rel=1e-6)
    w = torch.linspace(0.5, 1.5, 4)
    for est in ("k1", "k2", "k3", "k1+", "k3+"):
        for clamp in (10.0, 10):
            value, g_logp, g_ref = _grads(K.kl_penalty, logp, ref, est, clamp)
            raw = K.kl_penalty(logp, ref, est).detach()
            torch.testing.assert_close(value, raw.clamp(-10, 10))
            assert value.abs().max() <= 10 and torch.isfinite(g_logp).all()
            inside = raw.abs() <= 10
            assert (g_logp[~inside] == 0).all() and (g_ref[~inside] == 0).all()
            assert inside[2] and g_logp[2] != 0
            slope = _grads(K.kl_penalty, logp, ref, est)[1] / w
            torch.testing.assert_close(g_logp[inside], (w * slope)[inside])
    assert K.kl_penalty(logp, ref, "k1", 10.0)[1].item() == -10.0
    assert K.kl_penalty(logp, ref, "k3", 10.0)[0].item() == 10.0


def test_clamp_keeps_the_gradient_at_the_bound():
    # torch.clamp's rule: a value exactly at the bound passes its gradient.
    logp, ref = torch.tensor([2.0]), torch.tensor([0.0])
    value, g_logp, _ = _grads(K.kl_penalty, logp, ref, "k2", 2.0)
    assert value.item() == 2.0 and g_logp.item() == pytest.approx(0.5 * 2.0)


@pytest.mark.parametrize("clamp", [0, -1.0, float("inf"), True, "10"])
def test_bad_clamp(clamp):
    with pytest.raises(ValueError, match="clamp: expected None or a finite number > 0"):
        K.kl_penalty(torch.zeros(3), torch.zeros(3), "k1", clamp)


@pytest.mark.parametrize("estimator", K.ESTIMATORS)
@pytest.mark.parametrize("clamp", [None, 1.5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_interpreter_values_and_gradients(triton_interpreter, estimator, clamp, dtype):
    # 2 x 50 tokens with log-ratios up to +-6, so that clamp 1.5 cuts some of every estimator;
    # ref_logp is strided.
    logp = (3 * torch.randn(2, 50)).to(dtype)
    ref = (3 * torch.randn(50, 2)).to(dtype).t()
    assert "Triton" in type(K.kl_penalty(logp.requires_grad_(), ref, estimator, clamp).grad_fn).__name__
    got = _grads(K.kl_penalty, logp.detach(), ref, estimator, clamp)
    expected = _grads(K.kl_penalty_reference, logp.detach(), ref, estimator, clamp)
    assert got[0].dtype == torch.float32 and got[1].dtype == got[2].dtype == dtype
    if clamp is not None:
        assert 0 < (got[0].abs() == clamp).sum() < got[0].numel()
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)
