"""Rollouts from the trainer's own policy module, with a decode loop built for RL.

Why not Hugging Face `generate`: to report the sampled tokens' log-probs it must keep every
step's logits (``output_logits``), [B, T, V] on the host -- 40 GB at Qwen's V = 151,936 for
64 x 1,024 tokens -- and it keeps finished rows in the batch until the last row ends. This loop
runs the same model forward (`model(input_ids, attention_mask, position_ids, past_key_values)`),
and around it:

- one prefill per distinct prompt, left-padded; its keys and values are copied into the rows
  of its ``n`` samples, so a prompt is not run ``n`` times;
- a preallocated KV cache (`_PreallocatedLayer`, grown by doubling): a decode step writes one
  column in place and attends over a view of the filled part. transformers' `DynamicCache`
  concatenates, copying the whole cache every step; its `StaticCache` attends over its full
  length every step (the masked tail included). Both were slower here (README: the rollout
  loop);
- for the Llama family (Llama, Mistral, Qwen2, Qwen3: `_native_layers`), the decode step runs the
  model's own modules (embedding, rotary table, norms, projections, MLP, head) in a loop of its
  own, without the model forward's per-call work (output capture, mask construction, the cache
  and attention dispatch): one step at 128 rows of the built-in model took 13% less time here,
  with the same logits (README: the rollout loop);
- rows that end (end-of-sequence) leave the decode batch: every ``check_every`` steps one host
  read of the finished flags decides whether to stop or to drop the finished rows from the
  cache, so the long tail of a batch is not decoded at the batch's width. That read is the
  loop's only host synchronisation;
- sampling on fp32 logits: softmax(logits / T), nucleus (top-p) filtering when ``top_p < 1``,
  one uniform number per row (an inverse-CDF draw),
  and the sampled token's log-prob, log softmax(logits / T) before top-p (the trainer's
  definition, `Rollout.logprobs`), computed at the step into a [B, T] tensor: no [B, T, V]
  tensor exists at any point; each step holds a few [B, V] ones;
- counter-based random numbers: the uniform that draws response k's token at step t is a hash of
  (seed, k, t) (`_uniforms`, splitmix64 on int64 tensors), so a response's tokens do not depend on
  which other rows share its batch, when they end, or how the prompts are split into batches or
  across processes (``first_response``); the same seed gives the same rollout, and the caller's
  global RNG (and a GPU's) is not touched;
- with ``with_entropy``, the entropy of softmax(logits / T) at each step ([B, T], from the same
  [B, V] numbers the draw uses): the trainer logs it for responses its update does not forward.

The rollout's tensors stay on the policy's device; with a ``Precision`` the forwards run under
its autocast (bf16 compute on fp32 master weights). Models whose cache is not plain
full-attention layers (sliding windows, linear attention) take the same loop on transformers'
`DynamicCache`, prefilling every row and letting the model build its masks.
"""

from __future__ import annotations

import inspect
import secrets
import sys

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

from longcot.kernels import repetition_state, repetition_update

from ..device import Precision, autocast
from .base import Rollout, check_generate_args


