from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from longcot.engine.data import CHARSET, make_addition_task
from longcot.engine.models import (
    ModelError,
    ValueModel,
    build_char_tokenizer,
    build_tiny_model,
    last_hidden_states,
    lm_head_weight,
    load_policy,
    load_reference,
    save_model,
)
from longcot.kernels.linear_logprobs import linear_token_logprobs

SAMPLE = "47+85=7+5=12 c1\n4+8+1=13 c1\n\\boxed{132}"
# Spaces and newlines at the edges and in runs are where a lossy decoder shows.
EDGY = "  1 +\n\n2 = 3 \n"


@pytest.fixture(scope="module")
def tokenizer():
    return build_char_tokenizer(CHARSET)


@pytest.fixture(scope="module")
def small_model(tokenizer):
    return build_tiny_model(tokenizer, layers=2, hidden=128, heads=2, max_positions=64)


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory, tokenizer, small_model):
    return save_model(small_model, tokenizer, tmp_path_factory.mktemp("models") / "policy")


def _batch(tokenizer, texts):
    """Right-padded [B, T] ids and mask."""
    enc = [tokenizer(t)["input_ids"] for t in texts]
    width = max(map(len, enc))
    ids = torch.full((len(enc), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(enc), width), dtype=torch.long)
    for i, e in enumerate(enc):
        ids[i, : len(e)] = torch.tensor(e)
        mask[i, : len(e)] = 1
    return ids, mask


# ------------------------------------------------------------------------------------------
# Tokenizer
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", [SAMPLE, EDGY, "", "\\boxed{}", "c"])
def test_char_tokenizer_round_trip(tokenizer, text):
    ids = tokenizer(text)["input_ids"]
    assert len(ids) == len(text)
    assert tokenizer.encode(text, add_special_tokens=True) == ids
    assert tokenizer.decode(ids) == text
    assert tokenizer.batch_decode([ids]) == [text]
    assert [tokenizer.convert_tokens_to_string([t]) for t in tokenizer.convert_ids_to_tokens(ids)] == list(text)


def test_char_tokenizer_specials_and_vocab(tokenizer):
    assert isinstance(tokenizer, PreTrainedTokenizerFast)
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    assert len(tokenizer) == len(set(CHARSET)) + 3
    ids = tokenizer(SAMPLE)["input_ids"]
    assert tokenizer.decode(ids + [tokenizer.eos_token_id, 0, 0], skip_special_tokens=True) == SAMPLE
    assert tokenizer.decode(ids + [tokenizer.eos_token_id]) == SAMPLE + "<eos>"
    # Characters outside the charset are dropped (as the Qwen2 reload would drop them).
    assert tokenizer.decode(tokenizer("1a2")["input_ids"]) == "12"
    # Ids depend on the set of characters, not on the order they were listed in.
    assert build_char_tokenizer(CHARSET[::-1]).get_vocab() == tokenizer.get_vocab()


def test_char_tokenizer_save_load(tmp_path):
    original = build_char_tokenizer(CHARSET, save_dir=tmp_path / "tok")
    loaded = AutoTokenizer.from_pretrained(tmp_path / "tok")
    assert loaded.get_vocab() == original.get_vocab()
    for text in (SAMPLE, EDGY):
        ids = original(text)["input_ids"]
        assert loaded(text)["input_ids"] == ids
        assert loaded.decode(ids) == text
    assert (loaded.pad_token_id, loaded.eos_token_id, loaded.unk_token_id) == (0, 1, 2)


def test_char_tokenizer_rejects_bad_charset():
    with pytest.raises(ValueError, match="charset"):
        build_char_tokenizer("")
    with pytest.raises(ValueError, match="ASCII"):
        build_char_tokenizer("abΩ")


