"""The HF backend's decode loop: the Rollout contract, greedy equality with transformers'
`generate`, the sampling distribution (log-probs against the trainer's recomputation, chi-square
of first-token frequencies against softmax(logits / T)), seeds, and that no [B, T, V] tensor is
ever held."""

import copy
import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import (
    GemmaConfig,
    GemmaForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)
from transformers.generation.logits_process import TopPLogitsWarper

import longcot.engine.rollout.hf as hf_module
from longcot.engine.data import CHARSET
from longcot.engine.models import build_char_tokenizer, build_tiny_model
from longcot.engine.policy_forward import response_logprobs, sequence_batch
from longcot.engine.rollout import HFGenerator
from longcot.engine.rollout.hf import _native_layers, _preallocatable, top_p_filter

NEVER = 10**6  # an end-of-sequence id outside the vocabulary: decoding runs to max_new_tokens


@pytest.fixture(autouse=True)
def _one_thread():
    """The models here are tiny: intra-op threads only add synchronisation, and on a busy
    machine OpenMP's waiting threads made these tests about 10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def setup():
    tok = build_char_tokenizer(CHARSET)
    model = build_tiny_model(tok, layers=1, hidden=64, heads=1, seed=3).eval()
    prompts = [tok(t, add_special_tokens=False)["input_ids"] for t in ("12+7=", "3+4=", "100+23=")]
    return tok, model, prompts


def _generator(model, tok, **kw):
    return HFGenerator(model, tok.eos_token_id, tok.pad_token_id, **kw)


def _spread(model: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """At initializer_range 0.02 a random model decodes greedily to one repeated token; weights of
    std 0.3 make rows differ and end at different steps."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model.eval()


def _hf_greedy(model, prompts, eos, pad, steps):
    """transformers' `generate`, greedy, on left-padded prompts: [B, steps'] new tokens."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad)
    attn = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        attn[i, width - len(p):] = 1
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=attn, do_sample=False, max_new_tokens=steps,
                             eos_token_id=eos, pad_token_id=pad, top_k=None, top_p=None, temperature=None)
    return out[:, width:]


def _eos_for_mixed_endings(tokens: torch.Tensor) -> int:
    """A token id that the greedy decoding emits mid-way in some rows and never in others, so
    that as end-of-sequence it stops some rows early and leaves others to max_new_tokens."""
    for cand in range(1, int(tokens.max()) + 1):
        hits = tokens == cand
        first = torch.where(hits.any(1), hits.int().argmax(1), -1)
        if ((first >= 1) & (first < tokens.shape[1] - 2)).sum() >= 2 and (first == -1).sum() >= 2:
            return cand
    raise AssertionError("no token ends some rows and not others")


def _sliding_window_twin(model: Qwen2ForCausalLM) -> Qwen2ForCausalLM:
    """The same weights with a 3-token sliding window on the second layer: a cache the
    preallocated layers do not handle, so the loop runs on transformers' DynamicCache."""
    cfg = Qwen2Config(**{**model.config.to_dict(), "use_sliding_window": True, "sliding_window": 3,
                         "max_window_layers": 1, "layer_types": None})
    twin = Qwen2ForCausalLM(cfg).eval()
    twin.load_state_dict(model.state_dict())
    return twin


FAMILIES = {  # other Llama-family models the native decode step runs: grouped-query heads, q/k norms
    "llama-gqa": (LlamaConfig, LlamaForCausalLM), "mistral": (MistralConfig, MistralForCausalLM),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM),
}


def _family_model(variant: str, vocab: int) -> torch.nn.Module:
    config_cls, model_cls = FAMILIES[variant]
    torch.manual_seed(0)
    cfg = config_cls(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                     sliding_window=None, tie_word_embeddings=False)
    return _spread(model_cls(cfg))


@pytest.mark.parametrize("variant, steps", [("preallocated", 24), ("sliding-window", 24),
                                            ("preallocated", 160),  # 160: the cache grows mid-decode
                                            ("llama-gqa", 24), ("mistral", 24), ("qwen3", 24)])
