from __future__ import annotations

import math

import pytest
import torch

from longcot.engine.rewards import (
    RewardChannel,
    RewardInputs,
    RewardOutput,
    binary_reward,
    check_channels,
    cosine_length_reward,
    get_reward,
    paper_channels,
    register_reward,
    repetition_penalty,
    score_responses,
)
from longcot.engine.rewards import registry as registry_module
from longcot.kernels import repetition_mask


def cosine_definition(length: int, max_len: int, start: float, end: float) -> float:
    length = min(length, max_len)
    return end + (start - end) * (1 + math.cos(math.pi * length / max_len)) / 2


def bools(*values: bool) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.bool)


# --- cosine_length_reward ------------------------------------------------------------------


def test_cosine_paper_values() -> None:
    max_len = 16_384
    lengths = torch.tensor([0, max_len // 2, max_len] * 2 + [100, 100])
    correct = bools(True, True, True, False, False, False, True, False)
    truncated = bools(False, False, False, False, False, False, True, True)
    reward = cosine_length_reward(correct, lengths, max_len, truncated)
    expected = torch.tensor([2.0, 1.5, 1.0, -10.0, -5.0, 0.0, -10.0, -10.0])
    assert reward.dtype == torch.float32
    torch.testing.assert_close(reward, expected, rtol=0, atol=1e-6)


def test_cosine_matches_definition_at_random_lengths() -> None:
    generator = torch.Generator().manual_seed(1)
    max_len = 1000
    lengths = torch.randint(0, 1300, (64,), generator=generator)  # some past max_len: clamped
    correct = torch.rand(64, generator=generator) < 0.5
    truncated = torch.rand(64, generator=generator) < 0.2
    ranges = {True: (3.0, 0.5), False: (-4.0, 1.0)}
    reward = cosine_length_reward(
        correct, lengths, max_len, truncated, ranges[True], ranges[False], exceed=-7.5
    )
    expected = [
        -7.5 if t else cosine_definition(n, max_len, *ranges[c])
        for n, c, t in zip(lengths.tolist(), correct.tolist(), truncated.tolist())
    ]
    torch.testing.assert_close(reward, torch.tensor(expected), rtol=0, atol=1e-6)
    assert bool(truncated.any()) and bool((lengths > max_len).any())


def test_cosine_lengths_past_max_len_are_clamped() -> None:
    reward = cosine_length_reward(
        bools(True, False), torch.tensor([500, 10**9]), 100, bools(False, False)
    )
    torch.testing.assert_close(reward, torch.tensor([1.0, 0.0]))


def test_cosine_shape_of_incentives() -> None:
    # Shorter correct answers earn more; longer wrong answers are penalised less.
    lengths = torch.arange(0, 101, 10)
    n = len(lengths)
    correct = cosine_length_reward(
        torch.ones(n, dtype=torch.bool), lengths, 100, torch.zeros(n, dtype=torch.bool)
    )
    wrong = cosine_length_reward(
        torch.zeros(n, dtype=torch.bool), lengths, 100, torch.zeros(n, dtype=torch.bool)
    )
    assert bool((correct[1:] < correct[:-1]).all())
    assert bool((wrong[1:] > wrong[:-1]).all())
    assert bool((correct > wrong).all())


def test_cosine_accepts_ranges_as_lists_and_empty_batches() -> None:
    reward = cosine_length_reward(bools(True), torch.tensor([0]), 10, bools(False), [4, 3], [0, 1])
    assert reward.tolist() == [4.0]
    empty = cosine_length_reward(bools(), torch.tensor([], dtype=torch.long), 10, bools())
    assert empty.shape == (0,) and empty.dtype == torch.float32


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"lengths": torch.tensor([1, 2, 3])}, "lengths"),
        ({"truncated": bools(False)}, "truncated"),
        ({"correct": torch.tensor([1, 0])}, "correct"),
        ({"correct": torch.tensor([[True, False]])}, "correct"),
        ({"lengths": torch.tensor([1.0, 2.0])}, "lengths"),
        ({"lengths": torch.tensor([1, -1])}, "lengths"),
        ({"max_len": 0}, "max_len"),
        ({"max_len": 10.0}, "max_len"),
        ({"max_len": True}, "max_len"),
        ({"correct_range": (1.0,)}, "correct_range"),
        ({"correct_range": (1.0, 2.0, 3.0)}, "correct_range"),
        ({"correct_range": (1.0, math.nan)}, "correct_range"),
        ({"wrong_range": "ab"}, "wrong_range"),
        ({"wrong_range": (-math.inf, 0.0)}, "wrong_range"),
        ({"exceed": math.inf}, "exceed"),
        ({"exceed": None}, "exceed"),
    ],
)
def test_cosine_validation_names_the_argument(kwargs: dict, name: str) -> None:
    args = {
        "correct": bools(True, False),
        "lengths": torch.tensor([1, 2]),
        "max_len": 10,
        "truncated": bools(False, False),
    }
    args.update(kwargs)
    with pytest.raises(ValueError, match=name):
        cosine_length_reward(**args)


