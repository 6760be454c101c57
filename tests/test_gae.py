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