def test_greedy_equals_generate(variant, steps, monkeypatch):
    tok = build_char_tokenizer(CHARSET)
    if variant in FAMILIES:
        model = _family_model(variant, len(tok))
    else:
        model = _spread(build_tiny_model(tok, layers=2, hidden=64, heads=2, seed=3))
    if variant == "sliding-window":
        model = _sliding_window_twin(model)
    assert _preallocatable(model) == (variant != "sliding-window")
    assert _native_layers(model) == (variant != "sliding-window")
    native_steps = []
    step = hf_module._native_decode_step
    monkeypatch.setattr(hf_module, "_native_decode_step", lambda *a: native_steps.append(1) or step(*a))
    texts = ["12+7=", "3+4=", "100+23=", "9=", "55+55+55=", "8+80=", "1+2+3+4="]
    prompts = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    eos = _eos_for_mixed_endings(_hf_greedy(model, prompts, NEVER, tok.pad_token_id, steps))
    ref = _hf_greedy(model, prompts, eos, tok.pad_token_id, steps)
    is_eos = ref == eos
    ref_len = torch.where(is_eos.any(1), is_eos.int().argmax(1) + 1, steps)
    assert (ref_len < steps).sum() >= 2 and (~is_eos.any(1)).sum() >= 2  # both endings occur

    rows = []  # rows embedded per forward: the model's (prefill) or the native decode step's
    hook = model.model.embed_tokens.register_forward_hook(lambda m, a, o: rows.append(a[0].shape[0]))
    try:
        n = 2
        r = HFGenerator(model, eos, tok.pad_token_id).generate(prompts, n, 0.0, 1.0, steps, seed=0)
    finally:
        hook.remove()
    expect = ref.repeat_interleave(n, 0)
    assert torch.equal(r.tokens, expect[:, : r.tokens.shape[1]])
    assert (expect[:, r.tokens.shape[1]:] == tok.pad_token_id).all()
    assert torch.equal(r.lengths, ref_len.repeat_interleave(n))
    assert torch.equal(r.truncated, ~is_eos.any(1).repeat_interleave(n))
    # One prefill of the distinct prompts (the preallocated cache copies it to both samples),
    # then decode steps whose batch shrinks as rows end.
    assert rows[0] == (n * len(prompts) if variant == "sliding-window" else len(prompts))
    assert rows[1] == n * len(prompts) and rows[-1] == n * int((ref_len == ref_len.max()).sum())
    assert len(rows) == int(ref_len.max())  # prefill + one forward per step but the last
    assert len(native_steps) == (0 if variant == "sliding-window" else len(rows) - 1)
    # Greedy log-probs are of the raw logits (temperature 1) under the trainer's definition.
    with torch.no_grad():
        logp, _ = response_logprobs(model, sequence_batch(r.prompts, r.tokens, r.lengths, tok.pad_token_id), 1.0)
    assert torch.allclose(logp[r.mask], r.logprobs[r.mask], atol=1e-4)
    # Batches smaller than a prompt's samples (a prompt split across batches) decode the same.
    small = HFGenerator(model, eos, tok.pad_token_id, batch_size=3).generate(prompts, n, 0.0, 1.0, steps)
    assert torch.equal(small.tokens, r.tokens) and torch.equal(small.lengths, r.lengths)


@pytest.mark.parametrize("top_p", [1.0, 0.9])
def test_rollout_contract_and_logprobs(setup, top_p):
    """The sampled tokens' log-probs are log softmax(logits / T) (before top-p), as the trainer
    recomputes them from the full sequences, within 1e-4; so is each step's entropy, when asked
    for, and asking for it changes no token."""
    tok, model, prompts = setup
    model = _spread(copy.deepcopy(model), seed=2)
    r = _generator(model, tok).generate(prompts, 4, 0.7, top_p, 16, seed=5)
    assert r.entropy is None
    gen = _generator(model, tok)
    gen.with_entropy = True
    with_ent = gen.generate(prompts, 4, 0.7, top_p, 16, seed=5)
    assert torch.equal(with_ent.tokens, r.tokens) and torch.equal(with_ent.logprobs, r.logprobs)
    assert r.tokens.shape[0] == 12 and torch.equal(r.prompt_index, torch.arange(3).repeat_interleave(4))
    assert r.prompts == [p for p in prompts for _ in range(4)]
    ends = r.tokens[torch.arange(len(r)), r.lengths - 1] == tok.eos_token_id
    assert torch.equal(ends, ~r.truncated) and (r.lengths <= 16).all() and r.tokens.shape[1] == int(r.lengths.max())
    assert (r.tokens[~r.mask] == tok.pad_token_id).all() and (r.logprobs[~r.mask] == 0).all()
    with torch.no_grad():
        logp, ent = response_logprobs(model, sequence_batch(r.prompts, r.tokens, r.lengths, tok.pad_token_id), 0.7,
                                      with_entropy=True)
    assert torch.allclose(logp[r.mask], r.logprobs[r.mask], atol=1e-4)
    assert torch.allclose(ent, with_ent.entropy, atol=1e-4) and (with_ent.entropy[~r.mask] == 0).all()
    assert ent[r.mask].std() > 0.05  # the rows' entropies differ: the check compares something


