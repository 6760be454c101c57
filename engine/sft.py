"""Supervised fine-tuning on prompt/response pairs: the long-CoT warm start before RL.

The loss is the mean negative log-likelihood of the response tokens (end-of-sequence included);
prompt tokens are context only.
"""

from __future__ import annotations

import math
import time

import torch
from tqdm.auto import tqdm

from .config import SFTConfig
from .device import Precision
from .distributed import World
from .policy_forward import (
    micro_batch,
    plan_micro_batches,
    response_logprobs,
    row_sizes,
    sequence_batch,
)
from .task import new_run_dir, setup_task, validation_probe


def warmup_cosine(step: int, warmup: int, total: int, floor: float = 0.1) -> float:
    """Learning-rate multiplier: linear warm-up, then cosine decay to ``floor``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def pad_responses(responses: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([len(r) for r in responses], dtype=torch.long)
    tokens = torch.full((len(responses), int(lengths.max())), pad_id, dtype=torch.long)
    for i, r in enumerate(responses):
        tokens[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    return tokens, lengths


def run_sft(
    model: torch.nn.Module,
    examples: list[tuple[list[int], list[int]]],
    cfg: SFTConfig,
    pad_id: int,
    seed: int,
    progress: bool = True,
    on_step=None,
    probe=None,
    precision: Precision | None = None,
    world: World | None = None,
) -> dict[str, float]:
    """Train ``model`` in place on (prompt ids, response ids + eos) pairs; returns a summary.

    ``probe()`` returns the model's validation accuracy; with ``cfg.target_accuracy`` set it is
    called every ``cfg.eval_every`` steps and training stops once it reaches the target. With
    ``cfg.max_tokens_per_micro_batch`` each batch is cut into micro-batches of that many tokens
    (sorted by length) whose gradients add up to the whole batch's token mean. On several
    processes (``world``, the model FSDP-sharded) each rank takes its share of every batch and
    the loss is the whole batch's token mean, as on one process.
    """
    world = world or World()
    if not examples:
        raise ValueError("sft: no training examples")
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: warmup_cosine(s, cfg.warmup_steps, cfg.steps)
    )
    gen = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    model.train()
    start, loss_value, step, accuracy = time.perf_counter(), float("nan"), 0, None
    if cfg.target_accuracy is None:
        probe = None
    bar = tqdm(total=cfg.steps, desc="sft", disable=not progress, dynamic_ncols=True)
    for step in range(1, cfg.steps + 1):
        idx = torch.randint(len(examples), (cfg.batch_size,), generator=gen).tolist()[world.share(cfg.batch_size)]
        prompts = [examples[i][0] for i in idx]
        tokens, lengths = pad_responses([examples[i][1] for i in idx], pad_id)
        sb = sequence_batch(prompts, tokens.to(device), lengths.to(device), pad_id)
        total = world.sum(sb.mask.sum())
        optimizer.zero_grad(set_to_none=True)
        loss = torch.zeros((), device=device)
        rows = list(range(len(sb)))
        budget = cfg.max_tokens_per_micro_batch
        sizes = row_sizes(sb) if budget is not None else None
        plan = [rows] if sizes is None else plan_micro_batches(sizes[0], rows, budget, len(rows))
        # As many forwards and backwards on every rank (FSDP's collectives run inside them).
        for part in plan + [None] * (world.same_counts([len(plan)])[0] - len(plan)):
            micro = sb if sizes is None else micro_batch(sb, [0] if part is None else part, sizes=sizes)
            logp, _ = response_logprobs(model, micro, temperature=1.0, precision=precision)
            part_loss = -logp.sum() / total
            if part is None:
                part_loss = part_loss * 0
            part_loss.backward()
            loss += part_loss.detach()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        loss_value = world.sum(loss).item()
        bar.update(1)
        bar.set_postfix(loss=f"{loss_value:.3f}")
        row = {"phase": "sft", "step": step, "loss": loss_value, "lr": schedule.get_last_lr()[0]}
        if probe is not None and step % cfg.eval_every == 0:
            model.eval()
            accuracy = probe()
            model.train()
            row["valid_accuracy"] = accuracy
            bar.set_postfix(loss=f"{loss_value:.3f}", valid_acc=f"{accuracy:.2f}")
        if on_step is not None:
            on_step(row)
        if accuracy is not None and accuracy >= cfg.target_accuracy:
            break
        if cfg.seconds is not None and world.max(torch.tensor(int(time.perf_counter() - start > cfg.seconds))):
            break  # every rank stops at the same step
    bar.close()
    model.eval()
    summary = {"sft_steps": step, "sft_loss": loss_value, "sft_seconds": time.perf_counter() - start}
    if accuracy is not None:
        summary["sft_valid_accuracy"] = accuracy
    return summary


def sft_main(cfg) -> dict[str, float]:
    """`longcot sft`: the SFT stage alone on the configured data; saves the model to final/."""
    import json

    from .evaluate import greedy_accuracy
    from .models import save_model
    from .rollout import HFGenerator

    run_dir = new_run_dir(cfg.output_dir, cfg.seed)
    print(f"longcot: run folder {run_dir}", flush=True)
    torch.manual_seed(cfg.seed)
    setup = setup_task(cfg)
    if not setup.sft_examples:
        from .config import ConfigError

        raise ConfigError("data.sft_path: no SFT examples (set data.sft_path, or use data.task=addition)")
    tok = setup.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    lines = []
    precision = cfg.model.resolved_precision()
    generator = HFGenerator(setup.policy, tok.eos_token_id, pad, precision=precision)
    probe = validation_probe(cfg, setup, lambda ids, answers: greedy_accuracy(
        generator, tok, ids, answers, cfg.rollout.max_new_tokens, cfg.reward.verifier_timeout_s))
    summary = run_sft(setup.policy, setup.sft_examples, cfg.sft, pad, cfg.seed, cfg.logging.progress,
                      lines.append, probe, precision)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    save_model(setup.policy, tok, run_dir / "final")
    summary["run_dir"] = str(run_dir)
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"longcot: SFT done ({summary['sft_steps']} steps, loss {summary['sft_loss']:.3f}); "
          f"model in {run_dir / 'final'}", flush=True)
    return summary
