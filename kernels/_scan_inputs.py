"""Shared preparation for the reverse-time scans (discounted returns, GAE) on the C++ path."""

from __future__ import annotations

import numpy as np
import torch


def mask_for_cpu(mask: torch.Tensor, dtype: torch.dtype) -> np.ndarray:
    """bool/uint8 masks go to C++ as bytes (no copy); any other dtype is cast to the value type."""
    if mask.dtype not in (torch.bool, torch.uint8):
        mask = mask.to(dtype)
    return mask.detach().cpu().contiguous().numpy()


def values_for_cpu(t: torch.Tensor, dtype: torch.dtype) -> np.ndarray:
    return t.detach().to(device="cpu", dtype=dtype).contiguous().numpy()
