"""The Hugging Face `generate` backend: the Rollout contract, and sampling from softmax(logits / T)
whatever the model folder's generation_config says."""

import copy

import pytest
import torch

from longcot.engine.data import CHARSET
from longcot.engine.models import build_char_tokenizer, build_tiny_model
from longcot.engine.policy_forward import response_logprobs, sequence_batch
from longcot.engine.rollout import HFGenerator


@pytest.fixture(scope="module")
def setup():
    tok = build_char_tokenizer(CHARSET)
    model = build_tiny_model(tok, layers=1, hidden=64, heads=1, seed=3).eval()
    prompts = [tok(t, add_special_tokens=False)["input_ids"] for t in ("12+7=", "3+4=", "100+23=")]
    return tok, model, prompts


def _generator(model, tok):
    return HFGenerator(model, tok.eos_token_id, tok.pad_token_id)


def test_rollout_contract_and_logprobs(setup):
    tok, model, prompts = setup
    r = _generator(model, tok).generate(prompts, 4, 0.7, 1.0, 16, seed=5)
    assert r.tokens.shape[0] == 12 and torch.equal(r.prompt_index, torch.arange(3).repeat_interleave(4))
    assert r.prompts == [p for p in prompts for _ in range(4)]
    ends = r.tokens[torch.arange(len(r)), r.lengths - 1] == tok.eos_token_id
    assert torch.equal(ends, ~r.truncated) and (r.lengths <= 16).all()
    assert (r.tokens[~r.mask] == tok.pad_token_id).all() and (r.logprobs[~r.mask] == 0).all()
    with torch.no_grad():
        logp, _ = response_logprobs(model, sequence_batch(r.prompts, r.tokens, r.lengths, tok.pad_token_id), 0.7)
    assert torch.allclose(logp[r.mask], r.logprobs[r.mask], atol=1e-4)
    again = _generator(model, tok).generate(prompts, 4, 0.7, 1.0, 16, seed=5)
    assert torch.equal(again.tokens, r.tokens)


def test_model_generation_config_does_not_change_sampling(setup):
    """A folder's sampling settings (as instruct models ship them) are not applied: the same
    seed gives the same tokens as with a clean generation_config, greedy and sampled."""
    tok, model, prompts = setup
    tampered = copy.deepcopy(model)
    g = tampered.generation_config
    g.repetition_penalty, g.top_k, g.no_repeat_ngram_size, g.min_new_tokens = 5.0, 2, 1, 12
    g.suppress_tokens = list(range(3, 10))
    for temperature in (0.0, 1.0):
        clean = _generator(model, tok).generate(prompts, 2, temperature, 1.0, 16, seed=11)
        other = _generator(tampered, tok).generate(prompts, 2, temperature, 1.0, 16, seed=11)
        assert torch.equal(clean.tokens, other.tokens), temperature
        assert torch.equal(clean.lengths, other.lengths)
