"""Generalised advantage estimation over right-padded [B, T] responses.

With r and V multiplied by the mask first: delta_t = r_t + gamma * V_{t+1} - V_t (V_T = 0),
A_t = delta_t + gamma * lam * A_{t+1}, returns = A + V. Masking V first makes the last valid
token bootstrap from 0, the end of the episode.
"""

from __future__ import annotations

import torch

from . import _checks
from ._backend import cpu_extension, cpu_threads, select
from ._scan_inputs import mask_for_cpu, values_for_cpu


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


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, returns), each [B, T] in fp32 (fp64 when both inputs are fp64)."""
    rewards, values, mask, gamma, lam = _check(rewards, values, mask, gamma, lam)
    impl = select(rewards.device, cpu=True, triton=False)
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
