"""Incremental n-gram repetition during generation: one new token per sequence per decode step.

`repetition_state(batch, max_len, n, device)` makes a `RepetitionState`; each
`repetition_update(state, new_tokens, active)` appends one token to every active row and returns,
per row,

- ``occurrences``: how many times the n-gram ending at the new token has occurred so far, this one
  included (1 for a new n-gram; 0 while the row has fewer than n tokens, and for inactive rows);
- ``repeated``: the tokens marked so far, equal to ``repetition_mask(prefix, length, n).sum()``
  for the row's prefix after every step.

``state.distinct`` and ``state.total`` count the distinct and all n-grams of each prefix, and
``state.ratio()`` equals ``repetition_ratio`` on it. ``state.select(rows)`` keeps rows (the decode
loop drops finished ones).

Why ``repeated`` is incremental: the mask is the union of the intervals [s, s + n) of repeated
starts s, and starts arrive in increasing order with intervals of one length, so a new repeated
start s adds exactly ``s + n - max(end, s)`` tokens, where ``end`` is the end of the last marked
interval (a per-row scalar).

Memory per sequence (the fast paths; the state is allocated once, nothing grows):

- the token history: int64 [max_len], 8 bytes per token (the n-gram confirmations read it);
- an open-addressing hash table of C = the next power of two >= 2 * max(1, max_len - n + 1) slots
  (at most half full: a row has at most max_len - n + 1 distinct n-grams), each slot three int32
  (the first occurrence's start, the n-gram's 31-bit hash, its count): 12 bytes per slot, 2 to 4
  slots per token of ``max_len``;
- five int64 per row (length, rolling hash, marked tokens, end of the last marked interval,
  distinct n-grams) and one scratch slot (12 bytes) that is never probed.

That is 32 to 56 bytes per token of ``max_len`` (32 when 2 * (max_len - n + 1) is a power of two):
16,384 tokens x 256 rows take 128 MiB. The reference keeps the history and a Python dict per row
instead of the table (it is the oracle, not a fast path).

Exactness: a hash match is only a candidate; the n tokens are compared with those of the stored
first occurrence before it counts, so hash collisions cost a comparison and never a false repeat
(``hash_bits`` shrinks the hash for the tests that force collisions).

Implementations (chosen when the state is made, from its device and ``LONGCOT_KERNELS``, as for
every op; the state's layout depends on it; ``state.impl`` names it):

- ``reference``: a Python dict of n-gram tuples per row, the oracle;
- ``cpu`` (the default for CPU tensors when the C++ extension is built; ``LONGCOT_KERNELS=cpu``
  requires it there): csrc/ngram_update.cpp, the Triton kernel's per-row logic in C++, updating the
  state's tensors in place through their NumPy views (which share memory) in one extension call a
  step, with no per-call allocation but the two outputs. Threads over rows only for batches large
  enough to pay for them: a decode step of a few hundred rows runs on one;
- ``torch``: vectorised PyTorch over the whole batch (CPU or CUDA tensors, no Python loop over rows;
  the CPU fallback without the extension, and ``LONGCOT_KERNELS=cpu`` on CUDA tensors):
  each round gathers a window of probe slots, takes the first that is empty or holds the same hash,
  and confirms it by comparing the n tokens; rows that the window did not resolve (a long probe
  sequence or a collision) take further rounds. With at most half the slots used, a window of 16
  probes leaves a row unresolved with a probability of about 2^-16 (double hashing probes close to
  uniformly), but deciding whether another round is needed reads a flag on the host: free for CPU
  tensors, a device sync on CUDA tensors (where the default is the Triton kernel). About 100 small
  ops a step: their overhead, not the work, sets its cost on the CPU;
- Triton (the default for CUDA tensors; CPU tensors through the interpreter): one program per row
  does the append, the rolling hash, the probe loop with the token-by-token confirmation and the
  counts, all on the device: one launch per step and no host sync.

The three fast paths share the table's layout, hash and probe sequence (double hashing in a
power-of-two table: every slot is visited, so a probe ends at the n-gram or at an empty slot), so
one state can be updated by any of them.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import NamedTuple

import torch

from . import _checks
from ._backend import cpu_extension, cpu_threads, has_cpu_extension, requested_backend
from ._backend import select as select_backend
from .logprobs import check_triton_device, jit, tl, triton_interpreted

# The rolling hash: a polynomial in the base modulo 2^31 - 1 of the n tokens (each reduced modulo
# the prime first, so any int64 id works); every product stays below 2^62.
_PRIME = 2_147_483_647
_BASE = 1_000_003
# Odd 32-bit multipliers (Knuth's and murmur3's) spread the hash over the table; the high bits of
# the 32-bit product pick the home slot and the step of the probe sequence.
_MIX_HOME = 2_654_435_761
_MIX_STEP = 2_246_822_519
_LOW32 = 0xFFFFFFFF
# Probe slots gathered per round by the torch path.
_WINDOW = 16
# The state's tensors the C++ path updates, in the extension's argument order.
_CPP_ARRAYS = ("tokens", "length", "hash", "repeated", "marked_end", "distinct", "slot_start", "slot_key", "slot_count")


class RepetitionStep(NamedTuple):
    """What `repetition_update` returns, each int64 [B]."""

    occurrences: torch.Tensor
    repeated: torch.Tensor


@dataclasses.dataclass
class RepetitionState:
    """Per-row state of `repetition_update` (make it with `repetition_state`).

    Tensors live on the tokens' device: ``tokens`` int64 [B, max_len] (the history; columns at or
    past ``length`` are 0), ``length``, ``repeated``, ``distinct``, ``marked_end`` int64 [B]. The
    fast paths add ``hash`` int64 [B] (the rolling hash of the last n tokens) and the table
    ``slot_start``, ``slot_key``, ``slot_count`` int32 [B, capacity + 1] (start -1: empty; the last
    column is a scratch slot, never probed, where the torch path sends the writes of rows that have
    nothing to write, which spares it a read-modify-write of the real slots); the
    reference adds ``history`` and ``grams`` (a list and a dict of n-gram tuples per row).
    """

    n: int
    max_len: int
    impl: str
    hash_bits: int
    tokens: torch.Tensor
    length: torch.Tensor
    repeated: torch.Tensor
    distinct: torch.Tensor
    marked_end: torch.Tensor
    hash: torch.Tensor | None = None
    slot_start: torch.Tensor | None = None
    slot_key: torch.Tensor | None = None
    slot_count: torch.Tensor | None = None
    history: list[list[int]] | None = None
    grams: list[dict[tuple[int, ...], int]] | None = None
    # An upper bound on every row's length, known on the host: while it is below max_len no row
    # can be full, so the full-row check costs no device read.
    length_bound: int = 0
    # The C++ path's (tensors, their NumPy views), made on its first step: nine .numpy() calls a
    # step would cost more than the kernel at small batches. Rebuilt when a tensor is replaced.
    numpy_views: tuple[tuple[torch.Tensor, ...], tuple[object, ...]] | None = dataclasses.field(
        default=None, repr=False, compare=False
    )

    @property
    def batch(self) -> int:
        return self.tokens.shape[0]

    @property
    def device(self) -> torch.device:
        return self.tokens.device

    @property
    def capacity(self) -> int:
        """Hash-table slots per row (0 for the reference, which has no table)."""
        return 0 if self.slot_start is None else self.slot_start.shape[1] - 1

    @property
    def total(self) -> torch.Tensor:
        """Int64 [B]: the n-grams of each prefix, max(length - n + 1, 0)."""
        return (self.length - (self.n - 1)).clamp_min(0)

    def ratio(self) -> torch.Tensor:
        """Float32 [B]: 1 - distinct / total n-grams (0 without an n-gram): `repetition_ratio`."""
        total = self.total.to(torch.float64)
        ratio = 1.0 - self.distinct.to(torch.float64) / total.clamp_min(1)
        return torch.where(total > 0, ratio, torch.zeros_like(ratio)).to(torch.float32)

    def select(self, rows: object) -> RepetitionState:
        """A new state holding ``rows`` (indices into this one, in that order; repeats allowed).

        The bounds check reads the indices on the host (a device sync for CUDA tensors), which
        the decode loop pays anyway when it decides which rows to drop.
        """
        if isinstance(rows, torch.Tensor):
            _checks.rank("rows", rows, 1, "[R]")
            _checks.integer("rows", rows)
            index = rows.to(device=self.device, dtype=torch.int64)
        elif isinstance(rows, (list, tuple)) and all(
            isinstance(r, int) and not isinstance(r, bool) for r in rows
        ):
            index = torch.tensor(list(rows), dtype=torch.int64, device=self.device)
        else:
            raise ValueError(f"rows: expected a 1-D integer tensor or a list of ints, got {rows!r}")
        if index.numel():
            lo, hi = int(index.min()), int(index.max())
            if lo < 0 or hi >= self.batch:
                raise ValueError(
                    f"rows: expected indices in [0, {self.batch}) (the state's rows), got min {lo}, max {hi}"
                )
        picked = {
            f.name: getattr(self, f.name)[index]
            for f in dataclasses.fields(self)
            if isinstance(getattr(self, f.name), torch.Tensor)
        }
        host = index.tolist() if self.grams is not None else []
        return dataclasses.replace(
            self,
            **picked,
            # Copies, not shared lists: a row kept twice must not see the other's appends.
            history=None if self.history is None else [list(self.history[i]) for i in host],
            grams=None if self.grams is None else [copy.copy(self.grams[i]) for i in host],
            numpy_views=None,  # views of this state's tensors (and they would keep them alive)
        )


def _next_pow2(x: int) -> int:
    return 1 << max(0, x - 1).bit_length()


def repetition_state(
    batch: int,
    max_len: int,
    n: int,
    device: torch.device | str | None = None,
    *,
    capacity: int | None = None,
    hash_bits: int = 31,
) -> RepetitionState:
    """An empty `RepetitionState` for ``batch`` rows of up to ``max_len`` tokens, n-grams of ``n``.

    The implementation is chosen here (the device and ``LONGCOT_KERNELS``). ``capacity`` (hash
    slots per row; a power of two >= max(1, max_len - n + 1), default twice that rounded up) and
    ``hash_bits`` (the bits of the 31-bit hash kept, 0..31) exist for tests that force probing
    and collisions; smaller values only cost time, never exactness.
    """
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 0:
        raise ValueError(f"batch: expected an integer >= 0, got {batch!r}")
    max_len = _checks.positive_int("max_len", max_len)
    n = _checks.positive_int("n", n)
    if isinstance(hash_bits, bool) or not isinstance(hash_bits, int) or not 0 <= hash_bits <= 31:
        raise ValueError(f"hash_bits: expected an integer in [0, 31], got {hash_bits!r}")
    grams = max(1, max_len - n + 1)
    if capacity is None:
        capacity = _next_pow2(2 * grams)
    elif (
        isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < grams
        or capacity & (capacity - 1)
    ):
        raise ValueError(
            f"capacity: expected a power of two >= {grams} (the most n-grams a row can hold), got {capacity!r}"
        )
    try:
        device = torch.device("cpu" if device is None else device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device: expected a torch device, got {device!r}") from exc
    impl = select_backend(device, cpu=True, triton=True, cpu_needs_extension=False, op="repetition_update")
    if impl == "cpu":
        impl = _cpu_impl(device)

    def zeros(*shape: int, dtype: torch.dtype = torch.int64) -> torch.Tensor:
        return torch.zeros(*shape, dtype=dtype, device=device)

    state = RepetitionState(
        n=n, max_len=max_len, impl=impl, hash_bits=hash_bits,
        tokens=zeros(batch, max_len), length=zeros(batch), repeated=zeros(batch),
        distinct=zeros(batch), marked_end=zeros(batch),
    )
    if impl == "reference":
        state.history = [[] for _ in range(batch)]
        state.grams = [{} for _ in range(batch)]
    else:
        if impl == "triton":
            check_triton_device(state.tokens)
        state.hash = zeros(batch)
        state.slot_start = torch.full((batch, capacity + 1), -1, dtype=torch.int32, device=device)
        state.slot_key = zeros(batch, capacity + 1, dtype=torch.int32)
        state.slot_count = zeros(batch, capacity + 1, dtype=torch.int32)
    return state


def _cpu_impl(device: torch.device) -> str:
    """``cpu`` (C++) or ``torch`` for the CPU path: the C++ kernel updates host memory in place, so
    CUDA tensors take the vectorised torch path; CPU tensors take C++ when it is built (an explicit
    ``LONGCOT_KERNELS=cpu`` requires it, as for the other C++ ops), else the torch path."""
    if device.type != "cpu":
        return "torch"
    if requested_backend() == "cpu":
        cpu_extension()  # fails loudly, with the fix, when the extension is missing
        return "cpu"
    return "cpu" if has_cpu_extension() else "torch"


def _check(
    state: object, new_tokens: object, active: object
) -> tuple[RepetitionState, torch.Tensor, torch.Tensor | None]:
    if not isinstance(state, RepetitionState):
        raise ValueError(f"state: expected a RepetitionState (from repetition_state), got {type(state).__name__}")
    new_tokens = _checks.tensor("new_tokens", new_tokens)
    _checks.rank("new_tokens", new_tokens, 1, "[B]")
    _checks.integer("new_tokens", new_tokens)
    _checks.same_shape("new_tokens", new_tokens, "the state's rows", (state.batch,))
    _checks.same_device("new_tokens", new_tokens, "the state", state.device)
    if active is not None:
        active = _checks.tensor("active", active)
        if active.dtype != torch.bool:
            raise ValueError(f"active: expected a bool tensor, got {active.dtype}")
        _checks.same_shape("active", active, "the state's rows", (state.batch,))
        _checks.same_device("active", active, "the state", state.device)
    if state.length_bound >= state.max_len:  # some row may be full: look (a host read)
        grows = state.length + (1 if active is None else active.to(torch.int64))
        if state.batch and int(grows.max()) > state.max_len:
            row = int(grows.argmax())
            raise ValueError(
                f"new_tokens: row {row} already holds max_len={state.max_len} tokens "
                "(pass active=False for full rows, or make the state with a larger max_len)"
            )
    return state, new_tokens, active


# --- the reference ---------------------------------------------------------------------------


def repetition_update_reference(
    state: RepetitionState, new_tokens: torch.Tensor, active: torch.Tensor | None = None
) -> RepetitionStep:
    """The oracle: a dict of n-gram tuples per row. Needs a state made for the reference; inputs
    are not re-checked (`repetition_update` checks them)."""
    if state.grams is None or state.history is None:
        raise ValueError(f"state: made for the {state.impl!r} implementation, not the reference")
    n = state.n
    new = new_tokens.tolist()
    flags = [True] * state.batch if active is None else active.tolist()
    occurrences = [0] * state.batch
    repeated, distinct, end = state.repeated.tolist(), state.distinct.tolist(), state.marked_end.tolist()
    for b in range(state.batch):
        if not flags[b]:
            continue
        row = state.history[b]
        row.append(new[b])
        if len(row) < n:
            continue
        s = len(row) - n
        gram = tuple(row[s:])
        count = state.grams[b].get(gram, 0) + 1
        state.grams[b][gram] = count
        occurrences[b] = count
        if count > 1:
            repeated[b] += s + n - max(end[b], s)
            end[b] = s + n
        else:
            distinct[b] += 1
    device = state.device
    for b in range(state.batch):
        if flags[b]:
            state.tokens[b, len(state.history[b]) - 1] = new[b]
    state.length = torch.tensor([len(r) for r in state.history], dtype=torch.int64, device=device)
    state.repeated = torch.tensor(repeated, dtype=torch.int64, device=device)
    state.distinct = torch.tensor(distinct, dtype=torch.int64, device=device)
    state.marked_end = torch.tensor(end, dtype=torch.int64, device=device)
    return RepetitionStep(torch.tensor(occurrences, dtype=torch.int64, device=device), state.repeated)


# --- vectorised PyTorch (CPU and CUDA tensors) -------------------------------------------------


def _probe_params(key: torch.Tensor, capacity: int) -> tuple[torch.Tensor, torch.Tensor]:
    shift = 32 - (capacity.bit_length() - 1)
    home = ((key * _MIX_HOME) & _LOW32) >> shift
    step = ((((key * _MIX_STEP) & _LOW32) >> shift) | 1) & (capacity - 1)
    return home, step


def repetition_update_torch(
    state: RepetitionState, new_tokens: torch.Tensor, active: torch.Tensor | None = None
) -> RepetitionStep:
    """The vectorised PyTorch path (``torch``). Inputs are not re-checked."""
    n, max_len, cap = state.n, state.max_len, state.capacity
    device = state.device
    batch = state.batch
    new = new_tokens.to(torch.int64)
    length = state.length
    act = torch.ones(batch, dtype=torch.bool, device=device) if active is None else active
    # Full inactive rows aim at the last column and write back what is there.
    col = length.clamp(max=max_len - 1).unsqueeze(1)
    state.tokens.scatter_(1, col, torch.where(act, new, state.tokens.gather(1, col).squeeze(1)).unsqueeze(1))

    leaving = state.tokens.gather(1, (length - n).clamp(min=0).unsqueeze(1)).squeeze(1)
    h = state.hash
    dropped = torch.remainder(h - torch.remainder(leaving, _PRIME) * pow(_BASE, n - 1, _PRIME), _PRIME)
    h = torch.where(length >= n, dropped, h)
    h = torch.remainder(h * _BASE + torch.remainder(new, _PRIME), _PRIME)
    h = torch.where(act, h, state.hash)
    length = length + act
    gram = act & (length >= n)
    start = (length - n).clamp(min=0)
    key = h & ((1 << state.hash_bits) - 1)
    home, step = _probe_params(key, cap)

    span = torch.arange(n, device=device)
    current = state.tokens.gather(1, (start.unsqueeze(1) + span).clamp(max=max_len - 1))
    window = torch.arange(_WINDOW, device=device)
    key32 = key.to(torch.int32).unsqueeze(1)
    probe = torch.zeros(batch, dtype=torch.int64, device=device)  # probes done so far
    resolved = ~gram
    slot = torch.zeros(batch, dtype=torch.int64, device=device)
    is_new = torch.zeros(batch, dtype=torch.bool, device=device)
    while True:
        slots = (home.unsqueeze(1) + (probe.unsqueeze(1) + window) * step.unsqueeze(1)) & (cap - 1)
        first_start = state.slot_start.gather(1, slots)
        empty = first_start < 0
        candidate = empty | (state.slot_key.gather(1, slots) == key32)
        found = candidate.any(dim=1)
        pick = candidate.to(torch.uint8).argmax(dim=1, keepdim=True)  # the first candidate
        pick_empty = empty.gather(1, pick).squeeze(1)
        earlier = first_start.gather(1, pick).squeeze(1).clamp(min=0).to(torch.int64)
        same = (state.tokens.gather(1, (earlier.unsqueeze(1) + span).clamp(max=max_len - 1)) == current).all(dim=1)
        hit = ~resolved & found & (pick_empty | same)
        slot = torch.where(hit, slots.gather(1, pick).squeeze(1), slot)
        is_new = torch.where(hit, pick_empty, is_new)
        resolved = resolved | hit
        probe = torch.where(found, probe + pick.squeeze(1) + 1, probe + _WINDOW)
        if bool(resolved.all()):  # on CUDA tensors this is the path's one device sync per round
            break

    # An empty slot's count is 0, so the new count is always the old one plus 1.
    count = state.slot_count.gather(1, slot.unsqueeze(1)).squeeze(1) + 1
    state.slot_count.scatter_(1, torch.where(gram, slot, cap).unsqueeze(1), count.unsqueeze(1))
    at = torch.where(gram & is_new, slot, cap).unsqueeze(1)
    state.slot_start.scatter_(1, at, start.to(torch.int32).unsqueeze(1))
    state.slot_key.scatter_(1, at, key32)
    occurrences = torch.where(gram, count.to(torch.int64), torch.zeros_like(start))
    repeat = occurrences > 1
    added = start + n - torch.maximum(state.marked_end, start)
    state.repeated = state.repeated + torch.where(repeat, added, torch.zeros_like(added))
    state.marked_end = torch.where(repeat, start + n, state.marked_end)
    state.distinct = state.distinct + (occurrences == 1)
    state.hash, state.length = h, length
    return RepetitionStep(occurrences, state.repeated)


# --- C++ (CPU tensors) -------------------------------------------------------------------------


def repetition_update_cpp(
    state: RepetitionState, new_tokens: torch.Tensor, active: torch.Tensor | None = None
) -> RepetitionStep:
    """The C++ path (``cpu``): csrc/ngram_update.cpp updates the state's tensors in place. Any
    fast-path state on CPU tensors works (the layout is shared); the extension re-checks the arrays
    and the per-row scalars before it writes, so a refused call changes nothing."""
    if state.slot_start is None or state.device.type != "cpu":
        raise ValueError(f"state: the C++ path needs a fast-path state on CPU tensors, got {state.impl!r} "
                         f"on {state.device}")
    tensors = tuple(getattr(state, name) for name in _CPP_ARRAYS)
    views = state.numpy_views
    if views is None or any(a is not b for a, b in zip(views[0], tensors)):
        # The torch path replaces tensors each step (and a caller may): views must follow them.
        views = state.numpy_views = (tensors, tuple(t.numpy() for t in tensors))
    if new_tokens.dtype != torch.int64:
        new_tokens = new_tokens.to(torch.int64)
    flags = None if active is None else active.contiguous().numpy()
    occurrences, repeated = cpu_extension().repetition_update(
        *views[1], new_tokens.contiguous().numpy(), flags, state.n, state.hash_bits, cpu_threads()
    )
    return RepetitionStep(torch.from_numpy(occurrences), torch.from_numpy(repeated))


# --- Triton (CUDA tensors; CPU tensors through the interpreter) --------------------------------


def _update_kernel(
    tok_ptr, len_ptr, hash_ptr, rep_ptr, end_ptr, dist_ptr,
    start_ptr, key_ptr, count_ptr, new_ptr, act_ptr, occ_ptr, rep_out_ptr,
    max_len, n, cap, cap_shift, key_mask, pow_n1, mix_home, mix_step, low32,
    PRIME: tl.constexpr, BASE: tl.constexpr, HAS_ACTIVE: tl.constexpr, BLOCK_N: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    length = tl.load(len_ptr + row)
    rep = tl.load(rep_ptr + row)
    occ = length * 0
    go = length < max_len
    if HAS_ACTIVE:
        go = go & (tl.load(act_ptr + row) != 0)
    if go:
        toks = tok_ptr + row * max_len
        tok = tl.load(new_ptr + row)
        tl.store(toks + length, tok)
        h = tl.load(hash_ptr + row)
        if length >= n:
            old = tl.load(toks + length - n)
            old = ((old % PRIME) + PRIME) % PRIME
            h = (h + PRIME - (old * pow_n1) % PRIME) % PRIME
        h = (h * BASE + ((tok % PRIME) + PRIME) % PRIME) % PRIME
        length += 1
        tl.store(hash_ptr + row, h)
        tl.store(len_ptr + row, length)
        if length >= n:
            s = length - n
            key = h & key_mask
            slot = ((key * mix_home) & low32) >> cap_shift
            step = ((((key * mix_step) & low32) >> cap_shift) | 1) & (cap - 1)
            offs = tl.arange(0, BLOCK_N)
            table = row * (cap + 1)
            searching = length >= n
            while searching:
                first = tl.load(start_ptr + table + slot).to(tl.int64)
                empty = first < 0
                candidate = (first >= 0) & (tl.load(key_ptr + table + slot).to(tl.int64) == key)
                diff = tl.sum((offs < 0).to(tl.int32), axis=0)
                # Only a candidate's tokens are read. (The interpreter turns a scalar & vector of
                # bools into int64, which a load refuses as a mask: compare with a limit instead.)
                limit = tl.where(candidate, n, 0)
                for j in range(0, n, BLOCK_N):
                    m = (j + offs) < limit
                    a = tl.load(toks + first + j + offs, mask=m, other=0)
                    b = tl.load(toks + s + j + offs, mask=m, other=0)
                    diff += tl.sum((a != b).to(tl.int32), axis=0)
                match = candidate & (diff == 0)
                count = tl.load(count_ptr + table + slot, mask=match, other=0) + 1
                tl.store(start_ptr + table + slot, s.to(tl.int32), mask=empty)
                tl.store(key_ptr + table + slot, key.to(tl.int32), mask=empty)
                tl.store(count_ptr + table + slot, tl.where(empty, 1, count), mask=empty | match)
                occ = tl.where(empty, 1, tl.where(match, count.to(tl.int64), occ))
                searching = (~empty) & (~match)
                slot = (slot + step) & (cap - 1)
            if occ > 1:
                end = tl.load(end_ptr + row)
                rep += s + n - tl.maximum(end, s)
                tl.store(end_ptr + row, s + n)
                tl.store(rep_ptr + row, rep)
            else:
                tl.store(dist_ptr + row, tl.load(dist_ptr + row) + 1)
    tl.store(occ_ptr + row, occ)
    tl.store(rep_out_ptr + row, rep)


def repetition_update_triton(
    state: RepetitionState, new_tokens: torch.Tensor, active: torch.Tensor | None = None
) -> RepetitionStep:
    """The Triton path: one program per row. Inputs are not re-checked."""
    check_triton_device(state.tokens)
    batch, device = state.batch, state.device
    occurrences = torch.empty(batch, dtype=torch.int64, device=device)
    repeated = torch.empty(batch, dtype=torch.int64, device=device)
    if batch == 0:
        return RepetitionStep(occurrences, repeated)
    new = new_tokens.to(torch.int64).contiguous()
    flags = new if active is None else active.to(torch.int8)  # unread without HAS_ACTIVE
    cap = state.capacity
    interpreted = triton_interpreted()
    jit(_update_kernel)[(batch,)](
        state.tokens, state.length, state.hash, state.repeated, state.marked_end, state.distinct,
        state.slot_start, state.slot_key, state.slot_count, new, flags, occurrences, repeated,
        state.max_len, state.n, cap, 32 - (cap.bit_length() - 1), (1 << state.hash_bits) - 1,
        pow(_BASE, state.n - 1, _PRIME), _MIX_HOME, _MIX_STEP, _LOW32,
        PRIME=_PRIME, BASE=_BASE, HAS_ACTIVE=active is not None,
        BLOCK_N=min(128, max(16, _next_pow2(state.n))),
        **({} if interpreted else {"num_warps": 1}),
    )
    return RepetitionStep(occurrences, repeated)


def repetition_update(
    state: RepetitionState, new_tokens: torch.Tensor, active: torch.Tensor | None = None
) -> RepetitionStep:
    """Append ``new_tokens[b]`` to each row b where ``active[b]`` (default: every row); rows not
    active are left as they are. Returns (``occurrences``, ``repeated``), int64 [B]: see the
    module's docstring. ``new_tokens``: integer [B]; ``active``: bool [B]; both on the state's
    device. Updates ``state`` in place; the returned tensors are not changed by later steps.
    """
    state, new_tokens, active = _check(state, new_tokens, active)
    if state.impl == "triton":
        result = repetition_update_triton(state, new_tokens, active)
    elif state.impl == "cpu":
        result = repetition_update_cpp(state, new_tokens, active)
    elif state.impl == "torch":
        if state.batch == 0:
            result = RepetitionStep(state.length.clone(), state.repeated.clone())
        else:
            result = repetition_update_torch(state, new_tokens, active)
    else:
        result = repetition_update_reference(state, new_tokens, active)
    state.length_bound = min(state.length_bound + 1, state.max_len)
    return result
