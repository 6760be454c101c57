"""Several processes: one per device, started by torchrun (or `distributed.nproc_per_node`).

What changes when a run has N processes lives here, so that the RL step reads the same on one
process and on many:

- the process group (gloo on CPU, NCCL on CUDA), each rank's device and its share of the CPU
  cores (`init_world`);
- FSDP2 sharding of the trained models (`shard`) and whole-model unsharding for the work that
  runs the modules outside their forward hooks (the rollout loop, evaluation, the experience
  forwards: `World.unsharded`);
- sums and maxima over ranks, so that a step's denominators and metrics are those of the
  global batch (`World.sum`, `World.max`, `World.gather`);
- which rank writes the run folder (`World.main`).

One process is a `World` of size 1: its reductions return their input and it shards nothing, so
the single-process run is the code it was before.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

BACKENDS = {"cpu": "gloo", "cuda": "nccl"}


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1

    @property
    def main(self) -> bool:
        """Rank 0: the one that prints and writes the run folder."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    # --- the global batch -----------------------------------------------------------------------

    def share(self, n: int) -> slice:
        """This rank's contiguous share of ``n`` items (``n`` divisible by the world size)."""
        if n % self.size:
            raise ValueError(f"{n} items do not split evenly over {self.size} processes")
        k = n // self.size
        return slice(self.rank * k, (self.rank + 1) * k)

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The elementwise sum over ranks (a new tensor; the input itself with one process)."""
        return self._reduce(tensor, "SUM")

    def max(self, tensor: torch.Tensor) -> torch.Tensor:
        return self._reduce(tensor, "MAX")

    def min(self, tensor: torch.Tensor) -> torch.Tensor:
        return self._reduce(tensor, "MIN")

    def _reduce(self, tensor: torch.Tensor, op: str) -> torch.Tensor:
        if not self.distributed:
            return tensor
        import torch.distributed as dist

        # NCCL reduces CUDA tensors only; host numbers (flags, counts) travel through the device.
        out = tensor.to(_collective_device(), copy=True)
        dist.all_reduce(out, op=getattr(dist.ReduceOp, op))
        return out.to(tensor.device)

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every rank's ``tensor`` (same shape on each) concatenated along dim 0 in rank order."""
        if not self.distributed:
            return tensor
        import torch.distributed as dist

        local = tensor.to(_collective_device()).contiguous()
        parts = [torch.empty_like(local) for _ in range(self.size)]
        dist.all_gather(parts, local)
        return torch.cat(parts).to(tensor.device)

    def broadcast(self, obj):
        """Rank 0's ``obj`` on every rank (picklable; only ever objects this run made itself)."""
        if not self.distributed:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            dist.barrier()

    def same_counts(self, counts: Sequence[int]) -> list[int]:
        """The per-position maximum of ``counts`` over ranks: FSDP's collectives run inside each
        forward and backward, so every rank must run as many of them as the busiest one."""
        if not self.distributed:
            return list(counts)
        return self.max(torch.tensor(list(counts), dtype=torch.long)).tolist()

    # --- sharded models -------------------------------------------------------------------------

    @contextlib.contextmanager
    def unsharded(self, *models: torch.nn.Module | None) -> Iterator[None]:
        """The models' full parameters on every rank for the duration, with no collective inside:
        the rollout loop runs decoder layers outside their forward hooks, and ranks decode
        different numbers of steps. Costs one all-gather per sharded module on entry."""
        modules = [m for model in models if model is not None for m in _fsdp_modules(model)]
        if not modules:
            yield
            return
        for m in modules:
            m.set_reshard_after_forward(False, recurse=False)
            m.unshard()
        try:
            yield
        finally:
            for m in modules:
                m.reshard()
                m.set_reshard_after_forward(m.longcot_reshard_after_forward, recurse=False)


def _fsdp_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def _collective_device() -> torch.device:
    import torch.distributed as dist

    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def world_from_env() -> World:
    """The World torchrun describes in the environment (size 1 outside torchrun)."""
    env = os.environ
    size = int(env.get("WORLD_SIZE", "1"))
    return World(rank=int(env.get("RANK", "0")), size=size, local_rank=int(env.get("LOCAL_RANK", "0")),
                 local_size=int(env.get("LOCAL_WORLD_SIZE", str(size))))


def init_world(device: torch.device) -> World:
    """Join torchrun's process group (when there is one) on ``device``'s backend, give this rank
    its device (CUDA: ``cuda:LOCAL_RANK``) and its share of the machine's cores."""
    world = world_from_env()
    if not world.distributed:
        return world
    import torch.distributed as dist

    if device.type == "cuda":
        torch.cuda.set_device(world.local_rank)
    if not dist.is_initialized():
        dist.init_process_group(BACKENDS[device.type])
    # torchrun sets OMP_NUM_THREADS=1 unless told otherwise; the ranks on one machine share its
    # cores instead (no oversubscription, no idle cores).
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // world.local_size))
    return world


