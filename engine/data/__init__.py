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
    BENCHMARKS,
    DataError,
    PromptRecord,
    SFTRecord,
    apply_template,
    benchmark_path,
    load_prompt_records,
    load_sft_records,
    resolve_dataset,
)

__all__ = [
    "BENCHMARKS",
    "CHARSET",
    "TEMPLATE",
    "AdditionTask",
    "DataError",
    "Problem",
    "PromptRecord",
    "SFTRecord",
    "apply_template",
    "benchmark_path",
    "demonstrate",
    "load_prompt_records",
    "load_sft_records",
    "make_addition_task",
    "make_problem",
    "prompt",
    "resolve_dataset",
]
