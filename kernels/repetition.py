"""Exact n-gram repetition on token ids: the paper's dense repetition penalty and sparse measure.

A start s of an n-gram in ``tokens[b, :lengths[b]]`` is *repeated* when the same n tokens start at
some s' < s (overlaps allowed). `repetition_mask` marks the tokens of repeated n-grams (the paper
penalises each of them); `repetition_ratio` is 1 - distinct / total n-grams per sequence.

Implementations: the reference below (the per-sequence set-of-tuples loop RL code uses today),
C++ (csrc/ngram.cpp: rolling hashes confirmed by comparing tokens, threads over the batch) and
Triton for tensors on the GPU (hashes, a sort by hash and a token-by-token confirmation, below).
"""

from __future__ import annotations

import numpy as np
import torch

from . import _checks
from ._backend import cpu_extension, cpu_threads, select
from .logprobs import check_triton_device, jit, tl, triton_interpreted


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


# ---------------------------------------------------------------------------------------------
# Triton (CUDA tensors; CPU tensors through the interpreter). Three steps, all on the device:
#
# 1. `_ngram_keys_kernel`: one program per (sequence, block of starts) hashes each start's n
#    tokens with two polynomial hashes modulo 2^31 - 1 (products stay below 2^62, so int64 never
#    overflows), packed into one 62-bit key; starts that do not fit in the length get the largest
#    int64, so they sort last.
# 2. A stable `torch.sort` of each row's keys: equal n-grams have equal keys, so every earlier
#    occurrence of a start's n-gram lies before it in its run of equal keys (stable: positions
#    increase within the run).
# 3. `_ngram_confirm_kernel`: each sorted entry walks back through its run of equal keys and
#    compares the n tokens against each predecessor until one is equal (repeated) or the run ends.
#    Without collisions the first predecessor already matches; a colliding n-gram only costs
#    another comparison, and is never reported as repeated: marks are exact.
#
# The marks then follow with tensor ops: the tokens covered by a repeated start are those with a
# repeated start among the n starts ending at them (a cumulative sum), and with only_start=True a
# repeated start is marked when it lies past the previous repeated start's end (a cumulative max).

_HASH_PRIME = 2_147_483_647  # 2^31 - 1
_HASH_BASES = (1_000_003, 1_222_222_223)
_NO_KEY = torch.iinfo(torch.int64).max


