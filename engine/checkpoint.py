"""Checkpoints of an RL run, and reading them back for `longcot train resume=RUN_DIR`.

    RUN_DIR/checkpoints/step-000020/
        policy/               Hugging Face folder (safetensors weights, tokenizer)
        critic/               ValueModel.save_pretrained, when the algorithm has a critic
        optimizer.pt          optimiser state dicts (torch.save, read back with weights_only=True)
        critic_optimizer.pt
        rng.safetensors       torch's global RNG state and the trainer's update generator state
        state.json            the rest, as JSON; written last, it lists every file above

Each checkpoint is written into a temporary folder and renamed into place (`_atomic_save`), so a
crash mid-write leaves the previous checkpoint intact. A folder counts as a checkpoint only when
its name is ``step-N``, its state.json parses and every file it lists exists; leftover temporary
folders never match. Loading unpickles nothing but plain containers of tensors and numbers.
"""

from __future__ import annotations

import json
import pickle
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .models import _atomic_save, save_model

CHECKPOINTS = "checkpoints"
STATE_FILE = "state.json"
RNG_FILE = "rng.safetensors"
_NAME = re.compile(r"step-(\d+)")


class CheckpointError(ValueError):
    """A run folder or checkpoint that cannot be resumed from; the message names the path."""


class TrainingHalted(RuntimeError):
    """The trainer stopped the run on purpose, after writing a checkpoint; the message says why
    and where the checkpoint is."""


@dataclass
class Checkpoint:
    path: Path
    step: int
    state: dict[str, Any]  # the trainer's JSON state, as passed to save_checkpoint
    rng: dict[str, torch.Tensor]
    optimizers: dict[str, dict[str, Any]]  # name -> optimiser state dict


def checkpoint_path(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS / f"step-{step:06d}"


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    *,
    policy: torch.nn.Module,
    tokenizer: Any,
    critic: Any = None,
    optimizers: dict[str, torch.optim.Optimizer],
    rng: dict[str, torch.Tensor],
    state: dict[str, Any],
    keep: int,
) -> Path:
    """Write the checkpoint of ``step`` atomically, then delete all but the newest ``keep``."""
    from safetensors.torch import save_file

    def write(tmp: Path) -> None:
        save_model(policy, tokenizer, tmp / "policy")
        if critic is not None:
            critic.save_pretrained(tmp / "critic")
        for name, optimizer in optimizers.items():
            torch.save(optimizer.state_dict(), tmp / f"{name}.pt")
        save_file({k: v.detach().contiguous().cpu() for k, v in rng.items()}, str(tmp / RNG_FILE))
        files = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file())
        meta = {"step": step, "files": files, "optimizers": list(optimizers), "trainer": state}
        (tmp / STATE_FILE).write_text(json.dumps(meta, indent=1) + "\n")

    path = _atomic_save(checkpoint_path(run_dir, step), write)
    prune_checkpoints(run_dir, keep)
    return path


def _numbered(run_dir: str | Path) -> list[tuple[int, Path]]:
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _NAME.fullmatch(path.name)
        if match and path.is_dir():
            found.append((int(match.group(1)), path))
    return sorted(found, reverse=True)


def _read_meta(path: Path) -> dict[str, Any] | None:
    try:
        meta = json.loads((path / STATE_FILE).read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def is_complete(path: str | Path) -> bool:
    path = Path(path)
    match = _NAME.fullmatch(path.name)
    meta = _read_meta(path)
    if match is None or meta is None or meta.get("step") != int(match.group(1)):
        return False
    files = meta.get("files")
    return bool(files) and all((path / f).is_file() for f in files)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run, or None."""
    return next((path for _, path in _numbered(run_dir) if is_complete(path)), None)


def prune_checkpoints(run_dir: str | Path, keep: int) -> None:
    """Keep the newest ``keep`` complete checkpoints; remove the leftovers of interrupted writes."""
    complete = [path for _, path in _numbered(run_dir) if is_complete(path)]
    for path in complete[keep:]:
        shutil.rmtree(path, ignore_errors=True)
    # `.step-N.tmp-*` (a write that never finished) and `.step-N.old-*` (a replaced one). One
    # trainer writes a run folder, and it is not writing now.
    for path in (Path(run_dir) / CHECKPOINTS).glob(".step-*"):
        shutil.rmtree(path, ignore_errors=True)


def load_checkpoint(path: str | Path) -> Checkpoint:
    """The JSON state, RNG tensors and optimiser state dicts of a checkpoint (the models stay on
    disk: load ``path/policy`` and ``path/critic`` with the models module). Raises
    CheckpointError naming the file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not is_complete(path):
        raise CheckpointError(f"{path}: not a complete checkpoint")
    meta = _read_meta(path)
    try:
        rng = load_file(str(path / RNG_FILE))
    except (OSError, SafetensorError) as exc:
        raise CheckpointError(f"{path / RNG_FILE}: cannot load ({_one_line(exc)})") from None
    optimizers = {name: _load_tensors(path / f"{name}.pt") for name in meta["optimizers"]}
    return Checkpoint(path, meta["step"], meta["trainer"], rng, optimizers)


def _load_tensors(file: Path) -> dict[str, Any]:
    try:
        # weights_only: tensors, numbers, strings and containers; any other pickled object fails.
        return torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError(f"{file}: holds pickled objects other than tensors; refusing to load it") from None
    except (OSError, RuntimeError, EOFError, ValueError) as exc:
        raise CheckpointError(f"{file}: cannot load ({_one_line(exc)})") from None


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= 200 else text[:197] + "..."
