"""longcot.engine.rewards: the verifier, the outcome and length rewards, the repetition penalty,
and reward channels configured by name.
"""

from __future__ import annotations

from .cosine import binary_reward, cosine_length_reward
from .registry import (
    RewardChannel,
    RewardInputs,
    RewardOutput,
    RewardSpec,
    check_channels,
    get_reward,
    paper_channels,
    register_reward,
    reward_names,
    score_responses,
)
from .repetition import repetition_penalty
from .verifier import MAX_ANSWER_CHARS, extract_boxed, verify, verify_batch, verify_batch_verdicts

__all__ = [
    "MAX_ANSWER_CHARS",
    "RewardChannel",
    "RewardInputs",
    "RewardOutput",
    "RewardSpec",
    "binary_reward",
    "check_channels",
    "cosine_length_reward",
    "extract_boxed",
    "get_reward",
    "paper_channels",
    "register_reward",
    "repetition_penalty",
    "reward_names",
    "score_responses",
    "verify",
    "verify_batch",
    "verify_batch_verdicts",
]
