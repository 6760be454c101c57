"""Prompt and SFT datasets from local JSON-lines or Parquet files, and prompt templating.

Every problem with the input is a ``DataError`` whose message is one line naming the file and
the 1-based line (JSONL) or row (Parquet), so a bad record in a 50k-line file can be found
without a debugger.
"""

from __future__ import annotations

import importlib.resources
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

JSONL_SUFFIXES = (".jsonl",)
PARQUET_SUFFIXES = (".parquet", ".pq")

#: Benchmarks shipped inside the package (engine/data/benchmarks/, see its README), by name.
BENCHMARKS = {"math500": "math500.jsonl", "aime24": "aime24.jsonl"}


class DataError(ValueError):
    """Bad dataset input: the message names the file and, where it applies, the line or row."""


@dataclass(frozen=True)
class PromptRecord:
    """A question with its reference answer; ``meta`` holds the record's other fields."""

    question: str
    answer: str
    meta: dict[str, Any] = field(default_factory=dict)
    # "FILE: line N" (or "row N"), for errors found after loading; provenance, not content
    where: str = field(default="", compare=False)


@dataclass(frozen=True)
class SFTRecord:
    prompt: str
    response: str


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_path(path: str | Path) -> tuple[Path, str]:
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: file does not exist")
    if not path.is_file():
        raise DataError(f"{path}: not a regular file")
    suffix = path.suffix.lower()
    if suffix in JSONL_SUFFIXES:
        return path, "jsonl"
    if suffix in PARQUET_SUFFIXES:
        return path, "parquet"
    supported = ", ".join(JSONL_SUFFIXES + PARQUET_SUFFIXES)
    raise DataError(f"{path}: unknown extension {suffix or '(none)'!r}; expected one of {supported}")


