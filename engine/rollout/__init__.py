"""Rollout backends behind one `Generator` protocol: Hugging Face `generate` (here) and vLLM."""

from .base import Generator, Rollout, response_texts
from .hf import HFGenerator

__all__ = ["Generator", "HFGenerator", "Rollout", "response_texts"]
