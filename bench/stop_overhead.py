"""The early stop's cost where nothing stops: HF rollouts of a policy that does not loop, with and
without `stop_on_repetition` (n = 20, 4 occurrences), interleaved pair by pair.

    python -m longcot.bench.stop_overhead MODEL_DIR [--pairs 160] [--json PATH]

MODEL_DIR: a policy of the built-in addition task (e.g. a `longcot train` run's final/). 16
held-out prompts x 8 samples at temperature 0.7, up to 128 new tokens, 2 threads; each pair draws
the same tokens on both sides (checked), and which side runs first alternates. Prints the median
and mean times and the ratios, and writes JSON (default bench/out/stop-overhead.json).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch


def run(model_dir: str, pairs: int = 160, json_path: str | None = None) -> dict:
    from longcot.engine.data import addition
    from longcot.engine.models import load_policy
    from longcot.engine.rollout import HFGenerator

    torch.set_num_threads(2)
    model, tok = load_policy(model_dir)
    model.eval()
    task = addition.make_addition_task(3, 4000, 256, seed=0, n_valid=128)
    prompts = [tok(p.prompt, add_special_tokens=False)["input_ids"] for p in task.heldout[:16]]
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    generator = HFGenerator(model, tok.eos_token_id, pad)

    def rollout(stop: bool, seed: int):
        options = {"stop_on_repetition": (20, 4)} if stop else {}
        start = time.perf_counter()
        out = generator.generate(prompts, 8, 0.7, 1.0, 128, seed=seed, **options)
        return time.perf_counter() - start, out

    for seed in range(3):  # warm-up
        rollout(True, seed)
        rollout(False, seed)
    times: dict[bool, list[float]] = {True: [], False: []}
    stopped = 0
    for i in range(pairs):
        first = i % 2 == 0
        (t1, r1), (t2, r2) = rollout(first, 100 + i), rollout(not first, 100 + i)
        if not torch.equal(r1.tokens, r2.tokens):
            raise RuntimeError("the rollouts with and without the rule differ: the policy loops")
        looped = r1.repetition_stop if first else r2.repetition_stop
        stopped += int(looped.sum())
        times[first].append(t1)
        times[not first].append(t2)
    on, off = times[True], times[False]
    result = {
        "model": str(model_dir), "pairs": pairs, "tokens_per_rollout": int(r1.lengths.sum()),
        "stopped": stopped, "median_on_s": statistics.median(on), "median_off_s": statistics.median(off),
        "median_ratio": statistics.median(on) / statistics.median(off),
        "mean_ratio": statistics.mean(on) / statistics.mean(off),
        "pair_median_ratio": statistics.median(a / b for a, b in zip(on, off)),
    }
    print(f"{pairs} pairs, {result['tokens_per_rollout']} tokens per rollout, {stopped} stopped: "
          f"median {result['median_on_s']:.4f} s with the rule, {result['median_off_s']:.4f} s without "
          f"(ratio {result['median_ratio']:.4f}); mean ratio {result['mean_ratio']:.4f}; "
          f"per-pair median ratio {result['pair_median_ratio']:.4f}")
    path = Path(json_path or "bench/out/stop-overhead.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m longcot.bench.stop_overhead", description=__doc__.split("\n")[0])
    parser.add_argument("model_dir", help="a policy of the built-in addition task (a run's final/)")
    parser.add_argument("--pairs", type=int, default=160)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    run(args.model_dir, args.pairs, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