# --- binary_reward -------------------------------------------------------------------------


def test_binary_reward() -> None:
    correct = bools(True, False, True)
    assert binary_reward(correct).tolist() == [1.0, 0.0, 1.0]
    assert binary_reward(correct, 2.0, -1.0).tolist() == [2.0, -1.0, 2.0]
    assert binary_reward(correct).dtype == torch.float32
    with pytest.raises(ValueError, match="correct"):
        binary_reward(torch.tensor([1, 0]))
    with pytest.raises(ValueError, match="wrong_value"):
        binary_reward(correct, wrong_value=math.nan)


# --- repetition_penalty --------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 3, 5])
@pytest.mark.parametrize("only_start", [False, True])
def test_repetition_penalty_matches_kernel_mask(n: int, only_start: bool) -> None:
    generator = torch.Generator().manual_seed(n)
    tokens = torch.randint(0, 3, (6, 40), generator=generator)  # small vocab: many repeats
    lengths = torch.tensor([40, 33, 10, 1, 0, 25])
    penalty = repetition_penalty(tokens, lengths, n=n, penalty=-0.25, only_start=only_start)
    mask = repetition_mask(tokens, lengths, n, only_start)
    assert penalty.dtype == torch.float32 and penalty.shape == tokens.shape
    assert bool(mask.any())
    assert bool((penalty[mask] == -0.25).all())
    assert bool((penalty[~mask] == 0.0).all())


def test_repetition_penalty_on_a_known_sequence() -> None:
    tokens = torch.tensor([[1, 2, 3, 1, 2, 3, 9, 9]])
    penalty = repetition_penalty(tokens, torch.tensor([7]), n=3, penalty=-0.05)
    # "1 2 3" repeats at positions 3..5; position 7 is padding.
    expected = torch.tensor([[0, 0, 0, -0.05, -0.05, -0.05, 0, 0]])
    torch.testing.assert_close(penalty, expected)


def test_repetition_penalty_validation() -> None:
    tokens, lengths = torch.zeros(1, 4, dtype=torch.long), torch.tensor([4])
    for bad in (0.1, math.nan, -math.inf, "x", True):
        with pytest.raises(ValueError, match="penalty"):
            repetition_penalty(tokens, lengths, n=2, penalty=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="n"):
        repetition_penalty(tokens, lengths, n=0)
    assert bool((repetition_penalty(tokens, lengths, n=2, penalty=0.0) == 0).all())


# --- registry ------------------------------------------------------------------------------


@pytest.fixture
def isolated_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry_module, "_REGISTRY", dict(registry_module._REGISTRY))


def test_builtin_rewards_are_registered_with_their_kinds() -> None:
    assert get_reward("correctness").kind == "sparse"
    assert get_reward("cosine").kind == "sparse"
    assert get_reward("repetition").kind == "dense"
    assert get_reward("cosine").params == {"correct_range", "wrong_range", "exceed"}


def test_unknown_reward_lists_known_names() -> None:
    with pytest.raises(ValueError, match="unknown reward 'cosin'.*correctness, cosine, repetition"):
        get_reward("cosin")
    with pytest.raises(ValueError, match=r"channels\[1\]\.reward: unknown reward 'nope'"):
        check_channels([RewardChannel("cosine"), RewardChannel("nope")])


def test_unknown_parameter_names_reward_and_parameter() -> None:
    with pytest.raises(ValueError, match=r"channels\[0\].*reward 'repetition'.*'ngram'"):
        check_channels([RewardChannel("repetition", 0.99, {"ngram": 40})])
    with pytest.raises(ValueError, match="reward 'cosine'.*'exceeds'"):
        get_reward("cosine")(_inputs(), exceeds=-1.0)


