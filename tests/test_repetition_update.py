"""The incremental n-gram repetition state (kernels/repetition_update.py) against the whole-sequence
references, after every single step: `repetition_mask(prefix).sum()`, `repetition_ratio(prefix)` and
a direct count of the newest n-gram's occurrences."""

import contextlib
import importlib
from unittest import mock

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import longcot.kernels as K
from conftest import kernels_backend

# The module (the package's attribute of that name is the function).
RU = importlib.import_module("longcot.kernels.repetition_update")

# The paths that run on this machine without the interpreter fixture: C++ and vectorised torch.
FAST = ["cpu", "torch"]


@contextlib.contextmanager
def backend_for(name):
    """Make states for ``name``: the torch path is what CPU tensors get without the extension."""
    if name == "torch":
        with kernels_backend("auto"), mock.patch.object(RU, "has_cpu_extension", lambda: False):
            yield
    else:
        with kernels_backend(name):
            yield


def make_state(backend, *args, **kwargs):
    with backend_for(backend):
        state = K.repetition_state(*args, **kwargs)
    assert state.impl == backend
    return state


def expected_after(histories, n, stepped):
    """(occurrences, repeated, ratio, distinct) of each row's history, from the definitions."""
    width = max([1] + [len(h) for h in histories])
    tokens = torch.zeros(len(histories), width, dtype=torch.long)
    for b, h in enumerate(histories):
        tokens[b, : len(h)] = torch.tensor(h, dtype=torch.long)
    lengths = torch.tensor([len(h) for h in histories], dtype=torch.long)
    repeated = K.repetition_mask_reference(tokens, lengths, n).sum(dim=1).tolist()
    ratio = K.repetition_ratio_reference(tokens, lengths, n)
    occurrences, distinct = [], []
    for h, moved in zip(histories, stepped):
        grams = [tuple(h[s : s + n]) for s in range(len(h) - n + 1)]
        distinct.append(len(set(grams)))
        occurrences.append(grams.count(grams[-1]) if moved and grams else 0)
    return occurrences, repeated, ratio, distinct


def drive(backend, tokens, n, active=None, check_every=1, **kwargs):
    """Feed ``tokens`` [B, T] one column per step (``active`` [B, T] bool: which rows take it) to a
    state made for ``backend`` and compare with the definitions after every step."""
    batch, steps = tokens.shape
    state = make_state(backend, batch, steps, n, **kwargs)
    histories = [[] for _ in range(batch)]
    for t in range(steps):
        flags = None if active is None else active[:, t]
        step = K.repetition_update(state, tokens[:, t], flags)
        stepped = [True] * batch if flags is None else flags.tolist()
        for b in range(batch):
            if stepped[b]:
                histories[b].append(int(tokens[b, t]))
        if (t + 1) % check_every and t + 1 < steps:
            continue
        check(state, step, histories, stepped)
    return state, histories


def check(state, step, histories, stepped):
    occurrences, repeated, ratio, distinct = expected_after(histories, state.n, stepped)
    assert step.occurrences.dtype == step.repeated.dtype == torch.int64
    assert step.occurrences.tolist() == occurrences
    assert step.repeated.tolist() == repeated
    assert state.repeated.tolist() == repeated
    assert torch.equal(state.ratio(), ratio)  # bit for bit, not approximately
    assert state.distinct.tolist() == distinct
    assert state.total.tolist() == [max(0, len(h) - state.n + 1) for h in histories]
    assert state.length.tolist() == [len(h) for h in histories]
    for b, h in enumerate(histories):
        assert state.tokens[b, : len(h)].tolist() == h
        assert not state.tokens[b, len(h) :].any()


def periodic(batch, steps, period, alphabet, gen):
    base = torch.randint(0, alphabet, (batch, period), generator=gen)
    return base[:, torch.arange(steps) % period]


def nested(steps):
    # A period-3 loop inside a period-10 loop inside a period-23 one, then period 1.
    inner = [1, 2, 3] * 3 + [4]
    outer = (inner * 2 + [5, 6, 7]) * 4
    row = (outer + [9] * steps)[:steps]
    return torch.tensor([row], dtype=torch.long)


