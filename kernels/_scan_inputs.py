"""Shared preparation for the reverse-time scans (discounted returns, GAE): C++ and Triton."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def mask_for_cpu(mask: torch.Tensor, dtype: torch.dtype) -> np.ndarray:
    """bool/uint8 masks go to C++ as bytes (no copy); any other dtype is cast to the value type."""
    if mask.dtype not in (torch.bool, torch.uint8):
        mask = mask.to(dtype)
    return mask.detach().cpu().contiguous().numpy()


def values_for_cpu(t: torch.Tensor, dtype: torch.dtype) -> np.ndarray:
    return t.detach().to(device="cpu", dtype=dtype).contiguous().numpy()


def values_for_triton(t: torch.Tensor) -> torch.Tensor:
    """Rows with unit stride along time; bool masks are read as bytes (no copy)."""
    if t.dtype == torch.bool:
        t = t.view(torch.uint8)
    return t if t.stride(-1) == 1 else t.contiguous()


def scan_params(values: Sequence[float], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Scalars the kernels read in the compute dtype, rounded once like the reference's scalars
    (a Python float argument would reach the kernel as fp32 even for fp64 inputs)."""
    return torch.tensor(list(values), dtype=dtype, device=device)


def scan_block_t(steps: int, interpreted: bool) -> int:
    """Time steps per block: small under the interpreter so tests cover several blocks."""
    return 8 if interpreted else 32
