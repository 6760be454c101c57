"""Checkpoints of an RL run, and reading them back for `longcot train resume=RUN_DIR`.

    RUN_DIR/checkpoints/step-000020/
        policy/               Hugging Face folder (safetensors weights, tokenizer)
        critic/               ValueModel.save_pretrained, when the algorithm has a critic
        optimizer.pt          optimiser state dicts (torch.save, read back with weights_only=True)
        critic_optimizer.pt
        rng.safetensors       torch's global RNG state and the trainer's update generator state
        state.json            the rest, as JSON; written last, it lists every file above

A run on several processes writes a sharded checkpoint instead (`save_sharded_checkpoint`):

    RUN_DIR/checkpoints/step-000020/
        shards/               every rank's shards of the models and optimiser states, written with
                              torch.distributed.checkpoint (DCP) as safetensors files whose headers
                              say which slice of which tensor they hold
        rng.safetensors, state.json

DCP reads it back on any number of processes, one included (`load_sharded_state`), and a sharded
run also resumes from a single-process checkpoint: resuming works across world sizes.

Each checkpoint is written into a temporary folder and renamed into place (`_atomic_save`), so a
crash mid-write leaves the previous checkpoint intact. A folder counts as a checkpoint only when
its name is ``step-N``, its state.json parses and every file it lists exists; leftover temporary
folders never match. Loading unpickles nothing but plain containers of tensors and numbers.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .models import _atomic_save, save_model

CHECKPOINTS = "checkpoints"
SHARDED = "sharded"
SHARDS = "shards"
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
    optimizers: dict[str, dict[str, Any]]  # name -> optimiser state dict (single-process format)
    sharded: bool = False  # written by several processes: models and optimisers are in shards/
    models: tuple[str, ...] = ("policy",)  # the trained models it holds


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
    if meta.get("format") == SHARDED:
        return Checkpoint(path, meta["step"], meta["trainer"], rng, {}, True, tuple(meta["models"]))
    optimizers = {name: _load_tensors(path / f"{name}.pt") for name in meta["optimizers"]}
    models = ("policy", "critic") if (path / "critic").is_dir() else ("policy",)
    return Checkpoint(path, meta["step"], meta["trainer"], rng, optimizers, False, models)


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


# --- sharded checkpoints (several processes) ------------------------------------------------------


def save_sharded_checkpoint(
    run_dir: str | Path,
    step: int,
    world,
    *,
    models: dict[str, torch.nn.Module],
    optimizers: dict[str, tuple[str, torch.optim.Optimizer]],
    rng: dict[str, torch.Tensor],
    state: dict[str, Any],
    keep: int,
) -> Path:
    """Every rank writes its shards of ``models`` and of ``optimizers`` (name -> (the model it
    steps, optimiser)) into a temporary folder; rank 0 then writes the rest and renames it into
    place. A collective: every rank calls it."""
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import save_file
    from torch.distributed.checkpoint import HuggingFaceStorageWriter

    from .models import _fsync_dir, _fsync_tree

    path = checkpoint_path(run_dir, step)
    tmp = world.broadcast(path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}" if world.main else None)
    if world.main:
        tmp.mkdir(parents=True)
    world.barrier()
    dcp.save(_flat_state(models, optimizers)[0],
             storage_writer=HuggingFaceStorageWriter(str(tmp / SHARDS), save_distributed=True))
    world.barrier()
    if world.main:
        try:
            save_file({k: v.detach().contiguous().cpu() for k, v in rng.items()}, str(tmp / RNG_FILE))
            files = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file())
            meta = {"step": step, "format": SHARDED, "world_size": world.size, "files": files,
                    "models": list(models), "optimizers": list(optimizers), "trainer": state}
            (tmp / STATE_FILE).write_text(json.dumps(meta, indent=1) + "\n")
            _fsync_tree(tmp)
            old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
            if path.exists():
                os.replace(path, old)
            os.replace(tmp, path)
            _fsync_dir(path.parent)
            shutil.rmtree(old, ignore_errors=True)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        prune_checkpoints(run_dir, keep)
    world.barrier()
    return path


def load_sharded_state(path: str | Path, models: dict[str, torch.nn.Module],
                       optimizers: dict[str, tuple[str, torch.optim.Optimizer]]) -> None:
    """Fill ``models`` and ``optimizers`` (as passed to `save_sharded_checkpoint`; sharded or not,
    on any number of processes) from a sharded checkpoint. A collective when sharded."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader
    from torch.distributed.checkpoint.state_dict import (
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    flat, full = _flat_state(models, optimizers)
    try:
        with warnings.catch_warnings():  # one process reading shards is a supported case, not a slip
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(flat, storage_reader=HuggingFaceStorageReader(str(Path(path) / SHARDS)))
    except Exception as exc:  # DCP wraps every rank's error in its own exception types
        raise CheckpointError(f"{Path(path) / SHARDS}: cannot load ({_one_line(exc)})") from None
    for name, model in models.items():
        first = _first_names(model)
        set_model_state_dict(model, {k: flat[f"{name}/{first.get(k, k)}"] for k in full[name]})
    for name, (model_name, optimizer) in optimizers.items():
        osd = full[name]
        for fqn, entries in osd["state"].items():
            for key in entries:
                entries[key] = flat[f"{name}/{fqn}/{key}"]
        set_optimizer_state_dict(models[model_name], optimizer, osd)


def _flat_state(models, optimizers) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(one flat name -> tensor dict of every model and optimiser state, the nested state dicts
    it came from). A tensor that another key already holds (tied embeddings) is stored once:
    safetensors refuses shared memory, and loading restores the tie."""
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    flat: dict[str, torch.Tensor] = {}
    full: dict[str, Any] = {}
    for name, model in models.items():
        state = get_model_state_dict(model)
        full[name] = state
        first = _first_names(model)
        for key, tensor in state.items():
            if first.get(key, key) == key:
                flat[f"{name}/{key}"] = tensor
    for name, (model_name, optimizer) in optimizers.items():
        osd = get_optimizer_state_dict(models[model_name], optimizer)
        full[name] = osd
        for fqn, entries in osd["state"].items():
            for key, tensor in entries.items():
                flat[f"{name}/{fqn}/{key}"] = tensor
    return flat, full


def _first_names(model: torch.nn.Module) -> dict[str, str]:
    """Parameter name -> the first name of the same parameter (itself unless tied)."""
    first: dict[int, str] = {}
    return {name: first.setdefault(id(p), name) for name, p in model.named_parameters(remove_duplicate=False)}


def load_full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                              saved: dict[str, Any]) -> None:
    """A single-process checkpoint's optimiser state (keyed by parameter index) into an optimiser
    over ``model``'s (sharded) parameters: each rank keeps its shard of every moment."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    names = [n for n, _ in model.named_parameters()]  # the order the optimiser was built in
    state = {names[int(i)]: entry for i, entry in saved["state"].items()}
    groups = [{**g, "params": [names[int(i)] for i in g["params"]]} for g in saved["param_groups"]]
    set_optimizer_state_dict(model, optimizer, {"state": state, "param_groups": groups},
                             options=StateDictOptions(full_state_dict=True))