def adversarial_cases(gen, steps):
    return [
        periodic(2, steps, 7, 50, gen),
        periodic(2, steps, 1, 3, gen),  # period 1: every start after the first n repeats
        periodic(1, steps, 2, 2, gen),
        nested(steps),
        torch.arange(steps, dtype=torch.long).reshape(1, -1),  # never repeats
    ]


# --- the reference, C++ and the vectorised PyTorch path ---------------------------------------


@pytest.mark.parametrize("backend", ["reference", *FAST])
@pytest.mark.parametrize("n", [1, 2, 3, 5])
def test_random_small_vocab_every_prefix(backend, n):
    gen = torch.Generator().manual_seed(n)
    tokens = torch.randint(0, 3, (5, 60), generator=gen)
    drive(backend, tokens, n)


@pytest.mark.parametrize("backend", ["reference", *FAST])
@pytest.mark.parametrize("n", [1, 3, 8, 70, 200])
def test_adversarial_every_prefix(backend, n):
    # n = 70 and 200: longer than (or as long as) the sequences, so no n-gram ever completes.
    gen = torch.Generator().manual_seed(n)
    for tokens in adversarial_cases(gen, 70):
        drive(backend, tokens, n)


@pytest.mark.parametrize("backend", ["reference", *FAST])
def test_inactive_rows_mid_way(backend):
    # Rows skip steps in random places and whole stretches; a skipped row's tokens are ignored.
    gen = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, 3, (6, 50), generator=gen)
    active = torch.rand(6, 50, generator=gen) < 0.7
    active[1, 10:40] = False
    active[2] = False  # never active: stays empty
    active[3, :45] = False  # starts late
    drive(backend, tokens, 2, active=active)


def test_occurrences_and_marks_by_hand():
    # n = 2 over 1 2 1 2 1 3 1 2: the 2-grams are (1,2) (2,1) (1,2) (2,1) (1,3) (3,1) (1,2).
    state = K.repetition_state(1, 8, 2)
    got = [K.repetition_update(state, torch.tensor([t])) for t in [1, 2, 1, 2, 1, 3, 1, 2]]
    assert [int(g.occurrences) for g in got] == [0, 1, 1, 2, 2, 1, 1, 3]
    # starts 2 and 3 repeat (marks 2..4), then start 6 (marks 6, 7)
    assert [int(g.repeated) for g in got] == [0, 0, 0, 2, 3, 3, 3, 5]
    assert state.distinct.tolist() == [4] and state.total.tolist() == [7]
    assert state.ratio().tolist() == pytest.approx([1 - 4 / 7])


@pytest.mark.parametrize("backend", ["reference", *FAST])
def test_returned_tensors_are_not_changed_by_later_steps(backend):
    state = make_state(backend, 2, 6, 1)
    first = K.repetition_update(state, torch.tensor([4, 4]))
    for _ in range(3):
        K.repetition_update(state, torch.tensor([4, 4]))
    assert first.occurrences.tolist() == [1, 1] and first.repeated.tolist() == [0, 0]
    assert state.repeated.tolist() == [3, 3]


@pytest.mark.parametrize("backend", ["reference", *FAST])
def test_select_drops_reorders_and_repeats_rows(backend):
    gen = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, 3, (5, 40), generator=gen)
    state = make_state(backend, 5, 40, 2)
    histories = [[] for _ in range(5)]
    plan = {10: [4, 2, 0], 20: torch.tensor([2, 0, 0]), 30: [1]}
    for t in range(40):
        if t in plan:
            rows = plan[t]
            state = state.select(rows)
            picks = rows.tolist() if isinstance(rows, torch.Tensor) else rows
            histories = [list(histories[i]) for i in picks]
            assert state.batch == len(picks)
            check(state, K.RepetitionStep(torch.zeros(len(picks), dtype=torch.long), state.repeated),
                  histories, [False] * len(picks))
        # Row i of the state takes row i of `tokens`: the two copies of the row kept twice at step
        # 20 get different tokens from then on, so they must not share anything.
        column = tokens[: state.batch, t]
        step = K.repetition_update(state, column)
        for h, tok in zip(histories, column.tolist()):
            h.append(tok)
        check(state, step, histories, [True] * len(histories))