def close_world() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def shard(model: torch.nn.Module, reshard_after_forward: bool = True, bf16_compute: bool = False) -> torch.nn.Module:
    """FSDP2 over ``model``: each transformer layer its own unit (gathered for its forward and
    freed after it when ``reshard_after_forward``), the rest (embeddings, final norm, LM head)
    the root's. Gradients are summed over ranks, not averaged: the trainer's losses are already
    divided by the global batch's token or response counts.

    ``bf16_compute`` (precision bf16-mixed): the fp32 master shards are gathered in bf16, the
    forwards compute in it, and gradients are reduced in fp32. A critic's value head is a unit of
    its own that stays fp32 (values are regression targets of returns, as on one process)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    # The LM head comes out of the policy's forward as a view, and the critic's values too; nothing
    # downstream writes into either in place, which is what the warning is about.
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    mixed = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16_compute \
        else MixedPrecisionPolicy()
    head = getattr(model, "value_head", None)
    units = [(layer, reshard_after_forward, mixed) for layer in _decoder_layers(model)]
    if isinstance(head, torch.nn.Module):
        units.append((head, reshard_after_forward, MixedPrecisionPolicy()))
    # The root keeps its parameters gathered after the forward: the loss uses the LM head right
    # after it, and the backward needs them at once anyway.
    units.append((model, False, mixed))
    for module, reshard, policy in units:
        fully_shard(module, reshard_after_forward=reshard, mp_policy=policy)
        module.longcot_reshard_after_forward = reshard
    for m in _fsdp_modules(model):
        m.set_gradient_divide_factor(1.0)
        m.set_force_sum_reduction_for_comms(True)  # gloo has no pre-multiplied sum
    return model


def _decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    found = []
    for module in model.modules():
        layers = getattr(module, "layers", None)
        if isinstance(layers, torch.nn.ModuleList) and not found:
            found = list(layers)
    return found


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's parameters and buffers as plain tensors on every rank (a collective)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    if not _fsdp_modules(model):
        return model.state_dict()
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))


def full_copy(model: torch.nn.Module) -> torch.nn.Module:
    """An unsharded copy of a (sharded) Hugging Face causal LM, with the same weights: for the
    frozen reference and the critic's initial backbone, which copy the policy."""
    if not _fsdp_modules(model):
        import copy

        return copy.deepcopy(model)
    from transformers import AutoModelForCausalLM

    state = full_state_dict(model)
    dtype = next(iter(state.values())).dtype
    copy_ = AutoModelForCausalLM.from_config(model.config, dtype=dtype)
    copy_.load_state_dict(state)
    return copy_.to(next(iter(state.values())).device)


def save_full_model(model: torch.nn.Module, tokenizer, path, world: World) -> None:
    """A Hugging Face folder of the whole (sharded) model, written by rank 0: the run's final/.
    A collective when sharded: the full weights are gathered to rank 0's CPU memory only."""
    from .models import save_model

    if not _fsdp_modules(model):
        if world.main:
            save_model(model, tokenizer, path)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from transformers import AutoModelForCausalLM

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if world.main:
        plain = AutoModelForCausalLM.from_config(model.config, dtype=next(iter(state.values())).dtype)
        plain.load_state_dict(state)
        save_model(plain, tokenizer, path)
    world.barrier()


def grad_norm_value(norm: torch.Tensor) -> torch.Tensor:
    """clip_grad_norm_'s result as a plain tensor (a DTensor for sharded parameters)."""
    full = getattr(norm, "full_tensor", None)
    return full() if full is not None else norm


# --- launching ----------------------------------------------------------------------------------


def launch(nproc: int, argv: list[str]) -> int:
    """``longcot ARGV`` on ``nproc`` local processes, as ``torchrun --nproc-per-node NPROC -m
    longcot.engine.cli ARGV`` would start it. A rank that fails ends the others (torchrun's
    agent stops the group) and this returns its exit code after one line naming the rank."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, rdzv_backend="c10d",
                          rdzv_endpoint="localhost:0", run_id=f"longcot-{os.getpid()}", max_restarts=0,
                          monitor_interval=0.5)
    # The agent's own log lines (one per stopped worker) would bury the one line below.
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    try:
        elastic_launch(config, sys.executable)("-m", "longcot.engine.cli", *argv)
    except ChildFailedError as exc:
        rank, failure = exc.get_first_failure()
        code = failure.exitcode
        how = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
        print(f"longcot: error: rank {rank} failed ({how}); the other ranks were stopped", file=sys.stderr)
        return code if code > 0 else 1
    return 0


__all__ = ["World", "init_world", "close_world", "shard", "full_state_dict", "full_copy", "launch",
           "world_from_env", "grad_norm_value", "save_full_model"]
