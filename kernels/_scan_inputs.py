"""Shared preparation for the reverse-time scans (discounted returns, GAE): C++ and Triton."""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Sequence

import numpy as np
import torch

# Forces the Triton scans' chunk length (time steps per program of the first pass), for tests and
# experiments; rounded up to whole blocks. Unset: `scan_chunk_t` chooses.
CHUNK_ENV = "LONGCOT_SCAN_CHUNK"

# On a GPU: sequences up to this length are one chunk (one launch, the serial walk is short);
# longer ones are cut into chunks of at least MIN_CHUNK steps, doubled while the (sequence, chunk)
# programs outnumber what the GPU runs at once (132 SMs x 32 single-warp blocks on an H100/H200)
# or the carry walk of the second pass (one step per later chunk) would be longer than a chunk.
SINGLE_CHUNK_MAX = 1024
MIN_CHUNK = 256
MAX_PROGRAMS = 4096
MAX_GRID_Y = 65_535  # CUDA's limit on a grid's second dimension


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


def scan_params(
    values: Sequence[float],
    dtype: torch.dtype,
    device: torch.device,
    powers_of: Sequence[float] = (),
    chunk: int = 0,
) -> torch.Tensor:
    """Scalars the kernels read in the compute dtype, rounded once like the reference's scalars
    (a Python float argument would reach the kernel as fp32 even for fp64 inputs).

    With ``powers_of``: after the values, for each factor f (rounded to ``dtype`` first, as the
    kernels' recurrence uses it) the table f^1, ..., f^chunk, each power computed in float64 and
    rounded once (so f = 1 gives exactly 1, and long distances underflow to 0)."""
    out = list(values)
    for f in powers_of:
        out.extend(_powers(float(f), chunk, dtype))
    return torch.tensor(out, dtype=dtype, device=device)


@functools.lru_cache(maxsize=64)
def _powers(factor: float, chunk: int, dtype: torch.dtype) -> tuple[float, ...]:
    f = torch.tensor(factor, dtype=dtype).item()  # the factor as the kernel holds it
    return tuple(f**k for k in range(1, chunk + 1))


def scan_block_t(steps: int, interpreted: bool) -> int:
    """Time steps per block: small under the interpreter so tests cover several blocks."""
    return 8 if interpreted else 32


def scan_chunk_t(batch: int, steps: int, block: int, interpreted: bool) -> int:
    """Time steps per chunk (a multiple of ``block``): the first pass runs one program per
    (sequence, chunk), so a few long sequences still fill the GPU; steps <= chunk: one chunk, one
    launch. ``LONGCOT_SCAN_CHUNK`` forces it; under the interpreter it is 16 (tests cover several
    chunks)."""
    forced = os.environ.get(CHUNK_ENV, "").strip()
    if forced:
        try:
            chunk = int(forced)
        except ValueError:
            chunk = 0
        if chunk < 1:
            raise ValueError(f"{CHUNK_ENV}: expected a positive integer, got {forced!r}")
    elif interpreted:
        chunk = 16
    elif steps <= SINGLE_CHUNK_MAX:
        chunk = steps
    else:
        chunk = MIN_CHUNK
        while chunk < steps and (batch * -(-steps // chunk) > MAX_PROGRAMS or -(-steps // chunk) > chunk):
            chunk *= 2
    chunk = max(chunk, -(-steps // MAX_GRID_Y))  # chunks are the grid's second axis
    return max(block, -(-chunk // block) * block)


def fix_block_t(chunk: int) -> int:
    """Elements per block of the second pass (elementwise over a chunk): a power of two dividing
    the chunk, at most 256."""
    return math.gcd(chunk, 256)
