"""Reward functions by name, and the scoring of a batch of responses into reward channels.

A run's configuration names its reward channels (``RewardChannel("cosine", gamma=1.0, ...)``) instead
of importing functions, so that a new reward is one decorated function and a YAML line. Each
channel keeps its own discount factor because the paper discounts the sparse outcome reward and
the dense repetition penalty differently (1.0 and 0.99): the channels stay separate columns until
the advantage estimator combines them.
"""

from __future__ import annotations

import inspect
import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from .cosine import binary_reward, cosine_length_reward
from .repetition import repetition_penalty
from .verifier import verify_batch

RewardKind = Literal["sparse", "dense"]
_KINDS = ("sparse", "dense")


@dataclass
class RewardInputs:
    """What a reward function sees of a batch of B responses."""

    responses: list[str]  # decoded response texts
    answers: list[str]  # reference answers
    tokens: torch.Tensor  # LongTensor [B, T], response token ids, right-padded
    lengths: torch.Tensor  # LongTensor [B]
    truncated: torch.Tensor  # BoolTensor [B]: hit max_len without end-of-sequence
    max_len: int  # the response length limit
    correct: torch.Tensor  # BoolTensor [B], filled by the verifier before rewards run


@dataclass
class RewardChannel:
    """One reward channel of a run: a registered reward, its discount and its parameters."""

    reward: str
    gamma: float = 1.0
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class RewardOutput:
    """The rewards of a batch, one column per channel (in the order of the channels)."""

    sparse: torch.Tensor  # float32 [B, C]: sparse channels' values, 0 in dense channels' columns
    dense: torch.Tensor  # float32 [B, T, C]: dense channels' values, 0 in sparse channels' columns
    correct: torch.Tensor  # bool [B]
    timeouts: int  # verifier timeouts (scored wrong)
    gammas: list[float]  # one per channel


@dataclass(frozen=True)
class RewardSpec:
    """A registered reward function.

    ``params`` are the keyword parameters it accepts (None: any, for a function taking
    ``**kwargs``); configuration typos fail before any work instead of being silently ignored.
    """

    name: str
    kind: RewardKind
    fn: Callable[..., torch.Tensor]
    params: frozenset[str] | None

    def check_params(self, params: dict[str, Any]) -> None:
        if self.params is None:
            return
        for key in params:
            if key not in self.params:
                known = ", ".join(sorted(self.params)) or "none"
                raise ValueError(
                    f"reward {self.name!r} has no parameter {key!r} (its parameters: {known})"
                )

    def __call__(self, inputs: RewardInputs, **params: Any) -> torch.Tensor:
        """Float32 [B] (sparse) or [B, T] (dense), checked for shape and finiteness."""
        self.check_params(params)
        value = self.fn(inputs, **params)
        batch, width = inputs.tokens.shape
        expected = (batch,) if self.kind == "sparse" else (batch, width)
        if not isinstance(value, torch.Tensor) or tuple(value.shape) != expected:
            got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(
                f"{self.kind} reward {self.name!r} must return a tensor of shape {expected}, "
                f"got {got}"
            )
        value = value.to(device=inputs.tokens.device, dtype=torch.float32)
        if not bool(torch.isfinite(value).all()):
            raise ValueError(f"reward {self.name!r} returned non-finite values")
        return value


_REGISTRY: dict[str, RewardSpec] = {}


