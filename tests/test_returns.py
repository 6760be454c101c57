import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import longcot.kernels as K
from conftest import kernels_backend


def returns_cpu(*args):
    with kernels_backend("cpu"):
        return K.discounted_returns(*args)


def test_reference_hand_case():
    # One row, T = 3, two channels: sparse reward 1 at the last token (gamma 1), dense -0.5 at
    # t = 0 and t = 1 (gamma 0.5); the last position is padding and is ignored.
    rewards = torch.tensor([[[0.0, -0.5], [0.0, -0.5], [1.0, 0.0], [7.0, 7.0]]])
    mask = torch.tensor([[1, 1, 1, 0]])
    out = K.discounted_returns_reference(rewards, mask, [1.0, 0.5])
    # channel 0: [1, 1, 1, 0]; channel 1: t1 = -0.5, t0 = -0.5 + 0.5 * -0.5 = -0.75.
    assert out.tolist() == [[1.0 - 0.75, 1.0 - 0.5, 1.0, 0.0]]


def test_gamma_zero_is_the_masked_reward_sum():
    rewards = torch.randn(3, 5, 2)
    mask = torch.rand(3, 5) > 0.3
    expected = (rewards * mask.unsqueeze(-1)).sum(-1)
    torch.testing.assert_close(K.discounted_returns(rewards, mask, [0.0, 0.0]), expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.uint8, torch.int64, torch.float32])
def test_cpu_matches_reference(dtype, mask_dtype):
    gen = torch.Generator().manual_seed(1)
    rewards = torch.randn(7, 300, 3, generator=gen).to(dtype)
    lengths = torch.randint(0, 301, (7,), generator=gen)
    mask = (torch.arange(300)[None] < lengths[:, None]).to(mask_dtype)
    gammas = [1.0, 0.99, 0.5]
    expected = K.discounted_returns_reference(rewards, mask, gammas)
    got = returns_cpu(rewards, mask, gammas)
    assert got.dtype == expected.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


@given(
    batch=st.integers(1, 4),
    steps=st.integers(1, 30),
    gammas=st.lists(st.floats(0.0, 1.0), min_size=1, max_size=3),
    seed=st.integers(0, 2**16),
)
def test_cpu_matches_reference_random(batch, steps, gammas, seed):
    gen = torch.Generator().manual_seed(seed)
    rewards = torch.randn(batch, steps, len(gammas), generator=gen)
    mask = torch.rand(batch, steps, generator=gen) > 0.2
    mask[0] = False  # a fully masked row
    expected = K.discounted_returns_reference(rewards, mask, gammas)
    torch.testing.assert_close(returns_cpu(rewards, mask, gammas), expected, rtol=1e-6, atol=1e-6)
    assert (expected[0] == 0).all()


@pytest.mark.parametrize(
    "rewards, mask, gammas, match",
    [
        (torch.zeros(2, 3), torch.ones(2, 3), [1.0], "rewards: expected 3 dimensions"),
        (torch.zeros(2, 3, 1, dtype=torch.long), torch.ones(2, 3), [1.0], "rewards: expected a floating"),
        (torch.zeros(2, 3, 1), torch.ones(2, 4), [1.0], r"mask: expected shape \(2, 3\)"),
        (torch.zeros(2, 3, 2), torch.ones(2, 3), [1.0], "gammas: expected one discount per reward channel"),
        (torch.zeros(2, 3, 1), torch.ones(2, 3), [1.5], r"gammas\[0\]: expected a number in \[0, 1\]"),
        (torch.zeros(2, 3, 1), torch.ones(2, 3), 0.9, "gammas: expected a sequence"),
    ],
)
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_bad_input(rewards, mask, gammas, match, backend):
    with kernels_backend(backend), pytest.raises(ValueError, match=match):
        K.discounted_returns(rewards, mask, gammas)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("channels", [1, 3])
def test_triton_interpreter_matches_reference(triton_interpreter, dtype, channels):
    # T = 19: three 8-step blocks; a full row, a fully masked row, a length-1 row, one with holes.
    gen = torch.Generator().manual_seed(4)
    rewards = torch.randn(4, 19, channels, generator=gen).to(dtype)
    mask = torch.ones(4, 19, dtype=torch.bool)
    mask[1] = False
    mask[2, 1:] = False
    mask[3] = torch.rand(19, generator=gen) > 0.3
    gammas = [1.0, 0.99, 0.5][:channels]
    expected = K.discounted_returns_reference(rewards, mask, gammas)
    got = K.discounted_returns(rewards, mask, gammas)
    assert got.dtype == expected.dtype
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    assert (got[1] == 0).all()


