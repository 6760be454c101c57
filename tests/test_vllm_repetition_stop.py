"""The early stop of looping responses on the vLLM backend, without an engine: the stops found from
returned tokens (`repetition_stops`) against a reference, and the logits processor
(`RepetitionStopLogitsProcessor`) driven through vLLM's `BatchUpdate` contract -- requests added,
removed, swapped and moved, rows reused, its state grown, async placeholders -- against the same
reference. The engine itself is in test_vllm.py. Also the HF backend's flags when pad == eos."""

import random
from types import SimpleNamespace

import pytest
import torch

from longcot.engine.rollout.vllm import repetition_stops


def _first_stop(row: list[int], n: int, k: int, eos: int, ignore_eos: bool = False) -> int:
    """Reference: the length at which the rule ends ``row`` (the token completing an n-gram's k-th
    occurrence, not an end-of-sequence token), 0 if the row ends or runs out first."""
    counts: dict[tuple[int, ...], int] = {}
    for t, token in enumerate(row):
        if t + 1 >= n:
            gram = tuple(row[t + 1 - n : t + 1])
            counts[gram] = counts.get(gram, 0) + 1
            if counts[gram] >= k and token != eos:
                return t + 1
        if token == eos and not ignore_eos:
            return 0
    return 0


@pytest.mark.parametrize("ignore_eos", [False, True])
def test_repetition_stops_match_the_reference(ignore_eos):
    rng = random.Random(0)
    eos = 1
    for n, k in ((1, 2), (2, 3), (3, 2), (5, 4)):
        rows = [[rng.randrange(4) for _ in range(rng.randrange(1, 40))] for _ in range(30)]
        rows += [[], [eos], [2, 2, 2, 2, 2, 2, 2, 2], [1, 1, 1, 1, 1, 1]]
        expect = [_first_stop(r, n, k, eos, ignore_eos) for r in rows]
        assert repetition_stops(rows, n, k, eos, ignore_eos) == expect
        assert any(expect) and not all(expect)
    assert repetition_stops([], 3, 2, eos) == []


def test_hf_stopped_rows_are_truncated_when_pad_is_eos():
    """A stopped row's later steps hold the pad id; with pad == eos they must not read as an end of
    sequence (the row is truncated, as with any other pad id)."""
    from longcot.engine.data import CHARSET
    from longcot.engine.models import build_char_tokenizer, build_tiny_model
    from longcot.engine.rollout import HFGenerator

    tok = build_char_tokenizer(CHARSET)
    model = build_tiny_model(tok, layers=1, hidden=64, heads=1, seed=3).eval()
    prompts = [tok(t, add_special_tokens=False)["input_ids"] for t in ("12+7=", "3+4=", "100+23=")]
    runs = [HFGenerator(model, tok.eos_token_id, pad).generate(prompts, 4, 1.0, 1.0, 40, seed=1,
                                                                 stop_on_repetition=(1, 4))
            for pad in (tok.pad_token_id, tok.eos_token_id)]
    stopped = runs[0].repetition_stop
    assert stopped.any() and len(set(runs[0].lengths[stopped].tolist())) > 1  # rows stop at different steps
    for r in runs:
        assert torch.equal(r.repetition_stop, stopped) and torch.equal(r.lengths, runs[0].lengths)
        assert torch.equal(r.truncated, runs[0].truncated) and r.truncated[stopped].all()


# --- the logits processor, driven as vLLM's input batch drives it -------------------------------


