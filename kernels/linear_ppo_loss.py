"""The actor update's loss straight from hidden states: hidden -> log-probs -> clipped PPO loss.

Only the valid (masked-in) positions go through `linear_token_logprobs`, so padding costs no
vocabulary work, and on the chunked CPU path and the Triton path the [tokens x vocab] logits are
never held, forward or backward (the Triton backward holds the d logits of one vocabulary chunk,
about ``BWD_CHUNK_BYTES``, at a time). The reference materialises them, as eager code does.
"""

from __future__ import annotations

import torch

from . import _checks
from .linear_logprobs import linear_token_logprobs, linear_token_logprobs_reference
from .ppo_loss import ppo_policy_loss, ppo_policy_loss_reference


def _check(hidden: object, weight: object, tokens: object, mask: object):
    hidden = _checks.tensor("hidden", hidden)
    _checks.rank("hidden", hidden, 3, "[B, T, H]")
    tokens = _checks.tensor("tokens", tokens)
    _checks.same_shape("tokens", tokens, "hidden.shape[:2]", hidden.shape[:2])
    mask = _checks.tensor("mask", mask)
    _checks.same_shape("mask", mask, "hidden.shape[:2]", hidden.shape[:2])
    return hidden, weight, tokens, mask.bool()


def _scatter(valid: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.zeros(mask.shape, dtype=valid.dtype, device=valid.device).masked_scatter(mask, valid)


def linear_ppo_policy_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    tokens: torch.Tensor,
    old_logp: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    temperature: float = 1.0,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: float | None = None,
    agg: str = "token-mean",
    return_entropy: bool = False,
    ratio: str = "token",
    agg_norm: float | None = None,
):
    """``ppo_policy_loss`` of the log-probs of ``tokens`` under softmax(hidden @ weight.T / T).

    Shapes: hidden [B, T, H], weight [V, H], tokens/old_logp/advantages/mask [B, T].
    ``old_logp=None``: the update is on-policy (one update per rollout), so the old log-probs are
    these log-probs, detached: the ratio is exactly 1 and no separate forward is needed. Returns
    ``(loss, stats)`` like ``ppo_policy_loss``, with ``stats["logp"]`` (fp32 [B, T], 0 at padding,
    differentiable) and, with ``return_entropy``, ``stats["entropy"]`` (the same, for entropy
    bonuses). ``ratio`` and ``agg_norm`` as in ``ppo_policy_loss``. Differentiable with respect
    to hidden and weight.
    """
    hidden, weight, tokens, m = _check(hidden, weight, tokens, mask)
    out = linear_token_logprobs(hidden[m], weight, tokens[m], temperature, return_entropy)
    return _finish(out, m, mask, old_logp, advantages, clip_low, clip_high, dual_clip, agg,
                   return_entropy, ppo_policy_loss, ratio, agg_norm)


def linear_ppo_policy_loss_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    tokens: torch.Tensor,
    old_logp: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    temperature: float = 1.0,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: float | None = None,
    agg: str = "token-mean",
    return_entropy: bool = False,
    ratio: str = "token",
    agg_norm: float | None = None,
):
    hidden, weight, tokens, m = _check(hidden, weight, tokens, mask)
    out = linear_token_logprobs_reference(hidden[m], weight, tokens[m], temperature, return_entropy)
    return _finish(out, m, mask, old_logp, advantages, clip_low, clip_high, dual_clip, agg,
                   return_entropy, ppo_policy_loss_reference, ratio, agg_norm)


def _finish(out, m, mask, old_logp, advantages, clip_low, clip_high, dual_clip, agg, return_entropy, loss_fn,
            ratio, agg_norm):
    logp_valid, ent_valid = out if return_entropy else (out, None)
    logp = _scatter(logp_valid, m)
    old = logp.detach() if old_logp is None else old_logp
    loss, stats = loss_fn(logp, old, advantages, mask, clip_low, clip_high, dual_clip, agg, ratio, agg_norm)
    stats = {**stats, "logp": logp}
    if ent_valid is not None:
        stats["entropy"] = _scatter(ent_valid, m)
    return loss, stats
