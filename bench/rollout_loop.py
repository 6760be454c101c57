"""Rollout speed: the HF backend's decode loop against transformers' `generate`, same work.

Three sides, interleaved run by run in one process with one thread (timings on a shared
machine are noisy; the table shows medians of thread CPU time and wall time):

- ``generate+logits``: what `HFGenerator` did before its own loop: `generate(...,
  output_logits=True)`, every step's logits stacked to [B, T, V], then the sampled tokens'
  log-probs;
- ``generate``: plain `generate`, no log-probs (what TRL's GRPOTrainer runs; it recomputes the
  log-probs in a forward afterwards, not counted here);
- ``loop``: `HFGenerator` (prefill once per prompt, preallocated KV cache, finished rows
  dropped, log-probs at each step).

Settings: ``task`` samples 16 prompts x 8 of the built-in 3-digit addition task at temperature
0.7, up to 128 new tokens, on ``--model`` (a folder, e.g. an SFT-initialised policy; default: a
random model of the default preset's shape, whose rows end at very different steps);
``fixed`` decodes exactly 128 new tokens per row (end-of-sequence ignored: the per-step cost
alone); ``long`` 32 rows x 512 tokens, end-of-sequence ignored.

``--caches`` adds a second table: the loop's decode step (prefill, then fixed-length sampled
decoding, no row dropping) on three KV caches: the loop's preallocated layers, transformers'
`DynamicCache` (concatenates every step) and `StaticCache` (attends over its full length with a
mask), at 128 rows x 128 tokens and 32 rows x 512 tokens.

    python -m longcot.bench.rollout_loop [--model DIR] [--runs 5] [--settings task,fixed,long] [--caches]

Prints the tables and writes JSON (default bench/out/rollout_loop.json).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

SETTINGS = {
    "task": {"prompts": 16, "n": 8, "new_tokens": 128, "ignore_eos": False},
    "fixed": {"prompts": 16, "n": 8, "new_tokens": 128, "ignore_eos": True},
    "long": {"prompts": 32, "n": 1, "new_tokens": 512, "ignore_eos": True},
}
TEMPERATURE = 0.7


def _left_padded(prompts: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    attn = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        attn[i, width - len(p):] = 1
    return ids, attn


def _generate(model, prompts, eos, pad, new_tokens, ignore_eos, seed, with_logits) -> int:
    """transformers' generate on the expanded prompts; returns the response tokens produced."""
    from longcot.kernels import token_logprobs

    ids, attn = _left_padded(prompts, pad)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        out = model.generate(input_ids=ids, attention_mask=attn, do_sample=True, temperature=TEMPERATURE,
                             top_p=1.0, top_k=None, max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens if ignore_eos else None, eos_token_id=eos,
                             pad_token_id=pad, output_logits=with_logits, return_dict_in_generate=True)
    tokens = out.sequences[:, ids.shape[1]:]
    is_eos = tokens == eos
    has_eos = is_eos.any(1)
    lengths = torch.where(has_eos, is_eos.int().argmax(1) + 1, tokens.shape[1])
    if with_logits:
        logits = torch.stack(out.logits, dim=1)  # [B, T, V]
        token_logprobs(logits, tokens, temperature=TEMPERATURE)
    return int(lengths.sum())


def run(settings: list[str], runs: int, model_dir: str | None) -> list[dict]:
    from longcot.engine.data import CHARSET, make_addition_task
    from longcot.engine.models import build_char_tokenizer, build_tiny_model, load_policy
    from longcot.engine.rollout import HFGenerator

    if model_dir is not None:
        model, tok = load_policy(model_dir)
    else:
        tok = build_char_tokenizer(CHARSET)
        model = build_tiny_model(tok, max_positions=1024)
    model.eval()
    eos, pad = tok.eos_token_id, tok.pad_token_id
    task = make_addition_task(digits=3, n_train=64, n_heldout=0, seed=1)
    base = [tok(p.prompt, add_special_tokens=False)["input_ids"] for p in task.train]
    rows = []
    for name in settings:
        s = SETTINGS[name]
        prompts = base[: s["prompts"]]
        expanded = [p for p in prompts for _ in range(s["n"])]
        gen = HFGenerator(model, eos, pad)

        def loop(seed, s=s, prompts=prompts, gen=gen):
            r = gen.generate(prompts, s["n"], TEMPERATURE, 1.0, s["new_tokens"], seed=seed, ignore_eos=s["ignore_eos"])
            return int(r.lengths.sum())

        sides = {
            "generate+logits": lambda seed, s=s, e=expanded: _generate(model, e, eos, pad, s["new_tokens"],
                                                                       s["ignore_eos"], seed, True),
            "generate": lambda seed, s=s, e=expanded: _generate(model, e, eos, pad, s["new_tokens"],
                                                                s["ignore_eos"], seed, False),
            "loop": loop,
        }
        cpu = {k: [] for k in sides}
        wall = {k: [] for k in sides}
        tokens = {k: [] for k in sides}
        for f in sides.values():  # warm-up
            f(0)
        for rep in range(runs):
            for k, f in sides.items():
                w, c = time.perf_counter(), time.thread_time()
                tokens[k].append(f(rep + 1))
                cpu[k].append(time.thread_time() - c)
                wall[k].append(time.perf_counter() - w)
        for k in sides:
            rows.append({"setting": name, **s, "side": k, "cpu_s": statistics.median(cpu[k]),
                         "wall_s": statistics.median(wall[k]), "cpu_s_all": cpu[k], "wall_s_all": wall[k],
                         "tokens": statistics.mean(tokens[k])})
        ref = next(r for r in rows if r["setting"] == name and r["side"] == "generate")
        for r in rows:
            if r["setting"] == name:
                r["speedup_vs_generate"] = ref["cpu_s"] / r["cpu_s"]
    return rows


