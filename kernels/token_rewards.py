"""Per-token, per-channel rewards of a batch of responses, and the per-token KL.

rewards[b, t, c] = sparse[b, c] at t = last valid token of b (0 elsewhere)
                 + dense[b, t, c]
                 - kl_coef * KL[b, t] / C            (the KL term split equally over channels)
all multiplied by the mask. KL is `kl_penalty(logp, ref_logp, estimator, kl_clamp)`, masked (the
straight-through ``k1+`` / ``k3+`` give k1's / k3's values: rewards carry no gradient). Splitting
the KL equally keeps the summed return the usual r - beta * KL whatever C is, while each share
is discounted with its channel's gamma (the paper's convention).
"""

from __future__ import annotations

import torch

from . import _checks
from ._backend import select
from .kl import ESTIMATORS, base_estimator, kl_penalty_reference
from .logprobs import check_triton_device, jit, tl, triton, triton_interpreted


def _check(sparse, dense, logp, ref_logp, mask, kl_coef, estimator, kl_clamp):
    sparse = _checks.tensor("sparse", sparse)
    _checks.rank("sparse", sparse, 2, "[B, C]")
    _checks.floating("sparse", sparse)
    logp = _checks.tensor("logp", logp)
    _checks.rank("logp", logp, 2, "[B, T]")
    _checks.floating("logp", logp)
    batch, steps = logp.shape
    if sparse.shape[0] != batch:
        raise ValueError(f"sparse: expected {batch} rows (logp.shape[0]), got shape {tuple(sparse.shape)}")
    if dense is not None:
        dense = _checks.tensor("dense", dense)
        _checks.floating("dense", dense)
        _checks.same_shape("dense", dense, "[B, T, C] from logp and sparse", (batch, steps, sparse.shape[1]))
    for name, t in (("ref_logp", ref_logp), ("mask", mask)):
        t = _checks.tensor(name, t)
        _checks.same_shape(name, t, "logp", logp.shape)
        _checks.same_device(name, t, "logp", logp.device)
    _checks.floating("ref_logp", ref_logp)
    if isinstance(kl_coef, bool) or not isinstance(kl_coef, (int, float)) or not kl_coef >= 0:
        raise ValueError(f"kl_coef: expected a number >= 0, got {kl_coef!r}")
    estimator = _checks.choice("estimator", estimator, ESTIMATORS)
    return sparse, dense, logp, ref_logp, mask, float(kl_coef), estimator, _checks.optional_positive("kl_clamp", kl_clamp)


