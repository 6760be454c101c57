import math

import pytest
import torch

import longcot.kernels as K


def test_per_token_hand_case():
    # ratios e^0.5 ~ 1.65 (A > 0: clipped at 1.2), e^-0.5 ~ 0.61 (A < 0: clipped at 0.8),
    # 1.0 (no clip); one padded token that must not count.
    lr = torch.tensor([[0.5, -0.5, 0.0, 3.0]])
    adv = torch.tensor([[1.0, -2.0, 0.5, 100.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    loss, stats = K.ppo_policy_loss(lr, torch.zeros_like(lr), adv, mask)
    per_token = [-1.0 * 1.2, max(2.0 * math.exp(-0.5), 2.0 * 0.8), -0.5]
    assert loss.item() == pytest.approx(sum(per_token) / 3, rel=1e-6)
    assert stats["clip_frac"].item() == pytest.approx(2 / 3)
    assert stats["approx_kl"].item() == pytest.approx(0.0, abs=1e-7)


def test_clip_high_and_dual_clip():
    lr = torch.tensor([[0.2, 2.0]])  # ratios 1.22, 7.39
    adv = torch.tensor([[1.0, -1.0]])
    mask = torch.ones(1, 2)
    loss, _ = K.ppo_policy_loss(lr, torch.zeros_like(lr), adv, mask, clip_low=0.2, clip_high=0.28)
    assert loss.item() == pytest.approx((-math.exp(0.2) + math.exp(2.0)) / 2, rel=1e-6)
    loss, stats = K.ppo_policy_loss(lr, torch.zeros_like(lr), adv, mask, 0.2, 0.28, dual_clip=3.0)
    assert loss.item() == pytest.approx((-math.exp(0.2) + 3.0) / 2, rel=1e-6)
    assert stats["dual_clip_frac"].item() == pytest.approx(0.5)


def test_aggregations():
    per_token = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0], [9.0, 9.0, 9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 0]])
    # ratio 1 and A = -loss makes the per-token loss equal to the values above.
    zeros = torch.zeros(3, 3)
    got = {
        agg: K.ppo_policy_loss(zeros, zeros, -per_token, mask, agg=agg)[0].item()
        for agg in K.AGGREGATIONS
    }
    assert got["token-mean"] == pytest.approx(10 / 4)
    assert got["seq-mean-token-mean"] == pytest.approx((2 + 4) / 2)  # the empty row is skipped
    assert got["seq-mean-token-sum"] == pytest.approx((6 + 4) / 2)
    # divided by a constant: T = 3 by default, or the given one
    assert got["seq-mean-token-sum-norm"] == pytest.approx((6 + 4) / 2 / 3)
    normed, _ = K.ppo_policy_loss(zeros, zeros, -per_token, mask, agg="seq-mean-token-sum-norm", agg_norm=16)
    assert normed.item() == pytest.approx((6 + 4) / 2 / 16)


