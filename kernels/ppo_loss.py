"""PPO's clipped surrogate policy loss, with optional dual clip, sequence-level ratios and four
aggregations.

ratio = exp(logp - old_logp); per token, loss = max(-A * ratio, -A * clip(ratio, 1 - clip_low,
1 + clip_high)) (clip_high > clip_low is DAPO's "clip higher"). With ``dual_clip = c`` (> 1), tokens
with A < 0 are further capped at -A * c, so one very unlikely token cannot dominate the batch.

``ratio="sequence"`` is GSPO's sequence-level ratio in veRL's per-token form: every token of a
response takes the response's geometric-mean ratio s = exp(mean over its tokens of logp - old_logp)
as its value, with the gradient of its own log-prob (s_t = sg[s] * exp(logp_t - sg[logp_t])), so
clipping is decided per sequence. With ``seq-mean-token-mean`` (GSPO's aggregation) and one
advantage per response this is GSPO's gradient exactly; per-token advantages (a dense reward
channel) stay per token.

Aggregations over the masked tokens:
- ``token-mean``: mean over all valid tokens of the batch (long responses weigh more);
- ``seq-mean-token-mean``: mean per sequence, then over sequences (each response weighs the same);
- ``seq-mean-token-sum``: sum per sequence, then mean over sequences;
- ``seq-mean-token-sum-norm``: ``seq-mean-token-sum`` divided by a constant ``agg_norm`` (Dr.
  GRPO's normalisation by the generation budget, veRL's ``loss_scale_factor``; default: T, the
  width of the batch): every valid token weighs 1 / (responses x agg_norm), whatever the length
  of its response (no 1 / |o_i| length bias); pass a fixed agg_norm (the trainer passes
  rollout.max_new_tokens) so that the scale does not move with the batch's width.
The sequence means run over rows that have at least one valid token; an empty batch gives 0.
"""

from __future__ import annotations

import torch

from . import _checks
from ._backend import select
from .logprobs import check_triton_device, jit, tl, triton_interpreted

AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
RATIOS = ("token", "sequence")


def _check(logp, old_logp, advantages, mask, clip_low, clip_high, dual_clip, agg, ratio, agg_norm):
    logp = _checks.tensor("logp", logp)
    _checks.floating("logp", logp)
    for name, t in (("old_logp", old_logp), ("advantages", advantages), ("mask", mask)):
        t = _checks.tensor(name, t)
        _checks.same_shape(name, t, "logp", logp.shape)
        _checks.same_device(name, t, "logp", logp.device)
        if name != "mask":
            _checks.floating(name, t)
    agg = _checks.choice("agg", agg, AGGREGATIONS)
    ratio = _checks.choice("ratio", ratio, RATIOS)
    if agg != "token-mean":
        _checks.rank("logp", logp, 2, f"[B, T] for agg={agg!r}")
    if ratio == "sequence":
        _checks.rank("logp", logp, 2, "[B, T] for ratio='sequence'")
    agg_norm = _checks.optional_positive("agg_norm", agg_norm)
    if isinstance(clip_low, bool) or not isinstance(clip_low, (int, float)) or not 0 <= clip_low < 1:
        raise ValueError(f"clip_low: expected a number in [0, 1), got {clip_low!r}")
    if isinstance(clip_high, bool) or not isinstance(clip_high, (int, float)) or not clip_high >= 0:
        raise ValueError(f"clip_high: expected a number >= 0, got {clip_high!r}")
    if dual_clip is not None and (
        isinstance(dual_clip, bool) or not isinstance(dual_clip, (int, float)) or not dual_clip > 1
    ):
        raise ValueError(f"dual_clip: expected None or a number > 1, got {dual_clip!r}")
    return logp, old_logp, advantages, mask, float(clip_low), float(clip_high), dual_clip, agg, ratio, agg_norm


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp_min(1e-8)


def aggregate(loss: torch.Tensor, mask: torch.Tensor, agg: str, agg_norm: float | None = None) -> torch.Tensor:
    """Reduce per-token ``loss`` over the tokens where ``mask`` (fp32) is set."""
    if agg == "token-mean":
        return masked_mean(loss, mask)
    per_seq = (loss * mask).sum(-1)
    tokens = mask.sum(-1)
    if agg == "seq-mean-token-mean":
        per_seq = per_seq / tokens.clamp_min(1e-8)
    rows = (tokens > 0).to(loss.dtype)
    out = (per_seq * rows).sum() / rows.sum().clamp_min(1.0)
    if agg == "seq-mean-token-sum-norm":
        out = out / (agg_norm if agg_norm is not None else loss.shape[-1])
    return out


