"""Sparse outcome rewards: the classic 0/1 correctness reward and the paper's cosine length reward.

The cosine reward (Yeo et al., 2025) makes the reward depend on length as well as correctness:
correct answers earn more when short (2 -> 1 in the paper), wrong answers are penalised less when
long (-10 -> 0), so the policy learns to think longer only when it is failing; a response cut at
the length limit gets a fixed penalty whatever it contains, so running out of room is never a
way to avoid the wrong-answer penalty.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch


def _finite(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def _pair(name: str, value: object) -> tuple[float, float]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != 2:
        raise ValueError(
            f"{name} must be a pair (value at length 0, value at max_len), got {value!r}"
        )
    return _finite(f"{name}[0]", value[0]), _finite(f"{name}[1]", value[1])


def _bool_vector(name: str, value: object) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dtype != torch.bool:
        raise ValueError(f"{name} must be a bool tensor, got {value.dtype}")
    if value.dim() != 1:
        raise ValueError(f"{name} must have shape [B], got {list(value.shape)}")
    return value


def binary_reward(
    correct: torch.Tensor, correct_value: float = 1.0, wrong_value: float = 0.0
) -> torch.Tensor:
    """Float32 [B]: ``correct_value`` where ``correct`` else ``wrong_value``."""
    correct = _bool_vector("correct", correct)
    hi = _finite("correct_value", correct_value)
    lo = _finite("wrong_value", wrong_value)
    return torch.where(
        correct,
        torch.tensor(hi, dtype=torch.float32, device=correct.device),
        torch.tensor(lo, dtype=torch.float32, device=correct.device),
    )


def cosine_length_reward(
    correct: torch.Tensor,
    lengths: torch.Tensor,
    max_len: int,
    truncated: torch.Tensor,
    correct_range: Sequence[float] = (2.0, 1.0),
    wrong_range: Sequence[float] = (-10.0, 0.0),
    exceed: float = -10.0,
) -> torch.Tensor:
    """Float32 [B]: the cosine length-scaled reward of each response.

    A range is (value at length 0, value at length ``max_len``); at length L the reward is
    ``end + (start - end) * (1 + cos(pi * L / max_len)) / 2``, with ``correct_range`` for correct
    responses and ``wrong_range`` for wrong ones. ``truncated`` responses get ``exceed``. Lengths
    above ``max_len`` count as ``max_len``.
    """
    correct = _bool_vector("correct", correct)
    truncated = _bool_vector("truncated", truncated)
    if not isinstance(lengths, torch.Tensor):
        raise ValueError(f"lengths must be a torch.Tensor, got {type(lengths).__name__}")
    if lengths.dtype.is_floating_point or lengths.dtype.is_complex or lengths.dtype == torch.bool:
        raise ValueError(f"lengths must be an integer tensor, got {lengths.dtype}")
    if lengths.shape != correct.shape:
        raise ValueError(
            f"lengths must have the shape of correct {list(correct.shape)}, "
            f"got {list(lengths.shape)}"
        )
    if truncated.shape != correct.shape:
        raise ValueError(
            f"truncated must have the shape of correct {list(correct.shape)}, "
            f"got {list(truncated.shape)}"
        )
    if isinstance(max_len, bool) or not isinstance(max_len, numbers.Integral) or max_len < 1:
        raise ValueError(f"max_len must be an int >= 1, got {max_len!r}")
    max_len = int(max_len)
    if lengths.numel() and int(lengths.min()) < 0:
        raise ValueError(f"lengths must be >= 0, got a minimum of {int(lengths.min())}")
    c_start, c_end = _pair("correct_range", correct_range)
    w_start, w_end = _pair("wrong_range", wrong_range)
    exceed = _finite("exceed", exceed)

    device = lengths.device
    # float64 so that the reward at a given length is the formula's value to float32 precision
    # even for max_len in the tens of thousands.
    progress = lengths.clamp(max=max_len).to(torch.float64) / max_len
    weight = (1.0 + torch.cos(math.pi * progress)) / 2.0  # 1 at length 0, 0 at max_len
    start = torch.where(
        correct.to(device),
        torch.tensor(c_start, dtype=torch.float64, device=device),
        torch.tensor(w_start, dtype=torch.float64, device=device),
    )
    end = torch.where(
        correct.to(device),
        torch.tensor(c_end, dtype=torch.float64, device=device),
        torch.tensor(w_end, dtype=torch.float64, device=device),
    )
    reward = end + (start - end) * weight
    reward = torch.where(
        truncated.to(device), torch.tensor(exceed, dtype=torch.float64, device=device), reward
    )
    return reward.to(torch.float32)
