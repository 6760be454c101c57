"""The RL step at long lengths: one experience pass (policy, reference and critic forwards) and one
PPO update (policy and critic, one optimiser step each) over B responses whose lengths are drawn
uniformly from [L/8, L].

Sides, the same inputs on each:

- ``padded``: count-based micro-batches of 4 rows in rollout order, each at the batch's width
  (``algorithm.max_tokens_per_micro_batch=null micro_batch_size=4``, the trainer before token
  budgets);
- ``budget``: token-budget micro-batches (sorted by length, each trimmed to its own width);
- each with and without activation checkpointing (``+ckpt``).

Every side runs in a fresh subprocess, so that its peak memory is its own: the peak resident set
on CPU (reset once the models and inputs exist, so "extra" is what the pass itself added; glibc's
mmap threshold fixed, so that freed tensors leave the resident set), or
``torch.cuda.max_memory_allocated`` on CUDA. Columns: valid response tokens per second of the whole
pass, peak memory, and the padding share of the token positions the micro-batches forward.

    longcot bench step [--device cpu|cuda] [--lengths 2048,8192,16384] [--batch 16] [--small]

On CPU the model is the rollout benchmark's (4 layers, hidden 256, 4 heads, the built-in
character vocabulary); on CUDA a Qwen2.5-0.5B-shaped model (random weights, the same config
numbers) in bf16-mixed precision.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

SIDES = ("padded", "padded+ckpt", "budget", "budget+ckpt")
PROMPT_TOKENS = 32
# At L = 16,384 the padded side of B = 16 takes ~17 minutes on the 2-core CPU; the issue lets a
# row use a smaller B when a side would pass 3 minutes (the same B on every side of the row).
CPU_BATCH = {2048: 16, 8192: 16, 16384: 2}
QWEN05B = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
               num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768, rope_theta=1000000.0,
               rms_norm_eps=1e-6, tie_word_embeddings=True)


def _model(device: str, small: bool, max_len: int):
    from longcot.engine.data import CHARSET
    from longcot.engine.models import build_char_tokenizer, build_tiny_model

    if device == "cuda" and not small:
        from transformers import Qwen2Config, Qwen2ForCausalLM

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return Qwen2ForCausalLM(Qwen2Config(**QWEN05B, dtype="float32"))
    tok = build_char_tokenizer(CHARSET)
    if small:
        return build_tiny_model(tok, layers=1, hidden=64, heads=1, max_positions=max_len + PROMPT_TOKENS)
    return build_tiny_model(tok, layers=4, hidden=256, heads=4, max_positions=max_len + PROMPT_TOKENS)


def _rollout(batch: int, max_len: int, vocab: int, device: str):
    from longcot.engine.rollout import Rollout

    gen = torch.Generator().manual_seed(max_len)
    lengths = torch.randint(max(1, max_len // 8), max_len + 1, (batch,), generator=gen)
    steps = int(lengths.max())
    mask = torch.arange(steps)[None, :] < lengths[:, None]
    tokens = torch.randint(3, vocab, (batch, steps), generator=gen).masked_fill(~mask, 0)
    prompts = torch.randint(3, vocab, (batch, PROMPT_TOKENS), generator=gen).tolist()
    r = Rollout(prompts, torch.arange(batch), tokens, lengths, torch.zeros(batch, dtype=torch.bool),
                torch.zeros(tokens.shape))
    return r.to(torch.device(device))


def _current_rss() -> int:
    from .kernels import _rss_bytes

    return _rss_bytes()


def _reset_peak_rss() -> bool:
    """Linux: writing 5 to clear_refs resets the peak resident set (VmHWM) to the current one."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    from .kernels import _peak_rss_bytes

    return _peak_rss_bytes()