@pytest.mark.parametrize("shape", [(1, 1, 2), (2, 1, 1), (2, 4, 0), (0, 3, 1)])
def test_triton_interpreter_edge_shapes(triton_interpreter, shape):
    rewards = torch.randn(shape)
    mask = torch.ones(shape[:2], dtype=torch.int64)
    gammas = [0.9] * shape[2]
    torch.testing.assert_close(
        K.discounted_returns(rewards, mask, gammas),
        K.discounted_returns_reference(rewards, mask, gammas),
        rtol=1e-6, atol=1e-6,
    )


# --- the chunked Triton scan (several programs per sequence, carries across chunks) ----------


def _rows(steps, gen, boundary):
    """A full row, a fully masked row, a length-1 row, a row ending at a chunk boundary (and one
    past it), a row with holes."""
    mask = torch.ones(6, steps, dtype=torch.bool)
    mask[1] = False
    mask[2, 1:] = False
    mask[3, boundary:] = False
    mask[4, boundary + 1:] = False
    mask[5] = torch.rand(steps, generator=gen) > 0.3
    return mask


def _close_to_reference(got, expected):
    # Chunks change the order of the roundings (the channel sum of the local returns plus that of
    # the carries' contributions): by a few ulps of the largest value (<= 3 seen at T = 37 in
    # chunks of 8), not of each value.
    assert got.dtype == expected.dtype
    eps = torch.finfo(expected.dtype).eps
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=max(1e-6, 8 * eps * expected.abs().max().item()))


@pytest.mark.parametrize("chunk", [8, 24])
@pytest.mark.parametrize("gammas", [[1.0], [1.0, 0.99, 0.5], [0.0, 1.0], [0.3, 0.9, 1.0, 0.0, 0.7]])
def test_triton_interpreter_chunked_matches_reference(triton_interpreter, monkeypatch, chunk, gammas):
    # T = 37 in chunks of 8 (five, the last ragged) or 24 (two; blocks of 8 inside a chunk); one to
    # five channels with different discounts (five: a channel block of 8 with three masked off).
    monkeypatch.setenv("LONGCOT_SCAN_CHUNK", str(chunk))
    gen = torch.Generator().manual_seed(chunk + len(gammas))
    rewards = torch.randn(6, 37, len(gammas), generator=gen)
    mask = _rows(37, gen, chunk)
    got = K.discounted_returns(rewards, mask, gammas)
    _close_to_reference(got, K.discounted_returns_reference(rewards, mask, gammas))
    assert (got[1] == 0).all()


@pytest.mark.parametrize("dtype, mask_dtype", [(torch.float64, torch.uint8), (torch.bfloat16, torch.float32)])
def test_triton_interpreter_chunked_dtypes(triton_interpreter, monkeypatch, dtype, mask_dtype):
    monkeypatch.setenv("LONGCOT_SCAN_CHUNK", "8")
    gen = torch.Generator().manual_seed(7)
    rewards = torch.randn(6, 29, 2, generator=gen).to(dtype)
    mask = _rows(29, gen, 16).to(mask_dtype)
    got = K.discounted_returns(rewards, mask, [1.0, 0.99])
    _close_to_reference(got, K.discounted_returns_reference(rewards, mask, [1.0, 0.99]))


def test_triton_interpreter_chunked_exact_sums(triton_interpreter, monkeypatch):
    # gamma = 1: the factor is exactly 1, and with integer rewards every partial sum is exact in
    # fp32, so the chunked scan equals the reference bit for bit (a gamma = 0 channel beside it).
    monkeypatch.setenv("LONGCOT_SCAN_CHUNK", "8")
    gen = torch.Generator().manual_seed(8)
    rewards = torch.randint(-50, 50, (6, 37, 2), generator=gen).float()
    mask = _rows(37, gen, 8)
    assert torch.equal(K.discounted_returns(rewards, mask, [1.0, 0.0]),
                       K.discounted_returns_reference(rewards, mask, [1.0, 0.0]))


@pytest.mark.parametrize("steps, chunk", [(8, 8), (9, 8), (1, 8), (5, 64)])
def test_triton_interpreter_chunk_edges(triton_interpreter, monkeypatch, steps, chunk):
    # one whole chunk, a last chunk of one step, one step, a chunk longer than the sequence
    monkeypatch.setenv("LONGCOT_SCAN_CHUNK", str(chunk))
    rewards = torch.randn(3, steps, 2)
    mask = torch.ones(3, steps, dtype=torch.int64)
    mask[1] = 0
    got = K.discounted_returns(rewards, mask, [0.9, 1.0])
    _close_to_reference(got, K.discounted_returns_reference(rewards, mask, [0.9, 1.0]))
