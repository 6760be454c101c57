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
from ._scan_inputs import mask_for_cpu, values_for_cpu


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


def discounted_returns(
    rewards: torch.Tensor, mask: torch.Tensor, gammas: Sequence[float]
) -> torch.Tensor:
    """Sum over channels of the per-channel discounted returns, [B, T] in fp32 (fp64 for fp64)."""
    rewards, mask, gammas = _check(rewards, mask, gammas)
    impl = select(rewards.device, cpu=True, triton=False)
    if impl == "cpu":
        dtype = _checks.compute_dtype(rewards)
        out = cpu_extension().discounted_returns(
            values_for_cpu(rewards, dtype), mask_for_cpu(mask, dtype), gammas, cpu_threads()
        )
        return torch.from_numpy(out).to(rewards.device)
    return discounted_returns_reference(rewards, mask, gammas)
