"""The RL trainer. One step, top to bottom:

    rollout -> score -> experience -> token rewards -> advantages -> update -> sync

`Trainer(config).fit()` runs what `longcot train` runs: set up the task and models, an optional
SFT warm start, held-out evaluation of the initial policy, RL steps with a checkpoint every
`checkpoint.every` of them, a final evaluation, and the run folder's outputs (metrics.jsonl,
plots, summary.json, final/, checkpoints/). With `config.resume` set it continues a run folder
from its newest complete checkpoint instead.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import time
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
    load_full_optimizer_state,
    load_sharded_state,
    save_checkpoint,
    save_sharded_checkpoint,
)
from .config import TrainConfig, dump_config
from .device import Precision, enable_gradient_checkpointing
from .distributed import (
    World,
    close_world,
    full_copy,
    grad_norm_value,
    init_world,
    save_full_model,
    shard,
)
from .evaluate import greedy_accuracy
from .metrics import MetricsLogger, reflection_counts, save_plots
from .models import (
    ValueModel,
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
from .task import Setup, new_run_dir, setup_task, validation_probe

# How step metrics combine over data-parallel ranks (the rest are per-response means).
_TOKEN_MEANS = {"entropy", "kl"}
_SUMS = {"generated", "stop/tokens_saved"}
_MAXIMA = {"response_length/max"}

# algorithm.name -> advantage estimator
ESTIMATOR_OF = {"ppo": "gae", "grpo": "grpo", "reinforce++": "reinforce++", "rloo": "rloo",
                "reinforce_baseline": "reinforce_baseline"}


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


def build_vllm_generator(cfg: TrainConfig, policy, tokenizer, run_dir: Path, pad_id: int, world: World | None = None):
    """A vLLM engine started once from the (warm-started) policy, saved to ``run_dir/rollout_init``;
    afterwards the trainer only updates its weights in place. On several processes every rank
    starts its own engine (vLLM's ``external_launcher``: inside the torchrun process, one
    engine per rank, tensor-parallel size 1) and samples its share of each step's prompts."""
    from .rollout import VLLMGenerator

    world = world or World()
    r = cfg.rollout
    path = run_dir / "rollout_init"
    save_full_model(policy, tokenizer, path, world)
    options: dict[str, Any] = {"dtype": r.vllm_dtype, "kv_cache_gib": r.vllm_kv_cache_gib, "seed": cfg.seed}
    if world.distributed:
        options["distributed_executor_backend"] = "external_launcher"
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
        tr.world = World()
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
        """The whole run, on this process and the others of its torchrun world (if any)."""
        self.world = init_world(self.config.model.resolved_device())
        try:
            self.config.check_world(self.world.size)
            return self._fit()
        finally:
            close_world()

    def _fit(self) -> dict[str, Any]:
        cfg = self.config
        self.wall_start = time.perf_counter()
        state = self._new_run() if cfg.resume is None else self._resume(Path(cfg.resume))
        if (cfg.resume is not None and cfg.eval_every and 0 < state.step < cfg.steps
                and state.step % cfg.eval_every == 0 and all(e["step"] != state.step for e in state.evals)):
            # A run given more steps than it ended with: its last checkpoint precedes its final
            # evaluation, so the periodic one an uninterrupted run makes at this step is made now.
            state.evals.append(self.evaluate(state.step))
        self.wall_start -= state.wall_seconds
        rl_start = time.perf_counter() - state.rl_seconds
        bar = tqdm(total=cfg.steps, initial=state.step, desc="rl", dynamic_ncols=True,
                   disable=not (cfg.logging.progress and self.world.main))
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
            if cfg.seconds is not None and self.world.max(torch.tensor(int(state.rl_seconds > cfg.seconds))):
                break  # on every rank at the same step
        bar.close()
        # Before the final evaluation, so that a run resumed with more steps evaluates only where
        # an uninterrupted run of those steps would.
        self._save_checkpoint(state)
        state.evals.append(self.evaluate(state.step))
        return self._finish(state)

    def _new_run(self) -> RunState:
        """A new run folder: task and policy, the SFT warm start, the frozen reference, the RL
        optimisers, and the evaluation of the initial policy."""
        cfg, world = self.config, self.world
        torch.manual_seed(cfg.seed)
        self.run_dir = world.broadcast(new_run_dir(cfg.output_dir, cfg.seed) if world.main else None)
        if world.main:
            print(f"longcot: run folder {self.run_dir}", flush=True)
            dump_config(cfg, self.run_dir / "config.yaml")
        self.log = MetricsLogger(self.run_dir, cfg.logging.tensorboard, write=world.main)
        s = self._use_task(setup_task(cfg))
        state = RunState(summary={"run_dir": str(self.run_dir), "skipped_prompts": s.skipped_prompts})

        self.generator = self._hf_generator()
        if cfg.sft.enabled and s.sft_examples:
            state.summary.update(run_sft(self.policy, s.sft_examples, cfg.sft, self.pad_id, cfg.seed,
                                         cfg.logging.progress and world.main, self.log.log,
                                         validation_probe(cfg, s, self._greedy), self.precision, world))
        if cfg.rollout.resolved_backend() == "vllm":
            self.generator = build_vllm_generator(cfg, self.policy, self.tokenizer, self.run_dir, self.pad_id, world)
        # With no KL term the reference is neither built nor run.
        self.reference = self._frozen_reference() if cfg.algorithm.kl_coef > 0 else None
        if self.reference is not None and world.main:
            # Saved once per run, not in every checkpoint: it never changes after the warm
            # start, and for a real model it is as large as the policy.
            save_model(self.reference, self.tokenizer, self.run_dir / "reference")
        critic = None
        if ESTIMATOR_OF[cfg.algorithm.name] in NEEDS_CRITIC:
            p = self.precision
            critic = (ValueModel.from_pretrained(cfg.model.critic_path, dtype=p.param_dtype, device=p.device)
                      if cfg.model.critic_path else ValueModel.from_causal_lm(full_copy(self.policy)))
            if world.distributed:
                shard(critic, cfg.distributed.reshard_after_forward, p.name == "bf16-mixed")
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
        world = self.world
        if world.main:
            print(f"longcot: resuming run folder {run_dir} from {path.name}", flush=True)
        self.run_dir = run_dir
        # A sharded checkpoint's weights are loaded into the initial models below, once sharded.
        self._use_task(setup_task(cfg, policy_path=None if saved.sharded else path / "policy"))
        p = self.precision
        self.reference = None
        if cfg.algorithm.kl_coef > 0:
            if not (run_dir / "reference").is_dir():
                raise CheckpointError(f"{run_dir}: no reference/ (the run started with algorithm.kl_coef=0), "
                                      f"but algorithm.kl_coef={cfg.algorithm.kl_coef} needs the reference policy")
            self.reference = load_reference(run_dir / "reference", dtype=p.compute_dtype, device=p.device)[0]
        critic = None
        if ESTIMATOR_OF[cfg.algorithm.name] in NEEDS_CRITIC:
            if "critic" not in saved.models:
                raise CheckpointError(f"{path}: no critic (saved by a run without one), but "
                                      f"algorithm.name={cfg.algorithm.name} needs a critic")
            critic = (ValueModel.from_causal_lm(full_copy(self.policy)) if saved.sharded else
                      ValueModel.from_pretrained(path / "critic", dtype=p.param_dtype, device=p.device))
            if world.distributed:
                shard(critic, cfg.distributed.reshard_after_forward, p.name == "bf16-mixed")
        self._build_learners(critic)
        if saved.sharded:
            load_sharded_state(path, *self._checkpointed())
        elif world.distributed:
            load_full_optimizer_state(self.policy, self.optimizer, saved.optimizers["optimizer"])
            if self.critic_optimizer is not None:
                load_full_optimizer_state(self.critic, self.critic_optimizer, saved.optimizers["critic_optimizer"])
        else:
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
            self.generator = build_vllm_generator(cfg, self.policy, self.tokenizer, self.run_dir, self.pad_id, world)
        # The run's config as continued (e.g. more steps), without `resume`: it describes the job.
        if world.main:
            dump_config(replace(cfg, resume=None), run_dir / "config.yaml")
        self.log = MetricsLogger(run_dir, cfg.logging.tensorboard, keep_rows=saved.state["metrics_rows"],
                                 write=world.main)
        state = RunState(**saved.state["progress"])
        state.summary.setdefault("resumed_from_steps", []).append(saved.step)
        return state

    def _sampling_weights(self):
        """The HF loop samples from the policy module itself: its full weights for the duration.
        A vLLM engine has its own copy (updated after each step)."""
        return self.world.unsharded(self.policy) if isinstance(self.generator, HFGenerator) else contextlib.nullcontext()

    def _use_task(self, s: Setup) -> Setup:
        self.policy, self.tokenizer, self.setup = s.policy, s.tokenizer, s
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        self.precision: Precision = self.config.model.resolved_precision()
        self.device = self.precision.device
        if self.world.distributed:
            shard(self.policy, self.config.distributed.reshard_after_forward, self.precision.name == "bf16-mixed")
        self.sampler = PromptSampler(len(s.train.ids), self.config.seed)
        return s

    def _frozen_reference(self) -> torch.nn.Module:
        """A frozen copy of the policy in the compute dtype: it never trains, so it needs no fp32
        master copy."""
        return full_copy(self.policy).to(self.precision.compute_dtype).eval().requires_grad_(False)

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
        # The global RNG is saved though no RL step draws from it today, so that one that does
        # later stays reproducible across a resume.
        rng = {"torch": torch.get_rng_state(), "update_gen": self.update_gen.get_state()}
        trainer = {"progress": asdict(state), "kl_controller": self.kl_ctl.state_dict(),
                   "prompt_sampler": self.sampler.state_dict(), "metrics_rows": len(self.log.rows)}
        keep = self.config.checkpoint.keep
        if self.world.distributed:
            models, optimizers = self._checkpointed()
            return save_sharded_checkpoint(self.run_dir, state.step, self.world, models=models,
                                           optimizers=optimizers, rng=rng, state=trainer, keep=keep)
        optimizers = {"optimizer": self.optimizer}
        if self.critic_optimizer is not None:
            optimizers["critic_optimizer"] = self.critic_optimizer
        return save_checkpoint(self.run_dir, state.step, policy=self.policy, tokenizer=self.tokenizer,
                               critic=self.critic, optimizers=optimizers, rng=rng, state=trainer, keep=keep)

    def _checkpointed(self) -> tuple[dict[str, torch.nn.Module], dict[str, tuple[str, torch.optim.Optimizer]]]:
        """The trained models and their optimisers, by the names a sharded checkpoint uses."""
        models: dict[str, torch.nn.Module] = {"policy": self.policy}
        optimizers = {"optimizer": ("policy", self.optimizer)}
        if self.critic is not None:
            models["critic"] = self.critic
            optimizers["critic_optimizer"] = ("critic", self.critic_optimizer)
        return models, optimizers

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
        save_full_model(self.policy, self.tokenizer, self.run_dir / "final", self.world)
        self._close()
        summary["wall_seconds"] = time.perf_counter() - self.wall_start
        if not self.world.main:
            return summary
        if cfg.logging.plots:
            save_plots(self.log.rows, self.run_dir, state.evals)
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        print(f"longcot: held-out accuracy {summary['init_accuracy']:.3f} -> {summary['final_accuracy']:.3f} "
              f"in {summary['wall_seconds']:.0f} s; run folder {self.run_dir}", flush=True)
        return summary

    def evaluate(self, step: int) -> dict[str, Any]:
        h = self.setup.heldout
        result = self._greedy(h.ids, h.answers)
        result["step"] = step
        self.log.log({"phase": "eval", **result})
        return result

    def _greedy(self, prompts: list[list[int]], answers: list[str]) -> dict[str, Any]:
        """`greedy_accuracy` of the policy on the prompts, each rank decoding every world-size-th."""
        w, cfg = self.world, self.config
        mine = slice(w.rank, None, w.size)
        with self._sampling_weights():
            part = greedy_accuracy(self.generator, self.tokenizer, prompts[mine], answers[mine],
                                   cfg.rollout.max_new_tokens, cfg.reward.verifier_timeout_s) if prompts[mine] \
                else {"accuracy": 0.0, "response_length": 0.0, "truncation_rate": 0.0, "verifier_timeouts": 0, "n": 0}
        if not w.distributed:
            return part
        n = part["n"]
        keys = ("accuracy", "response_length", "truncation_rate")
        totals = w.sum(torch.tensor([*(part[k] * n for k in keys), part["verifier_timeouts"], n],
                                    dtype=torch.float64)).tolist()
        count = max(1.0, totals[-1])
        return {**{k: v / count for k, v in zip(keys, totals)}, "verifier_timeouts": round(totals[3]),
                "n": round(totals[4])}

    # --- one RL step -------------------------------------------------------------------------

    def step(self, step: int) -> dict[str, Any]:
        cfg, times, world = self.config, {}, self.world
        t = time.perf_counter()
        # Every rank draws the same prompts and samples its share, whole groups; the draws are
        # per response (first_response), so the global batch does not depend on the split.
        idx = self.sampler.take(cfg.rollout.prompts_per_step)
        mine = world.share(len(idx))
        idx = idx[mine]
        r = cfg.rollout
        options: dict[str, Any] = {"first_response": mine.start * r.samples_per_prompt} if world.distributed else {}
        # Only the RL rollouts stop looping responses early; evaluations decode to the end.
        if r.stop_on_repetition.enabled:
            options["stop_on_repetition"] = (r.stop_on_repetition.n, r.stop_on_repetition.min_repeats)
        with self._sampling_weights():
            rollout = self.generator.generate([self.setup.train.ids[i] for i in idx], r.samples_per_prompt,
                                              r.temperature, r.top_p, r.max_new_tokens,
                                              seed=cfg.seed * 1_000_003 + step, **options)
        rollout = rollout.to(self.device)  # a no-op for HF; vLLM hands back host tensors
        answers = [self.setup.train.answers[idx[i]] for i in rollout.prompt_index.tolist()]
        times["rollout"], t = time.perf_counter() - t, time.perf_counter()

        texts = response_texts(self.tokenizer, rollout)
        channels = [RewardChannel(c.reward, c.gamma, dict(c.params)) for c in cfg.reward.channels]
        scores = score_responses(texts, answers, rollout.tokens, rollout.lengths, rollout.truncated,
                                 r.max_new_tokens, channels, cfg.reward.verifier_timeout_s)
        times["scoring"], t = time.perf_counter() - t, time.perf_counter()

        with world.unsharded(self.policy, self.critic):  # forwards only, as many as this rank needs
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
        batch_sum = world.sum if world.distributed else None
        adv, returns = get_advantage(estimator)(AdvantageInputs(
            rewards, mask, scores.gammas, a.lam, rollout.prompt_index, exp.values, a.grpo_std, batch_sum))
        if a.normalize_advantages and estimator in ("gae", "rloo"):
            adv = normalize(adv, mask, batch_sum)
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
            responses = len(rollout) * world.size
            mean_kl = world.sum(kl.sum()) / responses if world.distributed else kl.sum(-1).mean()
            self.kl_ctl.update(mean_kl.item(), responses)
        return self.step_metrics(step, rollout, texts, scores, rewards, kl, exp, stats, times)

    def micro_batches(self, sb: SequenceBatch, rows: list[int], sizes: tuple[list[int], list[int]],
                      experience: bool = False) -> list[tuple[torch.Tensor, SequenceBatch]]:
        """(row indices on the device, the rows' SequenceBatch) per micro-batch of ``rows``: by
        the token budget (sorted by length, each trimmed to its own width), or in count mode
        ``micro_batch_size`` rows in the given order at the batch's width. ``sizes``: the batch's
        ``row_sizes``."""
        return [self._micro_batch(sb, r, sizes, experience) for r in self._plan(rows, sizes, experience)]

    def _budget(self, experience: bool) -> int | None:
        a = self.config.algorithm
        if experience and a.max_tokens_per_experience_batch is not None:
            return a.max_tokens_per_experience_batch
        return a.max_tokens_per_micro_batch

    def _plan(self, rows: list[int], sizes: tuple[list[int], list[int]], experience: bool = False) -> list[list[int]]:
        return plan_micro_batches(sizes[0], rows, self._budget(experience), self.config.algorithm.micro_batch_size)

    def _micro_batch(self, sb: SequenceBatch, rows: list[int], sizes: tuple[list[int], list[int]],
                     experience: bool = False) -> tuple[torch.Tensor, SequenceBatch]:
        return (torch.tensor(rows, device=sb.tokens.device),
                micro_batch(sb, rows, self._budget(experience) is not None, sizes))

    @torch.no_grad()
    def experience(self, rollout: Rollout) -> Experience:
        """The forwards the update needs before it starts: old-policy log-probs when they are
        recomputed (at the sampling temperature, so PPO's ratio starts at 1 up to round-off; see
        `algorithm.old_logprobs`), reference log-probs when there is a KL term, critic values."""
        sb = sequence_batch(rollout.prompts, rollout.tokens, rollout.lengths, self.pad_id)
        temp = self.config.rollout.temperature
        source = self.config.algorithm.old_logprobs_source(len(rollout) * self.world.size,
                                                           self._sampler_logprobs_exact())
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
        is cut, nor on how it is split over data-parallel ranks: the mini-batches are drawn from
        the global batch, each rank forwards its own rows of them, the shares' denominators are
        the global mini-batch's, and FSDP sums the gradients. Statistics stay on the device until
        the end of the step. The first epoch's forward also gives the step's entropy (and its KL
        when no old-policy forward ran).
        """
        cfg, a, world = self.config, self.config.algorithm, self.world
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
        # Per row of the global batch: its tokens, and its tokens when it is forwarded.
        local, first = len(exp.rollout), world.rank * len(exp.rollout)
        row_tokens = mask.sum(-1).float()
        forwarded = row_tokens if live is None else row_tokens * torch.tensor(live, device=self.device)
        tokens_of = world.gather(torch.stack([row_tokens, forwarded], 1))
        plans = []  # (epoch, global rows, this rank's rows, its micro-batches' rows)
        for epoch in range(a.epochs):
            perm = torch.randperm(local * world.size, generator=self.update_gen)
            for rows in perm.split(a.mini_batch_size):
                own = [r - first for r in rows.tolist() if first <= r < first + local]
                forward_rows = own if live is None else [r for r in own if live[r]]
                plans.append((epoch, rows.to(self.device), own, self._plan(forward_rows, sizes) if forward_rows else []))
        # FSDP gathers and reduces inside every forward and backward: a rank with fewer micro-batches
        # than the busiest runs zero-weighted ones on its first row (None in its plan).
        counts = world.same_counts([len(p[3]) for p in plans])
        for (epoch, rows, own, plan), count in zip(plans, counts):
            tokens = tokens_of[rows, 0].sum().clamp_min(1)
            stat_tokens = tokens if live is None else tokens_of[rows, 1].sum().clamp_min(1)
            self.optimizer.zero_grad(set_to_none=True)
            if self.critic_optimizer is not None:
                self.critic_optimizer.zero_grad(set_to_none=True)
            finite = torch.ones(2, dtype=torch.bool, device=self.device)  # policy, critic
            stats = torch.zeros(len(names), dtype=torch.float32, device=self.device)
            # The shares keep the whole mini-batch's denominators: a skipped row's terms are 0.
            if epoch == 0 and live is not None and not all(live[r] for r in own):
                self._entropy_of_rows(exp, [r for r in own if not live[r]], sizes)
            for part in plan + [None] * (count - len(plan)):
                filler = part is None
                micro, sb = self._micro_batch(exp.sb, [0] if filler else part, sizes)
                steps = sb.tokens.shape[1]
                token_share = sb.mask.sum() / tokens
                stat_share = sb.mask.sum() / stat_tokens
                share = token_share if a.loss_agg == "token-mean" else len(micro) / len(rows)
                if filler:
                    token_share, stat_share, share = token_share * 0, stat_share * 0, share * 0
                hidden, weight, sb = response_hidden(self.policy, sb, self.precision)
                old = None if exp.old_logp is None else exp.old_logp[micro, :steps]
                loss, st = linear_ppo_policy_loss(
                    hidden, weight, sb.tokens, old, exp.advantages[micro, :steps],
                    sb.mask, temp, a.clip_low, a.clip_high, a.dual_clip, a.loss_agg, return_entropy=True,
                    ratio=a.ratio, agg_norm=agg_norm)
                del hidden  # the loss keeps the valid rows it needs; the rest can go now
                logp, ent = st["logp"], st["entropy"]
                if epoch == 0 and not filler:
                    exp.entropy[micro, :steps] = ent.detach()
                stats[0] += loss.detach() * share
                stats[1] += st["clip_frac"] * stat_share
                stats[2] += st["approx_kl"] * stat_share
                loss = loss * share
                # Token means over the whole mini-batch, whatever the policy loss aggregation.
                if kl_in_loss:
                    kl = kl_penalty(logp, exp.ref_logp[micro, :steps], a.kl_estimator, a.kl_clamp)
                    loss = loss + self.kl_ctl.coef * (kl * sb.mask).sum() / tokens * (0 if filler else 1)
                    if epoch == 0 and exp.kl is not None and not filler:
                        exp.kl[micro, :steps] = (kl * sb.mask).detach()
                if a.entropy_coef > 0:
                    loss = loss - a.entropy_coef * (ent * sb.mask).sum() / tokens * (0 if filler else 1)
                finite[0] &= torch.isfinite(loss)
                loss.backward()
                if self.critic is not None:
                    values = response_values(self.critic, sb, self.precision)
                    vloss, vfrac = value_loss(values, exp.values[micro, :steps], exp.returns[micro, :steps],
                                              sb.mask, a.value_clip, num_tokens=tokens)
                    if filler:
                        vloss = vloss * 0
                    finite[1] &= torch.isfinite(vloss)
                    (a.vf_coef * vloss).backward()
                    stats[3] += vloss.detach()
                    stats[4] += vfrac * token_share
            per_minibatch.append(stats)
            if count == 0:  # Adam still steps on a zero gradient (moments, decay)
                for p in self.policy.parameters():
                    p.grad = torch.zeros_like(p) if p.requires_grad else None
            learners = [(self.policy, self.optimizer, "grad_norm")]
            if self.critic is not None:
                learners.append((self.critic, self.critic_optimizer, "critic_grad_norm"))
            clip = cfg.optim.grad_clip
            grad_norms = [grad_norm_value(torch.nn.utils.clip_grad_norm_(
                m.parameters(), clip if clip is not None else float("inf"))) for m, _, _ in learners]
            # A non-finite loss or gradient norm skips that optimiser's step (on every rank), so
            # its moments and step count stay as they were. One host sync per mini-batch.
            ok = finite[:len(learners)] & torch.isfinite(torch.stack(grad_norms))
            ok = world.min(ok.int()).bool().tolist() if world.distributed else ok.tolist()
            for (_, optimizer, key), norm, good in zip(learners, grad_norms, ok):
                updates += 1
                if good:
                    norms[key].append(norm.detach().float())
                    optimizer.step()
                else:
                    optimizer.zero_grad(set_to_none=True)
                    skipped += 1
        self.policy.eval()
        means = world.sum(torch.stack(per_minibatch)).mean(0)
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
        if self.world.distributed and not (exp.rollout.entropy is not None and self._sampler_logprobs_exact()):
            # The skipped rows' logged entropy would take forwards that the ranks do not agree on.
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
        rep_n = self.config.logging.repetition_n or next(
            (int(c.params.get("n", 40)) for c in self.config.reward.channels if c.reward == "repetition"), 40)
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
        values = torch.stack([v.to(device=device, dtype=torch.float32) for v in on_device.values()])
        reflections = reflection_counts(texts)
        timeouts = scores.timeouts
        if self.world.distributed:
            values = self._over_ranks(list(on_device), values, valid)
            reflections = dict(zip(reflections, (self.world.sum(torch.tensor(list(reflections.values())))
                                                 / self.world.size).tolist()))
            timeouts = int(self.world.sum(torch.tensor(timeouts)))
        read = dict(zip(on_device, values.tolist()))
        generated = read.pop("generated")
        row: dict[str, Any] = {
            "phase": "rl",
            "step": step,
            **read,
            "kl_coef": self.kl_ctl.coef,
            "lr": self.optimizer.param_groups[0]["lr"],
            "verifier_timeouts": timeouts,
            "tokens_per_second": generated / max(times["rollout"], 1e-9),
            **stats,
            **reflections,
        }
        row.update({f"time/{k}": v for k, v in times.items()})
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}

    def _over_ranks(self, keys: list[str], values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """This rank's step metrics made the global batch's: per-response means averaged over
        the ranks (each has as many responses), per-token means weighted by the ranks' tokens,
        counts summed, maxima maximised."""
        w = self.world
        per_token = torch.tensor([k in _TOKEN_MEANS for k in keys], device=values.device)
        summed = torch.tensor([k in _SUMS for k in keys], device=values.device)
        weight = torch.where(per_token, valid.float(), torch.ones_like(values))
        total = w.sum(torch.cat([values * weight, valid.float().reshape(1)]))
        divisor = torch.where(per_token, total[-1], torch.where(summed, 1.0, float(w.size)))
        out = total[:-1] / divisor
        maxima = torch.tensor([k in _MAXIMA for k in keys], device=values.device)
        return torch.where(maxima, w.max(values), out)