class _Batch:
    """A persistent batch as vLLM's `InputBatch` keeps one: requests at indices, removals leaving
    holes that the next additions fill (lowest first) and that condensing closes (moving the last
    request into a hole), swaps; each step's changes reach the processor as one `BatchUpdate`."""

    def __init__(self, proc, vocab: int, eos: int, placeholders: bool):
        self.proc, self.vocab, self.eos, self.placeholders = proc, vocab, eos, placeholders
        self.slots: list[dict | None] = []
        self.holes: list[int] = []
        self.removed: list[int] = []
        self.added: list = []
        self.moved: list = []

    def add(self, spec, max_tokens: int, rng: random.Random, cycle: int) -> dict:
        from vllm import SamplingParams

        from longcot.engine.rollout.vllm_repetition_stop import EXTRA_ARG

        params = SamplingParams(max_tokens=max_tokens, extra_args=None if spec is None else {EXTRA_ARG: spec})
        req = {"out": [], "params": params, "spec": spec, "rng": rng, "cycle": cycle, "forced": None}
        self.holes.sort()
        index = self.holes.pop(0) if self.holes else len(self.slots)
        if index in self.removed:  # a hole filled in the step it was made is not reported removed
            self.removed.remove(index)
        if index == len(self.slots):
            self.slots.append(None)
        self.slots[index] = req
        self.added.append((index, params, [5], req["out"]))
        return req

    def remove(self, index: int) -> None:
        self.slots[index] = None
        self.holes.append(index)
        self.removed.append(index)

    def swap(self, a: int, b: int) -> None:
        from vllm.v1.sample.logits_processor import MoveDirectionality

        self.slots[a], self.slots[b] = self.slots[b], self.slots[a]
        self.moved.append((a, b, MoveDirectionality.SWAP))

    def condense(self) -> None:
        from vllm.v1.sample.logits_processor import MoveDirectionality

        for hole in sorted(self.holes):
            while self.slots and self.slots[-1] is None:
                self.slots.pop()
            if hole < len(self.slots) - 1 and self.slots[hole] is None:
                last = len(self.slots) - 1
                self.slots[hole] = self.slots.pop()
                self.moved.append((last, hole, MoveDirectionality.UNIDIRECTIONAL))
        while self.slots and self.slots[-1] is None:
            self.slots.pop()
        self.holes = []

    def step(self) -> None:
        """update_state with this step's changes, apply on fresh logits, then each request samples:
        the end-of-sequence token where its row was forced, else its next token. With
        ``placeholders`` (async scheduling) update_state sees the newest token as -1, which vLLM
        replaces before the sampler runs the processors."""
        from vllm.v1.sample.logits_processor import BatchUpdate

        update = None
        if self.removed or self.added or self.moved:
            update = BatchUpdate(len(self.slots), sorted(self.removed, reverse=True), self.added, self.moved)
        self.removed, self.added, self.moved = [], [], []
        live = [r for r in self.slots if r is not None and r["out"]]
        newest = [r["out"][-1] for r in live]
        if self.placeholders:
            for r in live:
                r["out"][-1] = -1
        self.proc.update_state(update)
        for r, token in zip(live, newest):
            r["out"][-1] = token
        out = self.proc.apply(torch.randn(len(self.slots), self.vocab))
        for i, req in enumerate(self.slots):
            if req is None:
                continue
            row = out[i]
            if bool(torch.isneginf(row).sum() == self.vocab - 1 and row[self.eos] == 0):
                req["forced"] = len(req["out"])  # the response before the forced token
                req["out"].append(self.eos)
            else:  # a looping tail after a random start (never the eos: only forced ends)
                t = len(req["out"])
                req["out"].append(req["rng"].randrange(2, 6) if t < 6 else 2 + t % req["cycle"])


def _processor():
    from longcot.engine.rollout.vllm_repetition_stop import RepetitionStopLogitsProcessor

    return RepetitionStopLogitsProcessor(SimpleNamespace(model_config=SimpleNamespace(max_model_len=4096)),
                                         torch.device("cpu"), False)


@pytest.mark.parametrize("placeholders", [False, True])
def test_processor_forces_eos_after_a_repeat_through_batch_changes(placeholders):
    pytest.importorskip("vllm")
    eos, vocab = 1, 8
    proc = _processor()
    assert not proc.is_argmax_invariant()
    batch = _Batch(proc, vocab, eos, placeholders)
    requests = []
    largest = (0, 0)  # the states' most rows and longest rows
    specs = [[2, 3, eos], None, [3, 2, eos], [1, 4, eos], [2, 3, eos], None]
    for step in range(160):
        # New requests arrive over time (more than the first state's rows; later ones ask for
        # more tokens than the state was made for), finished ones leave, the batch is reshuffled.
        # (vLLM adds a whole batch in its first step.)
        for _ in range(12 if step == 0 else int(step % 3 == 0 and len(requests) < 48)):
            spec = specs[len(requests) % len(specs)]
            requests.append(batch.add(spec, 12 if len(requests) < 16 else 200, random.Random(len(requests)),
                                      cycle=2 + len(requests) % 9))
        for i, req in enumerate(batch.slots):
            if req is not None and (req["forced"] is not None or len(req["out"]) >= req["params"].max_tokens):
                batch.remove(i)
        if step % 7 == 3 and len(batch.slots) > 2 and not batch.holes:
            batch.swap(0, len(batch.slots) - 1)
        elif step % 2:
            batch.condense()
        batch.step()
        for table in proc.tables.values():
            if table.state is not None:
                largest = (max(largest[0], table.state.batch), max(largest[1], table.state.max_len))
    done = [r for r in requests if r["forced"] is not None or len(r["out"]) >= r["params"].max_tokens]
    assert len(done) >= 30
    for r in done:
        if r["spec"] is None:
            assert r["forced"] is None  # requests that did not ask are never touched
            continue
        n, k, _ = r["spec"]
        stop = _first_stop(r["out"], n, k, eos)
        if r["forced"] is None:  # ran out of tokens: no stop before its last token
            assert stop in (0, len(r["out"])), (r["spec"], r["out"])
        else:  # forced right after the stopping token
            assert r["forced"] == stop and r["out"][stop:] == [eos], (r["spec"], r["out"], stop)
    assert sum(r["forced"] is not None for r in done) >= 15
    assert largest[0] >= 4 and largest[1] >= 200  # the states grew (rows and length)
    # Once every request has left, no state is held.
    for i, req in enumerate(batch.slots):
        if req is not None:
            batch.remove(i)
    batch.step()
    assert not proc.requests and all(t.state is None for t in proc.tables.values())


