"""Generalised advantage estimation over right-padded [B, T] responses.

With r and V multiplied by the mask first: delta_t = r_t + gamma * V_{t+1} - V_t (V_T = 0),
A_t = delta_t + gamma * lam * A_{t+1}, returns = A + V. Masking V first makes the last valid
token bootstrap from 0, the end of the episode.
"""

from __future__ import annotations

import torch

from . import _checks
from ._backend import cpu_extension, cpu_threads, select
from ._scan_inputs import (
    fix_block_t,
    mask_for_cpu,
    scan_block_t,
    scan_chunk_t,
    scan_params,
    values_for_cpu,
    values_for_triton,
)
from .logprobs import check_triton_device, jit, tl, triton_interpreted


def _check(rewards: object, values: object, mask: object, gamma: object, lam: object):
    rewards = _checks.tensor("rewards", rewards)
    _checks.rank("rewards", rewards, 2, "[B, T]")
    _checks.floating("rewards", rewards)
    values = _checks.tensor("values", values)
    _checks.floating("values", values)
    _checks.same_shape("values", values, "rewards", rewards.shape)
    _checks.same_device("values", values, "rewards", rewards.device)
    mask = _checks.tensor("mask", mask)
    _checks.same_shape("mask", mask, "rewards", rewards.shape)
    _checks.same_device("mask", mask, "rewards", rewards.device)
    return rewards, values, mask, _checks.unit_interval("gamma", gamma), _checks.unit_interval("lam", lam)


def _dtype(rewards: torch.Tensor, values: torch.Tensor) -> torch.dtype:
    both64 = rewards.dtype == torch.float64 and values.dtype == torch.float64
    return torch.float64 if both64 else torch.float32