def test_seed_gives_the_same_rollout_and_leaves_the_global_rng(setup):
    tok, model, prompts = setup
    state = torch.random.get_rng_state()
    a = _generator(model, tok).generate(prompts, 4, 0.7, 1.0, 16, seed=5)
    b = _generator(model, tok).generate(prompts, 4, 0.7, 1.0, 16, seed=5)
    c = _generator(model, tok).generate(prompts, 4, 0.7, 1.0, 16, seed=6)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.logprobs, b.logprobs)
    assert not torch.equal(a.tokens, c.tokens)


def test_a_responses_draws_do_not_depend_on_its_batch(setup):
    """Response k's tokens are drawn by uniforms hashed from (seed, k, step): the rollout is the
    same in batches of any size, when other rows end and leave the batch, and split across calls at
    a prompt boundary with ``first_response`` (a data-parallel rank's share)."""
    tok, model, prompts = setup
    model = _spread(copy.deepcopy(model), seed=2)
    endless = HFGenerator(model, NEVER, tok.pad_token_id).generate(prompts, 4, 0.7, 1.0, 16, seed=7)
    eos = _eos_for_mixed_endings(endless.tokens)

    def gen(**kw):
        return HFGenerator(model, eos, tok.pad_token_id, **kw)

    whole = gen().generate(prompts, 4, 0.7, 1.0, 16, seed=7)
    assert whole.lengths.unique().numel() > 1  # rows end at different steps (and leave the batch)
    # Up to its end, each row is the endless run's row: other rows ending changed nothing.
    assert torch.equal(whole.tokens[whole.mask], endless.tokens[:, : whole.tokens.shape[1]][whole.mask])
    small = gen(batch_size=5).generate(prompts, 4, 0.7, 1.0, 16, seed=7)
    head = gen().generate(prompts[:1], 4, 0.7, 1.0, 16, seed=7)
    tail = gen().generate(prompts[1:], 4, 0.7, 1.0, 16, seed=7, first_response=4)
    for part in (small, _concat(head, tail)):
        assert torch.equal(part.tokens, whole.tokens) and torch.equal(part.lengths, whole.lengths)
        assert torch.allclose(part.logprobs, whole.logprobs, atol=1e-6)
    shifted = gen().generate(prompts[1:], 4, 0.7, 1.0, 16, seed=7)  # offset 0: other draws
    assert not torch.equal(shifted.tokens, _pad_to(whole.tokens[4:], shifted.tokens.shape[1], tok.pad_token_id))
    with pytest.raises(ValueError, match="first_response"):
        gen().generate(prompts, 1, 0.7, 1.0, 4, first_response=-1)


def _pad_to(t: torch.Tensor, width: int, value: int) -> torch.Tensor:
    return torch.nn.functional.pad(t, (0, max(0, width - t.shape[1])), value=value)[:, :width]


def _concat(a, b):
    width = max(a.tokens.shape[1], b.tokens.shape[1])
    pad = lambda t, v: torch.nn.functional.pad(t, (0, width - t.shape[1]), value=v)  # noqa: E731
    return type(a)(a.prompts + b.prompts, torch.cat([a.prompt_index, b.prompt_index + 1]),
                   torch.cat([pad(a.tokens, 0), pad(b.tokens, 0)]), torch.cat([a.lengths, b.lengths]),
                   torch.cat([a.truncated, b.truncated]), torch.cat([pad(a.logprobs, 0.0), pad(b.logprobs, 0.0)]))


def _chi_square_p(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """P-value of Pearson's chi-square test of ``counts`` against ``probs``; categories expected
    fewer than 5 times are pooled into one."""
    expected = probs.double() * counts.sum()
    small = expected < 5
    obs = torch.cat([counts[~small].double(), counts[small].double().sum().reshape(1)])
    exp = torch.cat([expected[~small], expected[small].sum().reshape(1)])
    obs, exp = obs[exp > 0], exp[exp > 0]
    stat = ((obs - exp) ** 2 / exp).sum()
    dof = len(exp) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), stat / 2))


