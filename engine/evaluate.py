"""Held-out accuracy of a policy: greedy decoding, scored by the same verifier as training."""

from __future__ import annotations

from .rewards import verify_batch
from .rollout import Generator, response_texts


def greedy_accuracy(
    generator: Generator,
    tokenizer,
    prompts: list[list[int]],
    answers: list[str],
    max_new_tokens: int,
    timeout_s: float = 5.0,
) -> dict[str, float]:
    rollout = generator.generate(prompts, n=1, temperature=0.0, top_p=1.0, max_new_tokens=max_new_tokens, seed=0)
    texts = response_texts(tokenizer, rollout)
    correct, timeouts = verify_batch(texts, answers, timeout_s)
    n = max(1, len(correct))
    return {
        "accuracy": sum(correct) / n,
        "response_length": rollout.lengths.float().mean().item(),
        "truncation_rate": rollout.truncated.float().mean().item(),
        "verifier_timeouts": timeouts,
        "n": len(correct),
    }