class HFGenerator:
    """Samples from ``model`` itself (any Hugging Face causal LM), so a weight update needs no copy.

    ``batch_size`` bounds the rows decoded together (prompts x samples); larger requests run in
    consecutive batches sharing one random stream. ``check_every`` is the number of decode steps
    between reads of the finished flags (default: every step on the CPU, where the read costs
    nothing; every 8 steps on an accelerator, where each read stalls the queue of kernels).
    ``with_entropy`` fills `Rollout.entropy` (two more passes over each step's [B, V] logits).
    """

    def __init__(self, model: torch.nn.Module, eos_token_id: int, pad_token_id: int, batch_size: int = 256,
                 precision: Precision | None = None, check_every: int | None = None, with_entropy: bool = False):
        if batch_size < 1:
            raise ValueError(f"batch_size: expected >= 1, got {batch_size}")
        if check_every is not None and check_every < 1:
            raise ValueError(f"check_every: expected >= 1, got {check_every}")
        self.model = model
        self.eos_token_id = eos_token_id
        self.pad_token_id = pad_token_id
        self.batch_size = batch_size
        self.precision = precision
        self.check_every = check_every
        self.with_entropy = with_entropy

    def update_weights(self, model: torch.nn.Module) -> None:
        self.model = model

    @torch.no_grad()
    def generate(
        self,
        prompts: list[list[int]],
        n: int,
        temperature: float,
        top_p: float,
        max_new_tokens: int,
        seed: int | None = None,
        ignore_eos: bool = False,
        first_response: int = 0,
        stop_on_repetition: tuple[int, int] | None = None,
    ) -> Rollout:
        """Sample ``n`` responses per prompt; ``temperature=0`` decodes greedily (log-probs then of
        the raw logits). ``ignore_eos`` decodes ``max_new_tokens`` for every row (benchmarks);
        the rows are then all marked truncated. ``first_response``: the index of this call's first
        response in a larger rollout split across calls (a data-parallel rank's offset): with the
        same seed, the split calls sample what one call over all prompts samples.
        ``stop_on_repetition=(n, k)`` ends a response at the token that completes the k-th
        occurrence of an n-gram in it (`longcot.kernels.repetition_update`, on the device, each
        step); such a response is truncated (no end-of-sequence) and flagged in
        `Rollout.repetition_stop`."""
        check_generate_args(prompts, n, max_new_tokens)
        if not temperature >= 0:
            raise ValueError(f"temperature: expected >= 0, got {temperature}")
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p: expected a number in (0, 1], got {top_p}")
        device = next(self.model.parameters()).device
        expanded = [p for p in prompts for _ in range(n)]
        index = torch.arange(len(prompts), device=device).repeat_interleave(n)
        if first_response < 0:
            raise ValueError(f"first_response: expected >= 0, got {first_response}")
        if stop_on_repetition is not None and (stop_on_repetition[0] < 1 or stop_on_repetition[1] < 2):
            raise ValueError(f"stop_on_repetition: expected (n >= 1, min_repeats >= 2), got {stop_on_repetition}")
        # Fresh entropy when unseeded, not drawn from (so not moving) the global RNG.
        key = _mix64(torch.tensor(secrets.randbits(63) if seed is None else seed % 2**63, dtype=torch.int64,
                                  device=device))
        was_training = self.model.training
        self.model.eval()
        chunks = []
        try:
            for start in range(0, len(expanded), self.batch_size):
                rows = range(start, min(start + self.batch_size, len(expanded)))
                # Consecutive rows of one prompt share its prefill.
                groups: list[list[int]] = []
                counts: list[int] = []
                for r in rows:
                    if r != start and r // n == (r - 1) // n:
                        counts[-1] += 1
                    else:
                        groups.append(list(expanded[r]))
                        counts.append(1)
                # Inference mode drops autograd's per-op bookkeeping (version counters, views) that
                # no_grad keeps; the torch.cat below turns the results into ordinary tensors.
                with torch.inference_mode():
                    row_keys = _mix64(key + _GOLDEN * torch.arange(first_response + start, first_response + rows.stop,
                                                                    device=device))
                    chunks.append(self._decode(groups, counts, temperature, top_p, max_new_tokens, row_keys,
                                               ignore_eos, stop_on_repetition))
        finally:
            self.model.train(was_training)
        steps = max(c[0].shape[1] for c in chunks)
        tokens = torch.cat([_pad_right(c[0], steps, self.pad_token_id) for c in chunks])
        logprobs = torch.cat([_pad_right(c[1], steps, 0.0) for c in chunks])
        lengths = torch.cat([c[2] for c in chunks])
        truncated = torch.cat([c[3] for c in chunks])
        entropy = torch.cat([_pad_right(c[4], steps, 0.0) for c in chunks]) if self.with_entropy else None
        looped = torch.cat([c[5] > 0 for c in chunks]) if stop_on_repetition is not None else None
        return Rollout(expanded, index, tokens, lengths, truncated, logprobs, entropy, looped)

    # --- one batch ---------------------------------------------------------------------------

    def _decode(self, prompts: list[list[int]], counts: list[int], temperature: float, top_p: float,
                max_new_tokens: int, row_keys: torch.Tensor, ignore_eos: bool,
                stop_on_repetition: tuple[int, int] | None):
        """(tokens [B, T], log-probs [B, T], lengths [B], truncated [B], entropy [B, T] or None, the
        length of each row ended for repeating (0 where not) [B] or None) for ``counts[i]`` samples of
        ``prompts[i]``, B = sum(counts), T = the longest response."""
        model = self.model
        device = next(model.parameters()).device
        batch, width = sum(counts), max(len(p) for p in prompts)
        fast = _preallocatable(model)
        native = fast and _native_layers(model)
        if not fast:  # transformers' own cache layers: prefill every row
            prompts = [p for p, c in zip(prompts, counts) for _ in range(c)]
            counts = [1] * batch
        repeats = torch.tensor(counts, device=device) if max(counts) > 1 else None
        cache = _PreallocatedCache(model, width + max_new_tokens, batch, repeats) if fast else DynamicCache(config=model.config)
        # Decoder-only generation continues each row from its last column: pad on the left.
        ids = torch.full((len(prompts), width), self.pad_token_id, dtype=torch.long)
        for row, p in enumerate(prompts):
            ids[row, width - len(p):] = torch.tensor(p, dtype=torch.long)
        prompt_lens = [len(p) for p in prompts]
        lens = torch.tensor(prompt_lens, device=device)
        col = torch.arange(width + max_new_tokens, device=device)
        # attend[b, j]: column j of row b holds a token (prompt or generated), not left padding.
        attend = col[None, :] >= (width - lens)[:, None]
        padded = min(prompt_lens) < width
        # Positions as `generate` makes them: 0, 1, ... from each row's first token.
        positions = (col[None, :width] - (width - lens)[:, None]).clamp_min(0)
        kwargs = {"logits_to_keep": 1} if _accepts_logits_to_keep(model) else {}
        with autocast(self.precision):
            out = model(input_ids=ids.to(device), attention_mask=attend[:, :width].long() if padded else None,
                        position_ids=positions, past_key_values=cache, use_cache=True, **kwargs)
        logits = out.logits[:, -1].float()
        del out
        if repeats is not None:
            logits, lens, attend = (x.repeat_interleave(repeats, 0) for x in (logits, lens, attend))
            prompt_lens = [length for length, c in zip(prompt_lens, counts) for _ in range(c)]

        check_every = self.check_every or (1 if device.type == "cpu" else 8)
        tokens = torch.full((batch, max_new_tokens), self.pad_token_id, dtype=torch.long, device=device)
        logps = torch.zeros((batch, max_new_tokens), dtype=torch.float32, device=device)
        ents = torch.zeros_like(logps) if self.with_entropy else None
        done = torch.zeros(batch, dtype=torch.bool, device=device)
        rep, looped = None, None
        if stop_on_repetition is not None:
            n, min_repeats = stop_on_repetition
            rep = repetition_state(batch, max_new_tokens, n, device)
            looped = torch.zeros(batch, dtype=torch.long, device=device)
        rows: torch.Tensor | None = None  # the original row of each decoded row, once rows were dropped
        pos = lens.clone()
        seen = width  # columns in the cache
        steps = max_new_tokens
        for t in range(max_new_tokens):
            u = _uniforms(row_keys, t) if temperature > 0 else None
            tok, logp, ent = _sample(logits, temperature, top_p, u, ents is not None)
            tok = tok.masked_fill_(done, self.pad_token_id)
            logp = logp.masked_fill_(done, 0.0)
            if rows is None:
                tokens[:, t], logps[:, t] = tok, logp
            else:
                tokens[rows, t], logps[rows, t] = tok, logp
            if ents is not None:
                ents[slice(None) if rows is None else rows, t] = ent.masked_fill_(done, 0.0)
            if rep is not None:
                occurrences = repetition_update(rep, tok, active=~done)[0]
                stop = (occurrences >= min_repeats) & ~done & (tok != self.eos_token_id)
                at = slice(None) if rows is None else rows
                looped[at] = torch.where(stop, t + 1, looped[at])
                done |= stop
            if t + 1 == max_new_tokens:
                break
            if not ignore_eos:
                done |= tok == self.eos_token_id
            if not ignore_eos or rep is not None:
                if (t + 1) % check_every == 0:
                    flags = done.tolist()  # the loop's one host read
                    left = [i for i, f in enumerate(flags) if not f]
                    if not left:
                        steps = t + 1
                        break
                    # A compaction copies the filled cache twice, about what two steps' attention
                    # reads; dropping fewer than an eighth of the rows would take long to repay it.
                    if len(flags) - len(left) >= max(1, len(flags) // 8):
                        keep = torch.tensor(left, device=device)
                        cache.batch_select_indices(keep)
                        rows = keep if rows is None else rows[keep]
                        tok, done, pos, attend = tok[keep], done[keep], pos[keep], attend[keep]
                        row_keys = row_keys[keep]
                        if rep is not None:
                            rep = rep.select(keep)
                        prompt_lens = [prompt_lens[i] for i in left]
                        padded = min(prompt_lens) < width
            with autocast(self.precision):
                if fast:
                    # One query per row: the mask only has to hide left padding, and sdpa reads it
                    # as given (a view, no per-step mask construction or host check).
                    mask = attend[:, None, None, : seen + 1] if padded else None
                else:
                    mask = attend[:, : seen + 1].long() if padded else None
                if native:
                    logits = _native_decode_step(model, tok, pos, cache, mask).float()
                else:
                    out = model(input_ids=tok[:, None], attention_mask=mask, position_ids=pos[:, None],
                                past_key_values=cache, use_cache=True)
                    logits = out.logits[:, -1].float()
                    del out
            pos += 1
            seen += 1
        tokens, logps = tokens[:, :steps], logps[:, :steps]
        is_eos = tokens == self.eos_token_id
        if ignore_eos:
            is_eos = torch.zeros_like(is_eos)
        has_eos = is_eos.any(dim=1)
        first_eos = is_eos.int().argmax(dim=1)
        lengths = torch.where(has_eos, first_eos + 1, torch.full_like(first_eos, steps))
        truncated = ~has_eos
        if looped is not None:  # a looping row ends at the token that completed its repeat, truncated
            lengths = torch.where(looped > 0, looped, lengths)  # (the pad after it may be the eos id)
            truncated |= looped > 0
        longest = int(lengths.max())
        if ents is not None:  # steps after a row's end-of-sequence hold pad tokens, not actions
            ents = ents[:, :longest] * (torch.arange(longest, device=device)[None, :] < lengths[:, None])
        return tokens[:, :longest], logps[:, :longest], lengths, truncated, ents, looped


# --- sampling ----------------------------------------------------------------------------------


_GOLDEN = -7046029254386353131  # 0x9E3779B97F4A7C15 as a signed int64: splitmix64's increment


def _mix64(x: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser on int64 tensors (multiplication wraps; the right shifts are masked
    to be logical): distinct inputs give well-spread, independent-looking outputs."""
    x = x ^ ((x >> 30) & ((1 << 34) - 1))
    x = x * -4658895280553007687  # 0xBF58476D1CE4E5B9
    x = x ^ ((x >> 27) & ((1 << 37) - 1))
    x = x * -7723592293110705685  # 0x94D049BB133111EB
    return x ^ ((x >> 31) & ((1 << 33) - 1))


def _uniforms(row_keys: torch.Tensor, step: int) -> torch.Tensor:
    """[B] float64 uniforms in [0, 1), one per row, a function of (row key, step) only."""
    offset = (_GOLDEN * (step + 1) + 2**63) % 2**64 - 2**63  # wrapped to int64, as tensors wrap
    bits = _mix64(row_keys + offset)
    return ((bits >> 11) & ((1 << 53) - 1)).to(torch.float64) * 2.0**-53


def _sample(logits: torch.Tensor, temperature: float, top_p: float, u: torch.Tensor | None,
            with_entropy: bool = False):
    """(token [B], its log-prob [B], entropy [B] or None) from fp32 logits [B, V]: greedy at
    temperature 0 (log-prob of the raw logits), else a draw from softmax(logits / T) by the row's
    uniform ``u`` [B] (float64 in [0, 1)), restricted to the top-p nucleus when ``top_p < 1``; the
    log-prob and the entropy are of softmax(logits / T) before top-p either way (of the raw logits
    when greedy)."""
    scaled = logits / temperature if temperature > 0 else logits
    top = scaled.amax(-1, keepdim=True)
    weights = (scaled - top).exp_()  # softmax(logits / T) times its normaliser
    total = weights.sum(-1)
    lse = top.squeeze(1) + total.log()
    ent = None
    if with_entropy:  # H = log Z - E_p[scaled]; a token of logit -inf adds 0 (not 0 * -inf)
        ent = lse - top.squeeze(1) - (weights * (scaled - top)).nan_to_num_(0.0).sum(-1) / total
    if temperature == 0:
        tok = logits.argmax(-1)
        return tok, logits.gather(1, tok[:, None]).squeeze(1) - lse, ent
    if top_p < 1:
        weights = top_p_filter(weights, top_p)
    # Inverse-CDF draw: one uniform per row. The exponential race (argmax p / Exp(1), what
    # torch.multinomial does for one sample) needs V random numbers per row; at V = 151,936 on
    # the CPU that was 2.6-7.7x slower here (B = 64 and 8). The CDF is summed in float64 so that
    # its rounding stays far below any probability that matters; a token of weight 0 spans an
    # empty interval and is never drawn.
    cdf = weights.cumsum(-1, dtype=torch.float64)
    tok = torch.searchsorted(cdf, u[:, None] * cdf[:, -1:], right=True).squeeze(1).clamp_(max=cdf.shape[1] - 1)
    return tok, scaled.gather(1, tok[:, None]).squeeze(1) - lse, ent


def top_p_filter(weights: torch.Tensor, top_p: float) -> torch.Tensor:
    """``weights`` [B, V] (probabilities, normalised or not) with the tokens outside the nucleus
    zeroed. The nucleus is transformers' `TopPLogitsWarper`'s: drop the least likely tokens
    whose total probability is at most 1 - top_p, always keeping the most likely one."""
    sorted_w, order = weights.sort(-1)  # ascending, as transformers does
    cum = sorted_w.cumsum(-1)
    drop = cum <= (1 - top_p) * cum[:, -1:]
    drop[:, -1] = False
    return weights.scatter(-1, order, sorted_w.masked_fill_(drop, 0.0))


# --- the decode step of the Llama family -----------------------------------------------------

# Attention classes whose forward is, for one query per row: q/k/v projections (q_norm/k_norm per
# head where present), the module's rotary embedding, the cache update, softmax attention with the
# module's scaling, o_proj; inside a pre-norm decoder layer with a residual around attention and
# around the MLP. Others (sliding windows, soft-capping, gated attention) take the model forward.
_NATIVE_ATTENTION = {"LlamaAttention", "MistralAttention", "Qwen2Attention", "Qwen3Attention"}


def _native_layers(model: torch.nn.Module) -> bool:
    """Whether `_native_decode_step` computes exactly what ``model``'s forward does (checked per
    rollout: the model's attention setting may change between them)."""
    body = getattr(model, "model", None)
    layers = getattr(body, "layers", None)
    ok = (body is not None and layers is not None and len(layers) > 0
          and all(hasattr(body, a) for a in ("embed_tokens", "rotary_emb", "norm"))
          and hasattr(model, "lm_head") and getattr(model.config, "_attn_implementation", None) == "sdpa"
          and not getattr(model.config, "final_logit_softcapping", None))
    for layer in layers if ok else ():
        attn = getattr(layer, "self_attn", None)
        ok = ok and (type(attn).__name__ in _NATIVE_ATTENTION and getattr(attn, "sliding_window", None) is None
                     and all(hasattr(layer, a) for a in ("input_layernorm", "post_attention_layernorm", "mlp"))
                     and type(layer).__module__ == type(attn).__module__)
    return bool(ok)


def _native_decode_step(model: torch.nn.Module, tok: torch.Tensor, pos: torch.Tensor, cache: DynamicCache,
                        mask: torch.Tensor | None) -> torch.Tensor:
    """The last-position logits [B, V] of one token per row (``tok``, ``pos`` [B]) over ``cache``,
    as ``model(input_ids=tok[:, None], ...)`` computes them, through the model's own modules."""
    body = model.model
    x = body.embed_tokens(tok[:, None])
    cos, sin = body.rotary_emb(x, pos[:, None])
    rows = x.shape[0]
    for layer, kv in zip(body.layers, cache.layers):
        attn = layer.self_attn
        h = layer.input_layernorm(x)
        shape = (rows, 1, -1, attn.head_dim)
        q, k = attn.q_proj(h).view(shape), attn.k_proj(h).view(shape)
        if hasattr(attn, "q_norm"):
            q, k = attn.q_norm(q), attn.k_norm(k)
        q, k = _rope(layer, q.transpose(1, 2), k.transpose(1, 2), cos, sin)
        keys, values = kv.update(k, attn.v_proj(h).view(shape).transpose(1, 2))
        o = torch.nn.functional.scaled_dot_product_attention(
            q, keys, values, attn_mask=mask, scale=attn.scaling, enable_gqa=keys.shape[1] != q.shape[1])
        x = x + attn.o_proj(o.transpose(1, 2).reshape(rows, 1, -1))
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    return model.lm_head(body.norm(x))[:, -1]


def _rope(layer: torch.nn.Module, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """The layer's own module's `apply_rotary_pos_emb` (the families agree, but their code is theirs)."""
    return sys.modules[type(layer).__module__].apply_rotary_pos_emb(q, k, cos, sin)


# --- the KV cache ------------------------------------------------------------------------------


class _PreallocatedLayer(DynamicLayer):
    """A full-attention cache layer in preallocated buffers: `update` writes the new columns in
    place and returns a view of the filled part, where `DynamicLayer` concatenates (copies the
    whole cache) every step. The buffers grow by doubling up to ``capacity`` (prompt width + max
    new tokens), so memory follows the rollout's actual length rather than its limit at an
    amortised copy of the cache once. The first `update`, the prefill of the distinct prompts,
    writes each prompt's keys and values into the rows of all its samples (``repeats``)."""

    def __init__(self, capacity: int, rows: int, repeats: torch.Tensor | None):
        super().__init__()
        self.capacity, self.rows, self.repeats = capacity, rows, repeats
        self.length = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        columns = min(self.capacity, 2 * key_states.shape[-2] + 128)
        self._keys = key_states.new_empty((self.rows, key_states.shape[1], columns, key_states.shape[-1]))
        self._values = value_states.new_empty((self.rows, value_states.shape[1], columns, value_states.shape[-1]))
        self.is_initialized = True

    def _reserve(self, end: int) -> None:
        if end <= self._keys.shape[2]:
            return
        columns = min(self.capacity, max(end, 2 * self._keys.shape[2]))
        grown = []
        for buf in (self._keys, self._values):
            new = buf.new_empty((buf.shape[0], buf.shape[1], columns, buf.shape[3]))
            new[:, :, : self.length] = buf[:, :, : self.length]
            grown.append(new)
        self._keys, self._values = grown

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        start, end = self.length, self.length + key_states.shape[-2]
        self._reserve(end)
        prefill = self.repeats is not None
        if prefill:
            self._keys[:, :, start:end] = key_states.repeat_interleave(self.repeats, 0)
            self._values[:, :, start:end] = value_states.repeat_interleave(self.repeats, 0)
            self.repeats = None
        else:
            self._keys[:, :, start:end] = key_states
            self._values[:, :, start:end] = value_states
        self.length = end
        self.keys, self.values = self._keys[:, :, :end], self._values[:, :, :end]
        # The prefill's queries are the distinct prompts, and the cache was empty before it:
        # they attend over their own keys.
        return (key_states, value_states) if prefill else (self.keys, self.values)

    def get_seq_length(self) -> int:
        return self.length

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        # In place, filled columns only: the kept rows move to the front of the same buffers, so a
        # compaction costs two copies of the filled part and allocates nothing (the next growth
        # allocates for the kept rows only).
        rows, end = indices.shape[0], self.length
        for buf in (self._keys, self._values):
            buf[:rows, :, :end] = buf[:, :, :end].index_select(0, indices)
        self._keys, self._values = self._keys[:rows], self._values[:rows]
        self.rows = rows
        self.keys, self.values = self._keys[:, :, :end], self._values[:, :, :end]


def _preallocatable(model: torch.nn.Module) -> bool:
    """Whether every layer of the model's cache is a plain full-attention `DynamicLayer`."""
    layers = DynamicCache(config=model.config).layers
    return bool(layers) and all(type(layer) is DynamicLayer for layer in layers)


class _PreallocatedCache(DynamicCache):
    """A `DynamicCache` of `_PreallocatedLayer`s (a subclass, for models that check the type)."""

    def __init__(self, model: torch.nn.Module, capacity: int, rows: int, repeats: torch.Tensor | None):
        super().__init__(config=model.config)
        self.layers = [_PreallocatedLayer(capacity, rows, repeats) for _ in self.layers]


_LOGITS_TO_KEEP: dict[type, bool] = {}


def _accepts_logits_to_keep(model: torch.nn.Module) -> bool:
    """Whether the forward can compute the last column's logits only (the prefill's)."""
    kind = type(model)
    if kind not in _LOGITS_TO_KEEP:
        _LOGITS_TO_KEEP[kind] = "logits_to_keep" in inspect.signature(model.forward).parameters
    return _LOGITS_TO_KEEP[kind]


def _pad_right(t: torch.Tensor, width: int, value: float | int) -> torch.Tensor:
    if t.shape[1] == width:
        return t
    return torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value)
