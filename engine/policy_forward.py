"""Log-probs, entropy and values of responses, straight from hidden states.

A batch of (prompt, response) pairs is laid out right-padded, each row [prompt | response | pad],
so positions are the natural 0..n-1 that generation used. The hidden state at column
p_b + t - 1 predicts response token t of row b (p_b = its prompt length); gathering those
columns gives [B, T, H] aligned with the response tensors, and `linear_token_logprobs` turns
the valid ones into log-probs without materialising [tokens x vocab] logits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from longcot.kernels import linear_token_logprobs

from .models import last_hidden_states, lm_head_weight


@dataclass
class SequenceBatch:
    input_ids: torch.Tensor  # [B, W]
    attention_mask: torch.Tensor  # [B, W]
    positions: torch.Tensor  # [B, T]: the column whose hidden state predicts response token t
    tokens: torch.Tensor  # [B, T] response ids
    mask: torch.Tensor  # bool [B, T]

    def to(self, device: torch.device) -> SequenceBatch:
        if self.input_ids.device == device:
            return self
        return SequenceBatch(*(t.to(device) for t in (self.input_ids, self.attention_mask, self.positions, self.tokens, self.mask)))


def sequence_batch(prompts: list[list[int]], tokens: torch.Tensor, lengths: torch.Tensor, pad_id: int) -> SequenceBatch:
    batch, steps = tokens.shape
    prompt_lens = torch.tensor([len(p) for p in prompts], dtype=torch.long)
    width = int((prompt_lens + lengths).max()) if batch else 1
    ids = torch.full((batch, width), pad_id, dtype=torch.long)
    attn = torch.zeros((batch, width), dtype=torch.long)
    for b, p in enumerate(prompts):
        n = len(p) + int(lengths[b])
        ids[b, : len(p)] = torch.tensor(p, dtype=torch.long)
        ids[b, len(p) : n] = tokens[b, : int(lengths[b])]
        attn[b, :n] = 1
    mask = torch.arange(steps)[None, :] < lengths[:, None]
    positions = (prompt_lens[:, None] - 1 + torch.arange(steps)[None, :]).clamp(max=width - 1)
    return SequenceBatch(ids, attn, positions, tokens, mask)


def _gather(hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    return hidden.gather(1, positions.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))


def response_hidden(model: torch.nn.Module, sb: SequenceBatch):
    """(hidden [B, T, H] of the state before each response token, LM-head weight [V, H], sb on
    the model's device): what `linear_token_logprobs` and `linear_ppo_policy_loss` take."""
    weight = lm_head_weight(model)
    sb = sb.to(weight.device)
    return _gather(last_hidden_states(model, sb.input_ids, sb.attention_mask), sb.positions), weight, sb


def response_logprobs(
    model: torch.nn.Module, sb: SequenceBatch, temperature: float, with_entropy: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(logp [B, T], entropy [B, T] or None), fp32, 0 at padding; differentiable."""
    hidden, weight, sb = response_hidden(model, sb)
    out = linear_token_logprobs(
        hidden[sb.mask], weight, sb.tokens[sb.mask], temperature, return_entropy=with_entropy
    )
    logp_valid, ent_valid = out if with_entropy else (out, None)
    zeros = torch.zeros(sb.tokens.shape, dtype=torch.float32, device=weight.device)
    logp = zeros.masked_scatter(sb.mask, logp_valid)
    entropy = None if ent_valid is None else zeros.masked_scatter(sb.mask, ent_valid)
    return logp, entropy


def response_values(critic: torch.nn.Module, sb: SequenceBatch) -> torch.Tensor:
    """Critic values V(s_t) [B, T] of the state before each response token, 0 at padding."""
    sb = sb.to(next(critic.parameters()).device)
    values = critic(sb.input_ids, sb.attention_mask)
    return values.gather(1, sb.positions) * sb.mask


def select_rows(sb: SequenceBatch, rows: torch.Tensor) -> SequenceBatch:
    return SequenceBatch(sb.input_ids[rows], sb.attention_mask[rows], sb.positions[rows], sb.tokens[rows], sb.mask[rows])
