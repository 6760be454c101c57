"""Per-token KL estimators between the policy and the frozen reference (Schulman's k1, k2, k3).

With d = logp - ref_logp on tokens sampled from the policy: k1 = d (unbiased, can be negative),
k2 = d^2 / 2 (biased, low variance), k3 = exp(-d) + d - 1 (unbiased and non-negative).

The expected gradients of k1 and k3 are not the gradient of the KL; k2's is. ``k1+`` and ``k3+``
are straight-through estimators (veRL's): the value of k1 / k3 with the gradient of k2.

``clamp = c`` bounds every estimate to [-c, c] (veRL clamps k3 at 10, OpenRLHF every estimator),
so one token far off the reference cannot dominate a step's KL term; where the estimate is
clamped its gradient is 0 (torch.clamp's rule: a value exactly at the bound keeps its gradient).
"""

from __future__ import annotations

import torch

from . import _checks
from ._backend import select
from .logprobs import check_triton_device, jit, tl, triton_interpreted

ESTIMATORS = ("k1", "k2", "k3", "k1+", "k3+")


def base_estimator(estimator: str) -> str:
    """The estimator whose value ``estimator`` takes: "k3+" -> "k3"."""
    return estimator.rstrip("+")


def _check(logp: object, ref_logp: object, estimator: object, clamp: object):
    logp = _checks.tensor("logp", logp)
    _checks.floating("logp", logp)
    ref_logp = _checks.tensor("ref_logp", ref_logp)
    _checks.floating("ref_logp", ref_logp)
    _checks.same_shape("ref_logp", ref_logp, "logp", logp.shape)
    _checks.same_device("ref_logp", ref_logp, "logp", logp.device)
    estimator = _checks.choice("estimator", estimator, ESTIMATORS)
    return logp, ref_logp, estimator, _checks.optional_positive("clamp", clamp)


def _value(d: torch.Tensor, base: str) -> torch.Tensor:
    if base == "k1":
        return d
    if base == "k2":
        return 0.5 * d.square()
    return torch.exp(-d) + d - 1.0


def kl_penalty_reference(
    logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str = "k1", clamp: float | None = None
) -> torch.Tensor:
    d = logp.float() - ref_logp.float()
    base = base_estimator(estimator)
    if clamp is not None:
        estimate = _value(d.detach(), base)
        inside = estimate.abs() <= clamp
        # The clamped tokens are evaluated at d = 0 so that their zero gradient cannot meet an
        # overflowing exp(-d) (0 * inf = NaN); their value is the bound.
        d = torch.where(inside, d, torch.zeros_like(d))
    value = _value(d, base)
    if estimator.endswith("+"):
        k2 = 0.5 * d.square()
        value = k2 - k2.detach() + value.detach()
    if clamp is not None:
        value = torch.where(inside, value, estimate.clamp(-clamp, clamp))
    return value


# ---------------------------------------------------------------------------------------------
# Triton: elementwise over the flattened tokens. The value's estimator is a constexpr EST (0, 1, 2
# for k1, k2, k3), the gradient's another, GRAD (0: 1, the slope of k1; 1: d, k2's and the
# straight-through ones'; 2: 1 - exp(-d), k3's); token_rewards' kernel computes the same values
# in the same order.