def token_rewards_reference(
    sparse: torch.Tensor,
    dense: torch.Tensor | None,
    logp: torch.Tensor,
    ref_logp: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
    estimator: str = "k1",
    kl_clamp: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    m = mask.float()
    batch, steps = logp.shape
    channels = sparse.shape[1]
    kl = kl_penalty_reference(logp, ref_logp, estimator, kl_clamp) * m
    rewards = torch.zeros(batch, steps, channels, dtype=torch.float32, device=logp.device)
    lengths = (mask != 0).sum(-1)
    rows = torch.nonzero(lengths > 0).squeeze(-1)
    # The last valid position of a right-padded row is its length - 1.
    rewards[rows, lengths[rows] - 1] += sparse[rows].float()
    if dense is not None:
        rewards += dense.float()
    if channels:
        rewards -= (kl_coef / channels) * kl.unsqueeze(-1)
    return rewards * m.unsqueeze(-1), kl


# ---------------------------------------------------------------------------------------------
# Triton: one program per sequence, one pass over time in blocks of [BLOCK_T, C]: the per-token KL
# (masked), the dense channels minus each channel's KL share, all masked, while counting the valid
# tokens; then the last valid position is rewritten as (sparse + dense - share) * mask, the
# reference's order of operations.


def _token_rewards_kernel(
    sparse_ptr, dense_ptr, logp_ptr, ref_ptr, m_ptr, rewards_ptr, kl_ptr,
    T, C, share, clamp,
    stride_sb, stride_db, stride_dt, stride_lb, stride_rb, stride_mb,
    EST: tl.constexpr, HAS_CLAMP: tl.constexpr, HAS_DENSE: tl.constexpr, BLOCK_T: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_T)
    chans = tl.arange(0, BLOCK_C)
    cmask = chans < C
    count = tl.zeros((), tl.int32)
    for t0 in range(0, T, BLOCK_T):
        cols = t0 + offs
        valid = cols < T
        m = tl.load(m_ptr + row * stride_mb + cols, mask=valid, other=0).to(tl.float32)
        count += tl.sum((m != 0).to(tl.int32), 0)
        d = tl.load(logp_ptr + row * stride_lb + cols, mask=valid, other=0).to(tl.float32) - tl.load(
            ref_ptr + row * stride_lb + cols, mask=valid, other=0
        ).to(tl.float32)
        if EST == 1:
            d = 0.5 * (d * d)
        elif EST == 2:
            d = tl.exp(-d) + d - 1.0
        if HAS_CLAMP:
            d = tl.minimum(tl.maximum(d, -clamp), clamp)
        kl = d * m
        tl.store(kl_ptr + row * T + cols, kl, mask=valid)
        both = valid[:, None] & cmask[None, :]
        r = -(share * kl)[:, None] + tl.zeros((BLOCK_T, BLOCK_C), tl.float32)
        if HAS_DENSE:
            dense = tl.load(
                dense_ptr + row * stride_db + cols[:, None] * stride_dt + chans[None, :],
                mask=both, other=0,
            ).to(tl.float32)
            r = dense - (share * kl)[:, None]
        out = rewards_ptr + row * stride_rb + cols[:, None] * C + chans[None, :]
        tl.store(out, r * m[:, None], mask=both)
    if count > 0:
        last = count.to(tl.int64) - 1
        m = tl.load(m_ptr + row * stride_mb + last).to(tl.float32)
        kl = tl.load(kl_ptr + row * T + last)
        sp = tl.load(sparse_ptr + row * stride_sb + chans, mask=cmask, other=0).to(tl.float32)
        if HAS_DENSE:
            sp = sp + tl.load(
                dense_ptr + row * stride_db + last * stride_dt + chans, mask=cmask, other=0
            ).to(tl.float32)
        r = (sp - share * kl) * m
        tl.store(rewards_ptr + row * stride_rb + last * C + chans, r, mask=cmask)


def token_rewards_triton(
    sparse: torch.Tensor,
    dense: torch.Tensor | None,
    logp: torch.Tensor,
    ref_logp: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
    estimator: str = "k1",
    kl_clamp: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The Triton path (CUDA, or the interpreter on CPU tensors). Inputs are not re-checked."""
    check_triton_device(logp)
    batch, steps = logp.shape
    channels = sparse.shape[1]
    rewards = torch.empty(batch, steps, channels, dtype=torch.float32, device=logp.device)
    kl = torch.empty(batch, steps, dtype=torch.float32, device=logp.device)
    if not (batch and steps):
        return rewards, kl
    a, b = logp.contiguous(), ref_logp.contiguous()
    m = (mask.view(torch.uint8) if mask.dtype == torch.bool else mask).contiguous()
    sp = sparse.contiguous()
    dn = None if dense is None else dense.contiguous()
    interpreted = triton_interpreted()
    jit(_token_rewards_kernel)[(batch,)](
        sp, a if dn is None else dn, a, b, m, rewards, kl,
        steps, channels, kl_coef / channels if channels else 0.0, 0.0 if kl_clamp is None else kl_clamp,
        sp.stride(0), 0 if dn is None else dn.stride(0), 0 if dn is None else dn.stride(1),
        a.stride(0), rewards.stride(0), m.stride(0),
        EST=("k1", "k2", "k3").index(base_estimator(estimator)), HAS_CLAMP=kl_clamp is not None,
        HAS_DENSE=dn is not None,
        BLOCK_T=16 if interpreted else 256, BLOCK_C=triton.next_power_of_2(max(channels, 1)),
    )
    return rewards, kl


def token_rewards(
    sparse: torch.Tensor,
    dense: torch.Tensor | None,
    logp: torch.Tensor,
    ref_logp: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
    estimator: str = "k1",
    kl_clamp: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rewards [B, T, C], kl [B, T]), fp32. Rows must be right-padded: the sparse reward lands at
    position (number of valid tokens - 1). ``kl_clamp``: None, or the bound c of each token's KL
    estimate to [-c, c] (see ``kl_penalty``)."""
    args = _check(sparse, dense, logp, ref_logp, mask, kl_coef, estimator, kl_clamp)
    if select(logp.device, cpu=False, triton=True, op="token_rewards") == "triton":
        return token_rewards_triton(*args)
    return token_rewards_reference(*args)
