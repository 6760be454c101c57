import pytest
import torch

import longcot.kernels as K
import longcot.kernels.linear_logprobs as LL
from conftest import kernels_backend


def _inputs(batch=3, steps=5, hidden=8, vocab=37, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(batch, steps, hidden, generator=g)
    w = torch.randn(vocab, hidden, generator=g) * 0.5
    tokens = torch.randint(vocab, (batch, steps), generator=g)
    lengths = torch.tensor([steps, 1, 0][:batch])
    mask = torch.arange(steps)[None, :] < lengths[:, None]
    old = -torch.rand(batch, steps, generator=g) * 3
    adv = torch.randn(batch, steps, generator=g)
    return h, w, tokens, old, adv, mask


def _run(fn, h, w, *rest, **kwargs):
    h, w = h.clone().requires_grad_(), w.clone().requires_grad_()
    loss, stats = fn(h, w, *rest, **kwargs)
    total = loss + (stats["entropy"].sum() * 0.1 if "entropy" in stats else 0)
    total.backward()
    return loss, stats, h.grad, w.grad


@pytest.mark.parametrize("agg", K.AGGREGATIONS)
@pytest.mark.parametrize("entropy", [False, True])
@pytest.mark.parametrize("ratio", K.RATIOS)
def test_matches_reference_and_the_two_step_composition(monkeypatch, agg, entropy, ratio):
    # A one-row-per-tile budget forces the chunked (never [N, V]) CPU path.
    monkeypatch.setattr(LL, "CHUNK_BYTES", 4 * 37)
    h, w, tokens, old, adv, mask = _inputs()
    kw = dict(temperature=0.7, dual_clip=3.0, agg=agg, return_entropy=entropy, ratio=ratio, agg_norm=4.0)
    got = _run(K.linear_ppo_policy_loss, h, w, tokens, old, adv, mask, **kw)
    ref = _run(K.linear_ppo_policy_loss_reference, h, w, tokens, old, adv, mask, **kw)
    for a, b in zip(got[2:], ref[2:]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[0], ref[0], rtol=1e-5, atol=1e-6)
    assert set(got[1]) == set(ref[1])
    for name in got[1]:
        torch.testing.assert_close(got[1][name], ref[1][name], rtol=1e-5, atol=1e-6)
    # The same as computing log-probs from explicit logits, then the PPO loss.
    logits = h @ w.T
    logp = K.token_logprobs_reference(logits, tokens, 0.7) * mask
    loss, _ = K.ppo_policy_loss_reference(logp, old, adv, mask, 0.2, 0.2, 3.0, agg, ratio, 4.0)
    torch.testing.assert_close(got[0], loss, rtol=1e-5, atol=1e-6)
    assert torch.all(got[1]["logp"][~mask] == 0)


@pytest.mark.parametrize("kw", [{}, {"agg": "seq-mean-token-sum-norm", "agg_norm": 6.0, "ratio": "sequence"}])
def test_triton_interpreter_matches_reference(triton_interpreter, kw):
    h, w, tokens, old, adv, mask = _inputs(steps=4, hidden=16, vocab=40)
    with kernels_backend("triton"):
        got = _run(K.linear_ppo_policy_loss, h, w, tokens, old, adv, mask, temperature=0.7, **kw)
    ref = _run(K.linear_ppo_policy_loss_reference, h, w, tokens, old, adv, mask, temperature=0.7, **kw)
    for a, b in zip(got[:1] + got[2:], ref[:1] + ref[2:]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_bad_shapes_name_the_argument():
    h, w, tokens, old, adv, mask = _inputs()
    with pytest.raises(ValueError, match="hidden"):
        K.linear_ppo_policy_loss(h[0], w, tokens, old, adv, mask)
    with pytest.raises(ValueError, match="tokens"):
        K.linear_ppo_policy_loss(h, w, tokens[:, :2], old, adv, mask)
    with pytest.raises(ValueError, match="mask"):
        K.linear_ppo_policy_loss(h, w, tokens, old, adv, mask[:2])
    with pytest.raises(ValueError, match="old_logp"):
        K.linear_ppo_policy_loss(h, w, tokens, old[:, :2], adv, mask)