def test_char_tokenizer_survives_model_folder_reload(tmp_path):
    # transformers rebuilds tokenizers of qwen2 folders as Qwen2Tokenizer; the encodings must
    # not change, including for characters the clean-up and split regex treat specially.
    charset = CHARSET + ".,'!?-\t"
    tokenizer = build_char_tokenizer(charset)
    model = build_tiny_model(tokenizer, layers=1)
    path = save_model(model, tokenizer, tmp_path / "m")
    loaded = AutoTokenizer.from_pretrained(path)
    texts = [SAMPLE, EDGY, " 'd . , ! ? \t\t x-1 \n", "1é2<eos>3 <pad>"]
    for text in texts:
        ids = tokenizer(text)["input_ids"]
        assert loaded(text)["input_ids"] == ids
        assert loaded.decode(ids) == tokenizer.decode(ids)
    assert tokenizer.decode(tokenizer(texts[2])["input_ids"]) == texts[2]
    assert len(loaded) == len(tokenizer)
    assert (loaded.pad_token_id, loaded.eos_token_id) == (0, 1)


# ------------------------------------------------------------------------------------------
# Tiny model
# ------------------------------------------------------------------------------------------


def test_default_tiny_model_shape(tokenizer):
    model = build_tiny_model(tokenizer)
    n_params = sum(p.numel() for p in model.parameters())
    assert 0.8e6 < n_params < 1.3e6, n_params
    cfg = model.config
    assert cfg.hidden_size // cfg.num_attention_heads == 64
    assert getattr(cfg, "head_dim", 64) == 64
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size) == (4, 128, len(tokenizer))
    assert cfg.eos_token_id == tokenizer.eos_token_id and cfg.pad_token_id == tokenizer.pad_token_id
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight


def test_tiny_model_is_seeded(tokenizer):
    before = torch.random.get_rng_state()
    a = build_tiny_model(tokenizer, layers=1, seed=5)
    assert torch.equal(torch.random.get_rng_state(), before)
    b = build_tiny_model(tokenizer, layers=1, seed=5)
    c = build_tiny_model(tokenizer, layers=1, seed=6)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["model.layers.0.self_attn.q_proj.weight"],
                           sc["model.layers.0.self_attn.q_proj.weight"])


def test_tiny_model_bad_shape(tokenizer):
    with pytest.raises(ValueError, match="divisible"):
        build_tiny_model(tokenizer, hidden=100, heads=3)


def test_save_and_load_policy_round_trip(tokenizer, small_model, saved_model):
    assert (saved_model / "model.safetensors").is_file()
    assert not list(saved_model.glob("*.bin"))
    model, tok = load_policy(saved_model)
    assert tok.get_vocab() == tokenizer.get_vocab()
    ids, mask = _batch(tokenizer, [SAMPLE, "12+34="])
    with torch.no_grad():
        expected = small_model(input_ids=ids, attention_mask=mask).logits
        got = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    # Plain transformers loads the folder too.
    plain = AutoModelForCausalLM.from_pretrained(saved_model)
    assert sum(p.numel() for p in plain.parameters()) == sum(p.numel() for p in small_model.parameters())
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight


def test_save_model_overwrites_atomically(tmp_path, tokenizer):
    a = build_tiny_model(tokenizer, layers=1, seed=1)
    b = build_tiny_model(tokenizer, layers=1, seed=2)
    path = tmp_path / "ckpt"
    save_model(a, tokenizer, path)
    save_model(b, tokenizer, path)
    loaded, _ = load_policy(path)
    key = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(loaded.state_dict()[key], b.state_dict()[key])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temp folders left


def test_load_reference_is_frozen(saved_model):
    ref, _ = load_reference(saved_model)
    assert not ref.training
    assert not any(p.requires_grad for p in ref.parameters())
    policy, _ = load_policy(saved_model)
    assert all(p.requires_grad for p in policy.parameters())


