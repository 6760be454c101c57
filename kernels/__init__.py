"""longcot.kernels: the per-token math of an RL step, one op per module.

Every op has a plain PyTorch reference (``<op>_reference``) beside its fast paths and dispatches by
device; ``LONGCOT_KERNELS=reference|cpu|triton`` forces a path (see ``_backend``).
"""

from ._backend import (
    BACKENDS,
    dispatch_counts,
    has_cpu_extension,
    requested_backend,
    reset_dispatch_counts,
)
from .gae import gae, gae_reference
from .kl import ESTIMATORS, kl_penalty, kl_penalty_reference
from .linear_logprobs import linear_token_logprobs, linear_token_logprobs_reference
from .linear_ppo_loss import linear_ppo_policy_loss, linear_ppo_policy_loss_reference
from .logprobs import token_logprobs, token_logprobs_reference
from .ppo_loss import AGGREGATIONS, RATIOS, ppo_policy_loss, ppo_policy_loss_reference
from .repetition import (
    repetition_mask,
    repetition_mask_reference,
    repetition_ratio,
    repetition_ratio_reference,
)
from .repetition_update import (
    RepetitionState,
    RepetitionStep,
    repetition_state,
    repetition_update,
    repetition_update_reference,
)
from .returns import discounted_returns, discounted_returns_reference
from .token_rewards import token_rewards, token_rewards_reference

__all__ = [
    "AGGREGATIONS",
    "BACKENDS",
    "ESTIMATORS",
    "RATIOS",
    "RepetitionState",
    "RepetitionStep",
    "discounted_returns",
    "dispatch_counts",
    "discounted_returns_reference",
    "gae",
    "gae_reference",
    "has_cpu_extension",
    "kl_penalty",
    "kl_penalty_reference",
    "linear_ppo_policy_loss",
    "linear_ppo_policy_loss_reference",
    "linear_token_logprobs",
    "linear_token_logprobs_reference",
    "ppo_policy_loss",
    "ppo_policy_loss_reference",
    "repetition_mask",
    "repetition_mask_reference",
    "repetition_ratio",
    "repetition_ratio_reference",
    "repetition_state",
    "repetition_update",
    "repetition_update_reference",
    "requested_backend",
    "reset_dispatch_counts",
    "token_logprobs",
    "token_logprobs_reference",
    "token_rewards",
    "token_rewards_reference",
]