def measure(spec: dict) -> dict:
    """One side in this (fresh) process: build, warm up on a short batch, then time the pass."""
    from longcot.engine import Trainer
    from longcot.engine.config import load_config
    from longcot.engine.models import ValueModel
    from longcot.engine.policy_forward import padding_share, row_sizes

    torch.set_num_threads(spec["threads"])
    device, side, batch, max_len = spec["device"], spec["side"], spec["batch"], spec["length"]
    budget_mode, ckpt = side.startswith("budget"), side.endswith("+ckpt")
    overrides = [f"model.device={device}", f"model.gradient_checkpointing={str(ckpt).lower()}",
                 f"rollout.prompts_per_step={batch}", "rollout.samples_per_prompt=1",
                 f"algorithm.mini_batch_size={batch}", f"algorithm.micro_batch_size={min(4, batch)}"]
    overrides.append(f"algorithm.max_tokens_per_micro_batch={spec['budget'] if budget_mode else 'null'}")
    cfg = load_config(None, overrides)
    policy = _model(device, spec["small"], max_len)
    vocab = policy.config.vocab_size
    tr = Trainer.from_models(cfg, policy, ValueModel.from_causal_lm(policy))

    def one_pass(rollout) -> tuple[float, float, object]:
        t = time.perf_counter()
        exp = tr.experience(rollout)
        _sync(device)
        t_exp = time.perf_counter() - t
        gen = torch.Generator(device=device).manual_seed(1)
        mask = exp.sb.mask
        exp.advantages = torch.randn(mask.shape, generator=gen, device=device) * mask
        exp.returns = torch.randn(mask.shape, generator=gen, device=device) * mask
        tr.update(exp)
        _sync(device)
        return t_exp, time.perf_counter() - t - t_exp, exp

    one_pass(_rollout(2, min(64, max_len), vocab, device))  # one-time costs (allocator, kernels)
    rollout = _rollout(batch, max_len, vocab, device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _current_rss()
        reset = _reset_peak_rss()
    t_exp, t_upd, exp = one_pass(rollout)
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else _peak_rss()
    micro = [sb for _, sb in tr.micro_batches(exp.sb, list(range(batch)), row_sizes(exp.sb))]
    valid = int(rollout.lengths.sum())
    return {
        "side": side, "length": max_len, "batch": batch, "valid_tokens": valid,
        "experience_s": t_exp, "update_s": t_upd, "tokens_per_s": valid / (t_exp + t_upd),
        "peak_bytes": peak, "extra_bytes": peak - base, "padding_share": padding_share(micro),
        "micro_batches": len(micro), "peak_reset": True if device == "cuda" else reset,
    }


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def measure_in_subprocess(spec: dict) -> dict:
    # glibc raises its mmap threshold to the size of each large block freed, after which such
    # blocks come from the heap and stay resident once freed: the peak RSS would then count
    # the allocator's cache, not the tensors alive. A fixed threshold keeps RSS ~ live memory.
    env = dict(os.environ, OMP_NUM_THREADS=str(spec["threads"]), MALLOC_MMAP_THRESHOLD_="131072")
    proc = subprocess.run([sys.executable, "-m", "longcot.bench.step", "measure", json.dumps(spec)],
                          capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"bench step: side {spec['side']} at L={spec['length']} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run(device: str = "cpu", small: bool = False, json_path: str | None = None,
        lengths: list[int] | None = None, batch: int | None = None, budget: int = 16384, threads: int = 2) -> int:
    """Runs every side at every length, prints the table, writes JSON; returns 0."""
    from .kernels import _cpu_name, _fmt_bytes

    if device not in ("cpu", "cuda"):
        raise ValueError(f"device: expected 'cpu' or 'cuda', got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("longcot bench step: --device cuda needs a CUDA device")
    if small:
        lengths, budget = lengths or [64, 128], min(budget, 256)
    lengths = lengths or [2048, 8192, 16384]
    rows: list[dict] = []
    print(f"{'L':>6} {'B':>3} {'side':<12} {'tokens/s':>10} {'vs padded':>9} {'peak':>10} {'extra':>10} "
          f"{'padding':>8} {'micro':>5} {'exp s':>7} {'upd s':>7}", flush=True)
    for max_len in lengths:
        b = batch or (4 if small else CPU_BATCH.get(max_len, 16) if device == "cpu" else 16)
        padded = None
        for side in SIDES:
            spec = {"device": device, "side": side, "batch": b, "length": max_len, "budget": budget,
                    "small": small, "threads": threads}
            row = measure_in_subprocess(spec)
            padded = row if side == "padded" else padded
            row["speedup_vs_padded"] = row["tokens_per_s"] / padded["tokens_per_s"]
            rows.append(row)
            print(f"{max_len:>6} {b:>3} {side:<12} {row['tokens_per_s']:>10.0f} {row['speedup_vs_padded']:>8.2f}x "
                  f"{_fmt_bytes(row['peak_bytes']):>10} {_fmt_bytes(row['extra_bytes']):>10} "
                  f"{row['padding_share']:>7.1%} {row['micro_batches']:>5} {row['experience_s']:>7.1f} "
                  f"{row['update_s']:>7.1f}", flush=True)
    result = {
        "suite": "step", "device": device, "small": small, "budget_tokens": budget,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"processor": _cpu_name(), "gpu": torch.cuda.get_device_name() if device == "cuda" else None,
                    "cores": os.cpu_count(), "torch_threads": threads, "torch": torch.__version__,
                    "python": platform.python_version()},
        "checks": _checks(rows),
        "rows": rows,
    }
    path = Path(json_path or f"bench/out/step-{device}{'-small' if small else ''}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    for name, value in result["checks"].items():
        print(f"{name}: {value}")
    print(f"\nwrote {path}")
    return 0


def _checks(rows: list[dict]) -> dict:
    """The issue's ratios, from the rows that exist: budget vs padded speed and padding at the
    middle length, checkpointing's memory at the longest, budget memory as L doubles."""
    by = {(r["length"], r["side"]): r for r in rows}
    lengths = sorted({r["length"] for r in rows})
    out: dict[str, float] = {}
    mid = 8192 if 8192 in lengths else lengths[len(lengths) // 2]
    if (mid, "budget") in by:
        out[f"budget_speedup_at_{mid}"] = by[(mid, "budget")]["speedup_vs_padded"]
        out[f"budget_padding_at_{mid}"] = by[(mid, "budget")]["padding_share"]
    top = lengths[-1]
    for side in ("padded", "budget"):
        if (top, side) in by and (top, side + "+ckpt") in by:
            out[f"{side}_ckpt_extra_ratio_at_{top}"] = by[(top, side + "+ckpt")]["extra_bytes"] / max(
                1, by[(top, side)]["extra_bytes"])
    if len(lengths) > 1:
        for side in ("budget", "budget+ckpt"):
            a, b = by.get((lengths[-2], side)), by.get((top, side))
            if a and b:
                out[f"{side}_peak_ratio_{lengths[-2]}_to_{top}"] = b["peak_bytes"] / a["peak_bytes"]
    return out


if __name__ == "__main__":  # the subprocess side
    if len(sys.argv) != 3 or sys.argv[1] != "measure":
        raise SystemExit("usage: python -m longcot.bench.step measure SPEC_JSON")
    print(json.dumps(measure(json.loads(sys.argv[2]))))