@pytest.mark.parametrize("backend", ["reference", *FAST])
def test_select_everything_away_and_empty_batches(backend):
    state = make_state(backend, 3, 4, 2)
    K.repetition_update(state, torch.tensor([1, 2, 3]))
    empty = state.select([])
    assert empty.batch == 0
    step = K.repetition_update(empty, torch.zeros(0, dtype=torch.long))
    assert step.occurrences.shape == step.repeated.shape == (0,)
    assert empty.ratio().shape == (0,)
    none = make_state(backend, 0, 4, 2)
    assert K.repetition_update(none, torch.zeros(0, dtype=torch.long)).repeated.shape == (0,)


@pytest.mark.parametrize("backend", ["reference", *FAST])
def test_full_rows(backend):
    state = make_state(backend, 2, 3, 1)
    for _ in range(2):
        K.repetition_update(state, torch.tensor([5, 5]))
    K.repetition_update(state, torch.tensor([5, 0]), torch.tensor([True, False]))  # row 0 full
    K.repetition_update(state, torch.tensor([0, 5]), torch.tensor([False, True]))  # row 1 full
    K.repetition_update(state, torch.tensor([0, 0]), torch.tensor([False, False]))
    assert state.repeated.tolist() == [2, 2]
    with pytest.raises(ValueError, match="new_tokens: row 0 already holds max_len=3"):
        K.repetition_update(state, torch.tensor([1, 1]))


@pytest.mark.parametrize("backend", ["reference", *FAST])
def test_extreme_ids_and_int32_tokens(backend):
    # Ids equal modulo the hash's prime hash alike; only the token comparison separates them.
    prime = 2**31 - 1
    big, small = torch.iinfo(torch.int64).max, torch.iinfo(torch.int64).min
    row = [big, small, big, small, 0, prime, 2 * prime, 3 * prime, 0, prime, -prime, big]
    drive(backend, torch.tensor([row, [i * prime for i in range(12)]]), 2)
    drive(backend, torch.tensor([[1, 2, 1, 2, 1]], dtype=torch.int32), 2)


# --- forced hash collisions and long probe sequences -------------------------------------------


def _minimal_capacity(steps, n):
    return 1 << (max(1, steps - n + 1) - 1).bit_length()


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("hash_bits", [0, 1, 3])
@pytest.mark.parametrize("n", [1, 2, 4])
def test_forced_collisions_and_full_tables(backend, hash_bits, n):
    # With 0-3 hash bits nearly every n-gram shares its hash with another, so each match is decided
    # by the token comparison; with a table of the smallest capacity allowed the probe sequences
    # run past the first window (more than _WINDOW slots), through the fallback rounds.
    gen = torch.Generator().manual_seed(hash_bits * 10 + n)
    steps = 48
    cases = [torch.randint(0, 4, (3, steps), generator=gen), *adversarial_cases(gen, steps)]
    for tokens in cases:
        state, histories = drive(backend, tokens, n, hash_bits=hash_bits,
                                 capacity=_minimal_capacity(steps, n))
        # one occupied slot per distinct n-gram, counts summing to the n-grams seen
        table = slice(0, state.capacity)  # without the scratch slot
        assert (state.slot_start[:, table] >= 0).sum(dim=1).tolist() == state.distinct.tolist()
        assert state.slot_count[:, table].sum(dim=1).tolist() == state.total.tolist()
    assert int(state.distinct.max()) > RU._WINDOW + 1  # the distinct row probed past one window


def test_torch_fallback_rounds_with_a_window_of_one(monkeypatch):
    # Every probe beyond the first takes a fallback round here.
    monkeypatch.setattr(RU, "_WINDOW", 1)
    gen = torch.Generator().manual_seed(1)
    drive("torch", torch.randint(0, 3, (4, 40), generator=gen), 2, hash_bits=1, capacity=64)


