"""Token-budget micro-batches, activation checkpointing and precision: the same numbers as the
padded count-based path, whatever the cut."""

import copy

import pytest
import torch

from longcot.engine import Trainer
from longcot.engine.config import ConfigError, load_config
from longcot.engine.data import addition
from longcot.engine.device import enable_gradient_checkpointing
from longcot.engine.models import ValueModel, build_char_tokenizer, build_tiny_model
from longcot.engine.policy_forward import (
    micro_batch,
    padding_share,
    plan_micro_batches,
    sequence_batch,
)
from longcot.engine.rollout import Rollout

# Ragged responses: two of one token, and one (prompt 6 + 30 tokens) over the budget of 32.
PROMPT_LENS = [3, 5, 4, 6, 2, 5, 3]
LENGTHS = [1, 1, 7, 30, 12, 25, 9]
BUDGET = 32


def test_plan_respects_the_budget_and_covers_every_row():
    widths = [p + n for p, n in zip(PROMPT_LENS, LENGTHS)]
    plan = plan_micro_batches(widths, list(range(len(widths))), BUDGET, max_rows=99)
    assert sorted(r for part in plan for r in part) == list(range(len(widths)))
    for part in plan:
        widest = max(widths[r] for r in part)
        assert len(part) * widest <= BUDGET or len(part) == 1
    assert [3] in plan  # wider than the budget: alone
    # count mode: fixed row counts in the given order
    assert plan_micro_batches(widths, [6, 0, 2, 1], None, max_rows=3) == [[6, 0, 2], [1]]


def test_micro_batch_trims_to_its_own_width():
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(3, 20, (len(LENGTHS), max(LENGTHS)), generator=gen)
    prompts = [list(range(3, 3 + p)) for p in PROMPT_LENS]
    sb = sequence_batch(prompts, tokens, torch.tensor(LENGTHS), pad_id=0)
    assert sb.input_ids.shape == (7, 36)
    small = micro_batch(sb, [0, 1])
    assert small.input_ids.shape == (2, 6) and small.tokens.shape == (2, 1)
    assert torch.equal(small.input_ids, sb.input_ids[[0, 1], :6])
    assert padding_share([small]) == pytest.approx(1 - (4 + 6) / 12)
    full = micro_batch(sb, [0, 1], trim=False)
    assert full.input_ids.shape == (2, 36)


def _rollout(vocab: int) -> Rollout:
    gen = torch.Generator().manual_seed(1)
    steps = max(LENGTHS)
    tokens = torch.randint(3, vocab, (len(LENGTHS), steps), generator=gen)
    lengths = torch.tensor(LENGTHS)
    mask = torch.arange(steps)[None, :] < lengths[:, None]
    tokens = tokens.masked_fill(~mask, 0)
    prompts = [torch.randint(3, vocab, (p,), generator=gen).tolist() for p in PROMPT_LENS]
    return Rollout(prompts, torch.arange(len(LENGTHS)) // 2, tokens, lengths, torch.zeros(len(LENGTHS), dtype=torch.bool),
                   torch.zeros(tokens.shape))


def _learner(overrides: list[str], policy, critic) -> Trainer:
    """A Trainer holding the given models, with SGD(lr=0) optimisers so that the gradients of
    one update stay readable in .grad afterwards."""
    cfg = load_config(None, ["rollout.prompts_per_step=4", "rollout.samples_per_prompt=2", "algorithm.mini_batch_size=7",
                             "optim.grad_clip=null", "algorithm.kl_coef=0.1", "algorithm.old_logprobs=recompute",
                             *overrides])
    tr = Trainer.from_models(cfg, policy, critic)
    tr.optimizer = torch.optim.SGD(policy.parameters(), lr=0.0)
    tr.critic_optimizer = torch.optim.SGD(critic.parameters(), lr=0.0)
    return tr


@pytest.fixture(scope="module")
def models():
    tok = build_char_tokenizer(addition.CHARSET)
    policy = build_tiny_model(tok, layers=2, hidden=64, heads=1, seed=3)
    critic = ValueModel.from_causal_lm(policy)
    with torch.no_grad():  # a zero head would give the critic's backbone no gradient to compare
        critic.value_head.weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(4))
    return policy, critic, len(tok)


def _experience_and_grads(overrides, policy, critic, vocab, checkpointing=False, perturb=True, mlp_tile=None):
    policy, critic = copy.deepcopy(policy), copy.deepcopy(critic)
    if checkpointing:
        enable_gradient_checkpointing(policy, mlp_tile)
        enable_gradient_checkpointing(critic, mlp_tile)
    tr = _learner(overrides, policy, critic)
    exp = tr.experience(_rollout(vocab))
    gen = torch.Generator().manual_seed(2)
    mask = exp.sb.mask
    noise = 0.3 * torch.randn(mask.shape, generator=gen)
    if perturb:  # off-policy old log-probs, so that clipping and the dual clip are active
        exp.old_logp = (exp.old_logp + noise) * mask
    exp.advantages = torch.randn(mask.shape, generator=gen) * mask
    exp.returns = torch.randn(mask.shape, generator=gen) * mask
    tr.update(exp)
    grads = {f"policy.{n}": p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None}
    grads.update({f"critic.{n}": p.grad.clone() for n, p in critic.named_parameters() if p.grad is not None})
    return exp, grads