@pytest.mark.parametrize("top_p", [1.0, 0.8])
def test_first_token_frequencies_follow_softmax_over_temperature(setup, top_p):
    """20,000 first tokens drawn at T = 0.7 fit softmax(logits / 0.7) (within transformers'
    top-p nucleus, renormalised, when top_p < 1) and reject the distribution of a temperature
    10% off, so a wrong temperature would fail this test. The nucleus keeps 5 tokens, where a 10%
    temperature error moves less mass: 60,000 draws there (p-values of the wrong law were 3e-4 to
    9e-8 at 20,000 over four seeds)."""
    tok, model, prompts = setup
    model = _spread(copy.deepcopy(model), seed=2)
    temperature, draws = 0.7, 20_000 if top_p == 1 else 60_000
    with torch.no_grad():
        logits = model(torch.tensor([prompts[0]])).logits[0, -1].double()

    def law(t: float) -> torch.Tensor:
        scaled = logits / t
        if top_p < 1:
            scaled = TopPLogitsWarper(top_p)(None, scaled[None].float())[0].double()
        return scaled.softmax(-1)

    assert law(temperature).max() < 0.5 and (law(temperature) > 0.01).sum() >= 5  # a spread-out law
    r = HFGenerator(model, NEVER, tok.pad_token_id, batch_size=draws).generate(
        [prompts[0]], draws, temperature, top_p, 1, seed=0)
    counts = torch.bincount(r.tokens[:, 0], minlength=logits.shape[0])
    assert _chi_square_p(counts, law(temperature)) > 1e-3
    for wrong in (temperature * 1.1, temperature / 1.1):
        assert _chi_square_p(counts, law(wrong)) < 1e-6, wrong
    if top_p < 1:
        assert counts[law(temperature) == 0].sum() == 0  # nothing outside the nucleus


@pytest.mark.parametrize("top_p", [0.3, 0.8, 0.95])
def test_top_p_keeps_transformers_nucleus(top_p):
    logits = torch.randn(64, 50, generator=torch.Generator().manual_seed(0)) * 3
    dropped = TopPLogitsWarper(top_p)(None, logits.clone()) == -float("inf")
    probs = logits.softmax(-1)
    assert torch.equal(top_p_filter(probs, top_p) == 0, dropped)
    assert torch.equal(top_p_filter(probs * 7.0, top_p) == 0, dropped)  # unnormalised weights too


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


def test_ignore_eos_and_bad_arguments(setup):
    tok, model, prompts = setup
    r = _generator(model, tok).generate(prompts, 2, 1.0, 1.0, 40, seed=0, ignore_eos=True)
    assert (r.lengths == 40).all() and r.truncated.all() and r.tokens.shape == (6, 40)
    for kwargs in ({"temperature": -0.1}, {"top_p": 0.0}, {"top_p": 1.5}):
        args = {"temperature": 0.7, "top_p": 1.0, **kwargs}
        with pytest.raises(ValueError, match=next(iter(kwargs))):
            _generator(model, tok).generate(prompts, 1, args["temperature"], args["top_p"], 4)


# The memory check runs in a child process: its peak RSS covers this rollout only. glibc returns
# allocations above MALLOC_MMAP_THRESHOLD_ to the system when they are freed, so the peak tracks
# the tensors alive at once rather than the allocator's high-water mark.
_PEAK_SCRIPT = r"""
import json, resource, torch
from transformers import Qwen2Config, Qwen2ForCausalLM
from longcot.engine.rollout import HFGenerator
torch.set_num_threads(1)
V, B, T = 151_936, 8, 256
cfg = Qwen2Config(vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=1,
                  num_key_value_heads=1, head_dim=16, max_position_embeddings=512, tie_word_embeddings=True,
                  eos_token_id=1, pad_token_id=0)
torch.manual_seed(0)
model = Qwen2ForCausalLM(cfg).eval()
g = HFGenerator(model, eos_token_id=1, pad_token_id=0)
prompts = [[5, 6, 7], [8, 9]] * (B // 2)
g.generate(prompts[:2], 1, 0.7, 1.0, 4, seed=0)  # first-call allocations, outside the measurement
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
r = g.generate(prompts, 1, 0.7, 1.0, T, seed=1, ignore_eos=True)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"extra": after - before, "shape": list(r.tokens.shape), "bound": B * T * V * 4}))
"""


