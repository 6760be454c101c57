"""Advantage estimators, registered by name: adding one is one function, not a new trainer.

Every estimator takes the per-token, per-channel rewards of a batch (sparse rewards already at
the last token, dense ones in place, the KL share subtracted when KL is in the reward) and
returns (advantages [B, T], returns [B, T] or None); only "gae" uses a critic.

The group estimators (grpo, rloo, reinforce_baseline) compare a response's score G_0 (its summed
return at the first token) with the other responses to the same prompt. A response alone in its
group (a group of one) has nothing to be compared with: grpo and reinforce_baseline give it
advantage 0 (veRL's GRPO instead passes its raw score through, as mean 0 and std 1); rloo's
leave-one-out baseline is then 0, so rloo passes its returns through, as veRL's does.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from longcot.kernels import discounted_returns, gae

EPS = 1e-6
# grpo's divisor of the group-centred scores: the sample std (n - 1), as veRL, OpenRLHF and the
# GRPO paper; the population std (n), longcot's before; none: Dr. GRPO (veRL's
# norm_adv_by_std_in_grpo=False, OpenRLHF's dr_grpo).
GRPO_STD = ("sample", "population", "none")


@dataclass
class AdvantageInputs:
    rewards: torch.Tensor  # [B, T, C]
    mask: torch.Tensor  # bool [B, T]
    gammas: list[float]  # one per channel
    lam: float
    group: torch.Tensor  # LongTensor [B]: the prompt each response answers
    values: torch.Tensor | None = None  # [B, T] critic values (gae only)
    grpo_std: str = "sample"  # one of GRPO_STD (grpo only)
    # The sum over the data-parallel ranks' batches (World.sum), for the statistics taken over
    # the whole batch (whitening); None: this batch is the whole batch.
    batch_sum: Callable[[torch.Tensor], torch.Tensor] | None = None


Estimator = Callable[[AdvantageInputs], tuple[torch.Tensor, torch.Tensor | None]]
ESTIMATORS: dict[str, Estimator] = {}
NEEDS_CRITIC: set[str] = set()


def register_advantage(name: str, critic: bool = False) -> Callable[[Estimator], Estimator]:
    def wrap(fn: Estimator) -> Estimator:
        ESTIMATORS[name] = fn
        if critic:
            NEEDS_CRITIC.add(name)
        return fn

    return wrap


def get_advantage(name: str) -> Estimator:
    if name not in ESTIMATORS:
        raise ValueError(f"algorithm.name: unknown estimator {name!r} (known: {', '.join(sorted(ESTIMATORS))})")
    return ESTIMATORS[name]


@register_advantage("gae", critic=True)
def gae_multi_gamma(x: AdvantageInputs) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's GAE. With one gamma for all channels the channels are summed first; with several
    (the paper's correctness 1.0 / repetition 0.99) lambda must be 1, where GAE is the
    multi-gamma return minus the value."""
    if x.values is None:
        raise ValueError("values: the gae estimator needs critic values")
    values = x.values * x.mask
    if len(set(x.gammas)) == 1:
        return gae(x.rewards.sum(-1), values, x.mask, x.gammas[0], x.lam)
    if x.lam != 1.0:
        raise ValueError(
            f"algorithm.lam: reward channels with different gammas ({x.gammas}) need lam = 1, got {x.lam}"
        )
    returns = discounted_returns(x.rewards, x.mask, x.gammas)
    return (returns - values) * x.mask, returns


def _group_stats(
    score: torch.Tensor, group: torch.Tensor, ddof: int = 1
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-response mean, std and size of its group's scores; the squared deviations are divided
    by size - ddof (1: the sample std; 0: the population std). A group of one has std 0."""
    groups = int(group.max()) + 1
    zeros = score.new_zeros(groups)
    count = zeros.index_add(0, group, torch.ones_like(score))
    total = zeros.index_add(0, group, score)
    mean = total / count
    var = zeros.index_add(0, group, (score - mean[group]) ** 2) / (count - ddof).clamp_min(1)
    return mean[group], var.sqrt()[group], count[group]


@register_advantage("grpo")
def grpo(x: AdvantageInputs) -> tuple[torch.Tensor, None]:
    """Group-normalised returns: (G_t - mean_group(G_0)) / std_group(G_0), the std per
    ``x.grpo_std`` (sample by default; ``none`` leaves the division out). With one sparse channel
    and gamma 1 this is GRPO's outcome advantage; a dense channel keeps its per-token shape on
    top. A group of one gets 0."""
    if x.grpo_std not in GRPO_STD:
        raise ValueError(f"algorithm.grpo_std: expected one of {', '.join(map(repr, GRPO_STD))}, got {x.grpo_std!r}")
    returns = discounted_returns(x.rewards, x.mask, x.gammas)
    score = returns[:, 0]
    mean, std, count = _group_stats(score, x.group, ddof=0 if x.grpo_std == "population" else 1)
    adv = returns - mean[:, None]
    if x.grpo_std != "none":
        adv = adv / (std[:, None] + EPS)
    return adv * (count > 1)[:, None] * x.mask, None


@register_advantage("rloo")
def rloo(x: AdvantageInputs) -> tuple[torch.Tensor, None]:
    """REINFORCE leave-one-out: the baseline of a response is the mean score of the others."""
    returns = discounted_returns(x.rewards, x.mask, x.gammas)
    score = returns[:, 0]
    mean, _, count = _group_stats(score, x.group)
    others = (mean * count - score) / (count - 1).clamp_min(1)
    return (returns - others[:, None]) * x.mask, None


@register_advantage("reinforce++")
def reinforce_pp(x: AdvantageInputs) -> tuple[torch.Tensor, None]:
    """REINFORCE++: token-level returns normalised over all valid tokens of the batch."""
    returns = discounted_returns(x.rewards, x.mask, x.gammas)
    return normalize(returns * x.mask, x.mask, x.batch_sum), None


@register_advantage("reinforce_baseline")
def reinforce_baseline(x: AdvantageInputs) -> tuple[torch.Tensor, None]:
    """REINFORCE with a group baseline (OpenRLHF's reinforce_baseline, veRL's
    reinforce_plus_plus_baseline): G_t minus the group's mean G_0, then whitened over the batch's
    valid tokens (the batch's mean and std, not the group's std). A group of one gets 0 before the
    whitening."""
    returns = discounted_returns(x.rewards, x.mask, x.gammas)
    score = returns[:, 0]
    mean, _, count = _group_stats(score, x.group)
    centred = (returns - mean[:, None]) * (count > 1)[:, None] * x.mask
    return normalize(centred, x.mask, x.batch_sum), None


def normalize(advantages: torch.Tensor, mask: torch.Tensor,
              batch_sum: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Whiten advantages over the batch's valid tokens (PPO's usual normalisation). With
    ``batch_sum`` this batch is one rank's share, and the mean and (sample) std are those of the
    whole batch: two passes, each one sum over ranks."""
    valid = advantages[mask]
    if batch_sum is None:
        if valid.numel() < 2:
            return advantages
        return (advantages - valid.mean()) / (valid.std() + EPS) * mask
    total, count = batch_sum(torch.stack([valid.sum(), torch.tensor(float(valid.numel()), device=valid.device)]))
    if count < 2:
        return advantages
    mean = total / count
    std = (batch_sum((valid - mean).square().sum()) / (count - 1)).sqrt()
    return (advantages - mean) / (std + EPS) * mask
