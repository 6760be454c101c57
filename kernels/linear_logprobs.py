"""Per-token log-probabilities (and entropy) straight from hidden states and the LM-head weight.

logits = hidden @ weight.T, then the same as `token_logprobs`. This is the op the trainer uses
for the policy and reference models, so that fast paths can avoid the [N, V] logits entirely.
"""

from __future__ import annotations

import torch

from . import _checks
from ._backend import select
from .logprobs import check_tokens_in_vocab, token_logprobs_reference


def _check(hidden: object, weight: object, tokens: object, temperature: object):
    hidden = _checks.tensor("hidden", hidden)
    _checks.rank("hidden", hidden, 2, "[N, H]")
    _checks.floating("hidden", hidden)
    weight = _checks.tensor("weight", weight)
    _checks.rank("weight", weight, 2, "[V, H]")
    _checks.floating("weight", weight)
    if weight.shape[1] != hidden.shape[1]:
        raise ValueError(
            f"weight: expected shape [V, {hidden.shape[1]}] (H from hidden), got {tuple(weight.shape)}"
        )
    if weight.shape[0] < 1:
        raise ValueError(f"weight: expected at least one vocabulary row, got {tuple(weight.shape)}")
    _checks.same_device("weight", weight, "hidden", hidden.device)
    tokens = _checks.tensor("tokens", tokens)
    _checks.integer("tokens", tokens)
    _checks.same_shape("tokens", tokens, "hidden.shape[:1]", hidden.shape[:1])
    _checks.same_device("tokens", tokens, "hidden", hidden.device)
    check_tokens_in_vocab(tokens, weight.shape[0])
    return hidden, weight, tokens, _checks.temperature(temperature)


def linear_token_logprobs_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    tokens: torch.Tensor,
    temperature: float = 1.0,
    return_entropy: bool = False,
):
    logits = hidden.float() @ weight.float().T
    return token_logprobs_reference(logits, tokens, temperature, return_entropy)


def linear_token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    tokens: torch.Tensor,
    temperature: float = 1.0,
    return_entropy: bool = False,
):
    """fp32 [N] log-probs of ``tokens`` under softmax(hidden @ weight.T / temperature).

    Returns ``logp``, or ``(logp, entropy)``. Differentiable with respect to hidden and weight.
    """
    hidden, weight, tokens, temperature = _check(hidden, weight, tokens, temperature)
    select(hidden.device, cpu=False, triton=False)
    return linear_token_logprobs_reference(hidden, weight, tokens, temperature, return_entropy)
