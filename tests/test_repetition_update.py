"""The incremental n-gram repetition state (kernels/repetition_update.py) against the whole-sequence
references, after every single step: `repetition_mask(prefix).sum()`, `repetition_ratio(prefix)` and
a direct count of the newest n-gram's occurrences."""

import importlib

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import longcot.kernels as K
from conftest import kernels_backend

# The module (the package's attribute of that name is the function).
RU = importlib.import_module("longcot.kernels.repetition_update")

FAST = ["cpu"]  # the paths that run on this machine without the interpreter fixture


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
    with kernels_backend(backend):
        state = K.repetition_state(batch, steps, n, **kwargs)
    assert state.impl == backend
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


# --- the reference and the vectorised PyTorch path -------------------------------------------


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
    with kernels_backend(backend):
        state = K.repetition_state(2, 6, 1)
    first = K.repetition_update(state, torch.tensor([4, 4]))
    for _ in range(3):
        K.repetition_update(state, torch.tensor([4, 4]))
    assert first.occurrences.tolist() == [1, 1] and first.repeated.tolist() == [0, 0]
    assert state.repeated.tolist() == [3, 3]


@pytest.mark.parametrize("backend", ["reference", *FAST])
def test_select_drops_reorders_and_repeats_rows(backend):
    gen = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, 3, (5, 40), generator=gen)
    with kernels_backend(backend):
        state = K.repetition_state(5, 40, 2)
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
    with kernels_backend(backend):
        state = K.repetition_state(3, 4, 2)
    K.repetition_update(state, torch.tensor([1, 2, 3]))
    empty = state.select([])
    assert empty.batch == 0
    step = K.repetition_update(empty, torch.zeros(0, dtype=torch.long))
    assert step.occurrences.shape == step.repeated.shape == (0,)
    assert empty.ratio().shape == (0,)
    with kernels_backend(backend):
        none = K.repetition_state(0, 4, 2)
    assert K.repetition_update(none, torch.zeros(0, dtype=torch.long)).repeated.shape == (0,)


@pytest.mark.parametrize("backend", ["reference", *FAST])
def test_full_rows(backend):
    with kernels_backend(backend):
        state = K.repetition_state(2, 3, 1)
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


@pytest.mark.parametrize("hash_bits", [0, 1, 3])
@pytest.mark.parametrize("n", [1, 2, 4])
def test_cpu_forced_collisions_and_full_tables(hash_bits, n):
    # With 0-3 hash bits nearly every n-gram shares its hash with another, so each match is decided
    # by the token comparison; with a table of the smallest capacity allowed the probe sequences
    # run past the first window (more than _WINDOW slots), through the fallback rounds.
    gen = torch.Generator().manual_seed(hash_bits * 10 + n)
    steps = 48
    cases = [torch.randint(0, 4, (3, steps), generator=gen), *adversarial_cases(gen, steps)]
    for tokens in cases:
        state, histories = drive("cpu", tokens, n, hash_bits=hash_bits,
                                 capacity=_minimal_capacity(steps, n))
        # one occupied slot per distinct n-gram, counts summing to the n-grams seen
        table = slice(0, state.capacity)  # without the scratch slot
        assert (state.slot_start[:, table] >= 0).sum(dim=1).tolist() == state.distinct.tolist()
        assert state.slot_count[:, table].sum(dim=1).tolist() == state.total.tolist()
    assert int(state.distinct.max()) > RU._WINDOW + 1  # the distinct row probed past one window


def test_cpu_fallback_rounds_with_a_window_of_one(monkeypatch):
    # Every probe beyond the first takes a fallback round here.
    monkeypatch.setattr(RU, "_WINDOW", 1)
    gen = torch.Generator().manual_seed(1)
    drive("cpu", torch.randint(0, 3, (4, 40), generator=gen), 2, hash_bits=1, capacity=64)


def test_distinct_ngrams_never_repeat_under_total_collision():
    # Every n-gram has the same hash and the same probe sequence: none may be called a repeat.
    tokens = torch.arange(64, dtype=torch.long).reshape(2, 32)
    state, _ = drive("cpu", tokens, 3, hash_bits=0, capacity=32)
    assert state.repeated.tolist() == [0, 0] and state.ratio().tolist() == [0.0, 0.0]


@given(
    data=st.data(),
    batch=st.integers(1, 4),
    steps=st.integers(1, 30),
    n=st.integers(1, 6),
    alphabet=st.integers(1, 4),
    hash_bits=st.sampled_from([0, 2, 31]),
)
def test_cpu_random(data, batch, steps, n, alphabet, hash_bits):
    tokens = torch.tensor(
        data.draw(st.lists(st.lists(st.integers(0, alphabet - 1), min_size=steps, max_size=steps),
                           min_size=batch, max_size=batch))
    )
    active = torch.tensor(
        data.draw(st.lists(st.lists(st.booleans(), min_size=steps, max_size=steps),
                           min_size=batch, max_size=batch))
    )
    drive("cpu", tokens, n, active=active, hash_bits=hash_bits)


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


def test_triton_and_torch_build_the_same_table(triton_interpreter):
    # One layout, one hash, one probe sequence: the two fast paths are interchangeable.
    gen = torch.Generator().manual_seed(2)
    tokens = torch.randint(0, 3, (2, 16), generator=gen)
    active = torch.rand(2, 16, generator=gen) < 0.8
    triton_state, _ = drive("triton", tokens, 2, active=active, check_every=8, hash_bits=3, capacity=16)
    torch_state, _ = drive("cpu", tokens, 2, active=active, hash_bits=3, capacity=16)
    for name in ("tokens", "length", "hash", "repeated", "distinct", "marked_end"):
        assert torch.equal(getattr(triton_state, name), getattr(torch_state, name)), name
    for name in ("slot_start", "slot_key", "slot_count"):  # the scratch slot aside
        assert torch.equal(getattr(triton_state, name)[:, :16], getattr(torch_state, name)[:, :16]), name


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
    assert K.repetition_state(1, 4, 2).impl == "cpu"  # the default on CPU tensors, no C++ needed
    for name in ("reference", "cpu"):
        with kernels_backend(name):
            assert K.repetition_state(1, 4, 2).impl == name
    counts = K.dispatch_counts()
    assert counts[("repetition_update", "cpu")] == 2
    assert counts[("repetition_update", "reference")] == 1
    cpu_state = K.repetition_state(1, 4, 2)
    with pytest.raises(ValueError, match="state: made for the 'cpu' implementation"):
        K.repetition_update_reference(cpu_state, torch.tensor([1]))


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
    with kernels_backend(backend):
        state = K.repetition_state(2, 8, 2)
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
    assert (kernel.impl, vectorised.impl) == ("triton", "cpu")
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