def _iter_jsonl(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    # Read bytes and decode line by line so that a bad byte is reported with its line number.
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            where = f"{path}: line {lineno}"
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{where}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
            if lineno == 1:
                text = text.removeprefix("\ufeff")
            if not text.strip():
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: malformed JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(record, dict):
                raise DataError(
                    f"{where}: expected a JSON object, got {type(record).__name__} {_short(record)}"
                )
            yield where, record


def _iter_parquet(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: not a readable Parquet file ({_one_line(e)})") from None
    row = 0
    try:
        # Batches keep memory bounded for large files; rows are numbered across batches.
        for batch in parquet.iter_batches():
            for record in batch.to_pylist():
                row += 1
                yield f"{path}: row {row}", record
    except (pa.ArrowException, OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: row {row + 1}: unreadable ({_one_line(e)})") from None


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def _iter_records(path: str | Path) -> Iterator[tuple[str, dict[str, Any]]]:
    path, kind = _check_path(path)
    any_rows = False
    for item in _iter_jsonl(path) if kind == "jsonl" else _iter_parquet(path):
        any_rows = True
        yield item
    if not any_rows:
        raise DataError(f"{path}: no rows")


def _text_field(where: str, record: dict[str, Any], name: str, allow_int: bool = False) -> str:
    if name not in record:
        fields = ", ".join(sorted(map(str, record))) or "none"
        raise DataError(f"{where}: missing field {name!r} (fields: {fields})")
    value = record[name]
    # Reference answers are often bare integers in JSON (AIME-style); bool is an int subclass
    # but never a meaningful answer.
    if allow_int and isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        expected = "a string or an integer" if allow_int else "a string"
        raise DataError(
            f"{where}: field {name!r} must be {expected}, got {type(value).__name__} {_short(value)}"
        )
    if not value.strip():
        raise DataError(f"{where}: field {name!r} is empty")
    return value


def _check_limit(limit: int | None) -> None:
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise DataError(f"limit must be a positive integer or None, got {limit!r}")


def load_prompt_records(
    path: str | Path,
    question_field: str = "problem",
    answer_field: str = "answer",
    limit: int | None = None,
) -> list[PromptRecord]:
    """Question/answer records from a ``.jsonl`` or ``.parquet`` file, in file order.

    Integer answers are converted to strings. Other fields go into ``meta`` unchanged. With
    ``limit``, only the first ``limit`` records are read (and validated).
    """
    _check_limit(limit)
    records: list[PromptRecord] = []
    for where, record in _iter_records(path):
        question = _text_field(where, record, question_field)
        answer = _text_field(where, record, answer_field, allow_int=True)
        meta = {k: v for k, v in record.items() if k not in (question_field, answer_field)}
        records.append(PromptRecord(question=question, answer=answer, meta=meta, where=where))
        if limit is not None and len(records) >= limit:
            break
    return records


def load_sft_records(
    path: str | Path,
    prompt_field: str = "prompt",
    response_field: str = "response",
    limit: int | None = None,
) -> list[SFTRecord]:
    """Prompt/response pairs for supervised fine-tuning from a ``.jsonl`` or ``.parquet`` file."""
    _check_limit(limit)
    records: list[SFTRecord] = []
    for where, record in _iter_records(path):
        records.append(
            SFTRecord(
                prompt=_text_field(where, record, prompt_field),
                response=_text_field(where, record, response_field),
            )
        )
        if limit is not None and len(records) >= limit:
            break
    return records


def apply_template(
    question: str,
    template: str | None,
    tokenizer: Any = None,
    use_chat_template: bool = False,
) -> str:
    """The prompt text for ``question``.

    ``template`` contains the placeholder ``{question}``; it is substituted literally rather
    than with ``str.format``, so other braces (``\\boxed{}`` in an instruction) need no
    escaping. With ``use_chat_template``, the (templated) question becomes the user turn of the
    tokenizer's chat template, followed by the generation prompt.
    """
    if not isinstance(question, str):
        raise DataError(f"apply_template: question must be a string, got {type(question).__name__}")
    content = question
    if template is not None:
        if not isinstance(template, str) or "{question}" not in template:
            raise DataError(f"apply_template: template {_short(template)} lacks the {{question}} placeholder")
        content = template.replace("{question}", question)
    if not use_chat_template:
        return content
    if tokenizer is None:
        raise DataError("apply_template: use_chat_template=True needs a tokenizer")
    if not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise DataError(f"apply_template: use_chat_template=True but tokenizer {name!r} has no chat template")
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
    )


def benchmark_path(name: str) -> Path:
    """The packaged file of benchmark ``name`` (a key of ``BENCHMARKS``)."""
    if name not in BENCHMARKS:
        raise DataError(f"{name}: unknown benchmark (packaged: {', '.join(BENCHMARKS)})")
    resource = importlib.resources.files(__package__) / "benchmarks" / BENCHMARKS[name]
    # Installed from a wheel or in editable mode the package is a folder, so this is a real
    # path; a zipped install would need importlib.resources.as_file, which nothing here uses.
    path = Path(str(resource))
    if not path.is_file():
        raise DataError(f"{path}: packaged benchmark {name!r} is missing (a broken install?)")
    return path


def resolve_dataset(name_or_path: str | Path) -> tuple[Path, str]:
    """``(file, short name)`` for a packaged benchmark's name or a .jsonl/.parquet path.

    A name that is neither a benchmark nor an existing file nor a data file's name is an
    error that lists the benchmarks, rather than "file does not exist" for a typo of one.
    """
    text = str(name_or_path)
    if text in BENCHMARKS:
        return benchmark_path(text), text
    path = Path(text)
    if path.exists() or path.suffix.lower() in JSONL_SUFFIXES + PARQUET_SUFFIXES:
        return path, path.stem
    raise DataError(
        f"{text}: unknown dataset (expected one of {', '.join(BENCHMARKS)}, or a path to a "
        f"{', '.join(JSONL_SUFFIXES + PARQUET_SUFFIXES)} file)"
    )
