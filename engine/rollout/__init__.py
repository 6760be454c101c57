"""Rollout backends behind one `Generator` protocol: longcot's decode loop on a Hugging Face
model (`HFGenerator`) and vLLM.

`VLLMGenerator` is imported lazily, so importing longcot does not import vLLM.
"""

from typing import Any

from .base import Generator, Rollout, response_texts
from .hf import HFGenerator

__all__ = ["Generator", "HFGenerator", "Rollout", "VLLMGenerator", "response_texts", "vllm_available"]


def vllm_available() -> bool:
    """Whether vLLM is installed (checked without importing it)."""
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


def __getattr__(name: str) -> Any:
    if name == "VLLMGenerator":
        from .vllm import VLLMGenerator

        return VLLMGenerator
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