def test_sequence_ratio_hand_case():
    # Row 0: log-ratios 0.3, 0.1, -0.1 -> s = e^0.1 = 1.105, inside [0.8, 1.2] for every token.
    # Row 1: 0.9, 0.3 (a padded 5.0 must not count) -> s = e^0.6 = 1.822: clipped where A > 0
    # (loss -1.2, no gradient), unclipped where A < 0 (loss 1.822, gradient -A * s).
    lr = torch.tensor([[0.3, 0.1, -0.1], [0.9, 0.3, 5.0]])
    adv = torch.tensor([[1.0, -1.0, 2.0], [1.0, -1.0, 7.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    logp = lr.clone().requires_grad_()
    loss, stats = K.ppo_policy_loss(logp, torch.zeros_like(lr), adv, mask, ratio="sequence")
    s0, s1 = math.exp(0.1), math.exp(0.6)
    per_token = [-s0, s0, -2 * s0, -1.2, s1]
    assert loss.item() == pytest.approx(sum(per_token) / 5, rel=1e-6)
    assert stats["clip_frac"].item() == pytest.approx(1 / 5)
    assert stats["approx_kl"].item() == pytest.approx(-(0.3 + 0.1 - 0.1 + 0.9 + 0.3) / 5, rel=1e-6)
    loss.backward()
    expected = torch.tensor([[-s0, s0, -2 * s0], [0.0, s1, 0.0]]) / 5
    torch.testing.assert_close(logp.grad, expected)


def test_sequence_ratio_is_gspo_with_one_advantage_per_response():
    # GSPO's objective: per response, max(-A s, -A clip(s)) with s = exp(mean log-ratio), averaged
    # over responses; its gradient flows through every token of s. The per-token form with
    # seq-mean-token-mean must give the same value and gradient.
    gen = torch.Generator().manual_seed(3)
    logp = -3 * torch.rand(4, 9, generator=gen)
    old = logp + 0.3 * torch.randn(4, 9, generator=gen)
    adv = torch.randn(4, 1, generator=gen).expand(4, 9)
    mask = torch.arange(9)[None] < torch.tensor([9, 5, 1, 7])[:, None]
    x, y = logp.clone().requires_grad_(), logp.clone().requires_grad_()
    loss, _ = K.ppo_policy_loss(x, old, adv, mask, 0.2, 0.28, agg="seq-mean-token-mean", ratio="sequence")
    m = mask.float()
    s = torch.exp(((y - old) * m).sum(-1) / m.sum(-1))
    a = adv[:, 0]
    gspo = torch.maximum(-a * s, -a * s.clamp(0.8, 1.28)).mean()
    torch.testing.assert_close(loss, gspo)
    loss.backward()
    gspo.backward()
    torch.testing.assert_close(x.grad, y.grad)
    assert (x.grad[~mask] == 0).all()


def test_fully_masked_batch_is_zero_not_nan():
    x = torch.randn(2, 3)
    for agg in K.AGGREGATIONS:
        loss, stats = K.ppo_policy_loss(x, x, x, torch.zeros(2, 3), agg=agg)
        assert loss.item() == 0.0 and stats["clip_frac"].item() == 0.0


def test_gradient_wrt_logp():
    logp = torch.randn(2, 4, requires_grad=True)
    old = logp.detach() + 0.05 * torch.randn(2, 4)
    adv = torch.randn(2, 4)
    loss, _ = K.ppo_policy_loss(logp, old, adv, torch.ones(2, 4))
    loss.backward()
    ratio = torch.exp(logp.detach() - old)
    inside = ((ratio > 0.8) & (ratio < 1.2)) | ((adv > 0) & (ratio <= 0.8)) | ((adv < 0) & (ratio >= 1.2))
    expected = torch.where(inside, -adv * ratio, torch.zeros(())) / 8
    torch.testing.assert_close(logp.grad, expected)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"agg": "mean"}, "agg: expected one of"),
        ({"clip_low": 1.0}, r"clip_low: expected a number in \[0, 1\)"),
        ({"clip_high": -0.1}, "clip_high: expected a number >= 0"),
        ({"dual_clip": 1.0}, "dual_clip: expected None or a number > 1"),
        ({"ratio": "seq"}, "ratio: expected one of 'token', 'sequence'"),
        ({"agg_norm": 0}, "agg_norm: expected None or a finite number > 0"),
    ],
)
def test_bad_options(kwargs, match):
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=match):
        K.ppo_policy_loss(x, x, x, x, **kwargs)


def test_bad_shapes():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"advantages: expected shape \(2, 3\)"):
        K.ppo_policy_loss(x, x, torch.zeros(3), x)
    with pytest.raises(ValueError, match="logp: expected 2 dimensions"):
        K.ppo_policy_loss(torch.zeros(6), torch.zeros(6), torch.zeros(6), torch.ones(6), agg="seq-mean-token-sum")
    with pytest.raises(ValueError, match=r"logp: expected 2 dimensions \[B, T\] for ratio='sequence'"):
        K.ppo_policy_loss(torch.zeros(6), torch.zeros(6), torch.zeros(6), torch.ones(6), ratio="sequence")


