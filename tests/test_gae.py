import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import longcot.kernels as K
from conftest import kernels_backend


def gae_cpu(*args):
    with kernels_backend("cpu"):
        return K.gae(*args)


def test_reference_hand_case():
    # T = 3 valid + 1 pad; gamma 0.5, lam 0.5.
    rewards = torch.tensor([[0.0, 0.0, 1.0, 9.0]])
    values = torch.tensor([[0.5, 0.25, 0.5, 9.0]])
    mask = torch.tensor([[True, True, True, False]])
    adv, ret = K.gae_reference(rewards, values, mask, 0.5, 0.5)
    d2 = 1.0 - 0.5  # last valid token bootstraps from V = 0
    d1 = 0.0 + 0.5 * 0.5 - 0.25
    d0 = 0.0 + 0.5 * 0.25 - 0.5
    a2, a1 = d2, d1 + 0.25 * d2
    a0 = d0 + 0.25 * a1
    torch.testing.assert_close(adv, torch.tensor([[a0, a1, a2, 0.0]]))
    torch.testing.assert_close(ret, torch.tensor([[a0 + 0.5, a1 + 0.25, a2 + 0.5, 0.0]]))


def test_lambda_one_gamma_one_is_return_minus_value():
    rewards, values = torch.randn(2, 6), torch.randn(2, 6)
    mask = torch.ones(2, 6, dtype=torch.bool)
    adv, ret = K.gae(rewards, values, mask, 1.0, 1.0)
    mc = rewards.flip(1).cumsum(1).flip(1)
    torch.testing.assert_close(ret, mc, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(adv, mc - values, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.float32, torch.int32])
def test_cpu_matches_reference(dtype, mask_dtype):
    gen = torch.Generator().manual_seed(2)
    rewards = torch.randn(9, 257, generator=gen).to(dtype)
    values = torch.randn(9, 257, generator=gen).to(dtype)
    lengths = torch.randint(0, 258, (9,), generator=gen)
    mask = (torch.arange(257)[None] < lengths[:, None]).to(mask_dtype)
    expected = K.gae_reference(rewards, values, mask, 0.99, 0.95)
    got = gae_cpu(rewards, values, mask, 0.99, 0.95)
    for e, g in zip(expected, got):
        assert g.dtype == e.dtype
        torch.testing.assert_close(g, e, rtol=1e-6, atol=1e-6)


@given(
    batch=st.integers(1, 4),
    steps=st.integers(1, 30),
    gamma=st.floats(0.0, 1.0),
    lam=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**16),
)
def test_cpu_matches_reference_random(batch, steps, gamma, lam, seed):
    gen = torch.Generator().manual_seed(seed)
    rewards = torch.randn(batch, steps, generator=gen)
    values = torch.randn(batch, steps, generator=gen)
    mask = torch.rand(batch, steps, generator=gen) > 0.3
    mask[-1] = False
    expected = K.gae_reference(rewards, values, mask, gamma, lam)
    got = gae_cpu(rewards, values, mask, gamma, lam)
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e, rtol=1e-6, atol=1e-6)
    assert (expected[0][-1] == 0).all() and (expected[1][-1] == 0).all()


@pytest.mark.parametrize(
    "args, match",
    [
        ((torch.zeros(3), torch.zeros(3), torch.ones(3), 1.0, 1.0), "rewards: expected 2 dimensions"),
        ((torch.zeros(2, 3), torch.zeros(2, 4), torch.ones(2, 3), 1.0, 1.0), "values: expected shape"),
        ((torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(3), 1.0, 1.0), "mask: expected shape"),
        ((torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 3), 1.0, 1.0), "values: expected a floating"),
        ((torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2, 3), 1.1, 1.0), r"gamma: expected a number in \[0, 1\]"),
        ((torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2, 3), 1.0, -0.5), r"lam: expected a number in \[0, 1\]"),
    ],
)
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_bad_input(args, match, backend):
    with kernels_backend(backend), pytest.raises(ValueError, match=match):
        K.gae(*args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.float32])