def _kl_kernel(logp_ptr, ref_ptr, out_ptr, N, clamp, EST: tl.constexpr, HAS_CLAMP: tl.constexpr,
               BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = offs < N
    d = tl.load(logp_ptr + offs, mask=valid, other=0).to(tl.float32) - tl.load(
        ref_ptr + offs, mask=valid, other=0
    ).to(tl.float32)
    if EST == 1:
        d = 0.5 * (d * d)
    elif EST == 2:
        d = tl.exp(-d) + d - 1.0
    if HAS_CLAMP:
        d = tl.minimum(tl.maximum(d, -clamp), clamp)
    tl.store(out_ptr + offs, d, mask=valid)


def _kl_bwd_kernel(logp_ptr, ref_ptr, g_ptr, grad_ptr, N, clamp, EST: tl.constexpr, GRAD: tl.constexpr,
                   HAS_CLAMP: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = offs < N
    d = tl.load(logp_ptr + offs, mask=valid, other=0).to(tl.float32) - tl.load(
        ref_ptr + offs, mask=valid, other=0
    ).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=valid, other=0).to(tl.float32)
    if GRAD == 0:
        slope = tl.full((BLOCK,), 1.0, tl.float32)
    elif GRAD == 1:
        slope = d
    else:
        slope = 1.0 - tl.exp(-d)
    if HAS_CLAMP:
        if EST == 0:
            value = d
        elif EST == 1:
            value = 0.5 * (d * d)
        else:
            value = tl.exp(-d) + d - 1.0
        slope = tl.where(tl.abs(value) <= clamp, slope, 0.0)
    tl.store(grad_ptr + offs, g * slope, mask=valid)


def _codes(estimator: str) -> tuple[int, int]:
    base = base_estimator(estimator)
    est = ("k1", "k2", "k3").index(base)
    grad = 1 if estimator.endswith("+") or base == "k2" else est
    return est, grad


def _block() -> int:
    return 64 if triton_interpreted() else 1024


class _TritonKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logp, ref_logp, estimator, clamp):
        a, b = logp.contiguous(), ref_logp.contiguous()
        out = torch.empty(logp.shape, dtype=torch.float32, device=logp.device)
        n, block = out.numel(), _block()
        est, grad = _codes(estimator)
        if n:
            jit(_kl_kernel)[((n + block - 1) // block,)](
                a, b, out, n, 0.0 if clamp is None else clamp,
                EST=est, HAS_CLAMP=clamp is not None, BLOCK=block,
            )
        ctx.save_for_backward(a, b)
        ctx.codes, ctx.clamp = (est, grad), clamp
        ctx.dtypes = (logp.dtype, ref_logp.dtype)
        return out

    @staticmethod
    def backward(ctx, g_out):
        a, b = ctx.saved_tensors
        need_logp, need_ref = ctx.needs_input_grad[:2]
        if g_out is None or not (need_logp or need_ref):
            return None, None, None, None
        g = g_out.contiguous()
        grad = torch.empty(a.shape, dtype=torch.float32, device=a.device)
        n, block = grad.numel(), _block()
        est, slope = ctx.codes
        if n:
            jit(_kl_bwd_kernel)[((n + block - 1) // block,)](
                a, b, g, grad, n, 0.0 if ctx.clamp is None else ctx.clamp,
                EST=est, GRAD=slope, HAS_CLAMP=ctx.clamp is not None, BLOCK=block,
            )
        # d KL / d ref_logp = -d KL / d logp: the estimators depend on logp - ref_logp only.
        return (grad.to(ctx.dtypes[0]) if need_logp else None,
                (-grad).to(ctx.dtypes[1]) if need_ref else None, None, None)


def kl_penalty_triton(
    logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str = "k1", clamp: float | None = None
) -> torch.Tensor:
    """The Triton path (CUDA, or the interpreter on CPU tensors). Inputs are not re-checked."""
    check_triton_device(logp)
    return _TritonKL.apply(logp, ref_logp, estimator, clamp)


def kl_penalty(
    logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str = "k1", clamp: float | None = None
) -> torch.Tensor:
    """Per-token KL estimate, fp32, same shape as ``logp``; differentiable w.r.t. both inputs.

    ``estimator``: ``k1``, ``k2``, ``k3``, or the straight-through ``k1+`` / ``k3+`` (that
    value, k2's gradient). ``clamp``: None, or the bound c of [-c, c] (gradient 0 beyond it).
    """
    logp, ref_logp, estimator, clamp = _check(logp, ref_logp, estimator, clamp)
    if select(logp.device, cpu=False, triton=True, op="kl_penalty") == "triton":
        return kl_penalty_triton(logp, ref_logp, estimator, clamp)
    return kl_penalty_reference(logp, ref_logp, estimator, clamp)