@pytest.mark.parametrize("backend", FAST)
def test_distinct_ngrams_never_repeat_under_total_collision(backend):
    # Every n-gram has the same hash and the same probe sequence: none may be called a repeat.
    tokens = torch.arange(64, dtype=torch.long).reshape(2, 32)
    state, _ = drive(backend, tokens, 3, hash_bits=0, capacity=32)
    assert state.repeated.tolist() == [0, 0] and state.ratio().tolist() == [0.0, 0.0]


@pytest.mark.parametrize("backend", FAST)
@given(
    data=st.data(),
    batch=st.integers(1, 4),
    steps=st.integers(1, 30),
    n=st.integers(1, 6),
    alphabet=st.integers(1, 4),
    hash_bits=st.sampled_from([0, 2, 31]),
)
def test_random(backend, data, batch, steps, n, alphabet, hash_bits):
    tokens = torch.tensor(
        data.draw(st.lists(st.lists(st.integers(0, alphabet - 1), min_size=steps, max_size=steps),
                           min_size=batch, max_size=batch))
    )
    active = torch.tensor(
        data.draw(st.lists(st.lists(st.booleans(), min_size=steps, max_size=steps),
                           min_size=batch, max_size=batch))
    )
    drive(backend, tokens, n, active=active, hash_bits=hash_bits)


# --- C++ against the torch path, slot for slot -----------------------------------------------


