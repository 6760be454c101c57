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
