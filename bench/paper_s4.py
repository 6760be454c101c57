"""Section 4 of Yeo et al. (2025) on the built-in reflection task: how the reward shapes length.

    longcot replicate s4 [--seeds 3] [--quick] [--out bench/out/paper_s4] [--jobs 2]

The arms are the YAML files of ``examples/paper_s4/`` (each also runs alone with ``longcot train
--config``: SFT, then its RL). The runner makes one SFT policy per seed from the baseline arm's
config, measures its length / accuracy trade-off, then trains every arm from that same policy
(``model.path=<sft>/final sft.enabled=false``), two runs at a time on two cores. It writes
``runs.json`` (every arm and seed's per-step series and held-out evaluations), ``summary.json``
(means and spreads over seeds, the trade-off, the findings' evidence), ``table.md`` and the
figures (``figures/*.png``). A finished (arm, seed) run is reused when the runner is started
again with the same output folder, so an interrupted experiment continues where it stopped.

Findings checked (the paper's wording, shortened):
  (a) classic 0/1 reward at a tight budget: length climbs to the limit, the exceed rate rises;
  (b) the cosine length reward keeps length growth stable at that budget;
  (c) at a long budget the cosine reward's incentive for long wrong answers is hacked by
      repetition, and the n-gram repetition penalty removes it;
  (d) the repetition channel works better with gamma 0.99 than with gamma 1.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "paper_s4"


@dataclass(frozen=True)
class Arm:
    name: str  # examples/paper_s4/<name>.yaml
    label: str
    partner: str | None  # the arm it is compared with; None: the baseline
    changes: tuple[str, ...]  # the only config keys (dotted prefixes) that differ from the partner's


ARMS: tuple[Arm, ...] = (
    Arm("cosine_tight", "cosine, tight budget", None, ()),
    Arm("classic_tight", "classic 0/1, tight budget", "cosine_tight", ("reward.channels",)),
    Arm("cosine_long", "cosine, long budget", "cosine_tight", ("rollout.max_new_tokens",)),
    Arm("cosine_long_rep", "cosine + repetition (gamma 0.99), long", "cosine_long", ("reward.channels",)),
    Arm("cosine_long_rep_g1", "cosine + repetition (gamma 1), long", "cosine_long_rep",
        ("reward.channels.1.gamma",)),
)
BASELINE = ARMS[0].name

# The series a step row contributes (metrics.jsonl keys; "reflections" sums reflection/*).
SERIES = {
    "length": "response_length/mean",
    "exceed_rate": "exceed_rate",
    "accuracy": "accuracy",
    "repetition_rate": "repetition_rate",
    "reflections": "reflection/*",
    "reward": "reward/mean",
}

# A run small enough for CI: a few SFT and RL steps on a handful of prompts.
QUICK = [
    "steps=2", "eval_every=1", "eval_size=8", "rollout.prompts_per_step=4", "rollout.samples_per_prompt=2",
    "algorithm.mini_batch_size=8", "data.addition.n_train=256", "data.addition.n_heldout=8",
    "sft.steps=6", "sft.target_accuracy=null", "sft.eval_size=8", "checkpoint.every=0",
]
QUICK_SFT_SAMPLES = 2


def arm_config_path(name: str, config_dir: Path = EXAMPLES) -> Path:
    return config_dir / f"{name}.yaml"


def flat_config(path: Path) -> dict[str, Any]:
    """The arm's full configuration (defaults filled in), flattened to dotted keys."""
    from longcot.engine.config import load_config

    out: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}{k}.", v)
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            for i, v in enumerate(value):
                walk(f"{prefix}{i}.", v)
        else:
            out[prefix.rstrip(".")] = value

    walk("", load_config(path).to_dict())
    return out


def config_differences(a: Path, b: Path) -> list[str]:
    """Dotted keys whose values differ between two configs (a key missing on one side included)."""
    fa, fb = flat_config(a), flat_config(b)
    return sorted(k for k in set(fa) | set(fb) if fa.get(k, ...) != fb.get(k, ...))


# --- the subprocess jobs --------------------------------------------------------------------------


def _threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)