def test_processor_does_not_count_a_placeholder():
    """A -1 left in an output list (a token not sampled yet) is not counted; the real token is,
    at the next call."""
    pytest.importorskip("vllm")
    from vllm import SamplingParams
    from vllm.v1.sample.logits_processor import BatchUpdate

    from longcot.engine.rollout.vllm_repetition_stop import EXTRA_ARG

    proc = _processor()
    out = [3, 3, -1]
    proc.update_state(BatchUpdate(1, [], [(0, SamplingParams(max_tokens=8, extra_args={EXTRA_ARG: [1, 3, 1]}),
                                           [5], out)], []))
    assert not torch.isneginf(proc.apply(torch.zeros(1, 6))).any()
    out[-1] = 3
    forced = proc.apply(torch.zeros(1, 6))[0]
    assert torch.isneginf(forced).sum() == 5 and forced[1] == 0


def test_processor_validates_its_argument():
    pytest.importorskip("vllm")
    from vllm import SamplingParams

    from longcot.engine.rollout.vllm_repetition_stop import EXTRA_ARG, RepetitionStopLogitsProcessor

    RepetitionStopLogitsProcessor.validate_params(SamplingParams(extra_args={EXTRA_ARG: [20, 4, 2]}))
    RepetitionStopLogitsProcessor.validate_params(SamplingParams())
    for bad in ([20, 1, 2], [0, 4, 2], [20, 4], "20,4,2", [20, 4, True]):
        with pytest.raises(ValueError, match=EXTRA_ARG):
            RepetitionStopLogitsProcessor.validate_params(SamplingParams(extra_args={EXTRA_ARG: bad}))


def test_clear_row_makes_a_fresh_row():
    """A reused row counts as a new state's row does (the processor clears rows in place)."""
    pytest.importorskip("vllm")
    from longcot.engine.rollout.vllm_repetition_stop import clear_row
    from longcot.kernels import repetition_state, repetition_update

    rng = random.Random(2)
    used = repetition_state(2, 30, 2, "cpu")
    for _ in range(25):
        repetition_update(used, torch.tensor([rng.randrange(3), rng.randrange(3)]))
    clear_row(used, 1)
    fresh = repetition_state(1, 30, 2, "cpu")
    for _ in range(30):
        tok = rng.randrange(3)
        a = repetition_update(used, torch.tensor([0, tok]), torch.tensor([False, True]))
        b = repetition_update(fresh, torch.tensor([tok]))
        assert a.occurrences[1] == b.occurrences[0] and a.repeated[1] == b.repeated[0]


class _Engine:
    """Returns fixed outputs (token ids, each with log-prob -0.5) whatever the request."""

    def __init__(self, outputs: list[list[int]]):
        self.outputs = outputs
        self.params = None

    def generate(self, prompts, params, use_tqdm=False):
        self.params = params
        return [SimpleNamespace(outputs=[SimpleNamespace(token_ids=ids, logprobs=[{t: -0.5} for t in ids])])
                for ids in self.outputs]

    def reset_prefix_cache(self):
        pass


def test_generate_cuts_stopped_responses_as_hf_does(tmp_path):
    """What `VLLMGenerator.generate` makes of an engine's outputs with the rule on: a forced
    end-of-sequence token after the stopping token is dropped; a stop at the last allowed token
    (the engine ended it by length) is found; a natural end is kept. Then the forced token's
    log-prob is not in the rollout, and the width is that of the longest kept response."""
    pytest.importorskip("vllm")
    from longcot.engine.rollout import VLLMGenerator

    eos, pad = 1, 0
    outputs = [[5, 5, 5, eos],  # stopped at 3 (n=1, k=3), the engine's forced eos after it
               [6, 5, 6, 5, 6],  # its last allowed token completes the 3rd 6: the engine ended it by length
               [5, 6, eos],  # ends on its own
               [7, 8, 9, 7, 8]]  # runs out, no stop
    gen = VLLMGenerator(tmp_path, eos_token_id=eos, pad_token_id=pad, sleep=False, llm=_Engine(outputs))
    r = gen.generate([[3]], 4, 0.7, 1.0, 5, seed=0, stop_on_repetition=(1, 3))
    assert r.repetition_stop.tolist() == [True, True, False, False]
    assert r.lengths.tolist() == [3, 5, 3, 5] and r.truncated.tolist() == [True, True, False, True]
    assert r.stop_reasons() == ["repetition", "repetition", "eos", "length"]
    assert r.tokens[0].tolist() == [5, 5, 5, pad, pad] and (r.logprobs[0, 3:] == 0).all()
    # A stand-in engine has no processor: the requests do not ask it; the cut is made all the same.
    assert all(p.extra_args is None for p in gen.llm.params)
    plain = gen.generate([[3]], 4, 0.7, 1.0, 5, seed=0)
    assert plain.repetition_stop is None and plain.lengths.tolist() == [4, 5, 3, 5]
    with pytest.raises(ValueError, match="stop_on_repetition"):
        gen.generate([[3]], 1, 0.7, 1.0, 5, stop_on_repetition=(2, 1))
