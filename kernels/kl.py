"""Per-token KL estimators between the policy and the frozen reference (Schulman's k1, k2, k3).

With d = logp - ref_logp on tokens sampled from the policy: k1 = d (unbiased, can be negative),
k2 = d^2 / 2 (biased, low variance), k3 = exp(-d) + d - 1 (unbiased and non-negative).
"""

from __future__ import annotations

import torch

from . import _checks
from ._backend import select

ESTIMATORS = ("k1", "k2", "k3")


def _check(logp: object, ref_logp: object, estimator: object):
    logp = _checks.tensor("logp", logp)
    _checks.floating("logp", logp)
    ref_logp = _checks.tensor("ref_logp", ref_logp)
    _checks.floating("ref_logp", ref_logp)
    _checks.same_shape("ref_logp", ref_logp, "logp", logp.shape)
    _checks.same_device("ref_logp", ref_logp, "logp", logp.device)
    return logp, ref_logp, _checks.choice("estimator", estimator, ESTIMATORS)


def kl_penalty_reference(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    diff = logp.float() - ref_logp.float()
    if estimator == "k1":
        return diff
    if estimator == "k2":
        return 0.5 * diff.square()
    return torch.exp(-diff) + diff - 1.0


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token KL estimate, fp32, same shape as ``logp``."""
    logp, ref_logp, estimator = _check(logp, ref_logp, estimator)
    select(logp.device, cpu=False, triton=False)
    return kl_penalty_reference(logp, ref_logp, estimator)