def sft_job(spec: dict) -> dict:
    """SFT from the baseline arm's config, then the trade-off of the policy it made."""
    _threads(spec["threads"])
    from longcot.engine.config import load_config
    from longcot.engine.sft import sft_main

    cfg = load_config(spec["config"], spec["overrides"])
    summary = sft_main(cfg)
    model = Path(summary["run_dir"]) / "final"
    return {"model": str(model), "sft": summary, "tradeoff": tradeoff(cfg, model, spec["samples"])}


class _Sampler:
    """A saved policy sampled at the rollouts' settings (temperature, top-p, budget of ``cfg``)
    on the arms' device, each response decoded and scored by the training verifier."""

    def __init__(self, cfg, model_dir):
        from longcot.engine.models import load_policy
        from longcot.engine.rollout import HFGenerator

        self.cfg = cfg
        policy, self.tok = load_policy(model_dir, device=cfg.model.resolved_device())
        self.gen = HFGenerator(policy, self.tok.eos_token_id, self.tok.pad_token_id)

    def __call__(self, prompts: list[list[int]], refs: list[str], n: int, seed: int,
                 heads: list[str] | None = None):
        """(rollout, texts, correct) for ``n`` samples of each prompt; ``refs`` per response.
        ``heads``: text each prompt already ends with, scored with its continuation."""
        from longcot.engine.rewards.verifier import verify_batch
        from longcot.engine.rollout.base import response_texts

        r = self.cfg.rollout
        rollout = self.gen.generate(prompts, n=n, temperature=r.temperature, top_p=r.top_p,
                                    max_new_tokens=r.max_new_tokens, seed=seed)
        texts = response_texts(self.tok, rollout)
        scored = texts if heads is None else [h + t for h, t in zip(heads, texts)]
        return rollout, texts, verify_batch(scored, refs, self.cfg.reward.verifier_timeout_s)[0]


def tradeoff(cfg, model_dir: Path, samples: int) -> dict:
    """What a reflection step is worth to the SFT policy, on the held-out problems.

    observed: its own samples (temperature 0.7, the RL budget), split by whether they reflect;
    their accuracy and length. forced: each sample's first (one-shot) line, continued once after
    ``wait`` and once after ``\\boxed{``, the same line both times; the accuracy of each
    continuation and its length. lines: how often a one-shot column line is wrong against a check
    line (`addition_reflect.audit`)."""
    from longcot.engine.data.addition_reflect import CHECK_WORD, audit
    from longcot.engine.metrics import reflection_counts
    from longcot.engine.task import setup_task

    heldout = setup_task(cfg).heldout  # the seed's held-out problems
    sample = _Sampler(cfg, model_dir)
    refs = [a for a in heldout.answers for _ in range(samples)]
    rollout, texts, correct = sample(heldout.ids, refs, samples, cfg.seed)
    lengths = rollout.lengths.tolist()
    reflects = [sum(reflection_counts([t]).values()) > 0 for t in texts]

    def group(rows: list[int]) -> dict:
        return {"share": len(rows) / max(1, len(texts)),
                "accuracy": sum(correct[i] for i in rows) / max(1, len(rows)),
                "length": sum(lengths[i] for i in rows) / max(1, len(rows))}

    observed = {"with_reflection": group([i for i, f in enumerate(reflects) if f]),
                "without_reflection": group([i for i, f in enumerate(reflects) if not f])}

    # Forced: the same one-shot line, then a check or the answer.
    rows = [i for i, t in enumerate(texts) if "\n" in t and audit(t.split("\n")[0])["lines"] == 1]
    forced = {}
    for name, word in (("with_reflection", CHECK_WORD), ("without_reflection", "\\boxed{")):
        if not rows:  # no sample began with a column line (an untrained policy)
            forced[name] = {"accuracy": float("nan"), "length": float("nan"), "n": 0}
            continue
        heads = [texts[i].split("\n")[0] + "\n" + word for i in rows]
        head_ids = [sample.tok(h, add_special_tokens=False)["input_ids"] for h in heads]
        cont, _, ok = sample([rollout.prompts[i] + h for i, h in zip(rows, head_ids)],
                             [refs[i] for i in rows], 1, cfg.seed + 1, heads=heads)
        lens = [len(h) + n for h, n in zip(head_ids, cont.lengths.tolist())]
        forced[name] = {"accuracy": sum(ok) / max(1, len(ok)), "length": sum(lens) / max(1, len(lens)),
                        "n": len(ok)}
    return {"samples": len(texts), "accuracy": sum(correct) / max(1, len(correct)),
            "length": sum(lengths) / max(1, len(lengths)), "observed": observed, "forced": forced,
            "lines": line_audit(texts)}