@pytest.mark.parametrize("hash_bits, small_table", [(31, False), (2, True)])
def test_cpp_and_torch_agree_step_by_step_on_a_batch(hash_bits, small_table):
    # 48 rows, a third looping with period 37, the others small vocabularies, rows idle at times:
    # the same outputs every step, the whole-sequence ops at checkpoints, the same table at the end.
    gen = torch.Generator().manual_seed(hash_bits)
    batch, steps, n = 48, 200, 5
    tokens = torch.randint(0, 4, (batch, steps), generator=gen)
    tokens[: batch // 3] = periodic(batch // 3, steps, 37, 1000, gen)
    active = torch.rand(batch, steps, generator=gen) < 0.9
    kwargs = {"hash_bits": hash_bits, "capacity": _minimal_capacity(steps, n) if small_table else None}
    cpp, vec = make_state("cpu", batch, steps, n, **kwargs), make_state("torch", batch, steps, n, **kwargs)
    for t in range(steps):
        a = K.repetition_update(cpp, tokens[:, t], active[:, t])
        b = K.repetition_update(vec, tokens[:, t], active[:, t])
        assert torch.equal(a.occurrences, b.occurrences) and torch.equal(a.repeated, b.repeated)
        if t % 50 == 49:
            assert torch.equal(a.repeated, K.repetition_mask(cpp.tokens, cpp.length, n).sum(dim=1))
            assert torch.equal(cpp.ratio(), K.repetition_ratio(cpp.tokens, cpp.length, n))
    assert_same_state(cpp, vec)


def test_one_state_updated_by_either_path():
    # The torch path replaces the state's tensors each step; the C++ path must follow them (its
    # cached NumPy views) and continue the same table.
    gen = torch.Generator().manual_seed(4)
    tokens = torch.randint(0, 3, (4, 60), generator=gen)
    active = torch.rand(4, 60, generator=gen) < 0.8
    mixed = make_state("cpu", 4, 60, 3, hash_bits=2)
    histories = [[] for _ in range(4)]
    paths = torch.rand(60, generator=gen) < 0.5
    for t in range(60):
        update = RU.repetition_update_cpp if paths[t] else RU.repetition_update_torch
        step = update(mixed, tokens[:, t], active[:, t])
        for b in range(4):
            if active[b, t]:
                histories[b].append(int(tokens[b, t]))
        check(mixed, step, histories, active[:, t].tolist())
    assert_same_state(mixed, drive("cpu", tokens, 3, active=active, hash_bits=2)[0])


def test_cpp_threads_over_large_batches():
    # 4096 rows are enough work for parallel_for to start threads (it decides by work): the rows
    # must come out as on one thread.
    gen = torch.Generator().manual_seed(6)
    batch, steps, n = 4096, 16, 3
    tokens = torch.randint(0, 3, (batch, steps), generator=gen)
    active = torch.rand(batch, steps, generator=gen) < 0.9
    with mock.patch.object(RU, "cpu_threads", lambda: 4):
        threaded, _ = drive("cpu", tokens, n, active=active, check_every=steps)
    single, _ = drive("torch", tokens, n, active=active, check_every=steps)
    assert_same_state(threaded, single)


def cpp_args(state, new_tokens, active=None):
    """The extension's arguments for ``state`` (views: the extension writes into the state)."""
    return [getattr(state, name).numpy() for name in RU._CPP_ARRAYS] + [
        new_tokens.numpy(), active, state.n, state.hash_bits,
    ]


def snapshot(state):
    return {name: getattr(state, name).clone() for name in RU._CPP_ARRAYS}


def test_cpp_bad_arrays_raise_before_any_write():
    ext = K._backend.cpu_extension()
    state = make_state("cpu", 2, 8, 2)  # capacity 16
    for t in [1, 2, 1]:
        K.repetition_update(state, torch.tensor([t, t + 1]))
    before = snapshot(state)
    new = torch.tensor([1, 2])
    readonly = state.hash.numpy().copy()
    readonly.flags.writeable = False
    # (argument index, replacement, message)
    cases = [
        (0, state.tokens.numpy().astype(np.float64), "tokens: expected dtype int64"),
        (0, state.tokens.numpy()[0], "tokens: expected 2 dimensions"),
        (0, np.asfortranarray(np.zeros((2, 8), dtype=np.int64)), "tokens: expected a C-contiguous array"),
        (1, state.length.numpy().astype(np.int32), "length: expected dtype int64"),
        (1, np.zeros(3, dtype=np.int64), r"length: expected shape\[0\] == 2"),
        (2, readonly, "hash: expected a writable array"),
        (3, state.repeated.numpy()[::-1], "repeated: expected a C-contiguous array"),
        (4, np.zeros((2, 1), dtype=np.int64), "marked_end: expected 1 dimensions"),
        (6, np.full((2, 13), -1, dtype=np.int32), "slot_start: expected shape.1. == capacity . 1 with capacity a power"),
        (6, np.full((2, 5), -1, dtype=np.int32), "power of two >= 7"),
        (7, np.zeros((2, 9), dtype=np.int32), r"slot_key: expected shape\[1\] == 17"),
        (8, state.slot_count.numpy().astype(np.int64), "slot_count: expected dtype int32"),
        (9, new.numpy().astype(np.int32), "new_tokens: expected dtype int64"),
        (9, np.zeros(3, dtype=np.int64), r"new_tokens: expected shape\[0\] == 2"),
        (10, np.ones(2, dtype=np.int64), "active: expected dtype bool"),
        (10, np.ones(3, dtype=bool), r"active: expected shape\[0\] == 2"),
        (10, [True, True], "active: expected a bool array or None"),
        (11, 0, "n: expected n >= 1"),
        (12, 32, r"hash_bits: expected a value in \[0, 31\]"),
    ]
    for index, value, match in cases:
        args = cpp_args(state, new)
        args[index] = value
        with pytest.raises(ValueError, match=match):
            ext.repetition_update(*args)
    # Per-row values out of range, each in a copy of the arrays so the state itself stays valid.
    rows = [
        (1, -1, r"length: expected values in \[0, 8\]"),
        (1, 9, r"length: expected values in \[0, 8\]"),
        (1, 8, "new_tokens: row 1 already holds max_len=8 tokens"),
        (2, 2**31 - 1, "hash: expected values"),
        (2, -1, "hash: expected values"),
        (3, 4, r"repeated: expected values in \[0, 3\]"),
        (4, -1, "marked_end: expected values"),
        (5, 3, r"distinct: expected values in \[0, 2\]"),
    ]
    for index, value, match in rows:
        args = cpp_args(state, new)
        args[:9] = [a.copy() for a in args[:9]]
        args[index][1] = value
        with pytest.raises(ValueError, match=match):
            ext.repetition_update(*args)
    for name, value in before.items():
        assert torch.equal(getattr(state, name), value), name  # nothing was written
    # A full row is fine while inactive.
    args = cpp_args(state, new, np.array([True, False]))
    args[:9] = [a.copy() for a in args[:9]]
    args[1][1] = 8
    occurrences, repeated = ext.repetition_update(*args)
    assert occurrences.tolist() == [1, 0] and args[1].tolist() == [4, 8]


@pytest.mark.parametrize("corruption", ["start past the history", "no empty slot"])
def test_cpp_corrupt_tables_raise_instead_of_reading_out_of_bounds(corruption):
    # hash_bits = 0: every n-gram has key 0, so every probe of the table reads a stored start.
    state = make_state("cpu", 1, 8, 2, hash_bits=0, capacity=8)
    K.repetition_update(state, torch.tensor([1]))
    K.repetition_update(state, torch.tensor([2]))
    if corruption == "start past the history":
        state.slot_start[0, :8] = 2**31 - 1  # occupied, key 0, a start far past the row
        state.slot_key[0, :8] = 0
    else:
        state.slot_start[0, :8] = 0  # every slot occupied by another key: no probe ever ends
        state.slot_key[0, :8] = 1
    with pytest.raises(ValueError, match="slot_start: row 0's hash table does not match its tokens"):
        K.repetition_update(state, torch.tensor([3]))


# --- Triton (the interpreter on CPU tensors) -------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 4])
def test_triton_every_prefix(triton_interpreter, n):
    gen = torch.Generator().manual_seed(n)
    tokens = torch.randint(0, 3, (3, 24), generator=gen)
    active = torch.rand(3, 24, generator=gen) < 0.8
    drive("triton", tokens, n, active=active)


def test_triton_adversarial(triton_interpreter):
    gen = torch.Generator().manual_seed(0)
    tokens = torch.cat([periodic(1, 20, 3, 50, gen), periodic(1, 20, 1, 3, gen), nested(20)])
    for n in (1, 3, 25):  # n = 25 > 20 steps: no n-gram completes
        drive("triton", tokens, n, check_every=4)


def test_triton_forced_collisions(triton_interpreter):
    gen = torch.Generator().manual_seed(5)
    tokens = torch.cat([torch.randint(0, 3, (1, 20), generator=gen),
                        torch.arange(20, dtype=torch.long).reshape(1, 20)])
    for hash_bits in (0, 2):
        drive("triton", tokens, 2, check_every=5, hash_bits=hash_bits, capacity=_minimal_capacity(20, 2))


def test_triton_long_ngrams_compare_every_block(triton_interpreter):
    # n = 130 spans two blocks of the kernel's comparison (128 + 2). The n-grams at starts 0 and 1
    # of 0^130 5 0 agree on their first 129 tokens and share the one hash value left: only the
    # second block tells them apart. The last n-gram (start 2, 0^128 5 0) is new too.
    tokens = torch.tensor([[0] * 130 + [5, 0]])
    state, _ = drive("triton", tokens, 130, check_every=33, hash_bits=0)
    assert state.distinct.tolist() == [3] and state.repeated.tolist() == [0]


def assert_same_state(a, b):
    for name in ("tokens", "length", "hash", "repeated", "distinct", "marked_end"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    cap = a.capacity
    for name in ("slot_start", "slot_key", "slot_count"):  # the scratch slot aside
        assert torch.equal(getattr(a, name)[:, :cap], getattr(b, name)[:, :cap]), name


def test_triton_torch_and_cpp_build_the_same_table(triton_interpreter):
    # One layout, one hash, one probe sequence: the three fast paths are interchangeable.
    gen = torch.Generator().manual_seed(2)
    tokens = torch.randint(0, 3, (2, 16), generator=gen)
    active = torch.rand(2, 16, generator=gen) < 0.8
    triton_state, _ = drive("triton", tokens, 2, active=active, check_every=8, hash_bits=3, capacity=16)
    for other in FAST:
        assert_same_state(triton_state, drive(other, tokens, 2, active=active, hash_bits=3, capacity=16)[0])


def test_triton_select_and_extremes(triton_interpreter):
    big = torch.iinfo(torch.int64).max
    prime = 2**31 - 1
    state = K.repetition_state(3, 8, 2)
    assert state.impl == "triton"
    rows = [[big, -1, big, -1], [0, prime, 0, prime], [1, 2, 3, 4]]
    for t in range(4):
        K.repetition_update(state, torch.tensor([r[t] for r in rows]))
    assert state.repeated.tolist() == [2, 2, 0]
    state = state.select([2, 0])
    step = K.repetition_update(state, torch.tensor([1, big], dtype=torch.int64), torch.tensor([True, True]))
    check(state, step, [[1, 2, 3, 4, 1], [big, -1, big, -1, big]], [True, True])


# --- dispatch and bad input -------------------------------------------------------------------


def test_dispatch():
    K.reset_dispatch_counts()
    assert K.repetition_state(1, 4, 2).impl == "cpu"  # the default on CPU tensors: C++
    for name in ("reference", "cpu"):
        with kernels_backend(name):
            assert K.repetition_state(1, 4, 2).impl == name
    counts = K.dispatch_counts()
    assert counts[("repetition_update", "cpu")] == 2
    assert counts[("repetition_update", "reference")] == 1
    cpu_state = K.repetition_state(1, 4, 2)
    with pytest.raises(ValueError, match="state: made for the 'cpu' implementation"):
        K.repetition_update_reference(cpu_state, torch.tensor([1]))
    # Without the extension: the torch path by default, an ImportError naming the fix when C++ is
    # asked for explicitly (as for repetition_mask).
    missing = ImportError("longcot.kernels._cpu (the C++ kernels) is not built; run `pip install -e .`")
    with mock.patch.object(RU, "has_cpu_extension", lambda: False), \
            mock.patch.object(RU, "cpu_extension", mock.Mock(side_effect=missing)):
        assert K.repetition_state(1, 4, 2).impl == "torch"
        with kernels_backend("cpu"), pytest.raises(ImportError, match="pip install -e"):
            K.repetition_state(1, 4, 2)
    # The C++ kernel updates host memory in place: CUDA tensors asked for the CPU path get torch.
    with kernels_backend("cpu"):
        assert RU._cpu_impl(torch.device("cuda")) == "torch"
    # Neither fast path runs on the reference's state.
    ref_state = make_state("reference", 1, 4, 2)
    with pytest.raises(ValueError, match="state: the C.. path needs a fast-path state on CPU tensors"):
        RU.repetition_update_cpp(ref_state, torch.tensor([1]))


def test_triton_dispatch(triton_interpreter):
    assert K.repetition_state(1, 4, 2).impl == "triton"


def test_memory_is_bounded():
    state = K.repetition_state(2, 1000, 4)
    assert state.capacity == 2048  # next power of two >= 2 * 997
    assert state.tokens.shape == (2, 1000)
    per_row = sum(t[0].numel() * t.element_size() for t in
                  (state.tokens, state.slot_start, state.slot_key, state.slot_count))
    assert per_row / 1000 <= 56 + 12 / 1000  # 8 + 3 * 4 * 2048 / 1000 bytes per token, one scratch slot
    assert K.repetition_state(1, 4, 9).capacity == 2  # n > max_len: one n-gram's worth


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"batch": -1}, "batch: expected an integer >= 0"),
        ({"batch": 1.5}, "batch: expected an integer >= 0"),
        ({"max_len": 0}, "max_len: expected an integer >= 1"),
        ({"n": 0}, "n: expected an integer >= 1"),
        ({"n": True}, "n: expected an integer >= 1"),
        ({"capacity": 4}, "capacity: expected a power of two >= 7"),
        ({"capacity": 12}, "capacity: expected a power of two >= 7"),
        ({"hash_bits": 32}, r"hash_bits: expected an integer in \[0, 31\]"),
        ({"hash_bits": -1}, r"hash_bits: expected an integer in \[0, 31\]"),
        ({"device": "nowhere"}, "device: expected a torch device"),
    ],
)
def test_bad_state_arguments(kwargs, match):
    args = {"batch": 2, "max_len": 8, "n": 2, **kwargs}
    with pytest.raises(ValueError, match=match):
        K.repetition_state(**args)


