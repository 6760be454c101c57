"""The contract between the trainer and a rollout backend.

A backend samples ``n`` responses per prompt and returns them as right-padded [B, T] tensors,
B = len(prompts) * n, grouped by prompt (responses of prompt i are rows i*n .. i*n+n-1). The
end-of-sequence token, when sampled, is part of the response: it is an action the policy takes
and is trained on. After every update the trainer hands the backend its policy module; a
backend that runs a copy of the weights (vLLM) loads them in place, one that runs the module
itself has nothing to do.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass
class Rollout:
    prompts: list[list[int]]  # the prompt token ids, one entry per response
    prompt_index: torch.Tensor  # LongTensor [B]: the prompt each response answers
    tokens: torch.Tensor  # LongTensor [B, T]: response ids, right-padded with the pad id
    lengths: torch.Tensor  # LongTensor [B]: response lengths, end-of-sequence included
    truncated: torch.Tensor  # BoolTensor [B]: stopped by max_new_tokens, no end-of-sequence
    logprobs: torch.Tensor  # FloatTensor [B, T]: log softmax(logits / temperature) of the sampled
    #                         tokens under the sampling policy (before top-p), 0 at padding
    entropy: torch.Tensor | None = None  # FloatTensor [B, T]: entropy of softmax(logits / T) at
    #                                      each step, 0 at padding; only from backends asked for it
    repetition_stop: torch.Tensor | None = None  # BoolTensor [B]: ended early for repeating an
    #                                              n-gram (truncated too); None: no such stopping

    def stop_reasons(self) -> list[str]:
        """Per response: "eos", "length" (max_new_tokens) or "repetition" (stopped early)."""
        looped = self.repetition_stop.tolist() if self.repetition_stop is not None else [False] * len(self)
        return ["repetition" if stop else "length" if cut else "eos"
                for cut, stop in zip(self.truncated.tolist(), looped)]

    @property
    def mask(self) -> torch.Tensor:
        """BoolTensor [B, T]: True at the response's valid positions."""
        steps = self.tokens.shape[1]
        return torch.arange(steps, device=self.lengths.device)[None, :] < self.lengths[:, None]

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def to(self, device: torch.device) -> Rollout:
        """The same rollout with its tensors on ``device`` (itself when they are there)."""
        if self.tokens.device == torch.device(device):
            return self
        return Rollout(self.prompts, *(t.to(device) for t in (self.prompt_index, self.tokens, self.lengths,
                                                               self.truncated, self.logprobs)),
                       *(None if t is None else t.to(device) for t in (self.entropy, self.repetition_stop)))


class Generator(Protocol):
    def generate(
        self,
        prompts: list[list[int]],
        n: int,
        temperature: float,
        top_p: float,
        max_new_tokens: int,
        seed: int | None = None,
    ) -> Rollout:
        """Sample ``n`` responses per prompt; ``temperature=0`` decodes greedily."""
        ...

    def update_weights(self, model: torch.nn.Module) -> None:
        """Make the next ``generate`` use ``model``'s current parameters."""
        ...


def check_generate_args(prompts: list[list[int]], n: int, max_new_tokens: int) -> None:
    """The argument checks every backend's ``generate`` makes first."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("prompts: expected a non-empty list of non-empty token id lists")
    if n < 1 or max_new_tokens < 1:
        raise ValueError(f"n and max_new_tokens: expected >= 1, got {n} and {max_new_tokens}")


def response_texts(tokenizer, rollout: Rollout) -> list[str]:
    """Decoded responses without their end-of-sequence token."""
    texts = []
    for row, length, cut in zip(rollout.tokens.tolist(), rollout.lengths.tolist(), rollout.truncated.tolist()):
        texts.append(tokenizer.decode(row[: length if cut else length - 1], skip_special_tokens=True))
    return texts
