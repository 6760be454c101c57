"""Multi-gamma discounted returns: the paper's reward channels, each with its own discount.

Per channel c: G_c[t] = r_c[t] * mask[t] + gamma_c * G_c[t+1], G_c[T] = 0; the result is the sum
over channels. With gamma 1.0 on the sparse correctness channel and 0.99 on the dense repetition
channel (the paper's best setting), a repetition penalty only reaches back a hundred-odd tokens
while the outcome reward reaches every token. This is GAE with lambda = 1 and no critic.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import _checks
from ._backend import cpu_extension, cpu_threads, select
from ._scan_inputs import mask_for_cpu, scan_block_t, scan_params, values_for_cpu, values_for_triton
from .logprobs import check_triton_device, jit, tl, triton, triton_interpreted


def _check(rewards: object, mask: object, gammas: object) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
    rewards = _checks.tensor("rewards", rewards)
    _checks.rank("rewards", rewards, 3, "[B, T, C]")
    _checks.floating("rewards", rewards)
    mask = _checks.tensor("mask", mask)
    _checks.same_shape("mask", mask, "rewards.shape[:2]", rewards.shape[:2])
    _checks.same_device("mask", mask, "rewards", rewards.device)
    if isinstance(gammas, (str, bytes)) or not isinstance(gammas, Sequence):
        raise ValueError(f"gammas: expected a sequence of floats, one per channel, got {gammas!r}")
    if len(gammas) != rewards.shape[2]:
        raise ValueError(
            f"gammas: expected one discount per reward channel ({rewards.shape[2]}), got {len(gammas)}"
        )
    return rewards, mask, [_checks.unit_interval(f"gammas[{c}]", g) for c, g in enumerate(gammas)]


def discounted_returns_reference(
    rewards: torch.Tensor, mask: torch.Tensor, gammas: Sequence[float]
) -> torch.Tensor:
    dtype = _checks.compute_dtype(rewards)
    r = rewards.to(dtype) * mask.to(dtype).unsqueeze(-1)
    batch, steps, _ = r.shape
    total = None
    for c, gamma in enumerate(gammas):
        ret = torch.zeros(batch, dtype=dtype, device=r.device)
        out = torch.empty(batch, steps, dtype=dtype, device=r.device)
        for t in reversed(range(steps)):
            ret = r[:, t, c] + gamma * ret
            out[:, t] = ret
        total = out if total is None else total + out
    if total is None:  # no channel at all
        total = torch.zeros(batch, steps, dtype=dtype, device=r.device)
    return total


# ---------------------------------------------------------------------------------------------
# Triton: one program per sequence holding every channel (so the channel sum needs no second pass
# or atomics), walking time backwards a block of [BLOCK_T, C] at a time. Each step picks its row
# out of the block with an exact masked sum, and the channels are summed in order 0, 1, ..., so
# the result rounds like the reference (up to fused multiply-adds on a GPU).


def _returns_kernel(
    r_ptr, m_ptr, out_ptr, gammas_ptr,
    T, C, stride_rb, stride_rt, stride_m, stride_out,
    BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_T)
    chans = tl.arange(0, BLOCK_C)
    gammas = tl.load(gammas_ptr + chans, mask=chans < C, other=0)
    carry = gammas * 0
    n_blocks = tl.cdiv(T, BLOCK_T)
    for i in range(n_blocks):
        cols = (n_blocks - 1 - i) * BLOCK_T + offs
        valid = cols < T
        m = tl.load(m_ptr + row * stride_m + cols, mask=valid, other=0).to(gammas.dtype)
        ptrs = r_ptr + row * stride_rb + cols[:, None] * stride_rt + chans[None, :]
        both = valid[:, None] & (chans[None, :] < C)
        r = tl.load(ptrs, mask=both, other=0).to(gammas.dtype) * m[:, None]
        out = tl.zeros((BLOCK_T, BLOCK_C), gammas.dtype)
        for j in tl.static_range(BLOCK_T):
            sel = (offs == (BLOCK_T - 1 - j))[:, None]
            carry = tl.sum(tl.where(sel, r, 0.0), 0) + gammas * carry
            out = tl.where(sel, carry[None, :], out)
        total = tl.sum(tl.where(chans[None, :] == 0, out, 0.0), 1)
        for c in range(1, C):
            total += tl.sum(tl.where(chans[None, :] == c, out, 0.0), 1)
        tl.store(out_ptr + row * stride_out + cols, total, mask=valid)


def discounted_returns_triton(
    rewards: torch.Tensor, mask: torch.Tensor, gammas: Sequence[float]
) -> torch.Tensor:
    """The Triton path (CUDA, or the interpreter on CPU tensors). Inputs are not re-checked."""
    check_triton_device(rewards)
    dtype = _checks.compute_dtype(rewards)
    batch, steps, channels = rewards.shape
    out = torch.zeros(batch, steps, dtype=dtype, device=rewards.device)
    if not (batch and steps and channels):
        return out
    r = rewards if rewards.stride(-1) == 1 else rewards.contiguous()
    m = values_for_triton(mask)
    interpreted = triton_interpreted()
    jit(_returns_kernel)[(batch,)](
        r, m, out, scan_params(gammas, dtype, rewards.device),
        steps, channels, r.stride(0), r.stride(1), m.stride(0), out.stride(0),
        BLOCK_T=scan_block_t(steps, interpreted), BLOCK_C=triton.next_power_of_2(channels),
        **({} if interpreted else {"num_warps": 1}),
    )
    return out


def discounted_returns(
    rewards: torch.Tensor, mask: torch.Tensor, gammas: Sequence[float]
) -> torch.Tensor:
    """Sum over channels of the per-channel discounted returns, [B, T] in fp32 (fp64 for fp64)."""
    rewards, mask, gammas = _check(rewards, mask, gammas)
    impl = select(rewards.device, cpu=True, triton=True, op="discounted_returns")
    if impl == "triton":
        return discounted_returns_triton(rewards, mask, gammas)
    if impl == "cpu":
        dtype = _checks.compute_dtype(rewards)
        out = cpu_extension().discounted_returns(
            values_for_cpu(rewards, dtype), mask_for_cpu(mask, dtype), gammas, cpu_threads()
        )
        return torch.from_numpy(out).to(rewards.device)
    return discounted_returns_reference(rewards, mask, gammas)