UPDATE_TERMS = ["algorithm.kl_in=loss", "algorithm.entropy_coef=0.01", "algorithm.dual_clip=3.0"]


# seq-mean-token-sum-norm divides by a constant (rollout.max_new_tokens), not by a micro-batch's
# trimmed width; GSPO's sequence ratio is a per-row quantity; k3+ is a straight-through KL term.
@pytest.mark.parametrize("agg, extra", [
    ("token-mean", []), ("seq-mean-token-mean", []), ("seq-mean-token-sum", []),
    ("seq-mean-token-sum-norm", []),
    ("seq-mean-token-mean", ["algorithm.ratio=sequence", "algorithm.kl_estimator=k3+"]),
])
def test_token_budget_path_equals_padded_path(models, agg, extra):
    policy, critic, vocab = models
    common = [f"algorithm.loss_agg={agg}", *UPDATE_TERMS, *extra]
    padded, g_padded = _experience_and_grads(
        [*common, "algorithm.max_tokens_per_micro_batch=null", "algorithm.micro_batch_size=2"], policy, critic, vocab)
    budget, g_budget = _experience_and_grads([*common, f"algorithm.max_tokens_per_micro_batch={BUDGET}"],
                                             policy, critic, vocab)
    for name in ("old_logp", "ref_logp", "entropy", "values"):
        diff = (getattr(padded, name) - getattr(budget, name)).abs().max().item()
        assert diff <= 1e-5, (name, diff)
    assert g_padded.keys() == g_budget.keys() and len(g_padded) > 10
    for name, g in g_padded.items():
        rel = ((g - g_budget[name]).norm() / g.norm().clamp_min(1e-12)).item()
        assert rel <= 1e-4, (name, rel)


@pytest.mark.parametrize("mlp_tile", [None, 5])
def test_gradient_checkpointing_gives_the_same_gradients(models, mlp_tile):
    policy, critic, vocab = models
    overrides = [f"algorithm.max_tokens_per_micro_batch={BUDGET}", *UPDATE_TERMS]
    _, plain = _experience_and_grads(overrides, policy, critic, vocab)
    _, ckpt = _experience_and_grads(overrides, policy, critic, vocab, checkpointing=True, mlp_tile=mlp_tile)
    for name, g in plain.items():
        rel = ((g - ckpt[name]).norm() / g.norm().clamp_min(1e-12)).item()
        assert rel <= 1e-5, (name, rel)


def test_mlp_tiles_run_in_the_backward_and_follow_copies():
    """Tiling engages only for micro-batches over the tile, in training with gradients, and a
    deep copy (the frozen reference) runs its own weights."""
    tok = build_char_tokenizer(addition.CHARSET)
    model = build_tiny_model(tok, layers=1, hidden=64, heads=1, seed=5)
    enable_gradient_checkpointing(model, 4)
    mlp = model.model.layers[0].mlp
    calls = []
    mlp.up_proj.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[:-1].numel()))
    ids = torch.randint(3, len(tok), (2, 5), generator=torch.Generator().manual_seed(0))
    model.train()
    model(ids).logits.sum().backward()
    # 10 tokens in tiles of 4, in the forward and in every recompute of the backward.
    assert calls[:3] == [4, 4, 2] and len(calls) > 3 and max(calls) == 4, calls
    calls.clear()
    with torch.no_grad():
        model(ids)
    assert calls == [10]
    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin.model.layers[0].mlp.down_proj.weight.zero_()
        assert not torch.equal(twin(ids).logits, model(ids).logits)


def test_budget_changes_cut_not_gradients(models):
    """Two different budgets (different cuts, different trims) give the same update."""
    policy, critic, vocab = models
    common = ["algorithm.loss_agg=seq-mean-token-mean", *UPDATE_TERMS]
    _, a = _experience_and_grads([*common, "algorithm.max_tokens_per_micro_batch=8"], policy, critic, vocab)
    _, b = _experience_and_grads([*common, "algorithm.max_tokens_per_micro_batch=1000"], policy, critic, vocab)
    for name, g in a.items():
        assert ((g - b[name]).norm() / g.norm().clamp_min(1e-12)).item() <= 1e-4, name


def test_cuda_without_cuda_is_a_config_error():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ConfigError, match=r"^model\.device: cuda requested but no CUDA device"):
        load_config(None, ["model.device=cuda"])
    with pytest.raises(ConfigError, match=r"^model\.device: expected auto, cpu, cuda or cuda:N"):
        load_config(None, ["model.device=gpu"])
    assert load_config(None, []).model.resolved_device().type == "cpu"
    assert load_config(None, []).model.resolved_precision().name == "fp32"