def gae_reference(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    dtype = _dtype(rewards, values)
    m = mask.to(dtype)
    r, v = rewards.to(dtype) * m, values.to(dtype) * m
    batch, steps = r.shape
    advantages = torch.empty_like(r)
    carry = torch.zeros(batch, dtype=dtype, device=r.device)
    next_value = torch.zeros(batch, dtype=dtype, device=r.device)
    for t in reversed(range(steps)):
        delta = r[:, t] + gamma * next_value - v[:, t]
        carry = delta + (gamma * lam) * carry
        advantages[:, t] = carry
        next_value = v[:, t]
    return advantages, advantages + v


# ---------------------------------------------------------------------------------------------
# Triton, parallel over time: the recurrence A_t = delta_t + decay * A_{t+1} has a constant factor,
# so a sequence is cut into chunks of `chunk_len` steps and
#
#   pass 1, one program per (sequence, chunk): the chunk's scan with a zero carry-in (its "local"
#     advantages), and the local advantage at the chunk's first position, its carry-out L_k;
#   pass 2, one program per (sequence, chunk) but the last: the true advantage just after the
#     chunk, Y_k = L_{k+1} + decay^chunk_len * Y_{k+1} (Y of the last chunk = 0), walked serially
#     over the later chunks' carry-outs, then A_t = local_t + decay^(end_k - t) * Y_k and
#     returns = A + V.
#
# A sequence of at most one chunk (short sequences on a GPU) is pass 1 alone, which then writes
# the final results. Inside a chunk delta is computed a block at a time in registers (with V_{t+1}
# loaded shifted by one, across the chunk's end too), then the recurrence runs over the block's
# steps one by one, each step picking its delta out of the block with an exact masked sum, so a
# single chunk rounds like the reference's loop (up to fused multiply-adds on a GPU); the powers
# of decay come from a table computed in float64 and rounded once (scan_params).


def _gae_kernel(
    r_ptr, v_ptr, m_ptr, adv_ptr, ret_ptr, carry_ptr, params_ptr,
    T, chunk_len, n_chunks, stride_r, stride_v, stride_m, stride_out,
    BLOCK_T: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    gamma = tl.load(params_ptr)
    decay = tl.load(params_ptr + 1)  # gamma * lam, rounded once like the reference's scalar
    zero = gamma * 0
    offs = tl.arange(0, BLOCK_T)
    start = chunk * chunk_len
    end = tl.minimum(start + chunk_len, T)
    carry = zero
    n_blocks = tl.cdiv(end - start, BLOCK_T)
    for i in range(n_blocks):
        cols = start + (n_blocks - 1 - i) * BLOCK_T + offs
        valid = cols < end
        nxt = (cols + 1) < T
        m = tl.load(m_ptr + row * stride_m + cols, mask=valid, other=0).to(gamma.dtype)
        r = tl.load(r_ptr + row * stride_r + cols, mask=valid, other=0).to(gamma.dtype) * m
        v = tl.load(v_ptr + row * stride_v + cols, mask=valid, other=0).to(gamma.dtype) * m
        m1 = tl.load(m_ptr + row * stride_m + cols + 1, mask=nxt, other=0).to(gamma.dtype)
        v1 = tl.load(v_ptr + row * stride_v + cols + 1, mask=nxt, other=0).to(gamma.dtype) * m1
        delta = r + gamma * v1 - v
        adv = tl.zeros((BLOCK_T,), gamma.dtype)
        for j in tl.static_range(BLOCK_T):
            sel = offs == (BLOCK_T - 1 - j)
            carry = tl.sum(tl.where(sel, delta, 0.0), 0) + decay * carry
            adv = tl.where(sel, carry, adv)
        tl.store(adv_ptr + row * stride_out + cols, adv, mask=valid)
        tl.store(ret_ptr + row * stride_out + cols, adv + v, mask=valid)
    tl.store(carry_ptr + row * n_chunks + chunk, carry)


def _gae_carry_kernel(
    adv_ptr, ret_ptr, v_ptr, m_ptr, carry_ptr, params_ptr,
    T, chunk_len, n_chunks, stride_v, stride_m, stride_out,
    BLOCK_K: tl.constexpr, BLOCK_T: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    decay = tl.load(params_ptr + 1)
    pows = params_ptr + 2  # decay^1, ..., decay^chunk_len
    big = tl.load(pows + chunk_len - 1)
    # Y: the true advantage at the first position after this chunk, from the carry-outs of the
    # chunks after it, walked from the last one down (blocks aligned to the end).
    first = chunk + 1
    y = decay * 0
    offs_k = tl.arange(0, BLOCK_K)
    for i in range(tl.cdiv(n_chunks - first, BLOCK_K)):
        top = n_chunks - i * BLOCK_K  # one past the block's last chunk
        idx = top - BLOCK_K + offs_k
        lk = tl.load(carry_ptr + row * n_chunks + idx, mask=idx >= first, other=0)
        for j in tl.static_range(BLOCK_K):
            sel = offs_k == (BLOCK_K - 1 - j)
            x = tl.sum(tl.where(sel, lk, 0.0), 0)
            y = tl.where(top - 1 - j >= first, x + big * y, y)
    end = first * chunk_len
    offs = tl.arange(0, BLOCK_T)
    for i in range(tl.cdiv(chunk_len, BLOCK_T)):
        cols = chunk * chunk_len + i * BLOCK_T + offs
        valid = cols < T
        p = tl.load(pows + (end - 1 - cols), mask=valid, other=0)
        adv = tl.load(adv_ptr + row * stride_out + cols, mask=valid, other=0) + y * p
        m = tl.load(m_ptr + row * stride_m + cols, mask=valid, other=0).to(y.dtype)
        v = tl.load(v_ptr + row * stride_v + cols, mask=valid, other=0).to(y.dtype) * m
        tl.store(adv_ptr + row * stride_out + cols, adv, mask=valid)
        tl.store(ret_ptr + row * stride_out + cols, adv + v, mask=valid)


def gae_triton(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The Triton path (CUDA, or the interpreter on CPU tensors). Inputs are not re-checked."""
    check_triton_device(rewards)
    dtype = _dtype(rewards, values)
    batch, steps = rewards.shape
    adv = torch.empty(batch, steps, dtype=dtype, device=rewards.device)
    ret = torch.empty_like(adv)
    if not (batch and steps):
        return adv, ret
    r, v, m = values_for_triton(rewards), values_for_triton(values), values_for_triton(mask)
    interpreted = triton_interpreted()
    block = scan_block_t(steps, interpreted)
    chunk = scan_chunk_t(batch, steps, block, interpreted)
    n_chunks = -(-steps // chunk)
    decay = gamma * lam
    params = scan_params([gamma, decay], dtype, rewards.device, [decay] if n_chunks > 1 else (), chunk)
    carries = torch.empty(batch, n_chunks, dtype=dtype, device=rewards.device)
    options = {} if interpreted else {"num_warps": 1}
    jit(_gae_kernel)[(batch, n_chunks)](
        r, v, m, adv, ret, carries, params, steps, chunk, n_chunks,
        r.stride(0), v.stride(0), m.stride(0), adv.stride(0), BLOCK_T=block, **options,
    )
    if n_chunks > 1:
        jit(_gae_carry_kernel)[(batch, n_chunks - 1)](
            adv, ret, v, m, carries, params, steps, chunk, n_chunks, v.stride(0), m.stride(0), adv.stride(0),
            BLOCK_K=block, BLOCK_T=fix_block_t(chunk), **options,
        )
    return adv, ret


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, returns), each [B, T] in fp32 (fp64 when both inputs are fp64)."""
    rewards, values, mask, gamma, lam = _check(rewards, values, mask, gamma, lam)
    impl = select(rewards.device, cpu=True, triton=True, op="gae")
    if impl == "triton":
        return gae_triton(rewards, values, mask, gamma, lam)
    if impl == "cpu":
        dtype = _dtype(rewards, values)
        adv, ret = cpu_extension().gae(
            values_for_cpu(rewards, dtype),
            values_for_cpu(values, dtype),
            mask_for_cpu(mask, dtype),
            gamma,
            lam,
            cpu_threads(),
        )
        return torch.from_numpy(adv).to(rewards.device), torch.from_numpy(ret).to(rewards.device)
    return gae_reference(rewards, values, mask, gamma, lam)
