"""The advantage estimators of engine/algorithms against hand values and the peers' formulas."""

import math
import typing

import pytest
import torch

from longcot.engine.algorithms import (
    ESTIMATORS,
    NEEDS_CRITIC,
    AdvantageInputs,
    get_advantage,
    normalize,
)
from longcot.engine.config import AlgorithmConfig
from longcot.engine.trainer import ESTIMATOR_OF


def _outcome(scores, group, lengths=None, dense=None, grpo_std="sample", gamma=(1.0,)):
    """Inputs with one sparse score per response at its last token (and optional dense rewards)."""
    scores = torch.tensor(scores, dtype=torch.float32)
    batch = len(scores)
    lengths = torch.tensor(lengths or [3] * batch)
    steps = int(lengths.max())
    mask = torch.arange(steps)[None] < lengths[:, None]
    rewards = torch.zeros(batch, steps, len(gamma))
    rewards[torch.arange(batch), lengths - 1, 0] = scores
    if dense is not None:
        rewards[..., 1] = dense * mask
    return AdvantageInputs(rewards, mask, list(gamma), 1.0, torch.tensor(group), grpo_std=grpo_std)


def test_every_algorithm_name_has_a_registered_estimator():
    names = typing.get_args(typing.get_type_hints(AlgorithmConfig)["name"])
    assert set(ESTIMATOR_OF) == set(names)
    assert set(ESTIMATOR_OF.values()) <= set(ESTIMATORS)
    assert NEEDS_CRITIC == {"gae"}


@pytest.mark.parametrize("grpo_std, expected", [("sample", 1 / math.sqrt(2)), ("population", 1.0),
                                                ("none", 0.5)])
def test_grpo_on_a_one_zero_group(grpo_std, expected):
    # The case: outcomes [1, 0]. The sample std (veRL, OpenRLHF, the GRPO paper) gives
    # +-0.7071, the population std +-1, no division (Dr. GRPO) +-0.5, on every valid token.
    x = _outcome([1.0, 0.0], [0, 0], grpo_std=grpo_std)
    adv, returns = get_advantage("grpo")(x)
    assert returns is None
    torch.testing.assert_close(adv, torch.tensor([[expected] * 3, [-expected] * 3]), rtol=1e-5, atol=0)


def test_grpo_default_is_the_sample_std():
    assert AlgorithmConfig().grpo_std == "sample"
    adv, _ = get_advantage("grpo")(_outcome([1.0, 0.0], [0, 0]))
    assert adv[0, 0].item() == pytest.approx(0.70710, abs=1e-4)


def test_grpo_matches_torch_std_per_group():
    # Groups of sizes 3 and 4, interleaved, ragged lengths; padding stays 0.
    scores = [2.0, -1.0, 0.5, 3.0, 1.0, 1.0, -2.0]
    group = [0, 1, 0, 1, 0, 1, 1]
    x = _outcome(scores, group, lengths=[3, 1, 4, 2, 4, 3, 1])
    adv, _ = get_advantage("grpo")(x)
    s, g = torch.tensor(scores), torch.tensor(group)
    for i in range(len(scores)):
        peers = s[g == g[i]]
        expected = (s[i] - peers.mean()) / (peers.std() + 1e-6)
        torch.testing.assert_close(adv[i][x.mask[i]], expected.expand(int(x.mask[i].sum())))
    assert (adv[~x.mask] == 0).all()


@pytest.mark.parametrize("grpo_std", ["sample", "population", "none"])
@pytest.mark.parametrize("name", ["grpo", "reinforce_baseline"])
def test_a_group_of_one_gets_zero(grpo_std, name):
    # Response 2 is alone in group 1, with a dense channel that would otherwise give it a shape
    # (and, divided by a zero std, a huge one).
    dense = torch.zeros(3, 3)
    dense[2, 0] = -0.05
    x = _outcome([1.0, 0.0, 5.0], [0, 0, 1], dense=dense, grpo_std=grpo_std, gamma=(1.0, 0.99))
    adv, _ = get_advantage(name)(x)
    assert torch.isfinite(adv).all()
    if name == "grpo":
        assert (adv[2] == 0).all() and (adv[:2] != 0).all()
    else:  # whitened over the batch, where the singleton's 0 before it is one of the values
        centred = torch.zeros(3, 3)
        centred[0], centred[1] = 0.5, -0.5
        torch.testing.assert_close(adv, normalize(centred, x.mask))


def test_rloo_passes_a_singleton_through():
    x = _outcome([1.0, 0.0, 4.0, 5.0], [0, 0, 0, 1])
    adv, _ = get_advantage("rloo")(x)
    torch.testing.assert_close(adv[:, 0], torch.tensor([1.0 - 2.0, 0.0 - 2.5, 4.0 - 0.5, 5.0]))


def test_reinforce_baseline_is_group_mean_then_batch_whitening():
    # OpenRLHF's reinforce_baseline: score - group mean, then (A - mean) / std over the batch's
    # valid tokens; the group's own std plays no part.
    scores = [1.0, 0.0, 0.0, 10.0, 2.0, 4.0]
    group = [0, 0, 0, 1, 1, 1]
    lengths = [3, 1, 2, 3, 3, 2]
    x = _outcome(scores, group, lengths=lengths)
    adv, returns = get_advantage("reinforce_baseline")(x)
    assert returns is None
    centred = torch.tensor([1 - 1 / 3, -1 / 3, -1 / 3, 10 - 16 / 3, 2 - 16 / 3, 4 - 16 / 3])
    tokens = centred.repeat_interleave(torch.tensor(lengths))
    expected = (centred - tokens.mean()) / (tokens.std() + 1e-6)
    for i, n in enumerate(lengths):
        torch.testing.assert_close(adv[i, :n], expected[i].expand(n))
        assert (adv[i, n:] == 0).all()
    valid = adv[x.mask]
    assert valid.mean().abs() < 1e-6 and valid.std().item() == pytest.approx(1.0, rel=1e-5)
    # Scaling every score by 10 leaves it unchanged (batch std), unlike a baseline alone.
    scaled, _ = get_advantage("reinforce_baseline")(_outcome([10 * s for s in scores], group, lengths=lengths))
    torch.testing.assert_close(scaled, adv, rtol=1e-5, atol=1e-6)


def test_bad_grpo_std_names_the_key():
    with pytest.raises(ValueError, match="algorithm.grpo_std: expected one of 'sample', 'population', 'none'"):
        get_advantage("grpo")(_outcome([1.0, 0.0], [0, 0], grpo_std="unbiased"))
