"""End-to-end runs of the trainer on a tiny model and the built-in task (seconds each)."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from longcot.engine import TrainConfig, Trainer
from longcot.engine.config import load_config
from longcot.engine.rollout import HFGenerator

LONGCOT = str(Path(sys.executable).with_name("longcot"))

TINY = [
    "model.tiny.layers=1", "model.tiny.hidden=64", "model.tiny.heads=1",
    "data.addition.digits=1", "data.addition.n_train=60", "data.addition.n_heldout=16",
    "eval_size=8", "rollout.prompts_per_step=4", "rollout.samples_per_prompt=4",
    "rollout.max_new_tokens=24", "algorithm.mini_batch_size=8", "algorithm.micro_batch_size=4",
    "sft.steps=6", "sft.batch_size=16", "sft.warmup_steps=2", "sft.eval_size=8", "steps=2",
    "logging.progress=false", "logging.tensorboard=false",
]

TIMING = ("time/", "tokens_per_second")


def tiny_config(tmp_path, *extra):
    return load_config(None, [*TINY, f"output_dir={tmp_path}", *extra])


def rl_rows(run_dir):
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["phase"] == "rl"]


def test_ppo_run_writes_every_output(tmp_path):
    summary = Trainer(tiny_config(tmp_path, "logging.plots=true")).fit()
    run = Path(summary["run_dir"])
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "reward.png", "accuracy.png",
                 "length.png", "kl.png", "final/config.json", "final/model.safetensors"):
        assert (run / name).exists(), name
    saved = json.loads((run / "summary.json").read_text())
    for key in ("init_accuracy", "final_accuracy", "wall_seconds", "steps"):
        assert key in saved
    assert saved["steps"] == 2 and 0 <= saved["final_accuracy"] <= 1
    rows = rl_rows(run)
    assert [r["step"] for r in rows] == [1, 2]
    for key in ("reward/mean", "accuracy", "response_length/mean", "response_length/max", "exceed_rate",
                "repetition_rate", "kl", "entropy", "clip_frac", "value_loss", "grad_norm",
                "reflection/wait", "tokens_per_second", "time/rollout", "time/scoring",
                "time/experience", "time/update", "time/weight_sync"):
        assert rows[-1].get(key) is not None, key
    # The final policy loads back with transformers and generates.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(run / "final")
    tok = AutoTokenizer.from_pretrained(run / "final")
    ids = torch.tensor([tok("3+4=", add_special_tokens=False)["input_ids"]])
    assert model.generate(ids, max_new_tokens=3, do_sample=False).shape[1] == ids.shape[1] + 3


def test_same_seed_same_metrics(tmp_path):
    runs = [Trainer(tiny_config(tmp_path / str(i), "algorithm.name=grpo", "model.tiny.layers=1")).fit()
            for i in range(2)]
    a, b = (rl_rows(r["run_dir"]) for r in runs)
    strip = [{k: v for k, v in row.items() if not k.startswith(TIMING)} for row in a + b]
    assert strip[: len(a)] == strip[len(a):]


@pytest.mark.parametrize("algorithm, extra", [
    ("grpo", []), ("reinforce++", []), ("rloo", []), ("reinforce_baseline", []),
    # Dr. GRPO with GSPO's sequence ratio and a straight-through KL term
    ("grpo", ["algorithm.grpo_std=none", "algorithm.loss_agg=seq-mean-token-sum-norm", "algorithm.ratio=sequence",
              "algorithm.kl_estimator=k3+", "algorithm.kl_clamp=5"]),
])
def test_critic_free_runs(tmp_path, algorithm, extra):
    summary = Trainer(tiny_config(tmp_path, f"algorithm.name={algorithm}", "sft.enabled=false",
                                  "algorithm.kl_in=loss", "algorithm.kl_estimator=k3", *extra)).fit()
    rows = rl_rows(summary["run_dir"])
    assert len(rows) == 2 and "value_loss" not in rows[-1]
    assert all(math.isfinite(r["reward/mean"]) for r in rows)
    assert all(r["skipped_updates"] == 0 and math.isfinite(r["pg_loss"]) for r in rows)


def test_policy_moves_and_reference_stays(tmp_path):
    cfg = tiny_config(tmp_path, "optim.lr=1e-2", "optim.warmup_steps=2")
    trainer = Trainer(cfg)
    summary = trainer.fit()
    assert [r["lr"] for r in rl_rows(summary["run_dir"])] == [5e-3, 1e-2]  # linear warm-up
    changed = any(not torch.equal(p, r) for p, r in zip(trainer.policy.parameters(), trainer.reference.parameters()))
    assert changed
    assert not any(p.requires_grad for p in trainer.reference.parameters())


def test_sft_command(tmp_path):
    proc = subprocess.run(
        [LONGCOT, "sft", *TINY, f"output_dir={tmp_path}"], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    run = next(tmp_path.iterdir())
    assert (run / "final" / "model.safetensors").exists()
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 6 and losses[-1] < losses[0]


def test_sft_stops_at_the_validation_target(tmp_path):
    from longcot.engine.sft import run_sft
    from longcot.engine.task import setup_task

    cfg = tiny_config(tmp_path, "sft.steps=50", "sft.eval_every=3", "sft.target_accuracy=0.5")
    setup = setup_task(cfg)
    assert len(setup.valid.ids) == 8 and not set(map(tuple, setup.valid.ids)) & set(map(tuple, setup.train.ids))
    probes = iter([0.1, 0.3, 0.6, 0.9])
    rows = []
    summary = run_sft(setup.policy, setup.sft_examples, cfg.sft, 0, 0, False, rows.append, lambda: next(probes))
    assert summary["sft_steps"] == 9 and summary["sft_valid_accuracy"] == 0.6
    assert [r["valid_accuracy"] for r in rows if "valid_accuracy" in r] == [0.1, 0.3, 0.6]
    assert setup.policy.training is False


def test_trainer_probes_validation_during_sft(tmp_path):
    # An unreachable target: SFT runs all its steps, probing every 3 and logging each probe.
    summary = Trainer(tiny_config(tmp_path, "sft.eval_every=3", "sft.target_accuracy=1.0")).fit()
    rows = [json.loads(line) for line in (Path(summary["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    probed = [r["step"] for r in rows if r["phase"] == "sft" and "valid_accuracy" in r]
    assert probed == [3, 6] and summary["sft_steps"] == 6
    assert 0 <= summary["sft_valid_accuracy"] <= 1


def test_api_exports():
    assert TrainConfig().algorithm.name == "ppo"


def test_rollouts_stop_looping_responses_when_asked(tmp_path, monkeypatch):
    """rollout.stop_on_repetition: RL rollouts end looping responses early (scored as truncated:
    the exceed penalty), the metrics count them and the tokens saved; evaluations decode to the
    end."""
    calls = []
    generate = HFGenerator.generate
    monkeypatch.setattr(HFGenerator, "generate",
                        lambda self, *a, **k: calls.append(k.get("stop_on_repetition")) or generate(self, *a, **k))
    # The untrained tiny model repeats itself: a 2-gram seen twice stops most rows at once.
    cfg = tiny_config(tmp_path, "sft.enabled=false", "rollout.stop_on_repetition.enabled=true",
                      "rollout.stop_on_repetition.n=2", "rollout.stop_on_repetition.min_repeats=2")
    tr = Trainer(cfg)
    summary = tr.fit()
    assert (2, 2) in calls and None in calls  # RL rollouts stop; the evaluations (greedy) do not
    rows = rl_rows(summary["run_dir"])
    for r in rows:
        assert 0 < r["stop/repetition"] <= 1 and r["stop/tokens_saved"] > 0
        assert r["exceed_rate"] + r["stop/repetition"] <= 1