@torch.no_grad()
def _decode_with(model, kind: str, ids: torch.Tensor, new_tokens: int, seed: int) -> None:
    from transformers.cache_utils import DynamicCache, StaticCache

    from longcot.engine.rollout.hf import _PreallocatedCache, _sample

    rows, width = ids.shape
    gen = torch.Generator().manual_seed(seed)
    capacity = width + new_tokens
    if kind == "dynamic":
        cache = DynamicCache(config=model.config)
    elif kind == "static":
        cache = StaticCache(config=model.config, max_cache_len=capacity)
    else:
        cache = _PreallocatedCache(model, capacity, rows, None)
    out = model(input_ids=ids, position_ids=torch.arange(width)[None].expand(rows, -1), past_key_values=cache,
                use_cache=True, logits_to_keep=1)
    logits = out.logits[:, -1].float()
    pos = torch.full((rows,), width)
    filled = torch.zeros(rows, 1, 1, capacity, dtype=torch.bool)  # the static cache's mask
    filled[..., :width] = True
    for t in range(new_tokens - 1):
        tok = _sample(logits, TEMPERATURE, 1.0, torch.rand(logits.shape[0], generator=gen, dtype=torch.float64))[0]
        mask = None
        if kind == "static":
            filled[..., width + t] = True
            mask = filled
        out = model(input_ids=tok[:, None], attention_mask=mask, position_ids=pos[:, None], past_key_values=cache,
                    use_cache=True)
        logits = out.logits[:, -1].float()
        pos += 1


def cache_rows(runs: int) -> list[dict]:
    """Thread CPU time of the same fixed-length decode on each KV cache (same-length prompts: no
    padding, so no mask but the static cache's)."""
    from longcot.engine.data import CHARSET, make_addition_task
    from longcot.engine.models import build_char_tokenizer, build_tiny_model

    tok = build_char_tokenizer(CHARSET)
    model = build_tiny_model(tok, max_positions=1024).eval()
    task = make_addition_task(digits=3, n_train=128, n_heldout=0, seed=1)
    rows = []
    for batch, new_tokens in ((128, 128), (32, 512)):
        ids = torch.tensor([tok(p.prompt, add_special_tokens=False)["input_ids"] for p in task.train[:batch]])
        kinds = ("preallocated", "dynamic", "static")
        cpu = {k: [] for k in kinds}
        for k in kinds:
            _decode_with(model, k, ids, 8, 0)
        for rep in range(runs):
            for k in kinds:
                c = time.thread_time()
                _decode_with(model, k, ids, new_tokens, rep)
                cpu[k].append(time.thread_time() - c)
        base = statistics.median(cpu["preallocated"])
        for k in kinds:
            rows.append({"rows": batch, "new_tokens": new_tokens, "cache": k, "cpu_s": statistics.median(cpu[k]),
                         "cpu_s_all": cpu[k], "vs_preallocated": statistics.median(cpu[k]) / base})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a causal-LM folder for the built-in task (default: a random tiny model)")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--settings", default="task,fixed,long")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--caches", action="store_true", help="also time the decode step on three KV caches")
    parser.add_argument("--out", default="bench/out/rollout_loop.json")
    args = parser.parse_args(argv)
    settings = [s for s in args.settings.split(",") if s]
    unknown = [s for s in settings if s not in SETTINGS]
    if unknown:
        parser.error(f"--settings: unknown {unknown}; choose from {list(SETTINGS)}")
    torch.set_num_threads(args.threads)
    rows = run(settings, args.runs, args.model)
    if rows:
        print(f"{'setting':<8} {'work':>10} {'side':<16} {'tokens':>7} {'cpu s':>7} {'wall s':>7} {'tok/s':>7} "
              f"{'vs generate':>11}")
    for r in rows:
        work = f"{r['prompts'] * r['n']}x{r['new_tokens']}"
        print(f"{r['setting']:<8} {work:>10} {r['side']:<16} {r['tokens']:>7.0f} {r['cpu_s']:>7.3f} "
              f"{r['wall_s']:>7.3f} {r['tokens'] / r['cpu_s']:>7.0f} {r['speedup_vs_generate']:>10.2f}x")
    caches = cache_rows(args.runs) if args.caches else []
    if caches:
        print(f"{'work':>10} {'KV cache':<13} {'cpu s':>7} {'vs preallocated':>15}")
        for r in caches:
            print(f"{r['rows']}x{r['new_tokens']:<6} {r['cache']:<13} {r['cpu_s']:>7.3f} {r['vs_preallocated']:>14.2f}x")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": platform.platform(), "torch": torch.__version__, "threads": args.threads,
                               "model": args.model or "random tiny (4 layers, hidden 128)", "rows": rows,
                               "caches": caches}, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
