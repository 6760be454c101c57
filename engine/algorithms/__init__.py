"""Advantage estimators (registered by name) and losses."""

from .advantages import (
    ESTIMATORS,
    GRPO_STD,
    NEEDS_CRITIC,
    AdvantageInputs,
    get_advantage,
    normalize,
    register_advantage,
)
from .losses import KLController, value_loss

__all__ = [
    "ESTIMATORS",
    "GRPO_STD",
    "NEEDS_CRITIC",
    "AdvantageInputs",
    "KLController",
    "get_advantage",
    "normalize",
    "register_advantage",
    "value_loss",
]