def test_triton_interpreter_matches_reference(triton_interpreter, dtype, mask_dtype):
    # T = 21: three 8-step blocks, the first one partial; a full row, a fully masked row, a
    # length-1 row and a row with holes.
    gen = torch.Generator().manual_seed(3)
    rewards = torch.randn(4, 21, generator=gen).to(dtype)
    values = torch.randn(4, 21, generator=gen).to(dtype)
    mask = torch.ones(4, 21, dtype=torch.bool)
    mask[1] = False
    mask[2, 1:] = False
    mask[3] = torch.rand(21, generator=gen) > 0.3
    mask = mask.to(mask_dtype)
    expected = K.gae_reference(rewards, values, mask, 0.99, 0.95)
    got = K.gae(rewards, values, mask, 0.99, 0.95)
    for e, g in zip(expected, got):
        assert g.dtype == e.dtype
        torch.testing.assert_close(g, e, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("shape", [(1, 1), (3, 1), (2, 8), (0, 5), (2, 0)])
def test_triton_interpreter_edge_shapes(triton_interpreter, shape):
    rewards, values = torch.randn(shape), torch.randn(shape)
    mask = torch.ones(shape)
    expected = K.gae_reference(rewards, values, mask, 1.0, 0.5)
    for e, g in zip(expected, K.gae(rewards, values, mask, 1.0, 0.5)):
        torch.testing.assert_close(g, e, rtol=1e-6, atol=1e-6)


def test_triton_interpreter_non_contiguous(triton_interpreter):
    rewards, values = torch.randn(9, 3).t(), torch.randn(3, 18)[:, ::2]
    mask = torch.rand(3, 9) > 0.2
    expected = K.gae_reference(rewards, values, mask, 0.9, 0.9)
    for e, g in zip(expected, K.gae(rewards, values, mask, 0.9, 0.9)):
        torch.testing.assert_close(g, e, rtol=1e-6, atol=1e-6)


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
    # Chunks change the order of the roundings: by a few ulps of the largest value (<= 4 seen at
    # T = 37 in chunks of 8), not of each value.
    eps = torch.finfo(expected[0].dtype).eps
    for g, e in zip(got, expected):
        assert g.dtype == e.dtype
        torch.testing.assert_close(g, e, rtol=1e-6, atol=max(1e-6, 8 * eps * e.abs().max().item()))


@pytest.mark.parametrize("chunk", [8, 24])
@pytest.mark.parametrize("gamma, lam", [(0.99, 0.95), (1.0, 1.0), (0.9, 0.0), (0.0, 0.5), (1.0, 0.3)])
def test_triton_interpreter_chunked_matches_reference(triton_interpreter, monkeypatch, chunk, gamma, lam):
    # T = 37 in chunks of 8 (five, the last ragged) or 24 (two; blocks of 8 inside a chunk).
    monkeypatch.setenv("LONGCOT_SCAN_CHUNK", str(chunk))
    gen = torch.Generator().manual_seed(chunk)
    rewards, values = torch.randn(6, 37, generator=gen), torch.randn(6, 37, generator=gen)
    mask = _rows(37, gen, chunk)
    expected = K.gae_reference(rewards, values, mask, gamma, lam)
    got = K.gae(rewards, values, mask, gamma, lam)
    _close_to_reference(got, expected)
    assert (got[0][1] == 0).all() and (got[1][1] == 0).all()


@pytest.mark.parametrize("dtype, mask_dtype", [(torch.float64, torch.float32), (torch.bfloat16, torch.int32)])
def test_triton_interpreter_chunked_dtypes(triton_interpreter, monkeypatch, dtype, mask_dtype):
    monkeypatch.setenv("LONGCOT_SCAN_CHUNK", "8")
    gen = torch.Generator().manual_seed(5)
    rewards = torch.randn(6, 29, generator=gen).to(dtype)
    values = torch.randn(6, 29, generator=gen).to(dtype)
    mask = _rows(29, gen, 16).to(mask_dtype)
    _close_to_reference(K.gae(rewards, values, mask, 0.999, 0.95), K.gae_reference(rewards, values, mask, 0.999, 0.95))


def test_triton_interpreter_chunked_exact_sums(triton_interpreter, monkeypatch):
    # gamma = lam = 1: the factor is exactly 1, and with integer rewards and values every partial sum
    # is exact in fp32, so the chunked scan equals the reference bit for bit.
    monkeypatch.setenv("LONGCOT_SCAN_CHUNK", "8")
    gen = torch.Generator().manual_seed(6)
    rewards = torch.randint(-50, 50, (6, 37), generator=gen).float()
    values = torch.randint(-50, 50, (6, 37), generator=gen).float()
    mask = _rows(37, gen, 8)
    for g, e in zip(K.gae(rewards, values, mask, 1.0, 1.0), K.gae_reference(rewards, values, mask, 1.0, 1.0)):
        assert torch.equal(g, e)


@pytest.mark.parametrize("steps, chunk", [(8, 8), (9, 8), (1, 8), (5, 64)])
def test_triton_interpreter_chunk_edges(triton_interpreter, monkeypatch, steps, chunk):
    # one whole chunk, a last chunk of one step, one step, a chunk longer than the sequence
    monkeypatch.setenv("LONGCOT_SCAN_CHUNK", str(chunk))
    rewards, values = torch.randn(3, steps), torch.randn(3, steps)
    mask = torch.ones(3, steps)
    mask[1] = 0
    _close_to_reference(K.gae(rewards, values, mask, 0.9, 0.8), K.gae_reference(rewards, values, mask, 0.9, 0.8))


def test_chunk_choice():
    from longcot.kernels._scan_inputs import CHUNK_ENV, scan_chunk_t

    # on a GPU (blocks of 32): short sequences are one chunk, one launch
    for steps in (1, 13, 1000, 1024):
        assert scan_chunk_t(8, steps, 32, False) >= steps
    # 8 sequences x 16k tokens: chunks of 256, 512 programs
    chunk = scan_chunk_t(8, 16_384, 32, False)
    assert chunk == 256 and 8 * (16_384 // chunk) == 512
    # many sequences: longer chunks, as many programs as the GPU runs at once
    chunk = scan_chunk_t(512, 16_384, 32, False)
    assert chunk % 32 == 0 and 512 * -(-16_384 // chunk) <= 4096
    # very long sequences: the carry walk (one step per chunk) stays no longer than a chunk
    chunk = scan_chunk_t(1, 1 << 20, 32, False)
    assert -(-(1 << 20) // chunk) <= chunk
    # the interpreter: 16; forced: rounded up to whole blocks
    assert scan_chunk_t(2, 100, 8, True) == 16
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(CHUNK_ENV, "20")
        assert scan_chunk_t(2, 100, 8, True) == 24
        assert scan_chunk_t(2, 100, 32, False) == 32
        mp.setenv(CHUNK_ENV, "8")
        assert -(-10**6 // scan_chunk_t(1, 10**6, 8, True)) <= 65_535  # the grid's second axis
        mp.setenv(CHUNK_ENV, "0")
        with pytest.raises(ValueError, match=CHUNK_ENV):
            scan_chunk_t(2, 100, 8, True)


def test_scan_powers():
    from longcot.kernels._scan_inputs import scan_params

    p = scan_params([0.5, 1.0], torch.float32, torch.device("cpu"), [1.0, 0.5, 0.0], 300)
    assert p.shape == (2 + 3 * 300,)
    ones, halves, zeros = p[2:].view(3, 300)
    assert (ones == 1).all() and (zeros == 0).all()
    assert halves[0] == 0.5 and halves[9] == 0.5**10 and halves[-1] == 0  # underflows to 0 in fp32
    # the factor is rounded to the compute dtype first, as the kernel holds it
    p = scan_params([], torch.float32, torch.device("cpu"), [0.99 * 0.95], 3)
    f = torch.tensor(0.99 * 0.95, dtype=torch.float32).double()
    torch.testing.assert_close(p, (f ** torch.arange(1, 4)).float(), rtol=0, atol=0)
