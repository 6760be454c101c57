"""Log-probs, entropy and values of responses, straight from hidden states.

A batch of (prompt, response) pairs is laid out right-padded, each row [prompt | response | pad],
so positions are the natural 0..n-1 that generation used. The hidden state at column
p_b + t - 1 predicts response token t of row b (p_b = its prompt length); gathering those
columns gives [B, T, H] aligned with the response tensors, and `linear_token_logprobs` turns
the valid ones into log-probs without materialising [tokens x vocab] logits.

The hot path keeps this one representation: micro-batches are row subsets of the batch, cut by a
token budget (`plan_micro_batches`) and trimmed to their own width (`micro_batch`), so memory and
time follow the tokens a micro-batch holds, not the batch's longest row.
"""

from __future__ import annotations

import types
from dataclasses import dataclass

import torch

from longcot.kernels import linear_token_logprobs

from .device import Precision, autocast
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

    def __len__(self) -> int:
        return self.tokens.shape[0]


def sequence_batch(
    prompts: list[list[int]], tokens: torch.Tensor, lengths: torch.Tensor, pad_id: int
) -> SequenceBatch:
    """[prompt | response | pad] rows on the device of ``tokens``; the prompts (host lists) are
    copied there once, the responses never leave it."""
    batch, steps = tokens.shape
    device = tokens.device
    lengths = lengths.to(device)
    prompt_lens = torch.tensor([len(p) for p in prompts], dtype=torch.long)
    longest = int(prompt_lens.max()) if batch else 1
    padded = torch.full((batch, longest), pad_id, dtype=torch.long)
    for b, p in enumerate(prompts):
        padded[b, : len(p)] = torch.tensor(p, dtype=torch.long)
    padded, prompt_lens = padded.to(device), prompt_lens.to(device)
    width = int((prompt_lens + lengths).max()) if batch else 1  # one host sync per batch
    col = torch.arange(width, device=device)[None, :]
    in_prompt = col < prompt_lens[:, None]
    in_response = ~in_prompt & (col < (prompt_lens + lengths)[:, None])
    from_prompt = padded.gather(1, col.clamp(max=longest - 1).expand(batch, -1))
    from_response = tokens.gather(1, (col - prompt_lens[:, None]).clamp(0, max(steps - 1, 0)))
    ids = torch.where(in_prompt, from_prompt, torch.where(in_response, from_response, pad_id))
    attn = (in_prompt | in_response).long()
    t = torch.arange(steps, device=device)[None, :]
    mask = t < lengths[:, None]
    positions = (prompt_lens[:, None] - 1 + t).clamp(max=width - 1)
    return SequenceBatch(ids, attn, positions, tokens, mask)


# --- micro-batches ---------------------------------------------------------------------------