def ppo_policy_loss_reference(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: float | None = None,
    agg: str = "token-mean",
    ratio: str = "token",
    agg_norm: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    m = mask.float()
    adv = advantages.float()
    log_ratio = logp.float() - old_logp.float()
    if ratio == "sequence":
        seq = (log_ratio * m).sum(-1) / m.sum(-1).clamp_min(1.0)
        lp = logp.float()
        rho = torch.exp(lp - lp.detach() + seq.detach().unsqueeze(-1))
    else:
        rho = torch.exp(log_ratio)
    unclipped = -adv * rho
    clipped = -adv * rho.clamp(1.0 - clip_low, 1.0 + clip_high)
    loss = torch.maximum(unclipped, clipped)
    stats = {}
    if dual_clip is not None:
        capped = torch.where(adv < 0, torch.minimum(loss, -adv * dual_clip), loss)
        stats["dual_clip_frac"] = masked_mean((capped < loss).float(), m).detach()
        loss = capped
    stats["clip_frac"] = masked_mean((clipped > unclipped).float(), m).detach()
    stats["approx_kl"] = masked_mean(-log_ratio, m).detach()
    return aggregate(loss, m, agg, agg_norm), stats


# ---------------------------------------------------------------------------------------------
# Triton: the tokens as rows ([B, T] as is; any other shape, token-mean only, as rows of its last
# dimension). The forward kernel, one program per row, writes the row's masked sums (loss, mask,
# clipped tokens, -log ratio, dual-clipped tokens) and, for sequence ratios, the row's mean log
# ratio (a first pass over the row); the aggregation combines those [R] sums. The backward kernel,
# one program per row, writes d loss / d logp = g * w_row * m * d loss_t / d logp, with torch's
# subgradients at ties (maximum/minimum split the gradient in half, clamp passes it at the
# bounds). d ratio_t / d logp_t = ratio_t for both ratios, so only the ratio's value differs.

_N_SUMS = 6  # loss, mask, clip, -log ratio, dual clip, the row's mean log ratio (SEQ)


def _ppo_fwd_kernel(
    logp_ptr, old_ptr, adv_ptr, m_ptr, sums_ptr,
    T, lo, hi, dual,
    HAS_DUAL: tl.constexpr, SEQ: tl.constexpr, BLOCK_T: tl.constexpr, N_SUMS: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_T)
    seq_lr = 0.0
    if SEQ:
        acc_lr = tl.zeros((BLOCK_T,), tl.float32)
        acc_n = tl.zeros((BLOCK_T,), tl.float32)
        for t0 in range(0, T, BLOCK_T):
            cols = row * T + t0 + offs
            valid = (t0 + offs) < T
            m = tl.load(m_ptr + cols, mask=valid, other=0).to(tl.float32)
            log_ratio = tl.load(logp_ptr + cols, mask=valid, other=0).to(tl.float32) - tl.load(
                old_ptr + cols, mask=valid, other=0
            ).to(tl.float32)
            acc_lr += log_ratio * m
            acc_n += m
        seq_lr = tl.sum(acc_lr, 0) / tl.maximum(tl.sum(acc_n, 0), 1.0)
        tl.store(sums_ptr + row * N_SUMS + 5, seq_lr)
    acc_loss = tl.zeros((BLOCK_T,), tl.float32)
    acc_m = tl.zeros((BLOCK_T,), tl.float32)
    acc_clip = tl.zeros((BLOCK_T,), tl.float32)
    acc_kl = tl.zeros((BLOCK_T,), tl.float32)
    acc_dual = tl.zeros((BLOCK_T,), tl.float32)
    for t0 in range(0, T, BLOCK_T):
        cols = row * T + t0 + offs
        valid = (t0 + offs) < T
        m = tl.load(m_ptr + cols, mask=valid, other=0).to(tl.float32)
        adv = tl.load(adv_ptr + cols, mask=valid, other=0).to(tl.float32)
        log_ratio = tl.load(logp_ptr + cols, mask=valid, other=0).to(tl.float32) - tl.load(
            old_ptr + cols, mask=valid, other=0
        ).to(tl.float32)
        if SEQ:
            ratio = tl.exp(seq_lr + tl.zeros((BLOCK_T,), tl.float32))
        else:
            ratio = tl.exp(log_ratio)
        unclipped = -adv * ratio
        clipped = -adv * tl.minimum(tl.maximum(ratio, lo), hi)
        loss = tl.maximum(unclipped, clipped)
        if HAS_DUAL:
            capped = tl.where(adv < 0, tl.minimum(loss, -adv * dual), loss)
            acc_dual += tl.where(capped < loss, m, 0.0)
            loss = capped
        acc_loss += loss * m
        acc_m += m
        acc_clip += tl.where(clipped > unclipped, m, 0.0)
        acc_kl += -log_ratio * m
    tl.store(sums_ptr + row * N_SUMS, tl.sum(acc_loss, 0))
    tl.store(sums_ptr + row * N_SUMS + 1, tl.sum(acc_m, 0))
    tl.store(sums_ptr + row * N_SUMS + 2, tl.sum(acc_clip, 0))
    tl.store(sums_ptr + row * N_SUMS + 3, tl.sum(acc_kl, 0))
    tl.store(sums_ptr + row * N_SUMS + 4, tl.sum(acc_dual, 0))


def _ppo_bwd_kernel(
    logp_ptr, old_ptr, adv_ptr, m_ptr, sums_ptr, scale_ptr, grad_ptr,
    T, lo, hi, dual,
    HAS_DUAL: tl.constexpr, SEQ: tl.constexpr, BLOCK_T: tl.constexpr, N_SUMS: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_T)
    scale = tl.load(scale_ptr + row)  # g * the row's aggregation weight
    for t0 in range(0, T, BLOCK_T):
        cols = row * T + t0 + offs
        valid = (t0 + offs) < T
        m = tl.load(m_ptr + cols, mask=valid, other=0).to(tl.float32)
        adv = tl.load(adv_ptr + cols, mask=valid, other=0).to(tl.float32)
        if SEQ:
            ratio = tl.exp(tl.load(sums_ptr + row * N_SUMS + 5) + tl.zeros((BLOCK_T,), tl.float32))
        else:
            log_ratio = tl.load(logp_ptr + cols, mask=valid, other=0).to(tl.float32) - tl.load(
                old_ptr + cols, mask=valid, other=0
            ).to(tl.float32)
            ratio = tl.exp(log_ratio)
        unclipped = -adv * ratio
        clipped = -adv * tl.minimum(tl.maximum(ratio, lo), hi)
        g_unclipped = -adv * ratio
        g_clipped = tl.where((ratio >= lo) & (ratio <= hi), g_unclipped, 0.0)
        d = tl.where(
            unclipped > clipped,
            g_unclipped,
            tl.where(unclipped < clipped, g_clipped, 0.5 * (g_unclipped + g_clipped)),
        )
        if HAS_DUAL:
            loss = tl.maximum(unclipped, clipped)
            cap = -adv * dual
            d_capped = tl.where(loss < cap, d, tl.where(loss == cap, 0.5 * d, 0.0))
            d = tl.where(adv < 0, d_capped, d)
        tl.store(grad_ptr + cols, d * (m * scale), mask=valid)


def _ppo_rows(t: torch.Tensor) -> torch.Tensor:
    if t.dtype == torch.bool:
        t = t.view(torch.uint8)
    if t.dim() == 2:
        return t.contiguous()
    return t.reshape(-1, t.shape[-1]).contiguous() if t.dim() > 1 else t.reshape(1, -1).contiguous()


def _ppo_block_t(interpreted: bool) -> int:
    return 16 if interpreted else 1024


def _ppo_row_weights(sums: torch.Tensor, agg: str, agg_norm: float | None) -> torch.Tensor:
    """[R] weight of each row's masked per-token losses in the aggregated loss."""
    tokens = sums[:, 1]
    if agg == "token-mean":
        return (1.0 / tokens.sum().clamp_min(1e-8)).expand_as(tokens)
    rows = (tokens > 0).to(torch.float32)
    w = rows / rows.sum().clamp_min(1.0)
    if agg == "seq-mean-token-mean":
        w = w / tokens.clamp_min(1e-8)
    elif agg == "seq-mean-token-sum-norm":
        w = w / agg_norm
    return w


class _TritonPPOLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logp, old_logp, adv, mask, lo, hi, dual, agg, seq, agg_norm):
        rows, steps = logp.shape
        sums = torch.zeros(rows, _N_SUMS, dtype=torch.float32, device=logp.device)
        interpreted = triton_interpreted()
        if rows and steps:
            jit(_ppo_fwd_kernel)[(rows,)](
                logp, old_logp, adv, mask, sums, steps, lo, hi,
                float(dual) if dual is not None else 0.0,
                HAS_DUAL=dual is not None, SEQ=seq, BLOCK_T=_ppo_block_t(interpreted), N_SUMS=_N_SUMS,
            )
        tokens = sums[:, 1]
        denom = tokens.sum().clamp_min(1e-8)
        if agg == "token-mean":
            loss = sums[:, 0].sum() / denom
        else:
            per_seq = sums[:, 0]
            if agg == "seq-mean-token-mean":
                per_seq = per_seq / tokens.clamp_min(1e-8)
            nonempty = (tokens > 0).to(torch.float32)
            loss = (per_seq * nonempty).sum() / nonempty.sum().clamp_min(1.0)
            if agg == "seq-mean-token-sum-norm":
                loss = loss / agg_norm
        stats = sums[:, 2:5].sum(0) / denom  # clip_frac, approx_kl, dual_clip_frac
        ctx.save_for_backward(logp, old_logp, adv, mask, sums)
        ctx.lo, ctx.hi, ctx.dual, ctx.agg, ctx.seq, ctx.agg_norm = lo, hi, dual, agg, seq, agg_norm
        ctx.mark_non_differentiable(stats)
        return loss, stats

    @staticmethod
    def backward(ctx, g_loss, _g_stats):
        logp, old_logp, adv, mask, sums = ctx.saved_tensors
        if not ctx.needs_input_grad[0] or g_loss is None:
            return (None,) * 10
        rows, steps = logp.shape
        scale = (_ppo_row_weights(sums, ctx.agg, ctx.agg_norm) * g_loss.float()).contiguous()
        grad = torch.empty(rows, steps, dtype=torch.float32, device=logp.device)
        if rows and steps:
            jit(_ppo_bwd_kernel)[(rows,)](
                logp, old_logp, adv, mask, sums, scale, grad, steps, ctx.lo, ctx.hi,
                float(ctx.dual) if ctx.dual is not None else 0.0,
                HAS_DUAL=ctx.dual is not None, SEQ=ctx.seq, BLOCK_T=_ppo_block_t(triton_interpreted()),
                N_SUMS=_N_SUMS,
            )
        return (grad.to(logp.dtype),) + (None,) * 9


