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
from ._scan_inputs import (
    fix_block_t,
    mask_for_cpu,
    scan_block_t,
    scan_chunk_t,
    scan_params,
    values_for_cpu,
    values_for_triton,
)
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
# Triton, parallel over time (the chunked scan of gae.py, with one factor gamma_c per channel):
#
#   pass 1, one program per (sequence, chunk) holding every channel (so the channel sum needs no
#     other pass or atomics): the chunk's per-channel scan with a zero carry-in, walking back a
#     block of [BLOCK_T, C] at a time, the channel sum of these local returns to `out`, and each
#     channel's local return at the chunk's first position, its carry-out L_k[c];
#   pass 2, one program per (sequence, chunk) but the last: per channel the true return just
#     after the chunk, Y_k = L_{k+1} + gamma_c^chunk_len * Y_{k+1}, walked serially over the later
#     chunks' carry-outs, then out_t += sum_c gamma_c^(end_k - t) * Y_k[c].
#
# A sequence of one chunk is pass 1 alone. Each step picks its row out of the block with an exact
# masked sum, and pass 1 sums the channels in order 0, 1, ..., so a single chunk rounds like the
# reference (up to fused multiply-adds on a GPU); with several chunks, the channel sum of the
# local returns plus the channel sum of the carries' contributions rounds differently by a few
# ulps of the largest partial return (tests/test_returns.py).


def _returns_kernel(
    r_ptr, m_ptr, out_ptr, carry_ptr, gammas_ptr,
    T, C, chunk_len, n_chunks, stride_rb, stride_rt, stride_m, stride_out,
    BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    offs = tl.arange(0, BLOCK_T)
    chans = tl.arange(0, BLOCK_C)
    gammas = tl.load(gammas_ptr + chans, mask=chans < C, other=0)
    carry = gammas * 0
    start = chunk * chunk_len
    end = tl.minimum(start + chunk_len, T)
    n_blocks = tl.cdiv(end - start, BLOCK_T)
    for i in range(n_blocks):
        cols = start + (n_blocks - 1 - i) * BLOCK_T + offs
        valid = cols < end
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
    tl.store(carry_ptr + (row * n_chunks + chunk) * C + chans, carry, mask=chans < C)


def _returns_carry_kernel(
    out_ptr, carry_ptr, params_ptr,
    T, C, chunk_len, n_chunks, stride_out,
    BLOCK_K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    chans = tl.arange(0, BLOCK_C)
    cmask = chans < C
    pows = params_ptr + C + chans * chunk_len  # per channel: gamma_c^1, ..., gamma_c^chunk_len
    big = tl.load(pows + chunk_len - 1, mask=cmask, other=0)
    # Y[c]: the true return at the first position after this chunk, from the carry-outs of the
    # chunks after it, walked from the last one down (blocks aligned to the end).
    first = chunk + 1
    y = big * 0
    offs_k = tl.arange(0, BLOCK_K)
    for i in range(tl.cdiv(n_chunks - first, BLOCK_K)):
        top = n_chunks - i * BLOCK_K  # one past the block's last chunk
        idx = top - BLOCK_K + offs_k
        ptrs = carry_ptr + (row * n_chunks + idx[:, None]) * C + chans[None, :]
        lk = tl.load(ptrs, mask=(idx >= first)[:, None] & cmask[None, :], other=0)
        for j in tl.static_range(BLOCK_K):
            sel = (offs_k == (BLOCK_K - 1 - j))[:, None]
            x = tl.sum(tl.where(sel, lk, 0.0), 0)
            y = tl.where(top - 1 - j >= first, x + big * y, y)
    end = first * chunk_len
    offs = tl.arange(0, BLOCK_T)
    for i in range(tl.cdiv(chunk_len, BLOCK_T)):
        cols = chunk * chunk_len + i * BLOCK_T + offs
        valid = cols < T
        p = tl.load(pows[None, :] + (end - 1 - cols)[:, None], mask=valid[:, None] & cmask[None, :], other=0)
        total = tl.load(out_ptr + row * stride_out + cols, mask=valid, other=0) + tl.sum(p * y[None, :], 1)
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
    block = scan_block_t(steps, interpreted)
    chunk = scan_chunk_t(batch, steps, block, interpreted)
    n_chunks = -(-steps // chunk)
    params = scan_params(gammas, dtype, rewards.device, gammas if n_chunks > 1 else (), chunk)
    carries = torch.empty(batch, n_chunks, channels, dtype=dtype, device=rewards.device)
    block_c = triton.next_power_of_2(channels)
    options = {} if interpreted else {"num_warps": 1}
    jit(_returns_kernel)[(batch, n_chunks)](
        r, m, out, carries, params,
        steps, channels, chunk, n_chunks, r.stride(0), r.stride(1), m.stride(0), out.stride(0),
        BLOCK_T=block, BLOCK_C=block_c, **options,
    )
    if n_chunks > 1:
        jit(_returns_carry_kernel)[(batch, n_chunks - 1)](
            out, carries, params, steps, channels, chunk, n_chunks, out.stride(0),
            BLOCK_K=block, BLOCK_T=fix_block_t(chunk), BLOCK_C=block_c, **options,
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
