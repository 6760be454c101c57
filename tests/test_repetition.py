import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import longcot.kernels as K
from conftest import kernels_backend
from longcot.engine.rewards import repetition_penalty
from longcot.kernels import _cpu


def mask_cpu(tokens, lengths, n, only_start=False):
    with kernels_backend("cpu"):
        return K.repetition_mask(tokens, lengths, n, only_start)


def ratio_cpu(tokens, lengths, n):
    with kernels_backend("cpu"):
        return K.repetition_ratio(tokens, lengths, n)


def T(*rows):
    return torch.tensor(rows, dtype=torch.long)


# --- the reference against the definition, by hand ------------------------------------------


def test_reference_hand_case():
    # n = 2 over [1 2 3 1 2 3 1]: starts 0..5 are (1,2) (2,3) (3,1) (1,2) (2,3) (3,1):
    # starts 3, 4, 5 repeat, covering positions 3..6.
    tokens = T([1, 2, 3, 1, 2, 3, 1, 9])
    mask = K.repetition_mask_reference(tokens, torch.tensor([7]), 2)
    assert mask.tolist() == [[False, False, False, True, True, True, True, False]]
    # Six 2-grams, three distinct.
    assert K.repetition_ratio_reference(tokens, torch.tensor([7]), 2).tolist() == [0.5]


def test_reference_only_start_hand_case():
    # n = 2 over [5 5 5 5 5 5 5]: starts 1..5 repeat. e starts at -inf: start 1 marked (1,2),
    # e = 3; start 2 (2 > 3? no), e = 4; start 3 no, e = 5; start 4 no, e = 6; start 5 no.
    tokens = T([5, 5, 5, 5, 5, 5, 5])
    mask = K.repetition_mask_reference(tokens, torch.tensor([7]), 2, only_start=True)
    assert mask.tolist() == [[False, True, True, False, False, False, False]]
    full = K.repetition_mask_reference(tokens, torch.tensor([7]), 2)
    assert full.tolist() == [[False] + [True] * 6]


def test_reference_only_start_marks_after_gap():
    # n = 2: [1 2 1 2 7 8 9 1 2 ...]: start 2 repeats (marks 2,3; e = 4); start 7 repeats, 7 > 4.
    tokens = T([1, 2, 1, 2, 7, 8, 9, 1, 2])
    mask = K.repetition_mask_reference(tokens, torch.tensor([9]), 2, only_start=True)
    assert mask.nonzero()[:, 1].tolist() == [2, 3, 7, 8]


def _two_loops():
    # 4 fresh tokens, a 3-token cycle for 30 tokens (positions 4..33), 8 fresh tokens, the same
    # cycle again for 12 tokens (42..53). n = 3: the first loop's repeated starts are 7..31, one
    # contiguous run; the second loop's are 42..51, a new run (42 > 31 + 3).
    loop = [1, 2, 3] * 10
    row = [10, 11, 12, 13] + loop + list(range(20, 28)) + loop[:12]
    return T(row), torch.tensor([len(row)])


def _once_per_run(mask):
    # a 30-token run penalised once per n tokens would mark all 27 of its covered positions
    return mask.nonzero()[:, 1].tolist() == [7, 8, 9, 42, 43, 44]


def test_only_start_penalises_a_run_once_not_once_per_n_tokens():
    tokens, lengths = _two_loops()
    assert _once_per_run(K.repetition_mask_reference(tokens, lengths, 3, only_start=True))
    assert _once_per_run(mask_cpu(tokens, lengths, 3, only_start=True))
    assert K.repetition_mask_reference(tokens, lengths, 3).sum().item() == 27 + 12
    penalty = repetition_penalty(tokens, lengths, n=3, penalty=-0.5, only_start=True)
    assert penalty.sum().item() == pytest.approx(-0.5 * 6)


