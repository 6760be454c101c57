"""No forward the step does not use: the old-policy forward skipped for on-policy updates, the
reference neither built nor run without a KL term."""

import json
from pathlib import Path

import pytest
from test_micro_batches import UPDATE_TERMS, _experience_and_grads, models  # noqa: F401
from test_trainer import rl_rows, tiny_config

import longcot.engine.trainer as trainer_module
from longcot.engine import Trainer
from longcot.engine.config import load_config


def test_on_policy_update_equals_recomputed_old_logprobs(models):  # noqa: F811
    policy, critic, vocab = models
    terms = [t for t in UPDATE_TERMS if not t.startswith("algorithm.dual_clip")]
    # _experience_and_grads perturbs the old log-probs of a recompute; here both must be exact.
    grads = {}
    for source in ("recompute", "auto"):
        exp, grads[source] = _experience_and_grads(
            [*terms, "algorithm.max_tokens_per_micro_batch=32", f"algorithm.old_logprobs={source}"],
            policy, critic, vocab, perturb=False)
        assert (exp.old_logp is None) == (source == "auto")
    for name, g in grads["recompute"].items():
        rel = ((g - grads["auto"][name]).norm() / g.norm().clamp_min(1e-12)).item()
        assert rel <= 1e-5, (name, rel)


@pytest.mark.parametrize("overrides, source", [
    ([], "recompute"),  # the default PPO: KL in the reward
    (["algorithm.kl_in=loss"], "update"),
    (["algorithm.kl_coef=0"], "update"),
    (["algorithm.kl_in=loss", "algorithm.epochs=2"], "recompute"),
    (["algorithm.kl_in=loss", "algorithm.mini_batch_size=64"], "recompute"),  # two mini-batches of 128
    (["algorithm.old_logprobs=rollout"], "rollout"),
])
def test_old_logprobs_source(overrides, source):
    a = load_config(None, ["algorithm.mini_batch_size=128", *overrides]).algorithm
    assert a.old_logprobs_source(128) == source


def test_no_kl_term_builds_and_runs_no_reference(tmp_path, monkeypatch):
    calls = []
    forward = trainer_module.response_logprobs
    monkeypatch.setattr(trainer_module, "response_logprobs",
                        lambda model, *a, **k: calls.append(model) or forward(model, *a, **k))
    tr = Trainer(tiny_config(tmp_path, "algorithm.name=grpo", "algorithm.kl_coef=0", "algorithm.mini_batch_size=16"))
    summary = tr.fit()
    assert tr.reference is None and tr.critic is None
    assert not (Path(summary["run_dir"]) / "reference").exists()
    assert calls == []  # one update per rollout and no KL: no experience forward at all
    rows = rl_rows(summary["run_dir"])
    assert all("kl" not in r and r["entropy"] is not None and r["approx_kl"] == 0 for r in rows)
    # resuming with a KL term needs the reference the run never saved
    from longcot.engine.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match="no reference/"):
        Trainer(load_config(None, [f"resume={summary['run_dir']}", "algorithm.kl_coef=0.1"])).fit()
    saved = json.loads((Path(summary["run_dir"]) / "summary.json").read_text())
    assert saved["steps"] == 2