@pytest.mark.parametrize("gamma", [1.5, -0.1, math.nan, True, "1"])
def test_bad_gamma_names_the_channel(gamma: object) -> None:
    channels = [RewardChannel("cosine"), RewardChannel("repetition", gamma=gamma)]  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"channels\[1\]\.gamma"):
        check_channels(channels)


def test_channel_list_validation() -> None:
    with pytest.raises(ValueError, match="at least one"):
        check_channels([])
    with pytest.raises(ValueError, match="list of RewardChannel"):
        check_channels(RewardChannel("cosine"))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"channels\[0\] must be a RewardChannel"):
        check_channels(["cosine"])  # type: ignore[list-item]
    assert [spec.name for spec in check_channels(paper_channels())] == ["cosine", "repetition"]


@pytest.mark.usefixtures("isolated_registry")
def test_register_reward_rejects_duplicates_and_bad_kinds() -> None:
    with pytest.raises(ValueError, match="already registered"):
        register_reward("cosine", kind="sparse")(lambda inputs: inputs.lengths.float())
    with pytest.raises(ValueError, match="kind"):
        register_reward("new", kind="per-token")  # type: ignore[arg-type]


@pytest.mark.usefixtures("isolated_registry")
def test_custom_rewards_and_return_shape_checks() -> None:
    @register_reward("length_bonus", kind="sparse")
    def length_bonus(inputs: RewardInputs, *, scale: float = 1.0) -> torch.Tensor:
        return inputs.lengths.float() * scale

    @register_reward("wrong_shape", kind="dense")
    def wrong_shape(inputs: RewardInputs) -> torch.Tensor:
        return inputs.lengths.float()  # [B], but a dense reward must be [B, T]

    @register_reward("anything", kind="sparse")
    def anything(inputs: RewardInputs, **params: float) -> torch.Tensor:
        return torch.full_like(inputs.lengths, sum(params.values()), dtype=torch.float32)

    @register_reward("nan", kind="sparse")
    def nan(inputs: RewardInputs) -> torch.Tensor:
        return torch.full(inputs.lengths.shape, math.nan)

    inputs = _inputs()
    assert get_reward("length_bonus")(inputs, scale=2.0).tolist() == [6.0, 8.0]
    assert get_reward("anything")(inputs, a=1.0, b=2.0).tolist() == [3.0, 3.0]
    with pytest.raises(ValueError, match="dense reward 'wrong_shape' must return"):
        get_reward("wrong_shape")(inputs)
    with pytest.raises(ValueError, match="'nan' returned non-finite"):
        get_reward("nan")(inputs)
    with pytest.raises(ValueError, match="'length_bonus' has no parameter 'sclae'"):
        check_channels([RewardChannel("length_bonus", params={"sclae": 2.0})])


def _inputs() -> RewardInputs:
    return RewardInputs(
        responses=[r"\boxed{1}", "x"],
        answers=["1", "1"],
        tokens=torch.zeros(2, 5, dtype=torch.long),
        lengths=torch.tensor([3, 4]),
        truncated=bools(False, False),
        max_len=5,
        correct=bools(True, False),
    )


def test_paper_channels() -> None:
    cosine, repetition = paper_channels()
    assert (cosine.reward, cosine.gamma) == ("cosine", 1.0)
    assert cosine.params == {
        "correct_range": (2.0, 1.0),
        "wrong_range": (-10.0, 0.0),
        "exceed": -10.0,
    }
    assert (repetition.reward, repetition.gamma) == ("repetition", 0.99)
    assert repetition.params == {"n": 40, "penalty": -0.05}
    assert paper_channels() is not paper_channels()  # callers may edit their copy


# --- score_responses end to end ------------------------------------------------------------