def _accepted_params(fn: Callable[..., Any]) -> frozenset[str] | None:
    parameters = list(inspect.signature(fn).parameters.values())[1:]  # the first is the inputs
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return None
    return frozenset(
        p.name
        for p in parameters
        if p.kind in (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    )


def register_reward(
    name: str, kind: RewardKind
) -> Callable[[Callable[..., torch.Tensor]], Callable[..., torch.Tensor]]:
    """Register ``fn(inputs: RewardInputs, **params) -> Tensor`` under ``name``.

    A ``sparse`` reward returns Tensor[B] (placed later at each response's last token); a
    ``dense`` one returns Tensor[B, T]. Returns the function unchanged.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty str, got {name!r}")
    if kind not in _KINDS:
        raise ValueError(f"kind must be one of {_KINDS}, got {kind!r}")

    def decorator(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        if name in _REGISTRY:
            raise ValueError(f"a reward named {name!r} is already registered")
        _REGISTRY[name] = RewardSpec(name, kind, fn, _accepted_params(fn))
        return fn

    return decorator


def reward_names() -> list[str]:
    return sorted(_REGISTRY)


def get_reward(name: str) -> RewardSpec:
    """The registered reward ``name`` (callable as ``spec(inputs, **params)``)."""
    spec = _REGISTRY.get(name) if isinstance(name, str) else None
    if spec is None:
        raise ValueError(f"unknown reward {name!r}; known rewards: {', '.join(reward_names())}")
    return spec


def check_channels(channels: Sequence[RewardChannel]) -> list[RewardSpec]:
    """Validate a channel list (names, gammas, parameter names); the specs in channel order.

    Cheap and free of side effects, so configuration loading can call it to fail early.
    """
    if isinstance(channels, RewardChannel) or not isinstance(channels, Sequence):
        raise ValueError(f"channels must be a list of RewardChannel, got {type(channels).__name__}")
    if not channels:
        raise ValueError("channels must name at least one reward channel")
    specs = []
    for i, channel in enumerate(channels):
        if not isinstance(channel, RewardChannel):
            raise ValueError(f"channels[{i}] must be a RewardChannel, got {type(channel).__name__}")
        try:
            spec = get_reward(channel.reward)
        except ValueError as error:
            raise ValueError(f"channels[{i}].reward: {error}") from None
        gamma = channel.gamma
        if (
            isinstance(gamma, bool)
            or not isinstance(gamma, numbers.Real)
            or not (math.isfinite(gamma) and 0.0 <= gamma <= 1.0)
        ):
            raise ValueError(f"channels[{i}].gamma must be a number in [0, 1], got {gamma!r}")
        if not isinstance(channel.params, dict):
            raise ValueError(
                f"channels[{i}].params must be a dict, got {type(channel.params).__name__}"
            )
        try:
            spec.check_params(channel.params)
        except ValueError as error:
            raise ValueError(f"channels[{i}].params: {error}") from None
        specs.append(spec)
    return specs


def _check_batch(
    responses: Sequence[str],
    answers: Sequence[str],
    tokens: torch.Tensor,
    lengths: torch.Tensor,
    truncated: torch.Tensor,
    max_len: int,
) -> None:
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2:
        raise ValueError("tokens must be a [B, T] tensor of token ids")
    if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
        raise ValueError(f"tokens must be an integer tensor, got {tokens.dtype}")
    batch, width = tokens.shape
    if len(responses) != batch or len(answers) != batch:
        raise ValueError(
            f"responses ({len(responses)}) and answers ({len(answers)}) must have one entry per "
            f"row of tokens ({batch})"
        )
    if not isinstance(lengths, torch.Tensor) or tuple(lengths.shape) != (batch,):
        raise ValueError(f"lengths must be a tensor of shape ({batch},)")
    if lengths.dtype.is_floating_point or lengths.dtype.is_complex or lengths.dtype == torch.bool:
        raise ValueError(f"lengths must be an integer tensor, got {lengths.dtype}")
    if batch and (int(lengths.min()) < 0 or int(lengths.max()) > width):
        raise ValueError(f"lengths must be in [0, T={width}]")
    if not isinstance(truncated, torch.Tensor) or tuple(truncated.shape) != (batch,):
        raise ValueError(f"truncated must be a tensor of shape ({batch},)")
    if truncated.dtype != torch.bool:
        raise ValueError(f"truncated must be a bool tensor, got {truncated.dtype}")
    if isinstance(max_len, bool) or not isinstance(max_len, numbers.Integral) or max_len < 1:
        raise ValueError(f"max_len must be an int >= 1, got {max_len!r}")


def score_responses(
    responses: Sequence[str],
    answers: Sequence[str],
    tokens: torch.Tensor,
    lengths: torch.Tensor,
    truncated: torch.Tensor,
    max_len: int,
    channels: Sequence[RewardChannel],
    timeout_s: float = 5.0,
) -> RewardOutput:
    """Verify each response once, then evaluate every channel into its column.

    Dense values at padding positions (at or past a response's length) are zeroed, so a dense
    reward never rewards tokens the policy did not emit. The verifier runs in this thread, which
    must be the main thread (see ``verifier``).
    """
    specs = check_channels(channels)
    _check_batch(responses, answers, tokens, lengths, truncated, max_len)
    batch, width = tokens.shape
    device = tokens.device

    correct_list, timeouts = verify_batch(list(responses), list(answers), timeout_s=timeout_s)
    correct = torch.tensor(correct_list, dtype=torch.bool, device=lengths.device).reshape(batch)
    inputs = RewardInputs(
        responses=list(responses),
        answers=list(answers),
        tokens=tokens,
        lengths=lengths,
        truncated=truncated,
        max_len=int(max_len),
        correct=correct,
    )

    sparse = torch.zeros(batch, len(specs), dtype=torch.float32, device=device)
    dense = torch.zeros(batch, width, len(specs), dtype=torch.float32, device=device)
    in_response = torch.arange(width, device=device) < lengths.to(device)[:, None]
    for column, (spec, channel) in enumerate(zip(specs, channels)):
        value = spec(inputs, **channel.params)
        if spec.kind == "sparse":
            sparse[:, column] = value
        else:
            dense[:, :, column] = value.masked_fill(~in_response, 0.0)
    return RewardOutput(
        sparse=sparse,
        dense=dense,
        correct=correct,
        timeouts=timeouts,
        gammas=[float(channel.gamma) for channel in channels],
    )


def paper_channels() -> list[RewardChannel]:
    """The main run of Yeo et al. (2025): cosine length reward and the n = 40 repetition penalty."""
    return [
        RewardChannel(
            "cosine",
            gamma=1.0,
            params={"correct_range": (2.0, 1.0), "wrong_range": (-10.0, 0.0), "exceed": -10.0},
        ),
        RewardChannel("repetition", gamma=0.99, params={"n": 40, "penalty": -0.05}),
    ]


# Built-in rewards. Their parameters are keyword-only so that a channel's params map onto them.


@register_reward("correctness", kind="sparse")
def _correctness(
    inputs: RewardInputs, *, correct_value: float = 1.0, wrong_value: float = 0.0
) -> torch.Tensor:
    return binary_reward(inputs.correct, correct_value=correct_value, wrong_value=wrong_value)


@register_reward("cosine", kind="sparse")
def _cosine(
    inputs: RewardInputs,
    *,
    correct_range: Sequence[float] = (2.0, 1.0),
    wrong_range: Sequence[float] = (-10.0, 0.0),
    exceed: float = -10.0,
) -> torch.Tensor:
    return cosine_length_reward(
        inputs.correct,
        inputs.lengths,
        inputs.max_len,
        inputs.truncated,
        correct_range=correct_range,
        wrong_range=wrong_range,
        exceed=exceed,
    )


@register_reward("repetition", kind="dense")
def _repetition(
    inputs: RewardInputs, *, n: int = 40, penalty: float = -0.05, only_start: bool = False
) -> torch.Tensor:
    return repetition_penalty(
        inputs.tokens, inputs.lengths, n=n, penalty=penalty, only_start=only_start
    )
