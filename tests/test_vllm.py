"""The vLLM backend (in-process engine, weights updated in place) against the trainer's own
Hugging Face policy. One engine is shared by the module: starting vLLM takes seconds."""

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("vllm")

from test_trainer import LONGCOT, TINY  # noqa: E402
from test_vllm_repetition_stop import _first_stop  # noqa: E402

from longcot.engine.data import CHARSET  # noqa: E402
from longcot.engine.models import build_char_tokenizer, build_tiny_model, save_model  # noqa: E402
from longcot.engine.policy_forward import response_logprobs, sequence_batch  # noqa: E402
from longcot.engine.rollout import HFGenerator, VLLMGenerator  # noqa: E402

PROBLEMS = ["12+34=", "9+9=", "1+1=", "77+5=", "305+18=", "4+40=", "66+6=", "0+999="]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    tok = build_char_tokenizer(CHARSET)
    # head_dim 64: vLLM's CPU attention rejects smaller heads.
    model = build_tiny_model(tok, layers=2, hidden=128, heads=2, max_positions=128, seed=0)
    path = save_model(model, tok, tmp_path_factory.mktemp("vllm") / "init")
    gen = VLLMGenerator(path, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                        max_num_seqs=64, kv_cache_gib=1)
    prompts = [tok(p, add_special_tokens=False)["input_ids"] for p in PROBLEMS]
    yield SimpleNamespace(tok=tok, model=model, gen=gen, prompts=prompts)
    gen.close()


def _ppo_updates(s, steps: int, lr: float = 3e-3) -> torch.nn.Module:
    """``steps`` policy-gradient updates on vLLM rollouts (PPO-clipped surrogate, random
    advantages), syncing the weights into vLLM after each, as the trainer does."""
    import copy

    model = copy.deepcopy(s.model).train()
    s.gen.update_weights(model)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(1)
    for step in range(steps):
        r = s.gen.generate(s.prompts, 2, 0.7, 1.0, 16, seed=step)
        sb = sequence_batch(r.prompts, r.tokens, r.lengths, s.tok.pad_token_id)
        adv = torch.randn(len(r), 1, generator=gen).expand_as(r.logprobs)
        logp, _ = response_logprobs(model, sb, 0.7)
        ratio = torch.exp(logp - r.logprobs)
        surrogate = torch.minimum(ratio * adv, ratio.clamp(0.8, 1.2) * adv)
        loss = -(surrogate * r.mask).sum() / r.mask.sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        s.gen.update_weights(model)
    return model.eval()


def test_greedy_matches_hf_after_ppo_updates(setup):
    s = setup
    before = {k: v.clone() for k, v in s.model.state_dict().items()}
    model = _ppo_updates(s, steps=4)
    moved = max((model.state_dict()[k] - v).abs().max().item() for k, v in before.items())
    assert moved > 1e-3  # the weights really changed
    hf = HFGenerator(model, s.tok.eos_token_id, s.tok.pad_token_id).generate(s.prompts, 1, 0.0, 1.0, 32)
    vl = s.gen.generate(s.prompts, 1, 0.0, 1.0, 32)
    stale = HFGenerator(s.model, s.tok.eos_token_id, s.tok.pad_token_id).generate(s.prompts, 1, 0.0, 1.0, 32)
    assert vl.tokens.shape == hf.tokens.shape and vl.tokens.shape[0] == 8
    assert torch.equal(vl.tokens, hf.tokens)
    assert torch.equal(vl.lengths, hf.lengths) and torch.equal(vl.truncated, hf.truncated)
    assert not torch.equal(stale.tokens, hf.tokens)  # the check would catch stale weights
    # Greedy log-probs are log-softmax of the raw logits, as the HF backend reports them.
    assert (vl.logprobs - hf.logprobs)[vl.mask].abs().max() < 1e-3


def test_sampling_logprobs_match_trainer(setup):
    s = setup
    s.gen.update_weights(s.model)
    r = s.gen.generate(s.prompts, 4, 0.7, 1.0, 32, seed=7)
    assert r.tokens.shape[0] == 32 and (r.lengths > 0).all()
    assert torch.equal(r.prompt_index, torch.arange(8).repeat_interleave(4))
    ends = r.tokens[torch.arange(len(r)), r.lengths - 1] == s.tok.eos_token_id
    assert torch.equal(ends, ~r.truncated)
    assert (r.tokens[~r.mask] == s.tok.pad_token_id).all() and (r.logprobs[~r.mask] == 0).all()
    with torch.no_grad():
        logp, _ = response_logprobs(s.model, sequence_batch(r.prompts, r.tokens, r.lengths, s.tok.pad_token_id), 0.7)
    assert (logp - r.logprobs)[r.mask].abs().mean() <= 1e-3
    again = s.gen.generate(s.prompts, 4, 0.7, 1.0, 32, seed=7)
    assert torch.equal(again.tokens, r.tokens)  # seeded


