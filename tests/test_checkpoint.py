"""Checkpoints, `longcot train resume=RUN_DIR`, and skipping non-finite updates (tiny CPU runs)."""

import copy
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from test_trainer import LONGCOT, TIMING, TINY

import longcot.engine.trainer as trainer_module
from longcot.engine import Trainer
from longcot.engine.algorithms import KLController
from longcot.engine.checkpoint import CHECKPOINTS, is_complete, latest_checkpoint
from longcot.engine.cli import main
from longcot.engine.config import ConfigError, load_config

# Smaller steps than TINY's (8 responses of up to 16 tokens, two mini-batches), an adaptive KL
# coefficient, so that its state matters, and PPO with a critic (the default), so that the
# critic's matters too.
SMALL = [*TINY, "rollout.prompts_per_step=2", "rollout.max_new_tokens=16", "algorithm.mini_batch_size=4",
         "algorithm.kl_target=0.01"]
# Checkpoints every 2 steps, the newest 2 kept.
RUN = [*SMALL, "steps=6", "checkpoint.every=2", "checkpoint.keep=2"]


def rows(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def untimed(rows):
    return [{k: v for k, v in r.items() if not k.startswith(TIMING)} for r in rows]


def steps_on_disk(run_dir):
    return sorted(p.name for p in (Path(run_dir) / CHECKPOINTS).iterdir())


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """A 6-step run, never interrupted: the reference for the resumed ones."""
    out = tmp_path_factory.mktemp("uninterrupted")
    summary = Trainer(load_config(None, [*RUN, f"output_dir={out}"])).fit()
    return Path(summary["run_dir"])


def copy_run(run_dir, tmp_path):
    dest = tmp_path / run_dir.name
    shutil.copytree(run_dir, dest)
    return dest


def test_killed_run_resumes_with_the_metrics_of_an_uninterrupted_one(tmp_path, uninterrupted, capsys):
    out, log = tmp_path / "runs", tmp_path / "stderr.txt"
    with log.open("w") as stderr:
        proc = subprocess.Popen([LONGCOT, "train", *RUN, f"output_dir={out}"], stdout=subprocess.DEVNULL, stderr=stderr)
    second = None
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        runs = list(out.iterdir()) if out.is_dir() else []
        if runs and is_complete(runs[0] / CHECKPOINTS / "step-000004"):
            second = runs[0] / CHECKPOINTS / "step-000004"
            break
        time.sleep(0.05)
    assert second is not None and proc.poll() is None, f"the run ended before its second checkpoint: {log.read_text()}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    run_dir = second.parents[1]
    resumed_from = int(latest_checkpoint(run_dir).name.split("-")[1])
    assert 4 <= resumed_from < 6

    # The command line's code path, in this process (a second process start costs seconds).
    assert main(["train", f"resume={run_dir}"]) == 0
    assert f"from step-{resumed_from:06d}" in capsys.readouterr().out

    # Every row once, and equal to the uninterrupted run's (SFT, evaluations, RL steps), timings
    # aside: in particular those of the steps after the checkpoint.
    got, want = untimed(rows(run_dir)), untimed(rows(uninterrupted))
    assert [r["step"] for r in got if r["phase"] == "rl"] == list(range(1, 7))
    assert [r for r in got if r["phase"] == "rl" and r["step"] > resumed_from] == \
        [r for r in want if r["phase"] == "rl" and r["step"] > resumed_from]
    assert got == want
    summary, reference = (json.loads((d / "summary.json").read_text()) for d in (run_dir, uninterrupted))
    assert summary["resumed_from_steps"] == [resumed_from] and summary["steps"] == 6
    assert summary["evals"] == reference["evals"] and summary["init_accuracy"] == reference["init_accuracy"]


def test_the_newest_checkpoints_are_kept(uninterrupted):
    assert steps_on_disk(uninterrupted) == ["step-000004", "step-000006"]
    assert (uninterrupted / "reference" / "model.safetensors").is_file()
    state = json.loads((uninterrupted / CHECKPOINTS / "step-000006" / "state.json").read_text())
    assert {"policy/model.safetensors", "critic/value_head.safetensors", "optimizer.pt", "critic_optimizer.pt",
            "rng.safetensors"} <= set(state["files"])


def test_incomplete_checkpoints_and_leftovers_are_never_picked(tmp_path, uninterrupted):
    run_dir = copy_run(uninterrupted, tmp_path)
    root, newest = run_dir / CHECKPOINTS, run_dir / CHECKPOINTS / "step-000006"
    shutil.copytree(newest, root / ".step-000012.tmp-0123abcd")  # a write that never got renamed
    shutil.copytree(newest, root / "step-000011")
    (root / "step-000011" / "optimizer.pt").unlink()  # a file it lists is missing
    shutil.copytree(newest / "policy", root / "step-000010" / "policy")  # no state.json
    assert latest_checkpoint(run_dir) == newest

    summary = Trainer(load_config(None, [f"resume={run_dir}", "steps=7"])).fit()
    assert summary["resumed_from_steps"] == [6]
    assert [r["step"] for r in rows(run_dir) if r["phase"] == "rl"] == list(range(1, 8))
    # The new checkpoint pruned the oldest and the leftover temporary folder.
    assert steps_on_disk(run_dir) == ["step-000006", "step-000007", "step-000010", "step-000011"]


def test_a_run_given_more_steps_evaluates_where_an_uninterrupted_one_would(tmp_path):
    # The 2-step run's last checkpoint precedes its final evaluation; continued to 3 steps it must
    # still hold the periodic evaluation of step 2 (made on resume), as a 3-step run does.
    short = Trainer(load_config(None, [*SMALL, "steps=2", "eval_every=1", f"output_dir={tmp_path / 'a'}"])).fit()
    Trainer(load_config(None, [f"resume={short['run_dir']}", "steps=3"])).fit()
    full = Trainer(load_config(None, [*SMALL, "steps=3", "eval_every=1", f"output_dir={tmp_path / 'b'}"])).fit()
    got, want = untimed(rows(short["run_dir"])), untimed(rows(full["run_dir"]))
    assert [r["step"] for r in got if r["phase"] == "eval"] == [0, 1, 2, 3]
    assert got == want


def test_overrides_on_resume_set_the_optimiser_hyper_parameters(tmp_path, uninterrupted):
    """The checkpoint brings back Adam's moments; betas and weight decay come from the config."""
    run_dir = copy_run(uninterrupted, tmp_path)
    trainer = Trainer(load_config(None, [f"resume={run_dir}", "steps=7", "optim.weight_decay=0.25",
                                         "optim.betas=[0.8, 0.95]"]))
    trainer.fit()
    (group,) = trainer.optimizer.param_groups
    assert group["weight_decay"] == 0.25 and tuple(group["betas"]) == (0.8, 0.95)
    assert tuple(trainer.critic_optimizer.param_groups[0]["betas"]) == (0.8, 0.95)
    assert trainer.optimizer.state[group["params"][0]]["step"] == 7 * 2  # two mini-batches a step


def test_resume_errors_are_one_line_with_exit_2(tmp_path, uninterrupted, capsys):
    no_checkpoint = tmp_path / "no-checkpoint"
    (no_checkpoint / CHECKPOINTS / ".step-000002.tmp-0123abcd").mkdir(parents=True)
    shutil.copy(uninterrupted / "config.yaml", no_checkpoint)
    (tmp_path / "no-config").mkdir()
    cases = [
        (tmp_path / "missing", "run folder does not exist"),
        (tmp_path / "no-config", "no config.yaml (not a longcot run folder)"),
        (no_checkpoint, "no complete checkpoint in"),
    ]
    for run_dir, message in cases:
        assert main(["train", f"resume={run_dir}"]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"longcot: error: resume: {run_dir}: {message}") and err.count("\n") == 1, err
    with pytest.raises(ConfigError, match="drop --config"):
        load_config(uninterrupted / "config.yaml", [f"resume={uninterrupted}"])


def _run_anything(path):
    Path(path).write_text("unpickled")


class Payload:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return _run_anything, (self.path,)


def test_loading_a_checkpoint_never_unpickles_objects(tmp_path, uninterrupted, capsys):
    run_dir = copy_run(uninterrupted, tmp_path)
    marker = tmp_path / "marker"
    target = run_dir / CHECKPOINTS / "step-000006" / "optimizer.pt"
    torch.save({"state": {}, "param_groups": [], "extra": Payload(str(marker))}, target)
    assert main(["train", f"resume={run_dir}", "steps=7"]) == 2
    err = capsys.readouterr().err
    assert err == f"longcot: error: {target}: holds pickled objects other than tensors; refusing to load it\n"
    assert not marker.exists()


def test_checkpoint_config_keys_are_checked():
    cfg = load_config(None, [])
    assert (cfg.checkpoint.every, cfg.checkpoint.keep, cfg.optim.max_nonfinite_steps, cfg.resume) == (25, 2, 5, None)
    for override, message in [("checkpoint.every=-1", "checkpoint.every: expected a number >= 0"),
                              ("checkpoint.keep=0", "checkpoint.keep: expected a number > 0"),
                              ("optim.max_nonfinite_steps=0", "optim.max_nonfinite_steps: expected a number > 0")]:
        with pytest.raises(ConfigError) as err:
            load_config(None, [override])
        assert str(err.value).startswith(message)


# --- non-finite losses -----------------------------------------------------------------------

NAN_RUN = [*SMALL, "sft.enabled=false", "optim.warmup_steps=0"]


def nan_rewards_on(monkeypatch, steps):
    """token_rewards returns NaN rewards on the given (1-based) RL steps."""
    real, calls = trainer_module.token_rewards, []

    def token_rewards(*args, **kwargs):
        rewards, kl = real(*args, **kwargs)
        calls.append(1)
        if len(calls) in steps:
            rewards = torch.full_like(rewards, float("nan"))
        return rewards, kl

    monkeypatch.setattr(trainer_module, "token_rewards", token_rewards)


class Recorder(Trainer):
    """Keeps the optimisers' states and the weights before and after every step."""

    snapshots: dict

    def step(self, step):
        def snapshot():
            return [copy.deepcopy(self.optimizer.state_dict()), copy.deepcopy(self.critic_optimizer.state_dict()),
                    [p.detach().clone() for p in [*self.policy.parameters(), *self.critic.parameters()]],
                    self.kl_ctl.coef]

        self.snapshots = getattr(self, "snapshots", {})
        before = snapshot()
        row = super().step(step)
        self.snapshots[step] = (before, snapshot())
        return row


def same(a, b):
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def test_a_nan_step_skips_its_updates_and_training_continues(tmp_path, monkeypatch):
    nan_rewards_on(monkeypatch, {2})
    trainer = Recorder(load_config(None, [*NAN_RUN, "steps=3", f"output_dir={tmp_path}"]))
    summary = trainer.fit()
    rl = [r for r in rows(summary["run_dir"]) if r["phase"] == "rl"]
    assert [(r["skipped_updates"], r["skipped_updates/total"]) for r in rl] == [(0, 0), (4, 4), (0, 4)]
    assert all(r["updates"] == 4 for r in rl) and summary["skipped_updates"] == 4
    assert rl[1]["reward/mean"] is None  # NaN, logged as null
    for step, unchanged in ((1, False), (2, True), (3, False)):
        before, after = trainer.snapshots[step]
        # Adam's step counts and moments, the weights, and the adaptive KL coefficient.
        assert same(before[0], after[0]) == unchanged and same(before[1], after[1]) == unchanged
        assert same(before[2], after[2]) == unchanged
    assert trainer.snapshots[2][0][3] != trainer.snapshots[2][1][3]  # the KL (finite) still adapts
    assert summary["steps"] == 3


def test_the_kl_controller_ignores_a_nonfinite_kl():
    ctl = KLController(0.1, target=0.01, horizon=10)
    for kl in (float("nan"), float("inf")):
        ctl.update(kl, 4)
    assert ctl.coef == 0.1
    ctl.update(0.02, 5)
    assert ctl.coef == pytest.approx(0.11)


def test_too_many_nan_steps_stop_the_run_with_a_checkpoint(tmp_path, monkeypatch, capsys):
    nan_rewards_on(monkeypatch, set(range(1, 100)))
    code = main(["train", *NAN_RUN, "steps=10", "optim.max_nonfinite_steps=2", f"output_dir={tmp_path}"])
    out = capsys.readouterr().err
    err = out.splitlines()[-1]  # after any progress bars of transformers
    assert "Traceback" not in out
    run_dir = next(tmp_path.iterdir())
    checkpoint = run_dir / CHECKPOINTS / "step-000002"
    assert code == 1
    assert err == (f"longcot: error: stopped at RL step 2: 2 steps in a row had a non-finite loss or gradient "
                   f"in every update (optim.max_nonfinite_steps=2); checkpoint in {checkpoint}")
    assert latest_checkpoint(run_dir) == checkpoint
    assert [r["skipped_updates/total"] for r in rows(run_dir) if r["phase"] == "rl"] == [4, 8]


def test_resumed_tensorboard_events_hold_each_step_once(tmp_path, monkeypatch):
    """Event files cannot be truncated, so a resume rebuilds them from the metrics rows it keeps."""
    import sys
    import types

    from longcot.engine.metrics import MetricsLogger

    writers = []

    class Writer:  # stands in for torch.utils.tensorboard.SummaryWriter (tensorboard is optional)
        def __init__(self, log_dir):
            Path(log_dir).mkdir(parents=True, exist_ok=True)
            (Path(log_dir) / f"events.{len(writers)}").write_text("")
            self.scalars = []
            writers.append(self)

        def add_scalar(self, tag, value, step):
            self.scalars.append((tag, value, step))

        def close(self):
            pass

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=Writer))
    first = MetricsLogger(tmp_path, tensorboard=True)
    for step in range(1, 6):
        first.log({"phase": "rl", "step": step, "reward": float(step)})
    first.close()
    resumed = MetricsLogger(tmp_path, tensorboard=True, keep_rows=3)  # checkpoint after step 3
    for step in (4, 5):
        resumed.log({"phase": "rl", "step": step, "reward": 10.0 * step})
    assert writers[1].scalars == [("rl/reward", 1.0, 1), ("rl/reward", 2.0, 2), ("rl/reward", 3.0, 3),
                                  ("rl/reward", 40.0, 4), ("rl/reward", 50.0, 5)]
    assert [p.name for p in (tmp_path / "tensorboard").iterdir()] == ["events.1"]  # the old file is gone