def test_reference_edges():
    tokens = T([4, 4, 4], [1, 2, 3])
    lengths = torch.tensor([0, 3])
    assert not K.repetition_mask_reference(tokens, lengths, 1).any(dim=1)[0]  # length 0
    assert not K.repetition_mask_reference(tokens, lengths, 4).any()  # n > T
    assert K.repetition_ratio_reference(tokens, lengths, 4).tolist() == [0.0, 0.0]
    # n = 1: a token repeats when it occurred before.
    assert K.repetition_mask_reference(T([7, 7, 8, 7]), torch.tensor([4]), 1).tolist() == [
        [False, True, False, True]
    ]


def test_positions_past_length_never_marked():
    tokens = T([3, 3, 3, 3, 3, 3])
    for fn in (K.repetition_mask_reference, mask_cpu):
        assert fn(tokens, torch.tensor([3]), 1).tolist() == [[False, True, True, False, False, False]]


# --- C++ against the reference ---------------------------------------------------------------


def periodic(batch, steps, period, alphabet, gen):
    base = torch.randint(0, alphabet, (batch, period), generator=gen)
    return base[:, torch.arange(steps) % period]


@pytest.mark.parametrize("only_start", [False, True])
@pytest.mark.parametrize("n", [1, 2, 3, 7, 40])
def test_cpu_matches_reference_structured(n, only_start):
    gen = torch.Generator().manual_seed(n)
    cases = [
        torch.randint(0, 3, (6, 120), generator=gen),
        periodic(5, 200, 13, 50, gen),
        periodic(3, 90, 1, 2, gen),
        torch.randint(0, 10**6, (4, 64), generator=gen),
    ]
    for tokens in cases:
        lengths = torch.randint(0, tokens.shape[1] + 1, (tokens.shape[0],), generator=gen)
        lengths[0] = tokens.shape[1]
        expected = K.repetition_mask_reference(tokens, lengths, n, only_start)
        assert torch.equal(mask_cpu(tokens, lengths, n, only_start), expected)
        assert torch.equal(ratio_cpu(tokens, lengths, n), K.repetition_ratio_reference(tokens, lengths, n))


@given(
    data=st.data(),
    batch=st.integers(1, 4),
    steps=st.integers(1, 40),
    n=st.integers(1, 12),
    alphabet=st.integers(1, 4),
    only_start=st.booleans(),
)
def test_cpu_matches_reference_random(data, batch, steps, n, alphabet, only_start):
    tokens = torch.tensor(
        data.draw(st.lists(st.lists(st.integers(0, alphabet - 1), min_size=steps, max_size=steps),
                           min_size=batch, max_size=batch))
    )
    lengths = torch.tensor(data.draw(st.lists(st.integers(0, steps), min_size=batch, max_size=batch)))
    expected = K.repetition_mask_reference(tokens, lengths, n, only_start)
    assert torch.equal(mask_cpu(tokens, lengths, n, only_start), expected)
    assert torch.equal(ratio_cpu(tokens, lengths, n), K.repetition_ratio_reference(tokens, lengths, n))


def test_extreme_token_ids_and_int32_input():
    big = torch.iinfo(torch.int64).max
    tokens = T([big, -1, big, -1, big, 0])
    lengths = torch.tensor([6])
    assert torch.equal(mask_cpu(tokens, lengths, 2), K.repetition_mask_reference(tokens, lengths, 2))
    small = torch.tensor([[1, 2, 1, 2]], dtype=torch.int32)
    assert mask_cpu(small, torch.tensor([4], dtype=torch.int32), 2).tolist() == [[False, False, True, True]]


def test_hash_collisions_never_mark():
    # Tokens that differ only in bits the hash folds together still compare unequal: no
    # distinct n-gram may be reported as repeated whatever the hash does.
    tokens = (torch.arange(2000, dtype=torch.long) * (1 << 32)).reshape(1, -1)
    assert not mask_cpu(tokens, torch.tensor([2000]), 3).any()
    assert ratio_cpu(tokens, torch.tensor([2000]), 3).item() == 0.0


