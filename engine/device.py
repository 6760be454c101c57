"""Where the RL step runs and in which precision: one setting for the whole step.

``model.device`` places the policy, reference, critic, optimiser states and every tensor of the
step; CUDA tensors take the Triton kernels, CPU tensors the C++/chunked paths. ``model.precision``
chooses the dtypes:

- ``fp32``: everything in float32 (the CPU default);
- ``bf16-mixed``: float32 master weights and optimiser state, bfloat16 compute through autocast
  around the transformer forwards (the CUDA default); the frozen reference is stored in bfloat16;
- ``bf16``: weights, gradients and optimiser state in bfloat16 (for memory).

Log-probs, entropy and values are float32 in every mode: the log-prob kernels run outside
autocast on the (bf16) hidden states and the (fp32 or bf16) LM-head weight.
"""

from __future__ import annotations

import contextlib
import re
import types
from collections.abc import Iterator
from dataclasses import dataclass

import torch

DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"
PRECISIONS = ("auto", "fp32", "bf16-mixed", "bf16")
_DEVICE_RE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def resolve_device(spec: str) -> torch.device:
    """``auto`` -> ``cuda`` when CUDA is available, else ``cpu``; raises ValueError naming what
    is wrong for a device this machine does not have."""
    if not isinstance(spec, str) or not _DEVICE_RE.match(spec.strip()):
        raise ValueError(f"expected {DEVICE_CHOICES}, got {spec!r}")
    spec = spec.strip()
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{spec} requested but no CUDA device is available "
                             "(torch.cuda.is_available() is False); use cpu or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"{spec} requested but this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


@dataclass(frozen=True)
class Precision:
    name: str  # fp32 | bf16-mixed | bf16
    device: torch.device

    @property
    def param_dtype(self) -> torch.dtype:
        """Trained weights and their optimiser state."""
        return torch.bfloat16 if self.name == "bf16" else torch.float32

    @property
    def compute_dtype(self) -> torch.dtype:
        """The transformer forwards; the frozen reference is stored in it."""
        return torch.float32 if self.name == "fp32" else torch.bfloat16

    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        """bf16 autocast for ``bf16-mixed``; nothing otherwise (the weights already have the
        compute dtype)."""
        if self.name != "bf16-mixed":
            yield
            return
        with torch.autocast(self.device.type, dtype=torch.bfloat16):
            yield


def autocast(precision: Precision | None) -> contextlib.AbstractContextManager:
    """``precision.autocast()``, or nothing without a precision."""
    return precision.autocast() if precision is not None else contextlib.nullcontext()


def resolve_precision(name: str, device: torch.device) -> Precision:
    """``auto`` -> ``bf16-mixed`` on CUDA, ``fp32`` elsewhere."""
    if name not in PRECISIONS:
        raise ValueError(f"expected one of {', '.join(PRECISIONS)}, got {name!r}")
    if name == "auto":
        name = "bf16-mixed" if device.type == "cuda" else "fp32"
    return Precision(name, device)


def enable_gradient_checkpointing(model: torch.nn.Module, mlp_tile_tokens: int | None = None) -> None:
    """Non-reentrant activation checkpointing of every transformer layer (Hugging Face's), for a
    causal LM or a bare backbone. Active only in training mode; each layer's forward is recomputed
    in the backward, so only the layers' inputs are kept.

    With ``mlp_tile_tokens``, each dense MLP (gate/up/down projections: Llama, Qwen, Mistral) of a
    micro-batch over that many tokens also runs in token tiles, each checkpointed on its own. The
    MLP is token-wise, so tiling changes no number; it bounds what a layer's recompute holds at
    once: at long lengths the MLP's intermediates (about 4x the MLP width per token, plus their
    gradients) are most of one layer's activations, and layer-level checkpointing alone keeps all
    of them for the whole micro-batch during that layer's backward. The price is one more MLP
    forward for those micro-batches.
    """
    target = getattr(model, "backbone", model)  # ValueModel wraps a backbone
    enable = getattr(target, "gradient_checkpointing_enable", None)
    if enable is None:
        raise ValueError(f"{type(target).__name__}: no gradient_checkpointing_enable (not a Hugging Face model)")
    enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if mlp_tile_tokens is None:
        return
    if isinstance(mlp_tile_tokens, bool) or not isinstance(mlp_tile_tokens, int) or mlp_tile_tokens < 1:
        raise ValueError(f"mlp_tile_tokens must be a positive int or None, got {mlp_tile_tokens!r}")
    for module in target.modules():
        mlp = getattr(module, "mlp", None)
        if isinstance(mlp, torch.nn.Module) and all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj")):
            mlp.checkpoint_tile_tokens = mlp_tile_tokens
            # A bound method, not a closure: deepcopy (the frozen reference) rebinds it to the copy.
            mlp.forward = types.MethodType(_tiled_mlp_forward, mlp)


def _tiled_mlp_forward(mlp: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    forward = type(mlp).forward
    tile = mlp.checkpoint_tile_tokens
    if not (mlp.training and torch.is_grad_enabled()) or x.shape[:-1].numel() <= tile:
        return forward(mlp, x)
    from torch.utils.checkpoint import checkpoint

    flat = x.reshape(-1, x.shape[-1])
    out = [checkpoint(forward, mlp, part, use_reentrant=False) for part in flat.split(tile)]
    return torch.cat(out).reshape(*x.shape[:-1], -1)