def test_load_dtype(saved_model):
    model, _ = load_policy(saved_model, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_model_errors(tmp_path, tokenizer, small_model):
    missing = tmp_path / "missing"
    with pytest.raises(ModelError, match=f"{missing}: model folder does not exist"):
        load_policy(missing)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelError, match=f"{empty}: no config.json"):
        load_reference(empty)
    with pytest.raises(ModelError, match="no config.json"):
        ValueModel.from_causal_lm(empty)
    # A tokenizer without eos: generation could never stop.
    no_eos_dir = tmp_path / "no_eos"
    save_model(small_model, tokenizer, no_eos_dir)
    config = json.loads((no_eos_dir / "tokenizer_config.json").read_text())
    config["eos_token"] = None
    (no_eos_dir / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match=f"{no_eos_dir}: the tokenizer has no eos token"):
        load_policy(no_eos_dir)
    # Without the key, transformers gives Qwen2 tokenizers a default eos that the model's
    # embedding does not cover.
    config.pop("eos_token")
    (no_eos_dir / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match=f"{no_eos_dir}: the tokenizer's eos token id 26 is outside"):
        load_policy(no_eos_dir)
    assert issubclass(ModelError, ValueError)


# ------------------------------------------------------------------------------------------
# Hidden states and the fused log-prob path
# ------------------------------------------------------------------------------------------


def test_hidden_states_and_head_give_model_logprobs(tokenizer, small_model):
    task = make_addition_task(n_train=3, n_heldout=0, seed=2)
    texts = [p.prompt + p.demonstration for p in task.train] + ["1+2="]
    ids, mask = _batch(tokenizer, texts)
    with torch.no_grad():
        logits = small_model(input_ids=ids, attention_mask=mask).logits
        hidden = last_hidden_states(small_model, ids, mask)
    assert hidden.shape == (*ids.shape, small_model.config.hidden_size)
    weight = lm_head_weight(small_model)
    assert weight.shape == (len(tokenizer), small_model.config.hidden_size)

    valid = mask[:, 1:].bool()
    next_tokens = ids[:, 1:][valid]
    got = linear_token_logprobs(hidden[:, :-1][valid], weight, next_tokens)
    expected = torch.log_softmax(logits[:, :-1].float(), dim=-1)[valid]
    expected = expected.gather(-1, next_tokens[:, None]).squeeze(-1)
    assert got.shape == (int(valid.sum()),)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # The head weight is the model's own parameter, so gradients reach the policy.
    assert weight is small_model.get_output_embeddings().weight


# ------------------------------------------------------------------------------------------
# Critic
# ------------------------------------------------------------------------------------------


def test_value_model_shapes_and_independence(tokenizer, small_model):
    critic = ValueModel.from_causal_lm(small_model)
    ids, mask = _batch(tokenizer, [SAMPLE, "9+9="])
    values = critic(ids, mask)
    assert values.shape == ids.shape and values.dtype == torch.float32
    assert torch.count_nonzero(values) == 0  # zero-initialised head
    # The backbone is a copy: training the critic must not move the policy.
    policy_param = small_model.model.layers[0].mlp.up_proj.weight
    critic_param = critic.backbone.layers[0].mlp.up_proj.weight
    assert torch.equal(policy_param, critic_param) and policy_param is not critic_param

    torch.nn.init.normal_(critic.value_head.weight, std=0.1)
    values = critic(ids, mask)
    values.sum().backward()
    assert critic_param.grad is not None and policy_param.grad is None
    assert critic.value_head.weight.grad is not None


def test_value_model_save_load(tmp_path, tokenizer, small_model, saved_model):
    critic = ValueModel.from_causal_lm(saved_model)
    with torch.no_grad():
        critic.value_head.weight.normal_(std=0.1)
        critic.value_head.bias.fill_(0.5)
    path = critic.save_pretrained(tmp_path / "critic", tokenizer=tokenizer)
    assert set(load_file(path / "value_head.safetensors")) == {"weight", "bias"}
    loaded = ValueModel.from_pretrained(path)
    ids, mask = _batch(tokenizer, [SAMPLE, "10+20="])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids, mask), critic(ids, mask), rtol=0, atol=0)
    # A causal-LM folder is not a saved critic.
    with pytest.raises(ModelError, match="no value_head.safetensors"):
        ValueModel.from_pretrained(saved_model)