def _spread(model: torch.nn.Module, seed: int = 2, std: float = 0.1) -> torch.nn.Module:
    """The setup's model with random weights of std ``std``: greedy decoding of these prompts then
    loops in some rows (at different steps), ends with an end-of-sequence token in others."""
    import copy

    g = torch.Generator().manual_seed(seed)
    model = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model.eval()


STOP = (8, 3)  # an 8-gram's third occurrence (greedy: these rows loop with long periods)
SAMPLED_STOP = (3, 3)  # at temperature 0.7 the loops are shorter


@pytest.mark.parametrize("pad_is_eos", [False, True])
def test_stop_on_repetition_stops_as_hf_does(setup, pad_is_eos):
    """Greedy, the same weights on both backends, early stop on: the same tokens, lengths,
    truncated and repetition_stop flags. A looping response stops at the token completing the
    n-gram's k-th occurrence (found on the run without the rule); the others are bit-identical to
    that run. With pad == eos a stopped response is still truncated."""
    s = setup
    model = _spread(s.model)
    s.gen.update_weights(model)
    eos = s.tok.eos_token_id
    pad = eos if pad_is_eos else s.tok.pad_token_id
    steps = 48
    s.gen.pad_token_id = pad
    try:
        off = s.gen.generate(s.prompts, 1, 0.0, 1.0, steps)
        on = s.gen.generate(s.prompts, 1, 0.0, 1.0, steps, stop_on_repetition=STOP)
    finally:
        s.gen.pad_token_id = s.tok.pad_token_id
    hf = HFGenerator(model, eos, pad).generate(s.prompts, 1, 0.0, 1.0, steps, stop_on_repetition=STOP)
    assert off.repetition_stop is None
    expect = [_first_stop(row[:length], *STOP, eos) for row, length in zip(off.tokens.tolist(), off.lengths.tolist())]
    assert on.repetition_stop.tolist() == [e > 0 for e in expect]
    # Every ending occurs: stopped for looping, end-of-sequence, max_new_tokens.
    assert set(on.stop_reasons()) == {"repetition", "eos", "length"}, (on.stop_reasons(), expect)
    for i, e in enumerate(expect):
        if e:
            assert int(on.lengths[i]) == e and bool(on.truncated[i])
            assert torch.equal(on.tokens[i, :e], off.tokens[i, :e]) and (on.tokens[i, e:] == pad).all()
            assert (on.logprobs[i, e:] == 0).all()
        else:  # untouched
            width = int(off.lengths[i])
            assert int(on.lengths[i]) == width and bool(on.truncated[i]) == bool(off.truncated[i])
            assert torch.equal(on.tokens[i, :width], off.tokens[i, :width])
            assert torch.allclose(on.logprobs[i, :width], off.logprobs[i, :width], atol=1e-5)
    for name in ("tokens", "lengths", "truncated", "repetition_stop"):
        assert torch.equal(getattr(on, name), getattr(hf, name)), name
    assert (on.logprobs - hf.logprobs).abs().max() < 1e-3


def test_stop_on_repetition_when_sampling(setup):
    """Seeded sampling: the rule stops the responses that loop, where the run without it shows
    the repeat; the other responses are the same as without the rule."""
    s = setup
    s.gen.update_weights(_spread(s.model))
    eos = s.tok.eos_token_id
    off = s.gen.generate(s.prompts, 4, 0.7, 1.0, 48, seed=5)
    engine_generate, raw = s.gen.llm.generate, []
    s.gen.llm.generate = lambda *a, **k: raw.extend(engine_generate(*a, **k)) or raw
    try:
        on = s.gen.generate(s.prompts, 4, 0.7, 1.0, 48, seed=5, stop_on_repetition=SAMPLED_STOP)
    finally:
        del s.gen.llm.generate
    expect = [_first_stop(row[:length], *SAMPLED_STOP, eos) for row, length in zip(off.tokens.tolist(), off.lengths.tolist())]
    assert on.repetition_stop.tolist() == [e > 0 for e in expect]
    assert any(expect) and not all(expect)
    # The engine stopped them: one forced end-of-sequence token after the stop, nothing more.
    for e, out in zip(expect, raw):
        if e:
            assert len(out.outputs[0].token_ids) == e + 1 and out.outputs[0].token_ids[-1] == eos
    cut = torch.tensor([e or length for e, length in zip(expect, off.lengths.tolist())])
    assert torch.equal(on.lengths, cut)
    assert torch.equal(on.truncated, off.truncated | on.repetition_stop)
    assert torch.equal(on.tokens, off.tokens[:, : on.tokens.shape[1]].masked_fill(~on.mask, s.tok.pad_token_id))