@pytest.mark.parametrize("backend", ["reference", *FAST])
def test_bad_update_arguments(backend):
    state = make_state(backend, 2, 8, 2)
    good = torch.tensor([1, 2])
    cases = [
        (([1, 2], good, None), "state: expected a RepetitionState"),
        ((state, [1, 2], None), "new_tokens: expected a torch.Tensor"),
        ((state, torch.tensor([[1, 2]]), None), "new_tokens: expected 1 dimensions"),
        ((state, torch.tensor([1.0, 2.0]), None), "new_tokens: expected an integer dtype"),
        ((state, torch.tensor([1, 2, 3]), None), r"new_tokens: expected shape \(2,\)"),
        ((state, good, torch.tensor([1, 0])), "active: expected a bool tensor"),
        ((state, good, torch.tensor([True])), r"active: expected shape \(2,\)"),
        ((state, good, [True, True]), "active: expected a torch.Tensor"),
    ]
    for (s, tokens, active), match in cases:
        with pytest.raises(ValueError, match=match):
            K.repetition_update(s, tokens, active)
    assert state.length.tolist() == [0, 0]  # nothing was appended by a refused call
    for rows, match in [([2], r"rows: expected indices in \[0, 2\)"), ([-1], "rows: expected indices"),
                        ("01", "rows: expected a 1-D integer tensor"), ([True], "rows: expected"),
                        (torch.tensor([0.0]), "rows: expected an integer dtype"),
                        (torch.tensor([[0]]), "rows: expected 1 dimensions")]:
        with pytest.raises(ValueError, match=match):
            state.select(rows)