def test_long_rollout_holds_no_batch_by_steps_by_vocab_tensor():
    """B = 8, T = 256 at Qwen's V = 151,936: an fp32 [B, T, V] tensor is 1.19 GiB (the former
    `generate(output_logits=True)` path peaked at 2.3 GiB over its baseline here). The loop's
    extra peak must stay below a quarter of that, so even a bf16 copy would fail."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    out = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["shape"] == [8, 256]
    assert res["extra"] < res["bound"] / 4, res


def test_native_decode_step_only_for_the_llama_family():
    """A family whose layers differ (Gemma: scaled embeddings, (1 + w) norms) takes the model forward."""
    cfg = GemmaConfig(vocab_size=40, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=32)
    assert _preallocatable(GemmaForCausalLM(cfg)) and not _native_layers(GemmaForCausalLM(cfg))
    eager = _family_model("qwen3", 40)
    eager.config._attn_implementation = "eager"  # the user's choice of attention is kept
    assert not _native_layers(eager)


def _first_repeat_stop(row: list[int], n: int, k: int, eos: int) -> int | None:
    """Reference: the length at which the row is stopped (the token completing an n-gram's k-th
    occurrence), or None if it ends (end-of-sequence) or runs out first."""
    counts: dict[tuple[int, ...], int] = {}
    for t, token in enumerate(row):
        if token == eos:
            return None
        if t + 1 >= n:
            gram = tuple(row[t + 1 - n : t + 1])
            counts[gram] = counts.get(gram, 0) + 1
            if counts[gram] >= k:
                return t + 1
    return None


@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_stop_on_repetition_ends_looping_rows_only(setup, temperature):
    """A row whose newest token completes an n-gram's k-th occurrence ends there (flagged, truncated,
    no end-of-sequence); every other row is bit-identical to the run without the rule."""
    tok, model, prompts = setup
    looping = copy.deepcopy(model)  # initializer_range 0.02: greedy decoding repeats itself
    n, k, steps = 3, 3, 40
    for m in (looping, _spread(copy.deepcopy(model), seed=2)):
        endless = HFGenerator(m, NEVER, tok.pad_token_id).generate(prompts, 4, temperature, 1.0, steps, seed=3)
        eos = _eos_for_mixed_endings(endless.tokens) if m is not looping else NEVER
        base = HFGenerator(m, eos, tok.pad_token_id).generate(prompts, 4, temperature, 1.0, steps, seed=3)
        stopped = HFGenerator(m, eos, tok.pad_token_id).generate(prompts, 4, temperature, 1.0, steps, seed=3,
                                                                stop_on_repetition=(n, k))
        assert base.repetition_stop is None and stopped.repetition_stop is not None
        expect = [_first_repeat_stop(row, n, k, eos) for row in base.tokens.tolist()]
        assert stopped.repetition_stop.tolist() == [e is not None for e in expect]
        for i, e in enumerate(expect):
            if e is None:  # untouched: the same tokens; log-probs up to the rounding of a batch
                width = int(base.lengths[i])  # that other rows left earlier
                assert int(stopped.lengths[i]) == width and bool(stopped.truncated[i]) == bool(base.truncated[i])
                assert torch.equal(stopped.tokens[i, :width], base.tokens[i, :width])
                assert torch.allclose(stopped.logprobs[i, :width], base.logprobs[i, :width], atol=1e-6)
            else:  # ends at the repeat, the rest padding
                assert int(stopped.lengths[i]) == e and bool(stopped.truncated[i])
                assert torch.equal(stopped.tokens[i, :e], base.tokens[i, :e])
                assert (stopped.tokens[i, e:] == tok.pad_token_id).all() and (stopped.logprobs[i, e:] == 0).all()
        if m is looping and temperature == 0:
            assert all(e is not None for e in expect)  # every row looped and stopped early
            assert stopped.stop_reasons() == ["repetition"] * len(stopped)
        elif m is not looping:  # some rows stop, some do not
            assert any(e is None for e in expect) and any(e is not None for e in expect), expect
            # A rollout where nothing loops is bit-identical with the rule on and off.
            calm = HFGenerator(m, eos, tok.pad_token_id).generate(prompts, 4, temperature, 1.0, steps, seed=3,
                                                                 stop_on_repetition=(30, 2))
            assert not calm.repetition_stop.any()
            for name in ("tokens", "logprobs", "lengths", "truncated"):
                assert torch.equal(getattr(calm, name), getattr(base, name)), name
    with pytest.raises(ValueError, match="stop_on_repetition"):
        HFGenerator(model, NEVER, tok.pad_token_id).generate(prompts, 1, 0.7, 1.0, 4, stop_on_repetition=(3, 1))