def test_cpu_is_the_default_on_cpu(monkeypatch):
    calls = []
    real = _cpu.repetition_mask
    monkeypatch.setattr(_cpu, "repetition_mask", lambda *a: calls.append(1) or real(*a))
    K.repetition_mask(T([1, 1]), torch.tensor([2]), 1)
    assert calls
    with kernels_backend("reference"):
        K.repetition_mask(T([1, 1]), torch.tensor([2]), 1)
    assert len(calls) == 1


# --- bad input -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "tokens, lengths, n, match",
    [
        (torch.zeros(4, dtype=torch.long), torch.tensor([4]), 2, "tokens: expected 2 dimensions"),
        (torch.zeros(1, 4), torch.tensor([4]), 2, "tokens: expected an integer dtype"),
        (torch.zeros(1, 4, dtype=torch.long), torch.tensor([5]), 2, "lengths: expected values in"),
        (torch.zeros(1, 4, dtype=torch.long), torch.tensor([-1]), 2, "lengths: expected values in"),
        (torch.zeros(2, 4, dtype=torch.long), torch.tensor([4]), 2, "lengths: expected 2 entries"),
        (torch.zeros(1, 4, dtype=torch.long), torch.tensor([4.0]), 2, "lengths: expected an integer"),
        (torch.zeros(1, 4, dtype=torch.long), torch.tensor([4]), 0, "n: expected an integer >= 1"),
        (torch.zeros(1, 4, dtype=torch.long), torch.tensor([4]), 2.5, "n: expected an integer >= 1"),
        ([[1, 2]], torch.tensor([2]), 1, "tokens: expected a torch.Tensor"),
    ],
)
@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_bad_input(tokens, lengths, n, match, backend):
    with kernels_backend(backend):
        for fn in (K.repetition_mask, K.repetition_ratio):
            with pytest.raises(ValueError, match=match):
                fn(tokens, lengths, n)


# --- Triton (the interpreter on CPU tensors) against the reference ---------------------------


def _triton_cases(gen):
    return [
        torch.randint(0, 3, (3, 40), generator=gen),
        periodic(2, 48, 5, 50, gen),
        periodic(2, 30, 1, 2, gen),
        torch.randint(0, 10**6, (2, 24), generator=gen),
    ]


def test_triton_only_start_penalises_a_run_once(triton_interpreter):
    assert _once_per_run(K.repetition_mask(*_two_loops(), 3, only_start=True))


@pytest.mark.parametrize("only_start", [False, True])
@pytest.mark.parametrize("n", [1, 2, 3, 7, 60])
def test_triton_matches_reference(triton_interpreter, n, only_start):
    gen = torch.Generator().manual_seed(n)
    for tokens in _triton_cases(gen):
        lengths = torch.randint(0, tokens.shape[1] + 1, (tokens.shape[0],), generator=gen)
        lengths[0], lengths[-1] = tokens.shape[1], 0
        expected = K.repetition_mask_reference(tokens, lengths, n, only_start)
        assert torch.equal(K.repetition_mask(tokens, lengths, n, only_start), expected)
        assert torch.equal(K.repetition_ratio(tokens, lengths, n),
                           K.repetition_ratio_reference(tokens, lengths, n))


@given(
    data=st.data(),
    batch=st.integers(1, 3),
    steps=st.integers(1, 24),
    n=st.integers(1, 6),
    alphabet=st.integers(1, 3),
    only_start=st.booleans(),
)
def test_triton_matches_reference_random(data, batch, steps, n, alphabet, only_start):
    pytest.importorskip("triton")
    from longcot.kernels.logprobs import triton_interpreted

    if not triton_interpreted():
        pytest.skip("Triton runs compiled here (TRITON_INTERPRET is not 1)")
    tokens = torch.tensor(
        data.draw(st.lists(st.lists(st.integers(0, alphabet - 1), min_size=steps, max_size=steps),
                           min_size=batch, max_size=batch))
    )
    lengths = torch.tensor(data.draw(st.lists(st.integers(0, steps), min_size=batch, max_size=batch)))
    expected = K.repetition_mask_reference(tokens, lengths, n, only_start)
    with kernels_backend("triton"):
        assert torch.equal(K.repetition_mask(tokens, lengths, n, only_start), expected)
        assert torch.equal(K.repetition_ratio(tokens, lengths, n),
                           K.repetition_ratio_reference(tokens, lengths, n))