def _ppo_inputs(shape, dtype=torch.float32, seed=5):
    gen = torch.Generator().manual_seed(seed)
    logp = (-torch.rand(shape, generator=gen) * 3).to(dtype)
    old = (logp.float() + 0.4 * torch.randn(shape, generator=gen)).to(dtype)  # ratios around 1
    adv = torch.randn(shape, generator=gen).to(dtype)
    mask = torch.rand(shape, generator=gen) > 0.25
    return logp, old, adv, mask


def _compare_ppo(logp, old, adv, mask, **kwargs):
    x, y = logp.clone().requires_grad_(), logp.clone().requires_grad_()
    loss, stats = K.ppo_policy_loss(x, old, adv, mask, **kwargs)
    ref_loss, ref_stats = K.ppo_policy_loss_reference(y, old, adv, mask, **kwargs)
    assert "Triton" in type(loss.grad_fn).__name__
    assert loss.shape == () and loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert list(stats) == list(ref_stats)
    for name in stats:
        assert not stats[name].requires_grad
        torch.testing.assert_close(stats[name], ref_stats[name], rtol=1e-5, atol=1e-6)
    (3.0 * loss).backward()
    (3.0 * ref_loss).backward()
    assert x.grad.dtype == logp.dtype
    torch.testing.assert_close(x.grad, y.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("agg", K.AGGREGATIONS)
@pytest.mark.parametrize("dual_clip", [None, 2.0])
@pytest.mark.parametrize("ratio", K.RATIOS)
def test_triton_interpreter_matches_reference(triton_interpreter, agg, dual_clip, ratio):
    # T = 37: three 16-wide blocks; row 1 fully masked, row 2 of length 1. agg_norm is used by
    # seq-mean-token-sum-norm only.
    logp, old, adv, mask = _ppo_inputs((4, 37))
    mask[1] = False
    mask[2] = False
    mask[2, 0] = True
    _compare_ppo(logp, old, adv, mask, clip_low=0.2, clip_high=0.28, dual_clip=dual_clip, agg=agg, ratio=ratio,
                 agg_norm=50.0)


def test_triton_interpreter_bf16_and_float_mask(triton_interpreter):
    logp, old, adv, mask = _ppo_inputs((3, 20), torch.bfloat16)
    _compare_ppo(logp, old, adv, mask.float(), dual_clip=3.0, agg="seq-mean-token-mean")
    _compare_ppo(logp, old, adv, mask.float(), dual_clip=3.0, agg="seq-mean-token-sum-norm", ratio="sequence")


@pytest.mark.parametrize(
    "shape, agg", [((1, 1), "seq-mean-token-sum"), ((3, 1), "token-mean"), ((13,), "token-mean"),
                   ((2, 3, 5), "token-mean"), ((2, 5), "seq-mean-token-sum-norm")],
)
def test_triton_interpreter_shapes(triton_interpreter, shape, agg):
    _compare_ppo(*_ppo_inputs(shape), agg=agg)


def test_triton_interpreter_all_masked_and_non_contiguous(triton_interpreter):
    logp, old, adv, mask = _ppo_inputs((6, 4))
    loss, stats = K.ppo_policy_loss(logp, old, adv, torch.zeros_like(mask), agg="seq-mean-token-mean")
    assert loss.item() == 0.0 and stats["clip_frac"].item() == 0.0
    _compare_ppo(logp.t(), old.t(), adv.t(), mask.t(), dual_clip=1.5)


def test_triton_interpreter_ties_take_torch_subgradients(triton_interpreter):
    # ratio exactly 1 = the lower clip bound with clip_low = 0 (clamp passes the gradient there),
    # and A = 0 (maximum's tie splits it in half: both halves are 0 here).
    logp = torch.tensor([[0.0, 0.0, 0.5, -0.5]])
    adv = torch.tensor([[1.0, -2.0, 0.0, 0.0]])
    mask = torch.ones(1, 4)
    _compare_ppo(logp, torch.zeros_like(logp), adv, mask, clip_low=0.0, clip_high=0.0)
    _compare_ppo(logp, torch.zeros_like(logp), adv, mask, clip_low=0.0, clip_high=0.5, dual_clip=1.5)
