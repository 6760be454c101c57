"""Precision modes and device placement of a training run; SFT micro-batches."""

import copy

import pytest
import torch
from test_trainer import rl_rows, tiny_config

from longcot.engine import Trainer
from longcot.engine.config import SFTConfig
from longcot.engine.data import addition
from longcot.engine.models import build_char_tokenizer, build_tiny_model
from longcot.engine.sft import run_sft


class RecordingTrainer(Trainer):
    """Keeps the last step's experience, to check where its tensors live."""

    def experience(self, rollout):
        self.last_experience = super().experience(rollout)
        return self.last_experience


def _optimizer_state_dtypes(optimizer):
    return {v.dtype for s in optimizer.state.values() for k, v in s.items() if k != "step"}


@pytest.mark.parametrize("precision, param, compute", [
    ("bf16-mixed", torch.float32, torch.bfloat16),
    ("bf16", torch.bfloat16, torch.bfloat16),
])
def test_precision_modes_train(tmp_path, precision, param, compute):
    tr = RecordingTrainer(tiny_config(tmp_path, f"model.precision={precision}", "model.gradient_checkpointing=true"))
    summary = tr.fit()
    assert {p.dtype for p in tr.policy.parameters()} == {param}
    assert {p.dtype for p in tr.reference.parameters()} == {compute}
    assert _optimizer_state_dtypes(tr.optimizer) == {param}
    assert {p.dtype for p in tr.critic.backbone.parameters()} == {param}
    assert tr.critic.value_head.weight.dtype == torch.float32
    exp = tr.last_experience
    for name in ("old_logp", "ref_logp", "entropy", "values", "advantages"):
        assert getattr(exp, name).dtype == torch.float32, name
    rows = rl_rows(summary["run_dir"])
    assert all(r["grad_norm"] is not None and r["kl"] is not None for r in rows)


def test_sft_micro_batches_give_the_whole_batch_gradient():
    tok = build_char_tokenizer(addition.CHARSET)
    model = build_tiny_model(tok, layers=1, hidden=64, heads=1)
    task = addition.make_addition_task(2, 40, 4, seed=0, n_valid=4)
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    examples = [(enc(p.prompt), enc(p.demonstration) + [tok.eos_token_id]) for p in task.train]
    grads = []
    for budget in (None, 40):
        m = copy.deepcopy(model)
        run_sft(m, examples, SFTConfig(steps=1, batch_size=16, target_accuracy=None, max_tokens_per_micro_batch=budget),
                pad_id=0, seed=0, progress=False)
        grads.append([p.grad.clone() for p in m.parameters()])
    for a, b in zip(*grads):
        assert ((a - b).norm() / a.norm().clamp_min(1e-12)).item() <= 1e-5


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_train_on_cuda_runs_the_triton_kernels(tmp_path, compiled_triton):
    from longcot.kernels import dispatch_counts, reset_dispatch_counts

    reset_dispatch_counts()
    tr = RecordingTrainer(tiny_config(tmp_path, "model.device=cuda"))
    tr.fit()
    assert tr.precision.name == "bf16-mixed"  # the CUDA default
    for model in (tr.policy, tr.reference, tr.critic):
        assert {p.device.type for p in model.parameters()} == {"cuda"}
    assert {v.device.type for s in tr.optimizer.state.values() for v in s.values() if torch.is_tensor(v)} == {"cuda"}
    exp = tr.last_experience
    for t in (exp.rollout.tokens, exp.rollout.lengths, exp.sb.input_ids, exp.old_logp, exp.ref_logp, exp.values,
              exp.advantages, exp.returns):
        assert t.device.type == "cuda"
    counts = dispatch_counts()
    for op in ("linear_token_logprobs", "ppo_policy_loss", "token_rewards", "repetition_mask"):
        assert counts.get((op, "triton"), 0) > 0, (op, counts)
    assert not any(impl == "cpu" for (_, impl) in counts), counts
