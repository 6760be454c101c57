"""No forward the step does not use: the old-policy forward skipped for on-policy updates, the
reference neither built nor run without a KL term."""

import copy
import json
from pathlib import Path

import pytest
import torch
from test_micro_batches import UPDATE_TERMS, _experience_and_grads, _rollout, models  # noqa: F401
from test_trainer import rl_rows, tiny_config

import longcot.engine.trainer as trainer_module
from longcot.engine import Trainer
from longcot.engine.config import load_config
from longcot.engine.data import addition
from longcot.engine.models import build_char_tokenizer


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


def test_old_logprobs_source_takes_an_exact_sampler():
    ppo = load_config(None, []).algorithm  # KL in the reward, two mini-batches
    assert ppo.old_logprobs_source(128, sampler_exact=True) == "rollout"
    assert load_config(None, ["algorithm.old_logprobs=recompute"]).algorithm.old_logprobs_source(
        128, sampler_exact=True) == "recompute"
    on_policy = load_config(None, ["algorithm.kl_coef=0", "algorithm.mini_batch_size=128"]).algorithm
    assert on_policy.old_logprobs_source(128, sampler_exact=True) == "update"


@pytest.mark.parametrize("precision, policy_forwards", [("fp32", False), ("bf16-mixed", True)])
def test_default_ppo_takes_the_hf_loops_log_probs_in_fp32(tmp_path, monkeypatch, precision, policy_forwards):
    """The default run (KL in the reward) needs old log-probs before the update: in fp32 the HF
    loop's own are taken and the policy runs no experience forward; in bf16 they are recomputed."""
    calls = []
    forward = trainer_module.response_logprobs
    monkeypatch.setattr(trainer_module, "response_logprobs",
                        lambda model, *a, **k: calls.append(model) or forward(model, *a, **k))
    tr = Trainer(tiny_config(tmp_path, f"model.precision={precision}"))
    tr.fit()
    assert tr.reference is not None and any(m is tr.reference for m in calls)
    assert any(m is tr.policy for m in calls) == policy_forwards


def test_no_kl_term_builds_and_runs_no_reference(tmp_path, monkeypatch):
    calls = []
    forward = trainer_module.response_logprobs
    monkeypatch.setattr(trainer_module, "response_logprobs",
                        lambda model, *a, **k: calls.append(k.get("with_entropy")) or forward(model, *a, **k))
    tr = Trainer(tiny_config(tmp_path, "algorithm.name=grpo", "algorithm.kl_coef=0", "algorithm.mini_batch_size=16"))
    summary = tr.fit()
    assert tr.reference is None and tr.critic is None
    assert not (Path(summary["run_dir"]) / "reference").exists()
    # One update per rollout and no KL: no experience forward at all, and the logged entropy of
    # rows the update skips (zero advantage) is the HF loop's (fp32), not a forward of its own.
    assert calls == []
    rows = rl_rows(summary["run_dir"])
    assert all("kl" not in r and r["entropy"] is not None and r["approx_kl"] == 0 for r in rows)
    # resuming with a KL term needs the reference the run never saved
    from longcot.engine.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match="no reference/"):
        Trainer(load_config(None, [f"resume={summary['run_dir']}", "algorithm.kl_coef=0.1"])).fit()
    saved = json.loads((Path(summary["run_dir"]) / "summary.json").read_text())
    assert saved["steps"] == 2