def plan_micro_batches(
    widths: list[int], rows: list[int], max_tokens: int | None, max_rows: int
) -> list[list[int]]:
    """Cut ``rows`` (indices into ``widths``: prompt + response lengths) into micro-batches.

    With a token budget the rows are sorted by width, longest first, and cut into consecutive
    runs whose padded rectangle (rows x the run's widest row) stays within ``max_tokens``; a row
    wider than the budget gets a micro-batch of its own. Among such cuts the one with the least
    padded tokens plus ``max_tokens / 16`` per micro-batch is chosen (an exact dynamic programme
    over the sorted rows): one more forward is worth it only when it removes at least that much
    padding, which keeps padding small on ragged batches without cutting a batch of equal
    lengths into many small forwards. Without a budget (count mode), ``max_rows`` rows each in
    the given order.
    """
    if max_tokens is None:
        return [rows[i : i + max_rows] for i in range(0, len(rows), max_rows)]
    order = sorted(rows, key=lambda r: -widths[r])  # stable: ties keep their given order
    w = [widths[r] for r in order]
    n, overhead = len(order), max_tokens / 16
    best = [0.0] + [float("inf")] * n  # best[j]: the cheapest cut of order[:j]
    cut = [0] * (n + 1)  # where the last run of that cut starts
    for i in range(n):  # a run order[i:j] is padded to w[i], the widest of it
        fits = max(1, max_tokens // max(1, w[i]))
        for j in range(i + 1, min(n, i + fits) + 1):
            cost = best[i] + (j - i) * w[i] + overhead
            if cost < best[j]:
                best[j], cut[j] = cost, i
    out, j = [], n
    while j > 0:
        out.append(order[cut[j]:j])
        j = cut[j]
    return out[::-1]


def row_sizes(sb: SequenceBatch) -> tuple[list[int], list[int]]:
    """(prompt + response widths, response lengths) of every row, as host lists: the one host
    sync a batch's micro-batch planning needs."""
    return sb.attention_mask.sum(-1).tolist(), sb.mask.sum(-1).tolist()


def micro_batch(sb: SequenceBatch, rows: list[int], trim: bool = True,
                sizes: tuple[list[int], list[int]] | None = None) -> SequenceBatch:
    """The rows of ``sb``; with ``trim``, cut to their own widest row and longest response, so a
    micro-batch of short rows does not pay for the batch's longest one. ``sizes`` (from
    ``row_sizes``) saves the host syncs of finding those."""
    index = torch.as_tensor(rows, dtype=torch.long, device=sb.input_ids.device)
    if not trim:
        return SequenceBatch(sb.input_ids[index], sb.attention_mask[index], sb.positions[index], sb.tokens[index],
                             sb.mask[index])
    widths, lengths = sizes if sizes is not None else row_sizes(sb)
    width = max(1, max(widths[r] for r in rows))
    steps = max(1, max(lengths[r] for r in rows))
    return SequenceBatch(sb.input_ids[index, :width], sb.attention_mask[index, :width],
                         sb.positions[index, :steps].clamp(max=width - 1), sb.tokens[index, :steps],
                         sb.mask[index, :steps])


def padding_share(sbs: list[SequenceBatch]) -> float:
    """Share of the token positions forwarded that are padding."""
    total = sum(s.input_ids.numel() for s in sbs)
    valid = sum(int(s.attention_mask.sum()) for s in sbs)
    return 1.0 - valid / max(1, total)


# --- forwards --------------------------------------------------------------------------------


def _gather(hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """hidden[b, positions[b, t]] as [B, T, H]. index_select keeps only the sizes for its
    backward, where gather would keep the whole [B, W, H] hidden states alive until then."""
    batch, width, size = hidden.shape
    rows = torch.arange(batch, device=positions.device)[:, None] * width
    return hidden.reshape(batch * width, size).index_select(0, (rows + positions).reshape(-1)).view(
        batch, -1, size)


def response_hidden(model: torch.nn.Module, sb: SequenceBatch, precision: Precision | None = None):
    """(hidden [B, T, H] of the state before each response token, LM-head weight [V, H], sb on
    the model's device): what `linear_token_logprobs` and `linear_ppo_policy_loss` take.

    Rows are right-padded, so no attention mask is passed: under the causal mask a valid position
    never sees the padding after it, and without a mask the attention runs its causal kernel
    (flash/memory-efficient) instead of materialising [W, W] masks for every row.
    """
    sb = sb.to(lm_head_weight(model).device)
    with autocast(precision):
        hidden, weight = _call_through_hooks(model, _hidden_and_head, sb.input_ids)
    return _gather(hidden, sb.positions), weight, sb


def _hidden_and_head(model: torch.nn.Module, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return last_hidden_states(model, input_ids), lm_head_weight(model)


def _call_through_hooks(model: torch.nn.Module, fn, *args):
    """``fn(model, *args)``, run as ``model``'s forward when it is FSDP-sharded: its hooks gather
    the root's parameters (embeddings, LM head) before and reduce their gradients after, which
    they would not do for the backbone called on its own. The LM head comes back as a view, so
    the hook FSDP puts on the forward's outputs is not left on the parameter itself."""
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(model, FSDPModule):
        return fn(model, *args)

    def forward(self, *a):
        hidden, weight = fn(self, *a)
        return hidden, weight.view(weight.shape)

    model.forward = types.MethodType(forward, model)
    try:
        return model(*args)
    finally:
        del model.forward


def response_logprobs(
    model: torch.nn.Module,
    sb: SequenceBatch,
    temperature: float,
    with_entropy: bool = False,
    precision: Precision | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(logp [B, T], entropy [B, T] or None), fp32, 0 at padding; differentiable."""
    hidden, weight, sb = response_hidden(model, sb, precision)
    out = linear_token_logprobs(
        hidden[sb.mask], weight, sb.tokens[sb.mask], temperature, return_entropy=with_entropy
    )
    logp_valid, ent_valid = out if with_entropy else (out, None)
    zeros = torch.zeros(sb.tokens.shape, dtype=torch.float32, device=weight.device)
    logp = zeros.masked_scatter(sb.mask, logp_valid)
    entropy = None if ent_valid is None else zeros.masked_scatter(sb.mask, ent_valid)
    return logp, entropy


def response_values(critic: torch.nn.Module, sb: SequenceBatch, precision: Precision | None = None) -> torch.Tensor:
    """Critic values V(s_t) [B, T] of the state before each response token, 0 at padding (no
    attention mask, as in `response_hidden`)."""
    sb = sb.to(next(critic.parameters()).device)
    with autocast(precision):
        values = critic(sb.input_ids)
    return values.gather(1, sb.positions) * sb.mask