# --- compiled Triton on a GPU -------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_kernel_and_torch_path_real_batch(compiled_triton):
    # 128 rows of 600 tokens with small vocabularies (loops galore), some rows idle at times: the
    # compiled kernel, the torch path on the GPU and the whole-sequence Triton op agree.
    gen = torch.Generator().manual_seed(0)
    batch, steps, n = 128, 600, 5
    tokens = torch.randint(0, 4, (batch, steps), generator=gen)
    tokens[: batch // 2] = periodic(batch // 2, steps, 37, 1000, gen)
    tokens, active = tokens.cuda(), (torch.rand(batch, steps, generator=gen) < 0.9).cuda()
    kernel = K.repetition_state(batch, steps, n, "cuda")
    with kernels_backend("cpu"):
        vectorised = K.repetition_state(batch, steps, n, "cuda")
    assert (kernel.impl, vectorised.impl) == ("triton", "torch")
    for t in range(steps):
        a = K.repetition_update(kernel, tokens[:, t], active[:, t])
        b = K.repetition_update(vectorised, tokens[:, t], active[:, t])
        assert torch.equal(a.occurrences, b.occurrences) and torch.equal(a.repeated, b.repeated)
        if t % 50 == 49 or t == steps - 1:
            prefix, lengths = kernel.tokens, kernel.length
            assert torch.equal(a.repeated, K.repetition_mask(prefix, lengths, n).sum(dim=1))
            assert torch.equal(kernel.ratio(), K.repetition_ratio(prefix, lengths, n))
    assert torch.equal(kernel.tokens, vectorised.tokens)
    for name in ("slot_start", "slot_key", "slot_count"):  # the scratch slot aside
        cap = kernel.capacity
        assert torch.equal(getattr(kernel, name)[:, :cap], getattr(vectorised, name)[:, :cap]), name
