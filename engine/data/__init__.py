"""Datasets (JSONL/Parquet prompt and SFT records, prompt templates) and built-in tasks."""

from __future__ import annotations

from .addition import (
    CHARSET,
    TEMPLATE,
    AdditionTask,
    Problem,
    demonstrate,
    make_addition_task,
    make_problem,
    prompt,
)
from .datasets import (
    DataError,
    PromptRecord,
    SFTRecord,
    apply_template,
    load_prompt_records,
    load_sft_records,
)

__all__ = [
    "CHARSET",
    "TEMPLATE",
    "AdditionTask",
    "DataError",
    "Problem",
    "PromptRecord",
    "SFTRecord",
    "apply_template",
    "demonstrate",
    "load_prompt_records",
    "load_sft_records",
    "make_addition_task",
    "make_problem",
    "prompt",
]
