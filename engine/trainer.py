"""The RL trainer. One step, top to bottom:

    rollout -> score -> experience -> token rewards -> advantages -> update -> sync

`Trainer(config).fit()` runs what `longcot train` runs: set up the task and models, an optional
SFT warm start, held-out evaluation of the initial policy, RL steps with a checkpoint every
`checkpoint.every` of them, a final evaluation, and the run folder's outputs (metrics.jsonl,
plots, summary.json, final/, checkpoints/). With `config.resume` set it continues a run folder
from its newest complete checkpoint instead.
"""

from __future__ import annotations

import copy
import datetime
import json
import math
import random
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from longcot.kernels import (
    kl_penalty,
    linear_ppo_policy_loss,
    repetition_mask,
    repetition_ratio,
    token_rewards,
)

from .algorithms import (
    NEEDS_CRITIC,
    AdvantageInputs,
    KLController,
    get_advantage,
    normalize,
    value_loss,
)
from .checkpoint import (
    CHECKPOINTS,
    CheckpointError,
    TrainingHalted,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from .config import TrainConfig, dump_config
from .data import addition
from .data.datasets import (
    DataError,
    apply_template,
    load_prompt_records,
    load_sft_records,
    resolve_dataset,
)
from .device import Precision, enable_gradient_checkpointing
from .evaluate import greedy_accuracy
from .metrics import MetricsLogger, reflection_counts, save_plots
from .models import (
    ValueModel,
    build_char_tokenizer,
    build_tiny_model,
    load_policy,
    load_reference,
    save_model,
)
from .policy_forward import (
    SequenceBatch,
    micro_batch,
    plan_micro_batches,
    response_hidden,
    response_logprobs,
    response_values,
    row_sizes,
    sequence_batch,
)
from .rewards import RewardChannel, score_responses
from .rollout import HFGenerator, Rollout, response_texts
from .sft import run_sft

# algorithm.name -> advantage estimator
ESTIMATOR_OF = {"ppo": "gae", "grpo": "grpo", "reinforce++": "reinforce++", "rloo": "rloo",
                "reinforce_baseline": "reinforce_baseline"}


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


@dataclass
class Experience:
    rollout: Rollout
    sb: SequenceBatch
    old_logp: torch.Tensor | None  # None: on-policy, the update's own log-probs are the old ones
    ref_logp: torch.Tensor | None  # None: no reference (algorithm.kl_coef = 0)
    values: torch.Tensor | None
    advantages: torch.Tensor | None = None
    returns: torch.Tensor | None = None
    # Filled by the update's forward (its first epoch): entropy, and the per-token KL when it is
    # a loss term and no old-policy forward ran.
    entropy: torch.Tensor | None = None
    kl: torch.Tensor | None = None


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
        tokenizer = build_char_tokenizer(addition.CHARSET)
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

    if data.task == "addition":
        a = data.addition
        task = addition.make_addition_task(a.digits, a.n_train, a.n_heldout, seed=cfg.seed, n_valid=cfg.sft.eval_size)

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


def validation_probe(cfg: TrainConfig, setup: Setup, generator) -> Callable[[], float] | None:
    """Greedy accuracy on the validation split, for the SFT stop; None when not configured."""
    v = setup.valid
    if cfg.sft.target_accuracy is None or not v.ids:
        return None

    def probe() -> float:
        return greedy_accuracy(generator, setup.tokenizer, v.ids, v.answers,
                               cfg.rollout.max_new_tokens, cfg.reward.verifier_timeout_s)["accuracy"]
    return probe


def new_run_dir(root: str, seed: int) -> Path:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    base = Path(root) / f"{stamp}-seed{seed}"
    path, i = base, 1
    while path.exists():
        path, i = Path(f"{base}-{i}"), i + 1
    path.mkdir(parents=True)
    return path


class PromptSampler:
    """Shuffled passes over the training prompts, seeded."""

    def __init__(self, n: int, seed: int):
        self.n, self.rng, self.order = n, random.Random(seed), []

    def take(self, k: int) -> list[int]:
        out = []
        while len(out) < k:
            if not self.order:
                self.order = list(range(self.n))
                self.rng.shuffle(self.order)
            out.append(self.order.pop())
        return out

    def state_dict(self) -> dict[str, Any]:
        version, internal, gauss = self.rng.getstate()
        return {"rng": [version, list(internal), gauss], "order": list(self.order)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        version, internal, gauss = state["rng"]
        self.rng.setstate((version, tuple(internal), gauss))
        self.order = list(state["order"])


def build_vllm_generator(cfg: TrainConfig, policy, tokenizer, run_dir: Path, pad_id: int):
    """A vLLM engine started once from the (warm-started) policy, saved to ``run_dir/rollout_init``;
    afterwards the trainer only updates its weights in place."""
    from .rollout import VLLMGenerator

    r = cfg.rollout
    path = save_model(policy, tokenizer, run_dir / "rollout_init")
    options: dict[str, Any] = {"dtype": r.vllm_dtype, "kv_cache_gib": r.vllm_kv_cache_gib, "seed": cfg.seed}
    if cfg.model.resolved_device().type == "cuda":
        options.update(gpu_memory_utilization=r.gpu_memory_utilization, sleep=r.vllm_sleep)
    else:
        options["sleep"] = False
    return VLLMGenerator(path, eos_token_id=tokenizer.eos_token_id, pad_token_id=pad_id, **options)


@dataclass
class RunState:
    """Where the run is and what it has measured so far: saved in every checkpoint (as JSON)."""

    step: int = 0  # RL steps done
    summary: dict[str, Any] = field(default_factory=dict)  # summary.json's keys known so far
    evals: list[dict[str, Any]] = field(default_factory=list)
    rl_seconds: float = 0.0
    wall_seconds: float = 0.0  # summed over the sessions of a resumed run, up to its checkpoints
    skipped_updates: int = 0  # over the whole run
    nonfinite_streak: int = 0  # consecutive steps whose every update was skipped


def _short(value: float | None, fmt: str = "{:.2f}") -> str:
    """A progress-bar number; metrics log a non-finite value as None."""
    return "nan" if value is None else fmt.format(value)


class Trainer:
    def __init__(self, config: TrainConfig):
        self.config = config

    @classmethod
    def from_models(cls, config: TrainConfig, policy: torch.nn.Module, critic: ValueModel | None = None,
                    pad_id: int = 0) -> Trainer:
        """A trainer around given models (placed on ``config.model``'s device and precision), with
        its optimisers and KL controller but no task: for calling ``experience`` and ``update``
        directly, as the step benchmark and tests do."""
        tr = cls(config)
        tr.precision = config.model.resolved_precision()
        tr.device = tr.precision.device
        tr.policy = policy.to(device=tr.device, dtype=tr.precision.param_dtype)
        tr.pad_id = pad_id
        if config.model.gradient_checkpointing:
            enable_gradient_checkpointing(policy, config.model.checkpoint_mlp_tile_tokens)
        tr.reference = tr._frozen_reference() if config.algorithm.kl_coef > 0 else None
        if critic is not None:
            critic.backbone.to(device=tr.device, dtype=tr.precision.param_dtype)
            critic.value_head.to(tr.device)
        tr._build_learners(critic)
        return tr

    # --- the run -----------------------------------------------------------------------------

    def fit(self) -> dict[str, Any]:
        cfg = self.config
        self.wall_start = time.perf_counter()
        state = self._new_run() if cfg.resume is None else self._resume(Path(cfg.resume))
        self.wall_start -= state.wall_seconds
        rl_start = time.perf_counter() - state.rl_seconds
        bar = tqdm(total=cfg.steps, initial=state.step, desc="rl", disable=not cfg.logging.progress,
                   dynamic_ncols=True)
        for step in range(state.step + 1, cfg.steps + 1):
            row = self.step(step)
            self._count_skipped_updates(state, row)
            self.log.log(row)
            bar.update(1)
            bar.set_postfix(reward=_short(row["reward/mean"]), acc=_short(row["accuracy"]),
                            len=_short(row["response_length/mean"], "{:.0f}"))
            if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:
                state.evals.append(self.evaluate(step))
            state.step, state.rl_seconds = step, time.perf_counter() - rl_start
            if state.nonfinite_streak >= cfg.optim.max_nonfinite_steps:
                bar.close()
                self._halt(state)
            if cfg.checkpoint.every and step % cfg.checkpoint.every == 0 and step < cfg.steps:
                self._save_checkpoint(state)
            if cfg.seconds is not None and state.rl_seconds > cfg.seconds:
                break
        bar.close()
        # Before the final evaluation, so that a run resumed with more steps evaluates only where
        # an uninterrupted run of those steps would.
        self._save_checkpoint(state)
        state.evals.append(self.evaluate(state.step))
        return self._finish(state)

    def _new_run(self) -> RunState:
        """A new run folder: task and policy, the SFT warm start, the frozen reference, the RL
        optimisers, and the evaluation of the initial policy."""
        cfg = self.config
        torch.manual_seed(cfg.seed)
        self.run_dir = new_run_dir(cfg.output_dir, cfg.seed)
        print(f"longcot: run folder {self.run_dir}", flush=True)
        dump_config(cfg, self.run_dir / "config.yaml")
        self.log = MetricsLogger(self.run_dir, cfg.logging.tensorboard)
        s = self._use_task(setup_task(cfg))
        state = RunState(summary={"run_dir": str(self.run_dir), "skipped_prompts": s.skipped_prompts})

        self.generator = self._hf_generator()
        if cfg.sft.enabled and s.sft_examples:
            state.summary.update(run_sft(self.policy, s.sft_examples, cfg.sft, self.pad_id, cfg.seed,
                                         cfg.logging.progress, self.log.log, validation_probe(cfg, s, self.generator),
                                         self.precision))
        if cfg.rollout.resolved_backend() == "vllm":
            self.generator = build_vllm_generator(cfg, self.policy, self.tokenizer, self.run_dir, self.pad_id)
        # With no KL term the reference is neither built nor run.
        self.reference = self._frozen_reference() if cfg.algorithm.kl_coef > 0 else None
        if self.reference is not None:
            # Saved once per run, not in every checkpoint: it never changes after the warm
            # start, and for a real model it is as large as the policy.
            save_model(self.reference, self.tokenizer, self.run_dir / "reference")
        critic = None
        if ESTIMATOR_OF[cfg.algorithm.name] in NEEDS_CRITIC:
            p = self.precision
            critic = (ValueModel.from_pretrained(cfg.model.critic_path, dtype=p.param_dtype, device=p.device)
                      if cfg.model.critic_path else ValueModel.from_causal_lm(self.policy))
        self._build_learners(critic)

        state.evals.append(self.evaluate(0))
        state.summary["init_accuracy"] = state.evals[0]["accuracy"]
        return state

    def _resume(self, run_dir: Path) -> RunState:
        """The run folder as of its newest complete checkpoint: no SFT, no initial evaluation;
        metrics.jsonl loses the rows logged after the checkpoint (they will be logged again)."""
        cfg = self.config
        path = latest_checkpoint(run_dir)
        if path is None:
            raise CheckpointError(f"resume: {run_dir}: no complete checkpoint in {run_dir / CHECKPOINTS}")
        saved = load_checkpoint(path)
        print(f"longcot: resuming run folder {run_dir} from {path.name}", flush=True)
        self.run_dir = run_dir
        self._use_task(setup_task(cfg, policy_path=path / "policy"))
        p = self.precision
        self.reference = None
        if cfg.algorithm.kl_coef > 0:
            if not (run_dir / "reference").is_dir():
                raise CheckpointError(f"{run_dir}: no reference/ (the run started with algorithm.kl_coef=0), "
                                      f"but algorithm.kl_coef={cfg.algorithm.kl_coef} needs the reference policy")
            self.reference = load_reference(run_dir / "reference", dtype=p.compute_dtype, device=p.device)[0]
        critic = None
        if ESTIMATOR_OF[cfg.algorithm.name] in NEEDS_CRITIC:
            if not (path / "critic").is_dir():
                raise CheckpointError(f"{path}: no critic/ (saved by a run without one), but "
                                      f"algorithm.name={cfg.algorithm.name} needs a critic")
            critic = ValueModel.from_pretrained(path / "critic", dtype=p.param_dtype, device=p.device)
        self._build_learners(critic)
        self.optimizer.load_state_dict(saved.optimizers["optimizer"])
        if self.critic_optimizer is not None:
            self.critic_optimizer.load_state_dict(saved.optimizers["critic_optimizer"])
        # load_state_dict also brings back the saved hyper-parameters; the config (with its
        # overrides) decides them, the checkpoint only the moments and step counts
        for opt, settings in zip((self.optimizer, self.critic_optimizer), self.optim_settings):
            for group in opt.param_groups if opt is not None else ():
                group.update(settings)
        if cfg.algorithm.kl_target is not None:  # an adaptive coefficient is state; a fixed one is config
            self.kl_ctl.coef = saved.state["kl_controller"]["coef"]
        self.sampler.load_state_dict(saved.state["prompt_sampler"])
        self.update_gen.set_state(saved.rng["update_gen"])
        torch.set_rng_state(saved.rng["torch"])

        self.generator = self._hf_generator()
        if cfg.rollout.resolved_backend() == "vllm":
            self.generator = build_vllm_generator(cfg, self.policy, self.tokenizer, self.run_dir, self.pad_id)
        # The run's config as continued (e.g. more steps), without `resume`: it describes the job.
        dump_config(replace(cfg, resume=None), run_dir / "config.yaml")
        self.log = MetricsLogger(run_dir, cfg.logging.tensorboard, keep_rows=saved.state["metrics_rows"])
        state = RunState(**saved.state["progress"])
        state.summary.setdefault("resumed_from_steps", []).append(saved.step)
        return state

    def _use_task(self, s: Setup) -> Setup:
        self.policy, self.tokenizer, self.setup = s.policy, s.tokenizer, s
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        self.precision: Precision = self.config.model.resolved_precision()
        self.device = self.precision.device
        self.sampler = PromptSampler(len(s.train.ids), self.config.seed)
        return s

    def _frozen_reference(self) -> torch.nn.Module:
        """A frozen copy of the policy in the compute dtype: it never trains, so it needs no fp32
        master copy."""
        return copy.deepcopy(self.policy).to(self.precision.compute_dtype).eval().requires_grad_(False)

    def _hf_generator(self) -> HFGenerator:
        # The sampler's entropy stands in for a forward over the responses the update skips; it
        # is the trainer's own number only where the sampler's log-probs are (fp32).
        a = self.config.algorithm
        may_skip = ESTIMATOR_OF[a.name] not in NEEDS_CRITIC and a.kl_in != "loss" and a.entropy_coef == 0
        return HFGenerator(self.policy, self.tokenizer.eos_token_id, self.pad_id, precision=self.precision,
                           with_entropy=may_skip and self.precision.name == "fp32")

    def _build_learners(self, critic: ValueModel | None) -> None:
        """The critic, optimisers, KL controller and RL random streams, as at RL step 0."""
        cfg = self.config
        self.critic = critic
        if critic is not None and cfg.model.gradient_checkpointing:
            enable_gradient_checkpointing(critic, cfg.model.checkpoint_mlp_tile_tokens)
        # (policy, critic) hyper-parameters besides the learning rates, which each step sets
        self.optim_settings = (dict(betas=cfg.optim.betas, weight_decay=cfg.optim.weight_decay),
                               dict(betas=cfg.optim.betas))
        self.optimizer = torch.optim.AdamW(self.policy.parameters(), lr=cfg.optim.lr, **self.optim_settings[0])
        self.critic_optimizer = None if self.critic is None else torch.optim.AdamW(
            self.critic.parameters(), lr=cfg.optim.critic_lr, **self.optim_settings[1])
        self.kl_ctl = KLController(cfg.algorithm.kl_coef, cfg.algorithm.kl_target, cfg.algorithm.kl_horizon)
        self.update_gen = torch.Generator().manual_seed(cfg.seed + 1)

    def _save_checkpoint(self, state: RunState) -> Path:
        # No learning-rate scheduler to save: the warm-up is a function of the step.
        state.wall_seconds = time.perf_counter() - self.wall_start
        optimizers = {"optimizer": self.optimizer}
        if self.critic_optimizer is not None:
            optimizers["critic_optimizer"] = self.critic_optimizer
        return save_checkpoint(
            self.run_dir, state.step, policy=self.policy, tokenizer=self.tokenizer, critic=self.critic,
            optimizers=optimizers,
            # The global RNG is saved though no RL step draws from it today, so that one that
            # does later stays reproducible across a resume.
            rng={"torch": torch.get_rng_state(), "update_gen": self.update_gen.get_state()},
            state={"progress": asdict(state), "kl_controller": self.kl_ctl.state_dict(),
                   "prompt_sampler": self.sampler.state_dict(), "metrics_rows": len(self.log.rows)},
            keep=self.config.checkpoint.keep,
        )

    def _count_skipped_updates(self, state: RunState, row: dict[str, Any]) -> None:
        state.skipped_updates += row["skipped_updates"]
        row["skipped_updates/total"] = state.skipped_updates
        all_skipped = row["updates"] > 0 and row["skipped_updates"] == row["updates"]
        state.nonfinite_streak = state.nonfinite_streak + 1 if all_skipped else 0

    def _halt(self, state: RunState) -> None:
        path = self._save_checkpoint(state)
        self._close()
        raise TrainingHalted(
            f"stopped at RL step {state.step}: {state.nonfinite_streak} steps in a row had a non-finite "
            f"loss or gradient in every update (optim.max_nonfinite_steps={self.config.optim.max_nonfinite_steps}); "
            f"checkpoint in {path}"
        )

    def _close(self) -> None:
        close = getattr(self.generator, "close", None)
        if close is not None:
            close()
        self.log.close()

    def _finish(self, state: RunState) -> dict[str, Any]:
        cfg = self.config
        summary = {**state.summary, "final_accuracy": state.evals[-1]["accuracy"], "steps": state.step,
                   "rl_seconds": state.rl_seconds, "evals": state.evals,
                   "skipped_updates": state.skipped_updates}
        save_model(self.policy, self.tokenizer, self.run_dir / "final")
        self._close()
        if cfg.logging.plots:
            save_plots(self.log.rows, self.run_dir, state.evals)
        summary["wall_seconds"] = time.perf_counter() - self.wall_start
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        print(f"longcot: held-out accuracy {summary['init_accuracy']:.3f} -> {summary['final_accuracy']:.3f} "
              f"in {summary['wall_seconds']:.0f} s; run folder {self.run_dir}", flush=True)
        return summary

    def evaluate(self, step: int) -> dict[str, Any]:
        h = self.setup.heldout
        result = greedy_accuracy(self.generator, self.tokenizer, h.ids, h.answers,
                                 self.config.rollout.max_new_tokens, self.config.reward.verifier_timeout_s)
        result["step"] = step
        self.log.log({"phase": "eval", **result})
        return result

    # --- one RL step -------------------------------------------------------------------------

    def step(self, step: int) -> dict[str, Any]:
        cfg, times = self.config, {}
        t = time.perf_counter()
        idx = self.sampler.take(cfg.rollout.prompts_per_step)
        r = cfg.rollout
        # Only the RL rollouts stop looping responses early; evaluations decode to the end.
        stop = {"stop_on_repetition": (r.stop_on_repetition.n, r.stop_on_repetition.min_repeats)} \
            if r.stop_on_repetition.enabled else {}
        rollout = self.generator.generate([self.setup.train.ids[i] for i in idx], r.samples_per_prompt,
                                          r.temperature, r.top_p, r.max_new_tokens, seed=cfg.seed * 1_000_003 + step,
                                          **stop)
        rollout = rollout.to(self.device)  # a no-op for HF; vLLM hands back host tensors
        answers = [self.setup.train.answers[idx[i]] for i in rollout.prompt_index.tolist()]
        times["rollout"], t = time.perf_counter() - t, time.perf_counter()

        texts = response_texts(self.tokenizer, rollout)
        channels = [RewardChannel(c.reward, c.gamma, dict(c.params)) for c in cfg.reward.channels]
        scores = score_responses(texts, answers, rollout.tokens, rollout.lengths, rollout.truncated,
                                 r.max_new_tokens, channels, cfg.reward.verifier_timeout_s)
        times["scoring"], t = time.perf_counter() - t, time.perf_counter()

        exp = self.experience(rollout)
        times["experience"], t = time.perf_counter() - t, time.perf_counter()

        a = cfg.algorithm
        mask = exp.sb.mask
        kl_coef = self.kl_ctl.coef if a.kl_in == "reward" else 0.0
        kl = None
        if exp.old_logp is not None and exp.ref_logp is not None:
            rewards, kl = token_rewards(scores.sparse, scores.dense, exp.old_logp, exp.ref_logp, mask, kl_coef,
                                        a.kl_estimator, a.kl_clamp)
        else:  # no KL in the reward (the old-policy forward is skipped only then)
            zeros = torch.zeros(mask.shape, dtype=torch.float32, device=self.device)
            rewards, _ = token_rewards(scores.sparse, scores.dense, zeros, zeros, mask, 0.0, a.kl_estimator)
        estimator = ESTIMATOR_OF[a.name]
        adv, returns = get_advantage(estimator)(AdvantageInputs(
            rewards, mask, scores.gammas, a.lam, rollout.prompt_index, exp.values, a.grpo_std))
        if a.normalize_advantages and estimator in ("gae", "rloo"):
            adv = normalize(adv, mask)
        exp.advantages, exp.returns = adv, returns
        warm = min(1.0, step / cfg.optim.warmup_steps) if cfg.optim.warmup_steps else 1.0
        for opt, lr in ((self.optimizer, cfg.optim.lr), (self.critic_optimizer, cfg.optim.critic_lr)):
            for group in opt.param_groups if opt is not None else ():
                group["lr"] = lr * warm
        stats = self.update(exp)
        times["update"], t = time.perf_counter() - t, time.perf_counter()

        self.generator.update_weights(self.policy)
        times["weight_sync"] = time.perf_counter() - t

        kl = exp.kl if kl is None else kl  # None: no reference, so no KL to report
        if kl is not None:
            self.kl_ctl.update(kl.sum(-1).mean().item(), len(rollout))
        return self.step_metrics(step, rollout, texts, scores, rewards, kl, exp, stats, times)

    def micro_batches(self, sb: SequenceBatch, rows: list[int], sizes: tuple[list[int], list[int]],
                      experience: bool = False) -> list[tuple[torch.Tensor, SequenceBatch]]:
        """(row indices on the device, the rows' SequenceBatch) per micro-batch of ``rows``: by
        the token budget (sorted by length, each trimmed to its own width), or in count mode
        ``micro_batch_size`` rows in the given order at the batch's width. ``sizes``: the batch's
        ``row_sizes``."""
        a = self.config.algorithm
        budget = a.max_tokens_per_micro_batch
        if experience and a.max_tokens_per_experience_batch is not None:
            budget = a.max_tokens_per_experience_batch
        plan = plan_micro_batches(sizes[0], rows, budget, a.micro_batch_size)
        return [(torch.tensor(r, device=sb.tokens.device), micro_batch(sb, r, budget is not None, sizes))
                for r in plan]

    @torch.no_grad()
    def experience(self, rollout: Rollout) -> Experience:
        """The forwards the update needs before it starts: old-policy log-probs when they are
        recomputed (at the sampling temperature, so PPO's ratio starts at 1 up to round-off; see
        `algorithm.old_logprobs`), reference log-probs when there is a KL term, critic values."""
        sb = sequence_batch(rollout.prompts, rollout.tokens, rollout.lengths, self.pad_id)
        temp = self.config.rollout.temperature
        source = self.config.algorithm.old_logprobs_source(len(rollout), self._sampler_logprobs_exact())
        models = {"old": self.policy if source == "recompute" else None, "ref": self.reference, "val": self.critic}
        out = {k: torch.zeros(sb.tokens.shape, dtype=torch.float32, device=self.device)
               for k, model in models.items() if model is not None}
        self.policy.eval()
        if out:
            for rows, micro in self.micro_batches(sb, list(range(len(sb))), row_sizes(sb), experience=True):
                steps = micro.tokens.shape[1]
                if "old" in out:
                    out["old"][rows, :steps] = response_logprobs(self.policy, micro, temp, precision=self.precision)[0]
                if "ref" in out:
                    out["ref"][rows, :steps] = response_logprobs(self.reference, micro, temp)[0]
                if "val" in out:
                    out["val"][rows, :steps] = response_values(self.critic, micro, self.precision)
        if source == "rollout":
            out["old"] = rollout.logprobs.to(torch.float32) * sb.mask
        return Experience(rollout, sb, out.get("old"), out.get("ref"), out.get("val"))

    def _sampler_logprobs_exact(self) -> bool:
        """Whether the rollouts' log-probs are the trainer's: the HF loop samples from the policy
        module itself, and in fp32 its cached decode matches a full forward to ~1e-5 in the ratio
        (README). vLLM's engine, or bf16 compute (cached decode and full forward round apart),
        are recomputed instead."""
        generator = getattr(self, "generator", None)
        return (isinstance(generator, HFGenerator) and generator.model is self.policy
                and self.precision.name == "fp32")

    def update(self, exp: Experience) -> dict[str, float]:
        """PPO epochs over shuffled mini-batches, accumulating gradients over micro-batches.

        Every term is weighted by its micro-batch's share of the mini-batch (tokens for token
        means, responses for sequence means), so the gradients do not depend on how a mini-batch
        is cut. Statistics stay on the device until the end of the step. The first epoch's
        forward also gives the step's entropy (and its KL when no old-policy forward ran).
        """
        cfg, a = self.config, self.config.algorithm
        temp = cfg.rollout.temperature
        mask = exp.sb.mask
        sizes = row_sizes(exp.sb)
        kl_in_loss = a.kl_in == "loss" and exp.ref_logp is not None
        # A constant, not a micro-batch's width: seq-mean-token-sum-norm must not depend on the cut.
        agg_norm = a.loss_agg_norm if a.loss_agg_norm is not None else cfg.rollout.max_new_tokens
        exp.entropy = torch.zeros(mask.shape, dtype=torch.float32, device=self.device)
        if kl_in_loss and exp.old_logp is None:
            exp.kl = torch.zeros(mask.shape, dtype=torch.float32, device=self.device)
        self.policy.train()
        if self.critic is not None:
            self.critic.train()
        names = ("pg_loss", "clip_frac", "approx_kl", "value_loss", "value_clip_frac")
        per_minibatch: list[torch.Tensor] = []
        norms: dict[str, list[torch.Tensor]] = {"grad_norm": [], "critic_grad_norm": []}
        updates = skipped = 0
        live = self._rows_with_gradient(exp, kl_in_loss)
        for epoch in range(a.epochs):
            perm = torch.randperm(len(exp.rollout), generator=self.update_gen)
            for rows in perm.split(a.mini_batch_size):
                rows = rows.tolist()
                tokens = mask[rows].sum().clamp_min(1)
                self.optimizer.zero_grad(set_to_none=True)
                if self.critic_optimizer is not None:
                    self.critic_optimizer.zero_grad(set_to_none=True)
                finite = torch.ones(2, dtype=torch.bool, device=self.device)  # policy, critic
                stats = torch.zeros(len(names), dtype=torch.float32, device=self.device)
                # The shares keep the whole mini-batch's denominators: a skipped row's terms are 0.
                forward_rows = rows if live is None else [r for r in rows if live[r]]
                stat_tokens = tokens if live is None else mask[forward_rows].sum().clamp_min(1)
                if epoch == 0 and len(forward_rows) < len(rows):
                    self._entropy_of_rows(exp, [r for r in rows if not live[r]], sizes)
                for micro, sb in self.micro_batches(exp.sb, forward_rows, sizes) if forward_rows else ():
                    steps = sb.tokens.shape[1]
                    token_share = sb.mask.sum() / tokens
                    stat_share = sb.mask.sum() / stat_tokens
                    share = token_share if a.loss_agg == "token-mean" else len(micro) / len(rows)
                    hidden, weight, sb = response_hidden(self.policy, sb, self.precision)
                    old = None if exp.old_logp is None else exp.old_logp[micro, :steps]
                    loss, st = linear_ppo_policy_loss(
                        hidden, weight, sb.tokens, old, exp.advantages[micro, :steps],
                        sb.mask, temp, a.clip_low, a.clip_high, a.dual_clip, a.loss_agg, return_entropy=True,
                        ratio=a.ratio, agg_norm=agg_norm)
                    del hidden  # the loss keeps the valid rows it needs; the rest can go now
                    logp, ent = st["logp"], st["entropy"]
                    if epoch == 0:
                        exp.entropy[micro, :steps] = ent.detach()
                    stats[0] += loss.detach() * share
                    stats[1] += st["clip_frac"] * stat_share
                    stats[2] += st["approx_kl"] * stat_share
                    loss = loss * share
                    # Token means over the whole mini-batch, whatever the policy loss aggregation.
                    if kl_in_loss:
                        kl = kl_penalty(logp, exp.ref_logp[micro, :steps], a.kl_estimator, a.kl_clamp)
                        loss = loss + self.kl_ctl.coef * (kl * sb.mask).sum() / tokens
                        if epoch == 0 and exp.kl is not None:
                            exp.kl[micro, :steps] = (kl * sb.mask).detach()
                    if a.entropy_coef > 0:
                        loss = loss - a.entropy_coef * (ent * sb.mask).sum() / tokens
                    finite[0] &= torch.isfinite(loss)
                    loss.backward()
                    if self.critic is not None:
                        values = response_values(self.critic, sb, self.precision)
                        vloss, vfrac = value_loss(values, exp.values[micro, :steps], exp.returns[micro, :steps],
                                                  sb.mask, a.value_clip, num_tokens=tokens)
                        finite[1] &= torch.isfinite(vloss)
                        (a.vf_coef * vloss).backward()
                        stats[3] += vloss.detach()
                        stats[4] += vfrac * token_share
                per_minibatch.append(stats)
                if not forward_rows:  # Adam still steps on a zero gradient (moments, decay)
                    for p in self.policy.parameters():
                        p.grad = torch.zeros_like(p) if p.requires_grad else None
                learners = [(self.policy, self.optimizer, "grad_norm")]
                if self.critic is not None:
                    learners.append((self.critic, self.critic_optimizer, "critic_grad_norm"))
                clip = cfg.optim.grad_clip
                grad_norms = [torch.nn.utils.clip_grad_norm_(m.parameters(), clip if clip is not None else float("inf"))
                              for m, _, _ in learners]
                # A non-finite loss or gradient norm skips that optimiser's step, so its moments and
                # step count stay as they were. One host sync per mini-batch.
                ok = (finite[:len(learners)] & torch.isfinite(torch.stack(grad_norms))).tolist()
                for (_, optimizer, key), norm, good in zip(learners, grad_norms, ok):
                    updates += 1
                    if good:
                        norms[key].append(norm.detach().float())
                        optimizer.step()
                    else:
                        optimizer.zero_grad(set_to_none=True)
                        skipped += 1
        self.policy.eval()
        means = torch.stack(per_minibatch).mean(0)
        norm_means = {k: torch.stack(v).mean() for k, v in norms.items() if v}
        values = torch.cat([means, torch.stack(list(norm_means.values())) if norm_means else means[:0]]).tolist()
        out = {k: v for k, v in zip(names, values) if self.critic is not None or not k.startswith("value")}
        out.update(zip(norm_means, values[len(names):]))
        out["updates"], out["skipped_updates"] = updates, skipped
        return out

    def _rows_with_gradient(self, exp: Experience, kl_in_loss: bool) -> list[bool] | None:
        """Per row, whether it can move the policy; None when every row must be forwarded.

        Without a critic, a KL loss term or an entropy bonus, a response whose advantage is 0 at
        every token (a GRPO/RLOO group whose responses all scored the same) adds exactly 0 to the
        clipped policy loss and to its gradient, whatever its ratio: the update skips its forward
        and backward. The denominators keep it, so the update is the same (a test compares)."""
        a = self.config.algorithm
        if self.critic is not None or kl_in_loss or a.entropy_coef > 0:
            return None
        return (exp.advantages != 0).any(-1).tolist()

    @torch.no_grad()
    def _entropy_of_rows(self, exp: Experience, rows: list[int], sizes) -> None:
        """The logged entropy of rows the update skips: the sampler's, where it is the trainer's
        number (`_sampler_logprobs_exact`), else a forward without a backward."""
        if exp.rollout.entropy is not None and self._sampler_logprobs_exact():
            index = torch.tensor(rows, device=self.device)
            exp.entropy[index] = exp.rollout.entropy[index] * exp.sb.mask[index]
            return
        temp = self.config.rollout.temperature
        for micro, sb in self.micro_batches(exp.sb, rows, sizes, experience=True):
            ent = response_logprobs(self.policy, sb, temp, with_entropy=True, precision=self.precision)[1]
            exp.entropy[micro, :sb.tokens.shape[1]] = ent

    def step_metrics(self, step, rollout, texts, scores, rewards, kl, exp, stats, times) -> dict[str, Any]:
        mask = exp.sb.mask
        valid = mask.sum().clamp_min(1)
        lengths = rollout.lengths.float()
        rep_n = next((int(c.params.get("n", 40)) for c in self.config.reward.channels if c.reward == "repetition"), 40)
        # Computed where the step's tensors live and read back in one host sync.
        on_device = {
            "reward/mean": rewards.sum(dim=(1, 2)).mean(),
            "reward/score": (scores.sparse.sum(-1) + scores.dense.sum(dim=(1, 2))).mean(),
            "accuracy": scores.correct.float().mean(),
            "response_length/mean": lengths.mean(),
            "response_length/max": lengths.max(),
            "exceed_rate": rollout.truncated.float().mean(),
            "repetition_rate": repetition_mask(rollout.tokens, rollout.lengths, rep_n).any(-1).float().mean(),
            "repetition_ratio": repetition_ratio(rollout.tokens, rollout.lengths, rep_n).mean(),
            "entropy": (exp.entropy * mask).sum() / valid,
            "generated": lengths.sum(),
        }
        if rollout.repetition_stop is not None:  # stopped for looping: truncated, not over the limit
            looped = rollout.repetition_stop
            on_device["exceed_rate"] = (rollout.truncated & ~looped).float().mean()
            on_device["stop/repetition"] = looped.float().mean()
            on_device["stop/tokens_saved"] = ((self.config.rollout.max_new_tokens - lengths) * looped).sum()
        if kl is not None:  # absent, not 0, without a reference
            on_device["kl"] = kl.sum() / valid
        device = rewards.device
        read = dict(zip(on_device, torch.stack([v.to(device=device, dtype=torch.float32)
                                                for v in on_device.values()]).tolist()))
        generated = read.pop("generated")
        row: dict[str, Any] = {
            "phase": "rl",
            "step": step,
            **read,
            "kl_coef": self.kl_ctl.coef,
            "lr": self.optimizer.param_groups[0]["lr"],
            "verifier_timeouts": scores.timeouts,
            "tokens_per_second": generated / max(times["rollout"], 1e-9),
            **stats,
            **reflection_counts(texts),
        }
        row.update({f"time/{k}": v for k, v in times.items()})
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
