"""PPO's clipped surrogate policy loss, with optional dual clip and three aggregations.

ratio = exp(logp - old_logp); per token, loss = max(-A * ratio, -A * clip(ratio, 1 - clip_low,
1 + clip_high)) (clip_high > clip_low is DAPO's "clip higher"). With ``dual_clip = c`` (> 1), tokens
with A < 0 are further capped at -A * c, so one very unlikely token cannot dominate the batch.

Aggregations over the masked tokens:
- ``token-mean``: mean over all valid tokens of the batch (long responses weigh more);
- ``seq-mean-token-mean``: mean per sequence, then over sequences (each response weighs the same);
- ``seq-mean-token-sum``: sum per sequence, then mean over sequences.
The sequence means run over rows that have at least one valid token; an empty batch gives 0.
"""

from __future__ import annotations

import torch

from . import _checks
from ._backend import select

AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")


def _check(logp, old_logp, advantages, mask, clip_low, clip_high, dual_clip, agg):
    logp = _checks.tensor("logp", logp)
    _checks.floating("logp", logp)
    for name, t in (("old_logp", old_logp), ("advantages", advantages), ("mask", mask)):
        t = _checks.tensor(name, t)
        _checks.same_shape(name, t, "logp", logp.shape)
        _checks.same_device(name, t, "logp", logp.device)
        if name != "mask":
            _checks.floating(name, t)
    agg = _checks.choice("agg", agg, AGGREGATIONS)
    if agg != "token-mean":
        _checks.rank("logp", logp, 2, f"[B, T] for agg={agg!r}")
    if isinstance(clip_low, bool) or not isinstance(clip_low, (int, float)) or not 0 <= clip_low < 1:
        raise ValueError(f"clip_low: expected a number in [0, 1), got {clip_low!r}")
    if isinstance(clip_high, bool) or not isinstance(clip_high, (int, float)) or not clip_high >= 0:
        raise ValueError(f"clip_high: expected a number >= 0, got {clip_high!r}")
    if dual_clip is not None and (
        isinstance(dual_clip, bool) or not isinstance(dual_clip, (int, float)) or not dual_clip > 1
    ):
        raise ValueError(f"dual_clip: expected None or a number > 1, got {dual_clip!r}")
    return logp, old_logp, advantages, mask, float(clip_low), float(clip_high), dual_clip, agg


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp_min(1e-8)


def aggregate(loss: torch.Tensor, mask: torch.Tensor, agg: str) -> torch.Tensor:
    """Reduce per-token ``loss`` over the tokens where ``mask`` (fp32) is set."""
    if agg == "token-mean":
        return masked_mean(loss, mask)
    per_seq = (loss * mask).sum(-1)
    tokens = mask.sum(-1)
    if agg == "seq-mean-token-mean":
        per_seq = per_seq / tokens.clamp_min(1e-8)
    rows = (tokens > 0).to(loss.dtype)
    return (per_seq * rows).sum() / rows.sum().clamp_min(1.0)


def ppo_policy_loss_reference(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: float | None = None,
    agg: str = "token-mean",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    m = mask.float()
    adv = advantages.float()
    log_ratio = logp.float() - old_logp.float()
    ratio = torch.exp(log_ratio)
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    loss = torch.maximum(unclipped, clipped)
    stats = {}
    if dual_clip is not None:
        capped = torch.where(adv < 0, torch.minimum(loss, -adv * dual_clip), loss)
        stats["dual_clip_frac"] = masked_mean((capped < loss).float(), m).detach()
        loss = capped
    stats["clip_frac"] = masked_mean((clipped > unclipped).float(), m).detach()
    stats["approx_kl"] = masked_mean(-log_ratio, m).detach()
    return aggregate(loss, m, agg), stats


def ppo_policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: float | None = None,
    agg: str = "token-mean",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(loss, stats): a 0-dim fp32 loss, differentiable w.r.t. ``logp``, and detached 0-dim stats
    ``clip_frac`` (share of valid tokens where the clipped branch is taken), ``approx_kl`` (mean of
    old_logp - logp) and, with a dual clip, ``dual_clip_frac``."""
    args = _check(logp, old_logp, advantages, mask, clip_low, clip_high, dual_clip, agg)
    select(args[0].device, cpu=False, triton=False)
    return ppo_policy_loss_reference(*args)
