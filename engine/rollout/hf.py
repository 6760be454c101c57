"""Rollouts with Hugging Face `generate` (KV cache), running the trainer's own policy module.

The rollout's tensors stay on the policy's device; with a ``Precision`` the decoding runs under
its autocast (bf16 compute on fp32 master weights).
"""

from __future__ import annotations

import torch

from longcot.kernels import token_logprobs

from ..device import Precision, autocast
from .base import Rollout, check_generate_args

# generate() fills every setting a call leaves unset from the model folder's
# generation_config.json, and instruct models ship sampling settings there (Qwen2.5-Instruct:
# repetition_penalty 1.05, top_k 20). Any of them would make the rollout's distribution differ
# from softmax(logits / T), the one the trainer's log-probs describe; so each call sets them all,
# to values that leave the logits as they are.
NEUTRAL_SAMPLING = {
    "top_k": None, "min_p": None, "top_h": None, "typical_p": 1.0, "epsilon_cutoff": 0.0,
    "eta_cutoff": 0.0, "repetition_penalty": 1.0, "encoder_repetition_penalty": 1.0,
    "no_repeat_ngram_size": 0, "encoder_no_repeat_ngram_size": 0, "bad_words_ids": None,
    "sequence_bias": None, "min_length": 0, "min_new_tokens": None, "forced_bos_token_id": None,
    "forced_eos_token_id": None, "exponential_decay_length_penalty": None, "suppress_tokens": None,
    "begin_suppress_tokens": None, "guidance_scale": None, "renormalize_logits": False,
    "watermarking_config": None, "num_beams": 1,
}


class HFGenerator:
    """Samples from ``model`` itself, so a weight update needs no copy."""

    def __init__(self, model: torch.nn.Module, eos_token_id: int, pad_token_id: int, batch_size: int = 256,
                 precision: Precision | None = None):
        self.model = model
        self.eos_token_id = eos_token_id
        self.pad_token_id = pad_token_id
        self.batch_size = batch_size
        self.precision = precision

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
    ) -> Rollout:
        check_generate_args(prompts, n, max_new_tokens)
        expanded = [p for p in prompts for _ in range(n)]
        device = next(self.model.parameters()).device
        index = torch.arange(len(prompts), device=device).repeat_interleave(n)
        chunks = []
        # A seeded, private RNG stream: the same seed gives the same rollout, and sampling does
        # not move the caller's global RNG (nor, on a GPU, its device's).
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            if seed is not None:
                torch.manual_seed(seed)
            for start in range(0, len(expanded), self.batch_size):
                chunks.append(
                    self._generate(expanded[start : start + self.batch_size], temperature, top_p, max_new_tokens)
                )
        steps = max(c[0].shape[1] for c in chunks)
        tokens = torch.cat([_pad_right(c[0], steps, self.pad_token_id) for c in chunks])
        logprobs = torch.cat([_pad_right(c[1], steps, 0.0) for c in chunks])
        lengths = torch.cat([c[2] for c in chunks])
        truncated = torch.cat([c[3] for c in chunks])
        return Rollout(expanded, index, tokens, lengths, truncated, logprobs)

    def _generate(self, prompts: list[list[int]], temperature: float, top_p: float, max_new_tokens: int):
        device = next(self.model.parameters()).device
        width = max(len(p) for p in prompts)
        # Decoder-only generation continues each row from its last column: pad on the left.
        ids = torch.full((len(prompts), width), self.pad_token_id, dtype=torch.long)
        attn = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, p in enumerate(prompts):
            ids[row, width - len(p) :] = torch.tensor(p)
            attn[row, width - len(p) :] = 1
        greedy = temperature == 0
        was_training = self.model.training
        self.model.eval()
        try:
            with autocast(self.precision):
                out = self.model.generate(
                    input_ids=ids.to(device),
                    attention_mask=attn.to(device),
                    do_sample=not greedy,
                    **NEUTRAL_SAMPLING,
                    temperature=None if greedy else temperature,
                    top_p=None if greedy else top_p,
                    max_new_tokens=max_new_tokens,
                    eos_token_id=self.eos_token_id,
                    pad_token_id=self.pad_token_id,
                    output_logits=True,
                    return_dict_in_generate=True,
                )
        finally:
            self.model.train(was_training)
        tokens = out.sequences[:, width:]
        logits = torch.stack(out.logits, dim=1)  # raw logits, before temperature and top-p
        is_eos = tokens == self.eos_token_id
        has_eos = is_eos.any(dim=1)
        first_eos = torch.where(has_eos, is_eos.int().argmax(dim=1), torch.full_like(has_eos, tokens.shape[1], dtype=torch.long))
        lengths = torch.where(has_eos, first_eos + 1, torch.full_like(first_eos, tokens.shape[1]))
        mask = torch.arange(tokens.shape[1], device=device)[None, :] < lengths[:, None]
        tokens = tokens.masked_fill(~mask, self.pad_token_id)
        logp = token_logprobs(logits, tokens, temperature=1.0 if greedy else temperature)
        logp = logp.masked_fill(~mask, 0.0)
        truncated = ~has_eos
        return tokens, logp, lengths, truncated


def _pad_right(t: torch.Tensor, width: int, value: float | int) -> torch.Tensor:
    if t.shape[1] == width:
        return t
    return torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value)
