"""The C++ module checks its own arguments: whatever it is given, it raises, never crashes."""

import numpy as np
import pytest

from longcot.kernels import _cpu

tok = np.zeros((2, 8), dtype=np.int64)
lens = np.array([8, 3], dtype=np.int64)
rew3 = np.zeros((2, 8, 2), dtype=np.float32)
rew2 = np.zeros((2, 8), dtype=np.float32)
msk = np.ones((2, 8), dtype=bool)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: _cpu.repetition_mask(tok.astype(np.int32), lens, 2), "tokens: expected dtype int64"),
        (lambda: _cpu.repetition_mask(tok[:, ::2], lens, 2), "tokens: expected a C-contiguous"),
        (lambda: _cpu.repetition_mask(tok[0], lens, 2), "tokens: expected 2 dimensions"),
        (lambda: _cpu.repetition_mask(tok, lens[:1], 2), "lengths: expected shape"),
        (lambda: _cpu.repetition_mask(tok, np.array([9, 1]), 2), "lengths: expected 0 <="),
        (lambda: _cpu.repetition_mask(tok, np.array([-5, 1]), 2), "lengths: expected 0 <="),
        (lambda: _cpu.repetition_mask(tok, lens, 0), "n: expected n >= 1"),
        (lambda: _cpu.repetition_ratio(tok, lens.astype(np.float64), 2), "lengths: expected dtype"),
        (lambda: _cpu.discounted_returns(rew3, msk, [1.0]), "gammas: expected one discount"),
        (lambda: _cpu.discounted_returns(rew3, msk, [1.0, float("nan")]), r"gammas\[1\]"),
        (lambda: _cpu.discounted_returns(rew3, msk, [1.0, 1.5]), r"gammas\[1\]"),
        (lambda: _cpu.discounted_returns(rew3, msk[:1], [1.0, 1.0]), "mask: expected shape"),
        (lambda: _cpu.discounted_returns(rew3.astype(np.float16), msk, [1.0, 1.0]), "rewards: expected dtype"),
        (lambda: _cpu.discounted_returns(rew3, msk.astype(np.float64), [1.0, 1.0]), "mask: expected dtype"),
        (lambda: _cpu.discounted_returns(rew2, msk, [1.0]), "rewards: expected 3 dimensions"),
        (lambda: _cpu.gae(rew2, rew2.astype(np.float64), msk, 1.0, 1.0), "values: expected the same dtype"),
        (lambda: _cpu.gae(rew2, rew2[:, :4].copy(), msk, 1.0, 1.0), "values: expected shape"),
        (lambda: _cpu.gae(rew2, rew2, msk, -0.1, 1.0), "gamma: expected a value in"),
        (lambda: _cpu.gae(rew2, rew2, msk, 1.0, 2.0), "lam: expected a value in"),
        (lambda: _cpu.gae(rew2.T, rew2, msk, 1.0, 1.0), "rewards: expected a C-contiguous"),
    ],
)
def test_bad_arguments_raise_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_empty_batches_and_zero_length():
    empty = np.zeros((0, 5), dtype=np.int64)
    assert _cpu.repetition_mask(empty, np.zeros(0, dtype=np.int64), 3).shape == (0, 5)
    assert _cpu.repetition_ratio(np.zeros((1, 0), dtype=np.int64), np.zeros(1, dtype=np.int64), 1).tolist() == [0.0]
    assert _cpu.discounted_returns(np.zeros((2, 0, 1), dtype=np.float32), np.zeros((2, 0), dtype=bool), [0.5]).shape == (2, 0)
    adv, ret = _cpu.gae(np.zeros((0, 3)), np.zeros((0, 3)), np.zeros((0, 3)), 1.0, 1.0)
    assert adv.shape == ret.shape == (0, 3)


def test_threads_agree_with_one_thread():
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 4, size=(33, 3000), dtype=np.int64)
    lengths = rng.integers(0, 3001, size=33, dtype=np.int64)
    assert np.array_equal(_cpu.repetition_mask(tokens, lengths, 5, False, 1),
                          _cpu.repetition_mask(tokens, lengths, 5, False, 4))
    rewards = rng.standard_normal((33, 3000, 2)).astype(np.float32)
    mask = rng.random((33, 3000)) < 0.9
    assert np.array_equal(_cpu.discounted_returns(rewards, mask, [1.0, 0.9], 1),
                          _cpu.discounted_returns(rewards, mask, [1.0, 0.9], 3))