def line_audit(texts: list[str]) -> dict:
    """`addition_reflect.audit` summed over responses: how often their one-shot column lines and
    their checks are wrong, and the share of responses that check."""
    from longcot.engine.data.addition_reflect import audit

    counts = [audit(t) for t in texts]
    total = {k: sum(c[k] for c in counts) for k in counts[0]} if counts else {}
    return {"one_shot_wrong": total.get("lines_wrong", 0) / max(1, total.get("lines", 0)),
            "check_wrong": total.get("checks_wrong", 0) / max(1, total.get("checks", 0)),
            "checking": sum(c["checks"] > 0 for c in counts) / max(1, len(counts)), **total}


def sampled_job(spec: dict) -> dict:
    """Held-out pass@1 at the rollout's sampling settings (``samples`` per problem) of each model
    folder: the RL objective's own accuracy, which greedy decoding hides once the most likely
    response is right."""
    _threads(spec["threads"])
    from longcot.engine.config import load_config
    from longcot.engine.task import setup_task

    cfg = load_config(spec["config"], spec["overrides"])
    heldout = setup_task(cfg).heldout
    n, out = spec["samples"], {}
    refs = [a for a in heldout.answers for _ in range(n)]
    for name, folder in spec["models"].items():
        rollout, texts, ok = _Sampler(cfg, folder)(heldout.ids, refs, n, cfg.seed + 7)
        out[name] = {"accuracy": sum(ok) / max(1, len(ok)), "length": rollout.lengths.float().mean().item(),
                     "exceed_rate": rollout.truncated.float().mean().item(), "n": len(ok),
                     "lines": line_audit(texts)}
    return out


JOBS = {"sft": sft_job, "sampled": sampled_job}


def _job_main(argv: list[str]) -> int:
    mode, spec_json, result_path = argv
    result = JOBS[mode](json.loads(spec_json))
    Path(result_path).write_text(json.dumps(result, indent=2) + "\n")
    return 0


def in_subprocess(cmd: list[str], log: Path, threads: int) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a") as f:  # a continued run's log follows its first part
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
    if proc.returncode:
        tail = "\n".join(log.read_text().splitlines()[-15:])
        raise RuntimeError(f"{' '.join(cmd[:6])} ... failed (exit {proc.returncode}); log {log}:\n{tail}")


# --- the experiment -------------------------------------------------------------------------------


# What an SFT policy depends on: a cached one is reused only when these are unchanged.
SFT_KEYS = ("seed", "model", "data", "sft")
# What a policy's sampled pass@1 depends on besides the policy and its seed.
SAMPLING_KEYS = ("temperature", "top_p", "max_new_tokens")
# What `line_audit` reports of each pass@1 sample set, in the table's order.
AUDIT_KEYS = ("checking", "one_shot_wrong", "check_wrong")


def _settings(config: str, overrides: list[str], keys: tuple[str, ...] | None = None) -> dict:
    from longcot.engine.config import load_config

    d = load_config(config, overrides).to_dict()
    return {k: d[k] for k in keys} if keys else d


def _current(path: Path) -> bool:
    """Whether a run's saved pass@1 record exists and has every field the summary reads (one
    written before the line audit is made again)."""
    return path.exists() and "lines" in json.loads(path.read_text()).get("final", {})


def _finished_run(folder: Path, settings: dict, shorter: bool = False) -> Path | None:
    """The newest finished run in ``folder`` made with exactly ``settings`` (an arm's YAML edited
    since makes a new run, not a stale reuse); ``shorter``: one that differs only in having run
    fewer steps, which `longcot train resume=RUN steps=N` continues as if never stopped."""
    import yaml

    for run in sorted((p.parent for p in folder.glob("*/summary.json")), reverse=True):
        done = yaml.safe_load((run / "config.yaml").read_text())
        if not shorter and done == settings:
            return run
        if shorter and done["steps"] < settings["steps"] and {**done, "steps": settings["steps"]} == settings:
            return run
    return None


