"""The task a run trains on, shared by `longcot train` and `longcot sft`: the policy and its
tokenizer, the train / held-out / validation prompts and the SFT pairs, built from the config
(the built-in addition task or prompt files), plus the run folder's name."""

from __future__ import annotations

import datetime
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .config import TrainConfig
from .data import addition, addition_reflect
from .data.datasets import (
    DataError,
    apply_template,
    load_prompt_records,
    load_sft_records,
    resolve_dataset,
)
from .device import enable_gradient_checkpointing
from .models import build_char_tokenizer, build_tiny_model, load_policy


@dataclass
class Prompts:
    ids: list[list[int]]
    answers: list[str]


@dataclass
class Setup:
    policy: torch.nn.Module
    tokenizer: Any
    train: Prompts
    heldout: Prompts
    valid: Prompts  # decides when the SFT warm start stops; never the reported split
    sft_examples: list[tuple[list[int], list[int]]]
    skipped_prompts: int


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def setup_task(cfg: TrainConfig, policy_path: str | Path | None = None) -> Setup:
    """The policy (on ``model.device``, in the precision's parameter dtype, checkpointed when
    configured), its tokenizer, and train/held-out prompts (plus SFT pairs) for the config.

    ``policy_path``: a saved policy (a checkpoint's) whose weights replace the initial ones.
    """
    precision = cfg.model.resolved_precision()
    data = cfg.data
    if data.task == "file":  # read (and check) every file before the model loads
        records = {data.path: load_prompt_records(data.path, data.question_field, data.answer_field)}
        if data.heldout_path:  # a file, or a packaged benchmark by name (math500, aime24)
            records[data.heldout_path] = load_prompt_records(
                resolve_dataset(data.heldout_path)[0], data.question_field, data.answer_field)
        sft_records = load_sft_records(data.sft_path) if data.sft_path else []
    if cfg.model.path is None:
        tokenizer = build_char_tokenizer(addition_reflect.CHARSET if data.task == "addition_reflect" else addition.CHARSET)
        t = cfg.model.tiny
        if policy_path is None:
            policy = build_tiny_model(tokenizer, layers=t.layers, hidden=t.hidden, heads=t.heads, seed=cfg.seed)
        else:
            policy = load_policy(policy_path)[0]
    else:
        policy, tokenizer = load_policy(policy_path or cfg.model.path, dtype=precision.param_dtype)
    policy.to(device=precision.device, dtype=precision.param_dtype)
    if cfg.model.gradient_checkpointing:
        enable_gradient_checkpointing(policy, cfg.model.checkpoint_mlp_tile_tokens)
    eos = tokenizer.eos_token_id

    if data.task in ("addition", "addition_reflect"):
        a = data.addition
        if data.task == "addition":
            task = addition.make_addition_task(a.digits, a.n_train, a.n_heldout, seed=cfg.seed,
                                               operands=a.operands, n_valid=cfg.sft.eval_size)
        else:
            r = data.reflect
            task = addition_reflect.make_reflect_task(
                a.digits, a.operands, a.n_train, a.n_heldout, seed=cfg.seed, n_valid=cfg.sft.eval_size,
                rates=addition_reflect.ReflectRates(r.mistake_rate, r.check_rate, r.recheck_rate))

        def prompts(problems) -> Prompts:
            return Prompts([_encode(tokenizer, p.prompt) for p in problems], [p.answer for p in problems])

        sft = [(_encode(tokenizer, p.prompt), _encode(tokenizer, p.demonstration) + [eos]) for p in task.train]
        return Setup(policy, tokenizer, prompts(task.train), prompts(task.heldout[: cfg.eval_size]),
                     prompts(task.valid), sft, 0)

    skipped = 0

    def prompts_from(path: str) -> Prompts:
        nonlocal skipped
        out = Prompts([], [])
        for rec in records[path]:
            ids = _encode(tokenizer, apply_template(rec.question, data.template, tokenizer, data.chat_template))
            if len(ids) > data.max_prompt_tokens:
                if data.strict:
                    raise DataError(f"{rec.where}: the prompt is {len(ids)} tokens, over "
                                    f"data.max_prompt_tokens={data.max_prompt_tokens} (data.strict=true)")
                skipped += 1
                continue
            out.ids.append(ids)
            out.answers.append(rec.answer)
        return out

    train = prompts_from(data.path)
    if data.heldout_path:
        heldout = prompts_from(data.heldout_path)
    else:  # hold out the tail of the training prompts
        k = min(cfg.eval_size, max(1, len(train.ids) // 10))
        heldout = Prompts(train.ids[-k:], train.answers[-k:])
        train = Prompts(train.ids[:-k], train.answers[:-k])
    heldout = Prompts(heldout.ids[: cfg.eval_size], heldout.answers[: cfg.eval_size])
    sft, valid = [], Prompts([], [])
    if data.sft_path:
        sft = [(_encode(tokenizer, r.prompt), _encode(tokenizer, r.response) + [eos]) for r in sft_records]
        if cfg.sft.target_accuracy is not None:  # the probe's prompts leave the RL prompts
            k = min(cfg.sft.eval_size, len(train.ids) // 2)
            valid = Prompts(train.ids[-k:], train.answers[-k:])
            train = Prompts(train.ids[:-k], train.answers[:-k])
    if not train.ids:
        raise DataError(f"{data.path}: no training prompts left ({skipped} over data.max_prompt_tokens="
                        f"{data.max_prompt_tokens}, {len(heldout.ids)} held out, {len(valid.ids)} for validation)")
    if skipped:
        print(f"longcot: skipped {skipped} prompts longer than data.max_prompt_tokens="
              f"{data.max_prompt_tokens} (data.strict=true makes them an error)", file=sys.stderr, flush=True)
    return Setup(policy, tokenizer, train, heldout, valid, sft, skipped)


def validation_probe(cfg: TrainConfig, setup: Setup,
                     greedy: Callable[[list[list[int]], list[str]], dict[str, Any]]) -> Callable[[], float] | None:
    """Greedy accuracy on the validation split, for the SFT stop; None when not configured.
    ``greedy(prompts, answers)``: `greedy_accuracy` of the policy (the trainer's own, over ranks)."""
    v = setup.valid
    if cfg.sft.target_accuracy is None or not v.ids:
        return None

    def probe() -> float:
        return greedy(v.ids, v.answers)["accuracy"]
    return probe


def new_run_dir(root: str, seed: int) -> Path:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    base = Path(root) / f"{stamp}-seed{seed}"
    path, i = base, 1
    while path.exists():
        path, i = Path(f"{base}-{i}"), i + 1
    path.mkdir(parents=True)
    return path
