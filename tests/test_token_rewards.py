import math

import pytest
import torch

import longcot.kernels as K


def test_hand_case():
    # Two rows, T = 3, C = 2; row 0 has 2 valid tokens, row 1 has 3.
    sparse = torch.tensor([[1.0, 0.0], [-1.0, 0.5]])
    dense = torch.zeros(2, 3, 2)
    dense[0, 0, 1] = -0.05
    logp = torch.tensor([[-1.0, -1.0, -9.0], [-2.0, -2.0, -2.0]])
    ref = torch.tensor([[-1.5, -1.0, 0.0], [-2.0, -1.0, -2.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    rewards, kl = K.token_rewards(sparse, dense, logp, ref, mask, kl_coef=0.1, estimator="k1")
    torch.testing.assert_close(kl, torch.tensor([[0.5, 0.0, 0.0], [0.0, -1.0, 0.0]]))
    expected = torch.zeros(2, 3, 2)
    expected[0, 0] = torch.tensor([-0.025, -0.05 - 0.025])
    expected[0, 1] = torch.tensor([1.0, 0.0])
    expected[1, 1] = torch.tensor([0.05, 0.05])
    expected[1, 2] = torch.tensor([-1.0, 0.5])
    torch.testing.assert_close(rewards, expected)


def test_summed_return_is_reward_minus_beta_kl():
    batch, steps, channels = 4, 7, 3
    logp, ref = torch.randn(batch, steps), torch.randn(batch, steps)
    mask = torch.ones(batch, steps)
    mask[1, 4:] = 0
    mask[2] = 0  # an empty row gets nothing, not even its sparse reward
    sparse = torch.randn(batch, channels)
    rewards, kl = K.token_rewards(sparse, None, logp, ref, mask, 0.2, "k3")
    total = rewards.sum(-1).sum(-1)
    expected = sparse.sum(-1) - 0.2 * kl.sum(-1)
    expected[2] = 0
    torch.testing.assert_close(total, expected)
    assert (kl >= 0).all() and (kl[mask == 0] == 0).all()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"sparse": torch.zeros(2)}, "sparse: expected 2 dimensions"),
        ({"sparse": torch.zeros(3, 2)}, "sparse: expected 2 rows"),
        ({"dense": torch.zeros(2, 3, 3)}, r"dense: expected shape \(2, 3, 2\)"),
        ({"mask": torch.ones(2, 4)}, r"mask: expected shape \(2, 3\)"),
        ({"kl_coef": -1.0}, "kl_coef: expected a number >= 0"),
        ({"estimator": "k9"}, "estimator: expected one of"),
        ({"kl_clamp": 0.0}, "kl_clamp: expected None or a finite number > 0"),
    ],
)
def test_bad_input(kwargs, match):
    args = {
        "sparse": torch.zeros(2, 2), "dense": None, "logp": torch.zeros(2, 3),
        "ref_logp": torch.zeros(2, 3), "mask": torch.ones(2, 3), "kl_coef": 0.1, "estimator": "k1",
    }
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        K.token_rewards(**args)


def test_kl_clamp_bounds_the_reward_share():
    # logp - ref = -5: k3 = 142.4 would put -0.1 * 142.4 = -14.2 into the reward; clamped at 10 the
    # KL share is -1.0. The straight-through k3+ gives k3's values.
    sparse = torch.tensor([[1.0]])
    logp, ref = torch.tensor([[-6.0, -1.0]]), torch.tensor([[-1.0, -1.5]])
    mask = torch.ones(1, 2)
    k3 = math.exp(-0.5) + 0.5 - 1
    for est in ("k3", "k3+"):
        rewards, kl = K.token_rewards(sparse, None, logp, ref, mask, 0.1, est, kl_clamp=10.0)
        torch.testing.assert_close(kl, torch.tensor([[10.0, k3]]))
        torch.testing.assert_close(rewards, torch.tensor([[[-1.0], [1.0 - 0.1 * k3]]]))
    _, unclamped = K.token_rewards(sparse, None, logp, ref, mask, 0.1, "k3")
    assert unclamped[0, 0].item() == pytest.approx(math.exp(5) - 6, rel=1e-6)


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3", "k1+", "k3+"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_dense", [False, True])
def test_triton_interpreter_matches_reference(triton_interpreter, estimator, dtype, with_dense):
    # T = 37: three 16-step blocks; a full row, a fully masked row, a length-1 row, a length-20
    # row; C = 3 channels (padded to 4 in the kernel).
    batch, steps, channels = 4, 37, 3
    logp, ref = torch.randn(batch, steps).to(dtype), torch.randn(batch, steps).to(dtype)
    lengths = torch.tensor([steps, 0, 1, 20])
    mask = torch.arange(steps)[None] < lengths[:, None]
    sparse = torch.randn(batch, channels).to(dtype)
    dense = torch.randn(batch, steps, channels).to(dtype) if with_dense else None
    for clamp in (None, 0.75):  # 0.75 cuts some tokens of every estimator
        rewards, kl = K.token_rewards(sparse, dense, logp, ref, mask, 0.3, estimator, clamp)
        expected_rewards, expected_kl = K.token_rewards_reference(sparse, dense, logp, ref, mask, 0.3, estimator,
                                                                  clamp)
        assert rewards.dtype == kl.dtype == torch.float32
        torch.testing.assert_close(kl, expected_kl, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(rewards, expected_rewards, rtol=1e-6, atol=1e-6)
        assert (rewards[1] == 0).all() and (kl[1] == 0).all()
        if clamp is not None:
            assert 0 < (kl.abs() == clamp).sum() and kl.abs().max() <= clamp


@pytest.mark.parametrize("batch, steps, channels", [(1, 1, 1), (2, 1, 2), (2, 5, 0), (0, 4, 2)])
def test_triton_interpreter_edge_shapes(triton_interpreter, batch, steps, channels):
    logp, ref = torch.randn(batch, steps), torch.randn(batch, steps)
    mask = torch.ones(batch, steps, dtype=torch.int32)
    sparse = torch.randn(batch, channels)
    got = K.token_rewards(sparse, None, logp, ref, mask, 0.1, "k1")
    expected = K.token_rewards_reference(sparse, None, logp, ref, mask, 0.1, "k1")
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-6, atol=1e-6)