def _batch() -> dict:
    tokens = torch.tensor(
        [
            [1, 2, 3, 1, 2, 3, 1, 2, 0, 0],  # repeats from position 3, length 8
            [4, 5, 6, 7, 8, 9, 4, 5, 6, 0],  # "4 5 6" repeats at 6..8
            [1, 1, 1, 1, 1, 1, 1, 1, 1, 1],  # truncated at the limit, all repetition
            [7, 7, 7, 7, 0, 0, 0, 0, 0, 0],  # padding after length 4 repeats the pad id
        ]
    )
    return {
        "responses": [
            r"so $\boxed{\frac{1}{2}}$",  # correct
            r"\boxed{3} wait, \boxed{4}",  # wrong: the last box counts
            r"\boxed{2",  # cut mid-answer
            r"\boxed{025}",  # correct by the integer fast path
        ],
        "answers": ["0.5", "3", "2", "25"],
        "tokens": tokens,
        "lengths": torch.tensor([8, 9, 10, 4]),
        "truncated": bools(False, False, True, False),
        "max_len": 10,
    }


def test_score_responses_places_channels_in_their_columns() -> None:
    batch = _batch()
    channels = [
        RewardChannel("cosine", 1.0, {"correct_range": (2.0, 1.0), "wrong_range": (-10.0, 0.0)}),
        RewardChannel("repetition", 0.99, {"n": 3, "penalty": -0.05}),
        RewardChannel("correctness", 0.5),
    ]
    out = score_responses(**batch, channels=channels)
    assert isinstance(out, RewardOutput)
    assert out.correct.tolist() == [True, False, False, True]
    assert out.timeouts == 0
    assert out.gammas == [1.0, 0.99, 0.5]
    assert out.sparse.shape == (4, 3) and out.sparse.dtype == torch.float32
    assert out.dense.shape == (4, 10, 3) and out.dense.dtype == torch.float32

    expected_cosine = [
        cosine_definition(8, 10, 2.0, 1.0),
        cosine_definition(9, 10, -10.0, 0.0),
        -10.0,  # truncated
        cosine_definition(4, 10, 2.0, 1.0),
    ]
    torch.testing.assert_close(out.sparse[:, 0], torch.tensor(expected_cosine))
    assert out.sparse[:, 2].tolist() == [1.0, 0.0, 0.0, 1.0]
    assert bool((out.sparse[:, 1] == 0).all())  # the dense channel's sparse column

    assert bool((out.dense[:, :, 0] == 0).all()) and bool((out.dense[:, :, 2] == 0).all())
    mask = repetition_mask(batch["tokens"], batch["lengths"], 3)
    torch.testing.assert_close(out.dense[:, :, 1], torch.where(mask, -0.05, 0.0))
    assert out.dense[0, :, 1].tolist()[2:6] == pytest.approx([0.0, -0.05, -0.05, -0.05])
    # All ones: every token but the first belongs to a trigram seen before.
    assert out.dense[2, 0, 1].item() == 0.0 and bool((out.dense[2, 1:, 1] == -0.05).all())


@pytest.mark.usefixtures("isolated_registry")
def test_score_responses_zeroes_dense_padding() -> None:
    @register_reward("everywhere", kind="dense")
    def everywhere(inputs: RewardInputs) -> torch.Tensor:
        return torch.ones(inputs.tokens.shape)

    batch = _batch()
    out = score_responses(**batch, channels=[RewardChannel("everywhere")])
    in_response = torch.arange(10) < batch["lengths"][:, None]
    torch.testing.assert_close(out.dense[:, :, 0], in_response.float())


def test_score_responses_with_paper_channels() -> None:
    out = score_responses(**_batch(), channels=paper_channels())
    assert out.gammas == [1.0, 0.99]
    assert out.sparse[2, 0].item() == -10.0
    assert bool((out.dense == 0).all())  # no 40-gram repeats in responses this short


def test_score_responses_validates_before_verifying() -> None:
    batch = _batch()
    with pytest.raises(ValueError, match=r"channels\[0\]\.gamma"):
        score_responses(**batch, channels=[RewardChannel("cosine", gamma=2.0)])
    with pytest.raises(ValueError, match="responses"):
        score_responses(**{**batch, "responses": batch["responses"][:3]}, channels=paper_channels())
    with pytest.raises(ValueError, match="lengths"):
        score_responses(
            **{**batch, "lengths": torch.tensor([8, 9, 11, 4])}, channels=paper_channels()
        )
    with pytest.raises(ValueError, match="truncated"):
        score_responses(**{**batch, "truncated": torch.zeros(4)}, channels=paper_channels())
    with pytest.raises(ValueError, match="max_len"):
        score_responses(**{**batch, "max_len": 0}, channels=paper_channels())