@pytest.mark.parametrize("overrides", [
    ["algorithm.mini_batch_size=7"],  # one mini-batch, on-policy: some rows skipped
    # two epochs of mini-batches of 2 rows off-policy: most mini-batches have no row to forward
    ["algorithm.mini_batch_size=2", "algorithm.epochs=2", "algorithm.old_logprobs=recompute",
     "algorithm.loss_agg=seq-mean-token-mean"],
])
def test_rows_without_advantage_are_skipped_exactly(models, overrides):  # noqa: F811
    """Skipping the zero-advantage rows' forward and backward leaves the update (Adam's step on
    every parameter) and the logged entropy as they are with every row forwarded."""
    policy, _, vocab = models
    live = torch.tensor([0, 0, 1, 0, 0, 0, 1], dtype=torch.bool)  # rows 2 and 6 have an advantage
    results = []
    for skip in (True, False):
        model = copy.deepcopy(policy)
        cfg = load_config(None, ["algorithm.name=grpo", "rollout.prompts_per_step=4", "rollout.samples_per_prompt=2",
                                 "algorithm.kl_coef=0", "optim.lr=1e-2", *overrides])
        tr = Trainer.from_models(cfg, model, None)
        # SGD with momentum and decay, which (like Adam) moves weights on a zero gradient, but
        # without Adam's division by the gradient's size, which turns round-off of the
        # zero-in-theory gradients (the key biases') into whole steps.
        tr.optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)
        if not skip:
            tr._rows_with_gradient = lambda exp, kl_in_loss: None
        exp = tr.experience(_rollout(vocab))
        mask = exp.sb.mask
        exp.advantages = torch.randn(mask.shape, generator=torch.Generator().manual_seed(5)) * mask * live[:, None]
        forwarded = []
        hook = model.model.embed_tokens.register_forward_hook(  # rows forwarded for a backward
            lambda m, i, o, seen=forwarded: seen.append(i[0].shape[0] if torch.is_grad_enabled() else 0))
        stats = tr.update(exp)
        hook.remove()
        results.append((dict(model.named_parameters()), exp.entropy.clone(), stats, sum(forwarded)))
    (skipped, ent_s, st_s, rows_s), (full, ent_f, st_f, rows_f) = results
    assert rows_s < rows_f  # the skip happened
    assert (ent_s - ent_f).abs().max().item() <= 1e-6
    assert st_s["pg_loss"] == pytest.approx(st_f["pg_loss"], abs=1e-7)
    for name, p in full.items():
        assert torch.allclose(skipped[name], p, rtol=0, atol=1e-6), (name, (skipped[name] - p).abs().max().item())
        assert not torch.equal(p, dict(policy.named_parameters())[name]) or "norm" in name, name


def test_skipped_rows_take_the_samplers_entropy(models):  # noqa: F811
    """With the HF loop sampling from the policy in fp32, the logged entropy of the rows the
    update skips is the sampler's: no forward of their own, and the numbers a forward gives."""
    policy, _, vocab = models
    model = copy.deepcopy(policy)
    cfg = load_config(None, ["algorithm.name=grpo", "rollout.prompts_per_step=4", "rollout.samples_per_prompt=2",
                             "algorithm.kl_coef=0", "algorithm.mini_batch_size=8", "rollout.temperature=1.0"])
    tr = Trainer.from_models(cfg, model, None)
    tr.tokenizer = build_char_tokenizer(addition.CHARSET)
    tr.generator = tr._hf_generator()
    assert tr.generator.with_entropy
    prompts = [torch.randint(3, vocab, (5,), generator=torch.Generator().manual_seed(i)).tolist() for i in range(4)]
    rollout = tr.generator.generate(prompts, 2, 1.0, 1.0, 12, seed=3)
    exp = tr.experience(rollout)
    live = torch.tensor([1, 1, 0, 0, 1, 1, 0, 0], dtype=torch.bool)
    exp.advantages = torch.randn(exp.sb.mask.shape, generator=torch.Generator().manual_seed(5)) * exp.sb.mask
    exp.advantages *= live[:, None]
    with torch.no_grad():
        from longcot.engine.policy_forward import response_logprobs

        _, want = response_logprobs(model, exp.sb, 1.0, with_entropy=True)
    forwarded = []
    hook = model.model.embed_tokens.register_forward_hook(lambda m, i, o: forwarded.append(i[0].shape[0]))
    tr.update(exp)
    hook.remove()
    assert sum(forwarded) == int(live.sum())  # only the rows with an advantage were forwarded
    assert (exp.entropy - want).abs().max().item() <= 1e-5
    assert exp.entropy[~live].abs().sum() > 0
