"""Per-token KL estimators between the policy and the frozen reference (Schulman's k1, k2, k3).

With d = logp - ref_logp on tokens sampled from the policy: k1 = d (unbiased, can be negative),
k2 = d^2 / 2 (biased, low variance), k3 = exp(-d) + d - 1 (unbiased and non-negative).
"""

from __future__ import annotations

import torch

from . import _checks
from ._backend import select
from .logprobs import check_triton_device, jit, tl, triton_interpreted

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


# ---------------------------------------------------------------------------------------------
# Triton: elementwise over the flattened tokens. The estimator is a constexpr (0, 1, 2 for k1, k2,
# k3); token_rewards' kernel computes the same expressions in the same order.


def _kl_kernel(logp_ptr, ref_ptr, out_ptr, N, EST: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = offs < N
    d = tl.load(logp_ptr + offs, mask=valid, other=0).to(tl.float32) - tl.load(
        ref_ptr + offs, mask=valid, other=0
    ).to(tl.float32)
    if EST == 1:
        d = 0.5 * (d * d)
    elif EST == 2:
        d = tl.exp(-d) + d - 1.0
    tl.store(out_ptr + offs, d, mask=valid)


def kl_penalty_triton(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """The Triton path (CUDA, or the interpreter on CPU tensors). Inputs are not re-checked."""
    check_triton_device(logp)
    a, b = logp.contiguous(), ref_logp.contiguous()
    out = torch.empty(logp.shape, dtype=torch.float32, device=logp.device)
    n = out.numel()
    block = 64 if triton_interpreted() else 1024
    if n:
        jit(_kl_kernel)[((n + block - 1) // block,)](
            a, b, out, n, EST=ESTIMATORS.index(estimator), BLOCK=block
        )
    return out


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token KL estimate, fp32, same shape as ``logp``."""
    logp, ref_logp, estimator = _check(logp, ref_logp, estimator)
    if select(logp.device, cpu=False, triton=True, op="kl_penalty") == "triton":
        return kl_penalty_triton(logp, ref_logp, estimator)
    return kl_penalty_reference(logp, ref_logp, estimator)
