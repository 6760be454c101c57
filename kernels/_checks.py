"""Argument checks shared by the ops: each failure is a ValueError naming the argument."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

_INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def tensor(name: str, value: object) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
    return value


def rank(name: str, t: torch.Tensor, ndim: int, shape_doc: str) -> None:
    if t.dim() != ndim:
        raise ValueError(f"{name}: expected {ndim} dimensions {shape_doc}, got shape {tuple(t.shape)}")


def integer(name: str, t: torch.Tensor) -> None:
    if t.dtype not in _INT_DTYPES:
        raise ValueError(f"{name}: expected an integer dtype (token ids), got {t.dtype}")


def floating(name: str, t: torch.Tensor) -> None:
    if not t.is_floating_point():
        raise ValueError(f"{name}: expected a floating-point dtype, got {t.dtype}")


def same_shape(name: str, t: torch.Tensor, other_name: str, shape: Sequence[int]) -> None:
    if tuple(t.shape) != tuple(shape):
        raise ValueError(
            f"{name}: expected shape {tuple(shape)} (same as {other_name}), got {tuple(t.shape)}"
        )


def same_device(name: str, t: torch.Tensor, other_name: str, device: torch.device) -> None:
    if t.device != device:
        raise ValueError(f"{name}: expected a tensor on {device} (like {other_name}), got {t.device}")


def lengths(value: object, batch: int, max_len: int) -> torch.Tensor:
    t = tensor("lengths", value)
    rank("lengths", t, 1, "[B]")
    integer("lengths", t)
    if t.shape[0] != batch:
        raise ValueError(f"lengths: expected {batch} entries (one per row of tokens), got {t.shape[0]}")
    if batch:
        lo, hi = int(t.min()), int(t.max())
        if lo < 0 or hi > max_len:
            raise ValueError(f"lengths: expected values in [0, T={max_len}], got min {lo}, max {hi}")
    return t


def positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: expected an integer >= 1, got {value!r}")
    return value


def unit_interval(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{name}: expected a number in [0, 1], got {value!r}")
    return float(value)


def temperature(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
        math.isfinite(value) and value > 0
    ):
        raise ValueError(f"temperature: expected a finite number > 0, got {value!r}")
    return float(value)


def choice(name: str, value: object, options: Sequence[str]) -> str:
    if value not in options:
        raise ValueError(f"{name}: expected one of {', '.join(map(repr, options))}, got {value!r}")
    return value  # type: ignore[return-value]


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """fp64 stays fp64; every other dtype computes in fp32 (DESIGN.md's kernel contract)."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def optional_positive(name: str, value: object) -> float | None:
    """None, or a finite number > 0 (a bound or a divisor that may be switched off)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
        math.isfinite(value) and value > 0
    ):
        raise ValueError(f"{name}: expected None or a finite number > 0, got {value!r}")
    return float(value)
