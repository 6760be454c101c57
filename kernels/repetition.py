"""Exact n-gram repetition on token ids: the paper's dense repetition penalty and sparse measure.

A start s of an n-gram in ``tokens[b, :lengths[b]]`` is *repeated* when the same n tokens start at
some s' < s (overlaps allowed). `repetition_mask` marks the tokens of repeated n-grams (the paper
penalises each of them); `repetition_ratio` is 1 - distinct / total n-grams per sequence.

Implementations: the reference below (the per-sequence set-of-tuples loop RL code uses today) and
C++ (csrc/ngram.cpp: rolling hashes confirmed by comparing tokens, threads over the batch).
"""

from __future__ import annotations

import numpy as np
import torch

from . import _checks
from ._backend import cpu_extension, cpu_threads, select


def _check(tokens: object, lengths: object, n: object) -> tuple[torch.Tensor, torch.Tensor, int]:
    tokens = _checks.tensor("tokens", tokens)
    _checks.rank("tokens", tokens, 2, "[B, T]")
    _checks.integer("tokens", tokens)
    lengths = _checks.lengths(lengths, tokens.shape[0], tokens.shape[1])
    n = _checks.positive_int("n", n)
    return tokens, lengths, n


def repetition_mask_reference(
    tokens: torch.Tensor, lengths: torch.Tensor, n: int, only_start: bool = False
) -> torch.Tensor:
    rows = []
    for row, length in zip(tokens.tolist(), lengths.tolist()):
        marks = [False] * tokens.shape[1]
        seen: set[tuple[int, ...]] = set()
        prev_end = None  # end (s + n) of the previous repeated start
        for s in range(length - n + 1):
            gram = tuple(row[s : s + n])
            if gram not in seen:
                seen.add(gram)
                continue
            if only_start:
                marked = prev_end is None or s > prev_end
                prev_end = s + n
                if not marked:
                    continue
            marks[s : s + n] = [True] * n
        rows.append(marks)
    return torch.tensor(rows, dtype=torch.bool, device=tokens.device).reshape(tokens.shape)


def repetition_ratio_reference(tokens: torch.Tensor, lengths: torch.Tensor, n: int) -> torch.Tensor:
    ratios = []
    for row, length in zip(tokens.tolist(), lengths.tolist()):
        total = length - n + 1
        if total <= 0:
            ratios.append(0.0)
            continue
        distinct = len({tuple(row[s : s + n]) for s in range(total)})
        ratios.append(1.0 - distinct / total)
    return torch.tensor(ratios, dtype=torch.float32, device=tokens.device)


def _as_numpy_int64(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(device="cpu", dtype=torch.int64).contiguous().numpy()


def repetition_mask(
    tokens: torch.Tensor, lengths: torch.Tensor, n: int, only_start: bool = False
) -> torch.Tensor:
    """Bool [B, T]: True at every position covered by a repeated n-gram.

    With ``only_start=True`` a repeated start's span is marked only when it starts past the end of
    the previous repeated start (``s > s_prev + n``), so a run of repetition is penalised once per
    n tokens instead of at every token. Positions at or past a sequence's length are never marked.
    """
    tokens, lengths, n = _check(tokens, lengths, n)
    impl = select(tokens.device, cpu=True, triton=False)
    if impl == "cpu":
        mask = cpu_extension().repetition_mask(
            _as_numpy_int64(tokens), _as_numpy_int64(lengths), n, bool(only_start), cpu_threads()
        )
        return torch.from_numpy(mask).to(tokens.device)
    return repetition_mask_reference(tokens, lengths, n, only_start)


def repetition_ratio(tokens: torch.Tensor, lengths: torch.Tensor, n: int) -> torch.Tensor:
    """Float32 [B]: 1 - distinct n-grams / n-grams per sequence; 0 when it has no n-gram."""
    tokens, lengths, n = _check(tokens, lengths, n)
    impl = select(tokens.device, cpu=True, triton=False)
    if impl == "cpu":
        ratio = cpu_extension().repetition_ratio(
            _as_numpy_int64(tokens), _as_numpy_int64(lengths), n, cpu_threads()
        )
        return torch.from_numpy(ratio).to(tokens.device)
    return repetition_ratio_reference(tokens, lengths, n)