@pytest.mark.parametrize("key_mask", [0, 1, 3])
@pytest.mark.parametrize("only_start", [False, True])
def test_triton_forced_hash_collisions_never_mark(triton_interpreter, key_mask, only_start):
    # With only the key's low bits kept, most distinct n-grams share a key: the token comparison
    # alone has to keep them apart.
    from longcot.kernels.repetition import repetition_mask_triton, repetition_ratio_triton

    gen = torch.Generator().manual_seed(key_mask)
    for tokens in _triton_cases(gen):
        lengths = torch.randint(0, tokens.shape[1] + 1, (tokens.shape[0],), generator=gen)
        lengths[0] = tokens.shape[1]
        for n in (1, 2, 4):
            expected = K.repetition_mask_reference(tokens, lengths, n, only_start)
            got = repetition_mask_triton(tokens, lengths, n, only_start, key_mask=key_mask)
            assert torch.equal(got, expected)
            assert torch.equal(repetition_ratio_triton(tokens, lengths, n, key_mask=key_mask),
                               K.repetition_ratio_reference(tokens, lengths, n))
    distinct = torch.arange(40, dtype=torch.long).reshape(1, -1)
    assert not repetition_mask_triton(distinct, torch.tensor([40]), 2, key_mask=key_mask).any()


def test_triton_edges(triton_interpreter):
    tokens = T([4, 4, 4], [1, 2, 3])
    lengths = torch.tensor([0, 3])
    assert not K.repetition_mask(tokens, lengths, 1)[0].any()  # length 0
    assert not K.repetition_mask(tokens, lengths, 4).any()  # n > T
    assert K.repetition_ratio(tokens, lengths, 4).tolist() == [0.0, 0.0]
    assert K.repetition_mask(T([7, 7, 8, 7]), torch.tensor([4]), 1).tolist() == [[False, True, False, True]]
    assert K.repetition_mask(T([3, 3, 3, 3, 3, 3]), torch.tensor([3]), 1).tolist() == [
        [False, True, True, False, False, False]
    ]
    empty = torch.zeros(0, 5, dtype=torch.long)
    assert K.repetition_mask(empty, torch.zeros(0, dtype=torch.long), 2).shape == (0, 5)
    assert K.repetition_ratio(empty, torch.zeros(0, dtype=torch.long), 2).shape == (0,)


def test_triton_extreme_token_ids_and_int32_input(triton_interpreter):
    big = torch.iinfo(torch.int64).max
    tokens = T([big, -1, big, -1, big, 0], [-big - 1, 2**31 - 1, -big - 1, 2**31 - 1, 0, 0])
    lengths = torch.tensor([6, 6])
    for n in (1, 2):
        assert torch.equal(K.repetition_mask(tokens, lengths, n),
                           K.repetition_mask_reference(tokens, lengths, n))
    small = torch.tensor([[1, 2, 1, 2]], dtype=torch.int32)
    assert K.repetition_mask(small, torch.tensor([4], dtype=torch.int32), 2).tolist() == [
        [False, False, True, True]
    ]


def test_triton_hash_collisions_never_mark(triton_interpreter):
    # Ids that are equal modulo the hash's prime (2^31 - 1) hash alike; the tokens tell them apart.
    tokens = (torch.arange(30, dtype=torch.long) * (2**31 - 1)).reshape(1, -1)
    assert not K.repetition_mask(tokens, torch.tensor([30]), 3).any()
    assert K.repetition_ratio(tokens, torch.tensor([30]), 3).item() == 0.0
