"""The paper's dense n-gram repetition penalty, as a per-token reward.

Every token of an n-gram that already occurred earlier in the same response is penalised
(Yeo et al., 2025: n = 40, -0.05 per token). Being dense, it is its own reward channel with its own
discount (0.99 in the paper), so the penalty lands on the tokens that repeat rather than being
smeared over the whole response like an outcome reward. The exact n-gram matching on token ids is
the kernel ``longcot.kernels.repetition_mask``.
"""

from __future__ import annotations

import math

import torch

from longcot.kernels import repetition_mask


def repetition_penalty(
    tokens: torch.Tensor,
    lengths: torch.Tensor,
    n: int = 40,
    penalty: float = -0.05,
    only_start: bool = False,
) -> torch.Tensor:
    """Float32 [B, T]: ``penalty`` at each token of a repeated n-gram, 0 elsewhere and in padding.

    ``only_start`` penalises each contiguous run of repetition once, on the n tokens of its first
    repeated n-gram, however long the run (see ``repetition_mask``).
    """
    if (
        isinstance(penalty, bool)
        or not isinstance(penalty, (int, float))
        or not math.isfinite(penalty)
        or penalty > 0
    ):
        raise ValueError(f"penalty must be a finite number <= 0, got {penalty!r}")
    if not isinstance(only_start, bool):
        raise ValueError(f"only_start must be a bool, got {only_start!r}")
    mask = repetition_mask(tokens, lengths, n, only_start)
    return torch.where(
        mask,
        torch.tensor(float(penalty), dtype=torch.float32, device=mask.device),
        torch.tensor(0.0, dtype=torch.float32, device=mask.device),
    )
