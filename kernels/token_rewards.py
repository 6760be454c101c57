"""Per-token, per-channel rewards of a batch of responses, and the per-token KL.

rewards[b, t, c] = sparse[b, c] at t = last valid token of b (0 elsewhere)
                 + dense[b, t, c]
                 - kl_coef * KL[b, t] / C            (the KL term split equally over channels)
all multiplied by the mask. KL is `kl_penalty(logp, ref_logp, estimator)`, masked. Splitting
the KL equally keeps the summed return the usual r - beta * KL whatever C is, while each share
is discounted with its channel's gamma (the paper's convention).
"""

from __future__ import annotations

import torch

from . import _checks
from ._backend import select
from .kl import ESTIMATORS, kl_penalty_reference


def _check(sparse, dense, logp, ref_logp, mask, kl_coef, estimator):
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
    return sparse, dense, logp, ref_logp, mask, float(kl_coef), _checks.choice("estimator", estimator, ESTIMATORS)


def token_rewards_reference(
    sparse: torch.Tensor,
    dense: torch.Tensor | None,
    logp: torch.Tensor,
    ref_logp: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
    estimator: str = "k1",
) -> tuple[torch.Tensor, torch.Tensor]:
    m = mask.float()
    batch, steps = logp.shape
    channels = sparse.shape[1]
    kl = kl_penalty_reference(logp, ref_logp, estimator) * m
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


def token_rewards(
    sparse: torch.Tensor,
    dense: torch.Tensor | None,
    logp: torch.Tensor,
    ref_logp: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
    estimator: str = "k1",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rewards [B, T, C], kl [B, T]), fp32. Rows must be right-padded: the sparse reward lands at
    position (number of valid tokens - 1)."""
    args = _check(sparse, dense, logp, ref_logp, mask, kl_coef, estimator)
    select(logp.device, cpu=False, triton=False)
    return token_rewards_reference(*args)
