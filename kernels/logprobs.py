"""Per-token log-probabilities (and entropy) of sampled tokens, from logits.

logp = log_softmax(logits / temperature)[token], in fp32 whatever the input dtype: sampling at
temperature t means the policy's distribution is softmax(logits / t), so PPO's ratios must be
taken under the same temperature. entropy = -sum_v p_v log p_v of that distribution.
"""

from __future__ import annotations

import torch

from . import _checks
from ._backend import select


def check_tokens_in_vocab(tokens: torch.Tensor, vocab: int) -> None:
    # Only on the CPU: on a GPU this would be a device sync per call, and an out-of-range id
    # there fails inside the kernel anyway.
    if tokens.device.type == "cpu" and tokens.numel():
        lo, hi = int(tokens.min()), int(tokens.max())
        if lo < 0 or hi >= vocab:
            raise ValueError(f"tokens: expected ids in [0, {vocab}), got min {lo}, max {hi}")


def _check(logits: object, tokens: object, temperature: object):
    logits = _checks.tensor("logits", logits)
    _checks.floating("logits", logits)
    if logits.dim() < 1 or logits.shape[-1] < 1:
        raise ValueError(f"logits: expected shape [..., V] with V >= 1, got {tuple(logits.shape)}")
    tokens = _checks.tensor("tokens", tokens)
    _checks.integer("tokens", tokens)
    _checks.same_shape("tokens", tokens, "logits.shape[:-1]", logits.shape[:-1])
    _checks.same_device("tokens", tokens, "logits", logits.device)
    check_tokens_in_vocab(tokens, logits.shape[-1])
    return logits, tokens, _checks.temperature(temperature)


def token_logprobs_reference(
    logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0, return_entropy: bool = False
):
    scaled = logits.float()
    if temperature != 1.0:
        scaled = scaled / temperature
    logp_all = torch.log_softmax(scaled, dim=-1)
    logp = logp_all.gather(-1, tokens.long().unsqueeze(-1)).squeeze(-1)
    if not return_entropy:
        return logp
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy


def token_logprobs(
    logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0, return_entropy: bool = False
):
    """fp32 log-probs of ``tokens`` under softmax(logits / temperature), shape ``logits.shape[:-1]``.

    Returns ``logp``, or ``(logp, entropy)`` with ``return_entropy=True``. Differentiable with
    respect to ``logits``.
    """
    logits, tokens, temperature = _check(logits, tokens, temperature)
    select(logits.device, cpu=False, triton=False)  # validates LONGCOT_KERNELS
    return token_logprobs_reference(logits, tokens, temperature, return_entropy)