def test_engine_stops_only_the_requests_that_ask(setup):
    """In the engine: a request with the option ends right after its stopping token with the
    forced end-of-sequence token (log-prob 0; `generate` drops it) -- fewer tokens decoded; a
    request without it (evaluation) in the same batch decodes exactly as it does alone."""
    from vllm import SamplingParams

    from longcot.engine.rollout.vllm_repetition_stop import EXTRA_ARG

    s = setup
    s.gen.update_weights(_spread(s.model))
    eos = s.tok.eos_token_id

    def params(opt: bool, row: int) -> SamplingParams:
        return SamplingParams(temperature=0.7, seed=row, max_tokens=48, logprobs=0, stop_token_ids=[eos],
                              detokenize=False, extra_args={EXTRA_ARG: [*SAMPLED_STOP, eos]} if opt else None)

    inputs = [{"prompt_token_ids": p} for p in s.prompts for _ in range(4)]
    alone = s.gen.llm.generate(inputs, [params(False, i) for i in range(len(inputs))], use_tqdm=False)
    mixed = s.gen.llm.generate(inputs, [params(i % 2 == 0, i) for i in range(len(inputs))], use_tqdm=False)
    stopped = 0
    for i, (a, m) in enumerate(zip(alone, mixed)):
        a, m = a.outputs[0], m.outputs[0]
        if i % 2:
            assert list(m.token_ids) == list(a.token_ids)
            continue
        stop = _first_stop(list(a.token_ids), *SAMPLED_STOP, eos)
        if stop:
            stopped += 1
            assert list(m.token_ids) == list(a.token_ids)[:stop] + [eos]
            assert m.logprobs[-1][eos].logprob == 0.0
        else:
            assert list(m.token_ids) == list(a.token_ids)
    assert stopped >= 2


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def test_repeated_weight_updates_do_not_grow_memory(setup):
    s = setup
    for _ in range(3):  # warm-up: first-time allocations
        s.gen.update_weights(s.model)
    start = _rss_mb()
    with torch.no_grad():
        for i in range(20):
            for p in s.model.parameters():
                p.add_(1e-4 * (-1) ** i)
            s.gen.update_weights(s.model)
    assert _rss_mb() - start <= 50


class _StandIn:
    """Records the engine calls the generator makes, in order (the GPU sleep path)."""

    def __init__(self):
        self.calls = []
        runner = SimpleNamespace(reload_weights=lambda **kw: self.calls.append("reload"))
        worker = SimpleNamespace(worker=SimpleNamespace(model_runner=runner))
        self.llm_engine = SimpleNamespace(engine_core=SimpleNamespace(
            model_executor=SimpleNamespace(driver_worker=worker)))

    def sleep(self, level):
        self.calls.append(f"sleep{level}")

    def wake_up(self, tags=None):
        self.calls.append("wake:" + ",".join(tags or ["all"]))

    def reset_prefix_cache(self):
        self.calls.append("reset")

    def generate(self, prompts, params, use_tqdm=False):
        self.calls.append("generate")
        out = SimpleNamespace(token_ids=[5, 1], logprobs=[{5: -0.5}, {1: -0.25}])
        return [SimpleNamespace(outputs=[out]) for _ in prompts]


def test_sleep_wake_ordering_with_stand_in(tmp_path):
    fake = _StandIn()
    gen = VLLMGenerator(tmp_path, eos_token_id=1, pad_token_id=0, sleep=True, llm=fake)
    model = torch.nn.Linear(2, 2)
    r = gen.generate([[3, 4]], 2, 0.7, 1.0, 8, seed=0)
    assert r.lengths.tolist() == [2, 2] and not r.truncated.any()
    assert r.logprobs.tolist() == [[-0.5, -0.25], [-0.5, -0.25]]
    gen.update_weights(model)  # the trainer's update happened while asleep
    gen.generate([[3]], 1, 0.0, 1.0, 8)
    assert fake.calls == [
        "generate", "sleep1",                # KV cache freed during the trainer's update
        "wake:weights", "reload",            # weights back, new ones loaded; KV still freed
        "wake:kv_cache", "reset", "generate", "sleep1",  # KV back, no stale prefix reused
    ]
    # Without sleep mode (the CPU build): update, reset, generate, nothing else.
    fake2 = _StandIn()
    gen2 = VLLMGenerator(tmp_path, eos_token_id=1, sleep=False, llm=fake2)
    gen2.update_weights(model)
    gen2.generate([[3]], 1, 0.0, 1.0, 8)
    assert fake2.calls == ["reload", "reset", "generate"]


def test_cli_train_and_resume_with_vllm_backend(tmp_path):
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1")
    proc = subprocess.run(
        [LONGCOT, "train", *TINY, "rollout.backend=vllm", "rollout.vllm_kv_cache_gib=1", f"output_dir={tmp_path}",
         "rollout.stop_on_repetition.enabled=true"],
        capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = [p for p in Path(tmp_path).iterdir() if p.is_dir()]
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "final/model.safetensors",
                 "rollout_init/model.safetensors"):
        assert (run / name).exists(), name
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 2
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["phase"] == "rl"] == [1, 2]

    # resumed from its end-of-run checkpoint for one more step: the engine restarts from the
    # restored policy
    proc = subprocess.run([LONGCOT, "train", f"resume={run}", "steps=3"],
                          capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["resumed_from_steps"] == [2]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["phase"] == "rl"] == [1, 2, 3]


def test_importing_longcot_does_not_import_vllm():
    code = "import sys, longcot.engine, longcot.engine.rollout; assert 'vllm' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