def ppo_policy_loss_triton(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: float | None = None,
    agg: str = "token-mean",
    ratio: str = "token",
    agg_norm: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The Triton path (CUDA, or the interpreter on CPU tensors). Inputs are not re-checked."""
    check_triton_device(logp)
    if agg_norm is None:
        agg_norm = float(logp.shape[-1])
    rows = [_ppo_rows(t) for t in (logp, old_logp, advantages, mask)]
    loss, stats = _TritonPPOLoss.apply(*rows, 1.0 - clip_low, 1.0 + clip_high, dual_clip, agg,
                                       ratio == "sequence", agg_norm)
    out = {}
    if dual_clip is not None:
        out["dual_clip_frac"] = stats[2]
    out["clip_frac"], out["approx_kl"] = stats[0], stats[1]
    return loss, out


def ppo_policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: float | None = None,
    agg: str = "token-mean",
    ratio: str = "token",
    agg_norm: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(loss, stats): a 0-dim fp32 loss, differentiable w.r.t. ``logp``, and detached 0-dim stats
    ``clip_frac`` (share of valid tokens where the clipped branch is taken), ``approx_kl`` (mean of
    old_logp - logp) and, with a dual clip, ``dual_clip_frac``.

    ``ratio``: ``token`` (PPO) or ``sequence`` (GSPO; see the module's docstring). ``agg_norm``:
    the constant of ``seq-mean-token-sum-norm`` (None: T, the batch's width); other aggregations
    ignore it."""
    args = _check(logp, old_logp, advantages, mask, clip_low, clip_high, dual_clip, agg, ratio, agg_norm)
    if select(args[0].device, cpu=False, triton=True, op="ppo_policy_loss") == "triton":
        return ppo_policy_loss_triton(*args)
    return ppo_policy_loss_reference(*args)