def _ngram_keys_kernel(
    tok_ptr, len_ptr, key_ptr, T, n, stride_tok,
    PRIME: tl.constexpr, BASE1: tl.constexpr, BASE2: tl.constexpr, NO_KEY: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    starts = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    length = tl.load(len_ptr + row)
    valid = (starts + n) <= length
    h1 = tl.zeros((BLOCK,), tl.int64)
    h2 = tl.zeros((BLOCK,), tl.int64)
    for t in range(n):
        tok = tl.load(tok_ptr + row * stride_tok + starts + t, mask=valid, other=0).to(tl.int64)
        tok = ((tok % PRIME) + PRIME) % PRIME
        h1 = (h1 * BASE1 + tok) % PRIME
        h2 = (h2 * BASE2 + tok) % PRIME
    key = tl.where(valid, h1 * 2147483648 + h2, NO_KEY)
    tl.store(key_ptr + row * T + starts, key, mask=starts < T)


def _ngram_confirm_kernel(
    tok_ptr, key_ptr, perm_ptr, rep_ptr, T, n, stride_tok,
    NO_KEY: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    idx = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inside = idx < T
    key = tl.load(key_ptr + row * T + idx, mask=inside, other=NO_KEY)
    pos = tl.load(perm_ptr + row * T + idx, mask=inside, other=0)
    valid = inside & (key != NO_KEY)
    found = valid & (idx < 0)
    active = valid
    j = idx - 1
    while tl.max(active.to(tl.int32), 0) > 0:
        active = active & (j >= 0)
        prev_key = tl.load(key_ptr + row * T + j, mask=active, other=NO_KEY)
        active = active & (prev_key == key)
        prev_pos = tl.load(perm_ptr + row * T + j, mask=active, other=0)
        equal = active
        for t in range(n):
            a = tl.load(tok_ptr + row * stride_tok + pos + t, mask=equal, other=0)
            b = tl.load(tok_ptr + row * stride_tok + prev_pos + t, mask=equal, other=0)
            equal = equal & (a == b)
        found = found | equal
        active = active & (~equal)
        j = j - 1
    tl.store(rep_ptr + row * T + pos, found.to(tl.int8), mask=valid)


def _repeated_starts_triton(
    tokens: torch.Tensor, lengths: torch.Tensor, n: int, key_mask: int | None = None
) -> torch.Tensor:
    """Bool [B, T]: start s is repeated (its n-gram starts earlier in the row). ``key_mask``
    (tests only) keeps only those bits of each key, to force hash collisions."""
    check_triton_device(tokens)
    batch, steps = tokens.shape
    device = tokens.device
    rep = torch.zeros(batch, steps, dtype=torch.int8, device=device)
    if batch == 0 or steps == 0 or n > steps:
        return rep.bool()
    tok = tokens.to(torch.int64).contiguous()
    lens = lengths.to(device=device, dtype=torch.int64).contiguous()
    keys = torch.empty(batch, steps, dtype=torch.int64, device=device)
    interpreted = triton_interpreted()
    block = 64 if interpreted else 256
    grid = (batch, -(-steps // block))
    opts = {} if interpreted else {"num_warps": 4}
    jit(_ngram_keys_kernel)[grid](
        tok, lens, keys, steps, n, tok.stride(0),
        PRIME=_HASH_PRIME, BASE1=_HASH_BASES[0], BASE2=_HASH_BASES[1], NO_KEY=_NO_KEY,
        BLOCK=block, **opts,
    )
    if key_mask is not None:
        keys = torch.where(keys == _NO_KEY, keys, keys & key_mask)
    keys, perm = torch.sort(keys, dim=1, stable=True)
    jit(_ngram_confirm_kernel)[grid](
        tok, keys, perm.contiguous(), rep, steps, n, tok.stride(0),
        NO_KEY=_NO_KEY, BLOCK=block, **opts,
    )
    return rep.bool()


def _marks_from_starts(rep: torch.Tensor, n: int, only_start: bool) -> torch.Tensor:
    batch, steps = rep.shape
    if only_start and steps:
        pos = torch.arange(steps, device=rep.device).expand(batch, steps)
        last = torch.where(rep, pos, torch.full_like(pos, -1)).cummax(dim=1).values
        prev = torch.cat([torch.full_like(last[:, :1], -1), last[:, :-1]], dim=1)
        rep = rep & ((prev < 0) | (pos > prev + n))
    counts = torch.nn.functional.pad(rep.to(torch.int32).cumsum(dim=1), (n, 0))
    return (counts[:, n:] - counts[:, :-n]) > 0


def repetition_mask_triton(
    tokens: torch.Tensor, lengths: torch.Tensor, n: int, only_start: bool = False,
    key_mask: int | None = None,
) -> torch.Tensor:
    """The Triton path of `repetition_mask`. Inputs are not re-checked."""
    rep = _repeated_starts_triton(tokens, lengths, n, key_mask)
    return _marks_from_starts(rep, n, only_start)


def repetition_ratio_triton(
    tokens: torch.Tensor, lengths: torch.Tensor, n: int, key_mask: int | None = None
) -> torch.Tensor:
    """The Triton path of `repetition_ratio`. Inputs are not re-checked."""
    rep = _repeated_starts_triton(tokens, lengths, n, key_mask)
    total = (lengths.to(device=tokens.device, dtype=torch.float64) - (n - 1)).clamp_min(0)
    repeated = rep.sum(dim=1, dtype=torch.float64)
    distinct = total - repeated
    ratio = torch.where(total > 0, 1.0 - distinct / total.clamp_min(1), torch.zeros_like(total))
    return ratio.to(torch.float32)


def repetition_mask(
    tokens: torch.Tensor, lengths: torch.Tensor, n: int, only_start: bool = False
) -> torch.Tensor:
    """Bool [B, T]: True at every position covered by a repeated n-gram.

    With ``only_start=True`` a repeated start's span is marked only when it starts past the end of
    the previous repeated start (``s > s_prev + n``): a contiguous run of repeated n-grams (each
    repeated start within n of the one before) is penalised once, on the n tokens of its first
    repeated n-gram, however long the run is; a new run (and a new mark) starts only at a repeated
    start more than n positions after the previous repeated start. Positions at or past a
    sequence's length are never marked.
    """
    tokens, lengths, n = _check(tokens, lengths, n)
    impl = select(tokens.device, cpu=True, triton=True, op="repetition_mask")
    if impl == "triton":
        return repetition_mask_triton(tokens, lengths, n, only_start)
    if impl == "cpu":
        mask = cpu_extension().repetition_mask(
            _as_numpy_int64(tokens), _as_numpy_int64(lengths), n, bool(only_start), cpu_threads()
        )
        return torch.from_numpy(mask).to(tokens.device)
    return repetition_mask_reference(tokens, lengths, n, only_start)


def repetition_ratio(tokens: torch.Tensor, lengths: torch.Tensor, n: int) -> torch.Tensor:
    """Float32 [B]: 1 - distinct n-grams / n-grams per sequence; 0 when it has no n-gram."""
    tokens, lengths, n = _check(tokens, lengths, n)
    impl = select(tokens.device, cpu=True, triton=True, op="repetition_ratio")
    if impl == "triton":
        return repetition_ratio_triton(tokens, lengths, n)
    if impl == "cpu":
        ratio = cpu_extension().repetition_ratio(
            _as_numpy_int64(tokens), _as_numpy_int64(lengths), n, cpu_threads()
        )
        return torch.from_numpy(ratio).to(tokens.device)
    return repetition_ratio_reference(tokens, lengths, n)