def run_experiment(out: Path, seeds: list[int], quick: bool, jobs: int, config_dir: Path = EXAMPLES,
                   log=print) -> dict:
    """Every seed's SFT and every (arm, seed) run; returns their raw records."""
    threads = max(1, (os.cpu_count() or 2) // jobs)
    extra = QUICK if quick else []
    base = str(arm_config_path(BASELINE, config_dir))
    samples = QUICK_SFT_SAMPLES if quick else 4

    def sft(seed: int) -> dict:
        folder = out / "sft" / f"seed{seed}"
        result = folder / "result.json"
        overrides = [*extra, f"seed={seed}", f"output_dir={folder}", "logging.progress=false"]
        settings = _settings(base, overrides, SFT_KEYS)
        if not result.exists() or json.loads(result.read_text()).get("settings") != settings:
            spec = {"config": base, "threads": threads, "samples": samples, "overrides": overrides}
            in_subprocess([sys.executable, "-m", "longcot.bench.paper_s4", "sft", json.dumps(spec), str(result)],
                          folder / "log.txt", threads)
            record = json.loads(result.read_text())
            result.write_text(json.dumps({**record, "settings": settings}, indent=2) + "\n")
        return json.loads(result.read_text())

    def arm_run(arm: Arm, seed: int, model: str) -> dict:
        folder = out / "runs" / arm.name / f"seed{seed}"
        config = str(arm_config_path(arm.name, config_dir))
        overrides = [*extra, f"seed={seed}", f"model.path={model}", "sft.enabled=false", f"output_dir={folder}",
                     "logging.progress=false", "logging.tensorboard=false"]
        settings = _settings(config, overrides)
        done = _finished_run(folder, settings)
        if done is None:
            # An arm given more steps continues its run from the final checkpoint.
            shorter = _finished_run(folder, settings, shorter=True)
            cmd = [sys.executable, "-m", "longcot.engine.cli", "train"]
            if shorter is None:
                cmd += ["--config", config, *overrides]
            else:
                (shorter / "sampled.json").unlink(missing_ok=True)
                cmd += [f"resume={shorter}", f"steps={settings['steps']}"]
            in_subprocess(cmd, folder / "log.txt", threads)
            done = _finished_run(folder, settings)
            if done is None:
                raise RuntimeError(f"{arm.name} seed {seed}: the run in {folder} left no summary.json")
        sampled = done / "sampled.json"
        if not _current(sampled):
            spec = {"config": config, "threads": threads, "samples": samples,
                    "overrides": [*extra, f"seed={seed}"], "models": {"final": str(done / "final")}}
            in_subprocess([sys.executable, "-m", "longcot.bench.paper_s4", "sampled", json.dumps(spec), str(sampled)],
                          folder / "sampled-log.txt", threads)
        rows = [json.loads(line) for line in (done / "metrics.jsonl").read_text().splitlines()]
        summary = json.loads((done / "summary.json").read_text())
        return {"arm": arm.name, "seed": seed, "run_dir": str(done), "series": series_of(rows),
                "evals": summary["evals"], "init_accuracy": summary["init_accuracy"],
                "final_accuracy": summary["final_accuracy"], "rl_seconds": summary["rl_seconds"],
                "sampled": {**json.loads(sampled.read_text()), "sft": sft_sampled(seed, config, model)}}

    sft_lock, sft_locks = threading.Lock(), {}

    def sft_sampled(seed: int, config: str, model: str) -> dict:
        # The SFT policy's pass@1 depends on its seed and the sampling settings only: made once
        # per seed and budget (the tight arms share one, the long arms another), not per arm.
        overrides = [*extra, f"seed={seed}"]
        rollout = _settings(config, overrides, ("rollout",))["rollout"]
        key = json.dumps({"model": model, "samples": samples, **{k: rollout[k] for k in SAMPLING_KEYS}},
                         sort_keys=True)
        with sft_lock:
            entry = sft_locks.setdefault(key, threading.Lock())
        with entry:  # a second arm with this key waits for the first one's result
            folder, name = out / "sft" / f"seed{seed}", f"sampled-{rollout['max_new_tokens']}"
            path = folder / f"{name}.json"
            saved = json.loads(path.read_text()) if path.exists() else {}
            if saved.get("key") == key and "lines" in saved["sft"]:
                return saved["sft"]
            spec = {"config": config, "threads": threads, "samples": samples, "overrides": overrides,
                    "models": {"sft": model}}
            tmp = folder / f"{name}.tmp.json"
            # Each budget's own log: the tight and the long arms' samples may run at once.
            in_subprocess([sys.executable, "-m", "longcot.bench.paper_s4", "sampled", json.dumps(spec), str(tmp)],
                          folder / f"{name}-log.txt", threads)
            record = {"key": key, "sft": json.loads(tmp.read_text())["sft"]}
            path.write_text(json.dumps(record, indent=2) + "\n")
            tmp.unlink()
            return record["sft"]

    start = time.perf_counter()
    with ThreadPoolExecutor(jobs) as pool:
        # Every SFT is queued before any arm: the queue is first in, first out, so an arm's
        # worker waits only on an SFT already running, and a seed's arms start as soon as its
        # SFT is done, beside the other seeds' SFTs.
        sft_futures = {seed: pool.submit(sft, seed) for seed in seeds}
        futures = [(arm, seed, pool.submit(lambda a, s: arm_run(a, s, sft_futures[s].result()["model"]), arm, seed))
                   for seed in seeds for arm in ARMS]
        sfts = {seed: f.result() for seed, f in sft_futures.items()}
        log(f"paper_s4: SFT policies ready ({time.perf_counter() - start:.0f} s)")
        runs = []
        for arm, seed, fut in futures:
            runs.append(fut.result())
            log(f"paper_s4: {arm.name} seed {seed} done ({time.perf_counter() - start:.0f} s)")
    return {"seeds": seeds, "quick": quick, "seconds": time.perf_counter() - start,
            "sft": {str(s): v for s, v in sfts.items()}, "runs": runs}


def series_of(rows: list[dict]) -> dict[str, list[float | None]]:
    rl = [r for r in rows if r.get("phase") == "rl"]
    out: dict[str, list[float | None]] = {"step": [r["step"] for r in rl]}
    for name, key in SERIES.items():
        if key.endswith("*"):
            out[name] = [sum(v for k, v in r.items() if k.startswith(key[:-1]) and v is not None) for r in rl]
        else:
            out[name] = [r.get(key) for r in rl]
    return out


# --- summaries ------------------------------------------------------------------------------------


def _mean_sd(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _window(xs: list[float | None], first: bool, frac: float = 0.2) -> float:
    vals = [x for x in xs if x is not None]
    k = max(1, round(len(vals) * frac))
    part = vals[:k] if first else vals[-k:]
    return statistics.fmean(part) if part else float("nan")


def summarize(raw: dict) -> dict:
    """Per arm over seeds: each series per step (mean, sd), the first and last 20% of steps of
    each series, held-out accuracy before and after; then the findings' evidence."""
    arms: dict[str, Any] = {}
    for arm in ARMS:
        runs = [r for r in raw["runs"] if r["arm"] == arm.name]
        steps = min(len(r["series"]["step"]) for r in runs)
        per_step = {name: [_mean_sd([r["series"][name][i] for r in runs]) for i in range(steps)]
                    for name in SERIES}
        early = {name: _mean_sd([_window(r["series"][name], True) for r in runs]) for name in SERIES}
        late = {name: _mean_sd([_window(r["series"][name], False) for r in runs]) for name in SERIES}
        size = max(1, math.ceil(steps / 5))
        windows = {name: [[statistics.fmean(v) if (v := [x for x in r["series"][name][lo:lo + size] if x is not None])
                           else float("nan") for r in runs] for lo in range(0, steps, size)] for name in SERIES}
        init = _mean_sd([r["init_accuracy"] for r in runs])
        final = _mean_sd([r["final_accuracy"] for r in runs])
        gain = _mean_sd([r["final_accuracy"] - r["init_accuracy"] for r in runs])
        sampled = {k: _mean_sd([r["sampled"][k]["accuracy"] for r in runs]) for k in ("sft", "final")}
        sampled["gain"] = _mean_sd([r["sampled"]["final"]["accuracy"] - r["sampled"]["sft"]["accuracy"] for r in runs])
        sampled["final_length"] = _mean_sd([r["sampled"]["final"]["length"] for r in runs])
        sampled["seed_gains"] = {str(r["seed"]): r["sampled"]["final"]["accuracy"] - r["sampled"]["sft"]["accuracy"]
                                 for r in runs}
        for key in AUDIT_KEYS:
            sampled[key] = {k: _mean_sd([r["sampled"][k]["lines"][key] for r in runs]) for k in ("sft", "final")}
        by_step = [{e["step"]: e["accuracy"] for e in r["evals"]} for r in runs]
        eval_steps = sorted(set.intersection(*(set(b) for b in by_step)))
        evals = [_mean_sd([b[k] for b in by_step]) for k in eval_steps]
        arms[arm.name] = {"label": arm.label, "seeds": len(runs), "steps": steps, "per_step": per_step,
                          "early": early, "late": late, "heldout_init": init, "heldout_final": final,
                          "heldout_gain": gain, "eval_steps": eval_steps, "heldout": evals, "sampled": sampled,
                          "windows": windows}
    return {"arms": arms, "tradeoff": _tradeoff_summary(raw), "findings": findings(arms),
            "seeds": raw["seeds"], "quick": raw["quick"], "seconds": raw["seconds"]}


def _tradeoff_summary(raw: dict) -> dict:
    t = [v["tradeoff"] for v in raw["sft"].values()]
    out: dict[str, Any] = {"accuracy": _mean_sd([x["accuracy"] for x in t]), "length": _mean_sd([x["length"] for x in t])}
    for kind in ("observed", "forced"):
        for group in ("with_reflection", "without_reflection"):
            for key in ("accuracy", "length", "share"):
                if key in t[0][kind][group]:
                    out[f"{kind}/{group}/{key}"] = _mean_sd([x[kind][group][key] for x in t])
    out["one_shot_line_wrong"] = _mean_sd([x["lines"]["one_shot_wrong"] for x in t])
    out["check_line_wrong"] = _mean_sd([x["lines"]["check_wrong"] for x in t])
    return out


def findings(arms: dict) -> dict:
    """Each finding's comparison, on the late window (the last 20% of RL steps) against the early
    one, means over seeds. The rule is stated next to its verdict."""
    def e(arm, key):
        return arms[arm]["early"][key][0]

    def l(arm, key):  # noqa: E743
        return arms[arm]["late"][key][0]

    out = {}
    c, k = "classic_tight", "cosine_tight"
    out["a"] = {
        "rule": "classic 0/1 at the tight budget: late length > early length and late exceed rate > early + 0.02",
        "evidence": {"length": [e(c, "length"), l(c, "length")], "exceed_rate": [e(c, "exceed_rate"), l(c, "exceed_rate")],
                     "heldout_final": arms[c]["heldout_final"][0]},
        "reproduced": l(c, "length") > e(c, "length") and l(c, "exceed_rate") > e(c, "exceed_rate") + 0.02,
    }
    out["b"] = {
        "rule": "cosine at the tight budget: its late exceed rate and its length growth below classic's",
        "evidence": {"length": [e(k, "length"), l(k, "length")], "exceed_rate": [e(k, "exceed_rate"), l(k, "exceed_rate")],
                     "heldout_final": arms[k]["heldout_final"][0]},
        "reproduced": l(k, "exceed_rate") < l(c, "exceed_rate")
        and l(k, "length") - e(k, "length") < l(c, "length") - e(c, "length"),
    }
    n, r = "cosine_long", "cosine_long_rep"
    out["c"] = {
        "rule": "long budget: without the penalty the repetition rate grows (late > early + 0.02); with it, "
                "the late repetition rate is below the arm without",
        "evidence": {"repetition_without": [e(n, "repetition_rate"), l(n, "repetition_rate")],
                     "repetition_with": [e(r, "repetition_rate"), l(r, "repetition_rate")],
                     "length_without": [e(n, "length"), l(n, "length")], "length_with": [e(r, "length"), l(r, "length")]},
        "reproduced": l(n, "repetition_rate") > e(n, "repetition_rate") + 0.02
        and l(r, "repetition_rate") < l(n, "repetition_rate"),
    }
    g1 = "cosine_long_rep_g1"
    out["d"] = {
        "rule": "the repetition channel at gamma 0.99 ends with a higher held-out pass@1 than at gamma 1 "
                "(by more than the larger of the two spreads over seeds)",
        "evidence": {"pass1_final_gamma_0.99": arms[r]["sampled"]["final"], "pass1_final_gamma_1": arms[g1]["sampled"]["final"],
                     "greedy_final_gamma_0.99": arms[r]["heldout_final"], "greedy_final_gamma_1": arms[g1]["heldout_final"],
                     "repetition_late_gamma_0.99": l(r, "repetition_rate"), "repetition_late_gamma_1": l(g1, "repetition_rate")},
        "reproduced": arms[r]["sampled"]["final"][0] - arms[g1]["sampled"]["final"][0]
        > max(arms[r]["sampled"]["final"][1], arms[g1]["sampled"]["final"][1]),
    }
    return out


def _fmt(ms: tuple[float, float], pct: bool = False, digits: int = 1) -> str:
    m, s = ms
    if pct:
        return f"{100 * m:.{digits}f} ± {100 * s:.{digits}f}"
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def table(summary: dict) -> str:
    """The per-arm table (markdown): means ± sd over seeds; early/late = first/last 20% of steps."""
    head = ("| arm | held-out pass@1, T 0.7: SFT → final (%) | gain (points) | held-out greedy: SFT → final (%) "
            "| length early → late | exceed early → late (%) | repetition early → late (%) | reflections/response late |")
    lines = [head, "|" + "---|" * 8]
    for a in summary["arms"].values():
        s = a["sampled"]
        lines.append(
            f"| {a['label']} | {_fmt(s['sft'], True)} → {_fmt(s['final'], True)} | {_fmt(s['gain'], True)} "
            f"| {_fmt(a['heldout_init'], True)} → {_fmt(a['heldout_final'], True)} "
            f"| {_fmt(a['early']['length'])} → {_fmt(a['late']['length'])} "
            f"| {_fmt(a['early']['exceed_rate'], True)} → {_fmt(a['late']['exceed_rate'], True)} "
            f"| {_fmt(a['early']['repetition_rate'], True)} → {_fmt(a['late']['repetition_rate'], True)} "
            f"| {_fmt(a['late']['reflections'], digits=2)} |")
    lines += ["", "Per seed, pass@1 gain (points): " + "; ".join(
        f"{a['label']} " + ", ".join(f"{100 * g:.1f}" for g in a["sampled"]["seed_gains"].values())
        for a in summary["arms"].values()) + ".", "",
        "The pass@1 samples, SFT → final (%): responses that check, one-shot lines wrong, checks wrong:", "",
        "| arm | checking | one-shot line wrong | check wrong |", "|---|---|---|---|"]
    for a in summary["arms"].values():
        s = a["sampled"]
        lines.append(f"| {a['label']} | " + " | ".join(
            f"{_fmt(s[k]['sft'], True)} → {_fmt(s[k]['final'], True)}" for k in AUDIT_KEYS) + " |")
    lines += curves(summary)
    t = summary["tradeoff"]
    lines += ["", "SFT policy (held-out, temperature 0.7):", "",
              "| responses | share (%) | accuracy (%) | length (tokens) |", "|---|---|---|---|"]
    for kind in ("observed", "forced"):
        for group in ("with_reflection", "without_reflection"):
            share = t.get(f"{kind}/{group}/share")
            lines.append(f"| {kind}, {group.replace('_', ' ')} | {_fmt(share, True) if share else '(forced)'} "
                         f"| {_fmt(t[f'{kind}/{group}/accuracy'], True)} | {_fmt(t[f'{kind}/{group}/length'])} |")
    lines += ["", f"One-shot column lines wrong: {_fmt(t['one_shot_line_wrong'], True)}%; "
                  f"check lines wrong: {_fmt(t['check_line_wrong'], True)}%.", ""]
    for key, f in summary["findings"].items():
        lines.append(f"({key}) {'reproduced' if f['reproduced'] else 'not reproduced'} -- rule: {f['rule']}; "
                     f"evidence: {json.dumps(_rounded(f['evidence']))}")
    return "\n".join(lines) + "\n"


def curves(summary: dict, windows: int = 5) -> list[str]:
    """The figures' numbers: each series averaged over consecutive windows of RL steps, per arm
    (mean over seeds of each seed's window mean ± their sd)."""
    out = []
    for name, (title, pct) in FIGURES.items():
        any_arm = next(iter(summary["arms"].values()))
        steps = any_arm["steps"]
        size = max(1, math.ceil(steps / windows))
        bounds = [(lo, min(lo + size, steps)) for lo in range(0, steps, size)]
        out += ["", f"{title}{' (%)' if pct else ''}, by RL steps:", "",
                "| arm | " + " | ".join(f"{lo + 1}-{hi}" if hi > lo + 1 else f"{hi}" for lo, hi in bounds) + " |",
                "|---|" + "---|" * len(bounds)]
        for a in summary["arms"].values():
            cells = [_fmt(_mean_sd(a["windows"][name][i]), pct) for i in range(len(bounds))]
            out.append(f"| {a['label']} | " + " | ".join(cells) + " |")
    return out


def _rounded(x):
    if isinstance(x, float):
        return round(x, 4)
    if isinstance(x, (list, tuple)):
        return [_rounded(v) for v in x]
    if isinstance(x, dict):
        return {k: _rounded(v) for k, v in x.items()}
    return x


FIGURES = {
    "length": ("mean response length (tokens)", False),
    "exceed_rate": ("exceed-length rate", True),
    "accuracy": ("accuracy (sampled, train prompts)", True),
    "repetition_rate": ("responses with a repeated n-gram", True),
    "reflections": ("reflection words per response", False),
}


def figures(summary: dict, folder: Path) -> list[Path]:
    """One PNG per series: each arm's mean over seeds per RL step, the band one sd; plus
    held-out greedy accuracy at the evaluation steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, (title, _) in FIGURES.items():
        fig, ax = plt.subplots(figsize=(7, 4))
        for a in summary["arms"].values():
            pts = [(i + 1, m, s) for i, (m, s) in enumerate(a["per_step"][name]) if math.isfinite(m)]
            if not pts:
                continue
            x, m, s = zip(*pts)
            line, = ax.plot(x, m, label=a["label"], lw=1.3)
            ax.fill_between(x, [u - v for u, v in zip(m, s)], [u + v for u, v in zip(m, s)],
                            color=line.get_color(), alpha=0.15, lw=0)
        written.append(_save(fig, ax, f"{title} (mean over {len(summary['seeds'])} seeds, band: ±1 sd)",
                             folder / f"{name}.png"))
    fig, ax = plt.subplots(figsize=(7, 4))
    for a in summary["arms"].values():
        m = [v[0] for v in a["heldout"]]
        s = [v[1] for v in a["heldout"]]
        ax.errorbar(a["eval_steps"], m, yerr=s, label=a["label"], marker="o", ms=3, capsize=2, lw=1.2)
    written.append(_save(fig, ax, "held-out accuracy (greedy; mean ± sd over seeds)", folder / "heldout_accuracy.png"))
    return written


def _save(fig, ax, title: str, path: Path) -> Path:
    import matplotlib.pyplot as plt

    ax.set_xlabel("RL step")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def run(seeds: int = 3, quick: bool = False, out: str | None = None, jobs: int = 2,
        config_dir: Path = EXAMPLES) -> int:
    # Absolute, so that the runs' recorded settings (output_dir, model.path) and their reuse do
    # not depend on the folder the command starts in.
    out_dir = Path(out or ("bench/out/paper_s4-quick" if quick else "bench/out/paper_s4")).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    raw = run_experiment(out_dir, list(range(seeds)), quick, jobs, config_dir)
    (out_dir / "runs.json").write_text(json.dumps(raw) + "\n")
    summary = summarize(raw)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    text = table(summary)
    (out_dir / "table.md").write_text(text)
    paths = figures(summary, out_dir / "figures")
    print(text)
    print(f"paper_s4: {len(raw['runs'])} runs in {raw['seconds']:.0f} s; {out_dir / 'summary.json'}, "
          f"{out_dir / 'table.md'}, figures: {', '.join(p.name for p in paths)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in JOBS:
        return _job_main(argv)
    p = argparse.ArgumentParser(prog="python -m longcot.bench.paper_s4")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=None)
    p.add_argument("--jobs", type=int, default=2)
    a = p.parse_args(argv)
    return run(a.seeds, a.quick, a.out, a.jobs)


if __name__ == "__main__":
    sys.exit(main())
