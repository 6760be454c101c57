"""The compiled Triton scan, KL/reward and PPO-loss kernels against the references (CUDA only).

Skipped without a CUDA device; run with `pytest -m gpu tests/test_gpu_kernels.py` on a GPU machine
(TRITON_INTERPRET unset, so the kernels are compiled). The references run on the same GPU.
"""

import pytest
import torch

import longcot.kernels as K

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.usefixtures("compiled_triton"),
]


def _right_padded(batch, steps, device="cuda"):
    lengths = torch.randint(0, steps + 1, (batch,), device=device)
    lengths[0], lengths[1] = steps, 0
    return torch.arange(steps, device=device)[None] < lengths[:, None]


# Fused multiply-adds on the GPU round differently from the reference's separate ops.
TOL = {"rtol": 1e-5, "atol": 1e-5}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gae_real_size(dtype):
    batch, steps = 64, 4099
    rewards = torch.randn(batch, steps, device="cuda").to(dtype)
    values = torch.randn(batch, steps, device="cuda").to(dtype)
    mask = _right_padded(batch, steps)
    got = K.gae(rewards, values, mask, 0.999, 0.95)
    expected = K.gae_reference(rewards, values, mask, 0.999, 0.95)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, **TOL)


def test_discounted_returns_real_size():
    batch, steps = 64, 4099
    rewards = torch.randn(batch, steps, 3, device="cuda")
    mask = _right_padded(batch, steps)
    gammas = [1.0, 0.99, 0.5]
    # Against float64: over thousands of steps the fp32 reference's own round-off is about the
    # tolerance, and the chunked scan's sums round differently from its serial loop.
    torch.testing.assert_close(
        K.discounted_returns(rewards, mask, gammas),
        K.discounted_returns_reference(rewards.double(), mask, gammas).float(),
        rtol=1e-5, atol=1e-4,
    )


@pytest.mark.parametrize("estimator", K.ESTIMATORS)
@pytest.mark.parametrize("clamp", [None, 1.0])
def test_kl_and_token_rewards_real_size(estimator, clamp):
    batch, steps, channels = 256, 8191, 2
    logp, ref = -3 * torch.rand(batch, steps, device="cuda"), -3 * torch.rand(batch, steps, device="cuda")
    mask = _right_padded(batch, steps)
    sparse = torch.randn(batch, channels, device="cuda")
    dense = torch.randn(batch, steps, channels, device="cuda")
    x, y = logp.clone().requires_grad_(), logp.clone().requires_grad_()
    got, expected = K.kl_penalty(x, ref, estimator, clamp), K.kl_penalty_reference(y, ref, estimator, clamp)
    assert "Triton" in type(got.grad_fn).__name__
    torch.testing.assert_close(got, expected, **TOL)
    weights = torch.rand(batch, steps, device="cuda")
    (got * weights).sum().backward()
    (expected * weights).sum().backward()
    torch.testing.assert_close(x.grad, y.grad, **TOL)
    got = K.token_rewards(sparse, dense, logp, ref, mask, 0.05, estimator, clamp)
    expected = K.token_rewards_reference(sparse, dense, logp, ref, mask, 0.05, estimator, clamp)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, **TOL)


@pytest.mark.parametrize("agg", K.AGGREGATIONS)
@pytest.mark.parametrize("dual_clip", [None, 3.0])
@pytest.mark.parametrize("ratio", K.RATIOS)
def test_ppo_policy_loss_real_size(agg, dual_clip, ratio):
    batch, steps = 128, 16_384
    logp = -3 * torch.rand(batch, steps, device="cuda")
    old = logp + 0.3 * torch.randn(batch, steps, device="cuda")
    adv = torch.randn(batch, steps, device="cuda")
    mask = _right_padded(batch, steps)
    x, y = logp.clone().requires_grad_(), logp.clone().requires_grad_()
    loss, stats = K.ppo_policy_loss(x, old, adv, mask, 0.2, 0.28, dual_clip, agg, ratio, 16_384.0)
    ref_loss, ref_stats = K.ppo_policy_loss_reference(y, old, adv, mask, 0.2, 0.28, dual_clip, agg, ratio, 16_384.0)
    assert "Triton" in type(loss.grad_fn).__name__
    torch.testing.assert_close(loss, ref_loss, rtol=1e-4, atol=1e-6)
    for name in ref_stats:
        torch.testing.assert_close(stats[name], ref_stats[name], rtol=1e-4, atol=1e-6)
    loss.backward()
    ref_loss.backward()
    torch.testing.assert_close(x.grad, y.grad, rtol=1e-4, atol=1e-9)


def _rep_tokens(batch, steps, alphabet, device="cuda"):
    # Random ids, then a loop (a 50-token cycle) from a quarter of the way in, as degenerate
    # long chains of thought do.
    tokens = torch.randint(0, alphabet, (batch, steps), device=device)
    cycle = torch.randint(0, alphabet, (batch, 50), device=device)
    start = steps // 4
    tokens[:, start:] = cycle[:, torch.arange(steps - start, device=device) % 50]
    return tokens


@pytest.mark.parametrize("only_start", [False, True])
@pytest.mark.parametrize("n, alphabet", [(40, 200), (3, 4), (1, 1000)])
def test_repetition_real_size(n, alphabet, only_start, monkeypatch):
    # B = 512, T = 16,384 against the C++ path (itself tested exact against the reference).
    batch, steps = 512, 16_384
    tokens = _rep_tokens(batch, steps, alphabet)
    lengths = torch.randint(0, steps + 1, (batch,), device="cuda")
    lengths[0], lengths[1], lengths[2] = steps, 0, n - 1
    mask = K.repetition_mask(tokens, lengths, n, only_start)
    ratio = K.repetition_ratio(tokens, lengths, n)
    assert mask.is_cuda and ratio.is_cuda
    monkeypatch.setenv("LONGCOT_KERNELS", "cpu")
    expected = K.repetition_mask(tokens.cpu(), lengths.cpu(), n, only_start)
    assert torch.equal(mask.cpu(), expected)
    assert torch.equal(ratio.cpu(), K.repetition_ratio(tokens.cpu(), lengths.cpu(), n))


@pytest.mark.parametrize("only_start", [False, True])
def test_repetition_against_reference_and_collisions(only_start):
    from longcot.kernels.repetition import repetition_mask_triton

    tokens = _rep_tokens(16, 700, 3)
    lengths = torch.randint(0, 701, (16,), device="cuda")
    for n in (1, 2, 5, 40, 800):
        expected = K.repetition_mask_reference(tokens.cpu(), lengths.cpu(), n, only_start)
        assert torch.equal(K.repetition_mask(tokens, lengths, n, only_start).cpu(), expected)
        # Keys cut to 2 bits: nearly every distinct n-gram collides; marks stay exact.
        got = repetition_mask_triton(tokens, lengths, n, only_start, key_mask=3)
        assert torch.equal(got.cpu(), expected)
