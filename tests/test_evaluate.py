"""Benchmark evaluation: the packaged MATH-500 / AIME 2024 files, the grader on their answers,
`evaluate_benchmark` on a stub generator, and `longcot eval` end to end and on bad input."""

from __future__ import annotations

import hashlib
import importlib.resources
import json
import math
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from longcot.engine import cli
from longcot.engine.data import (
    BENCHMARKS,
    DataError,
    PromptRecord,
    benchmark_path,
    load_prompt_records,
)
from longcot.engine.evaluate import (
    Z95,
    evaluate_benchmark,
    format_table,
    load_eval_config,
    pass_at_1_interval,
    wilson_interval,
)
from longcot.engine.rewards import verify_batch
from longcot.engine.rollout import Rollout
from longcot.kernels import repetition_ratio_reference

LONGCOT = str(Path(sys.executable).with_name("longcot"))
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"

# From engine/data/benchmarks/README.md (math500: the prm800k release's hash).
SHA256 = {
    "math500": "35dc41080a3680858b27fa7e0533d2d547825316fc5dafe5d316f4ccc5a06132",
    "aime24": "764c5d45b9c08815a3071f7daf19c1bea777b560f511bbfee2c688f5deab25c3",
}
ROWS = {"math500": 500, "aime24": 30}


# --- the packaged data ---------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(BENCHMARKS))
def test_packaged_benchmark_resolves_and_matches_its_hash(name):
    resource = importlib.resources.files("longcot.engine.data") / "benchmarks" / BENCHMARKS[name]
    data = resource.read_bytes()
    assert hashlib.sha256(data).hexdigest() == SHA256[name]
    assert benchmark_path(name).read_bytes() == data
    shared = SHARED / BENCHMARKS[name]
    if shared.exists():  # the project's shared copy, where this checkout has one
        assert shared.read_bytes() == data
    records = load_prompt_records(benchmark_path(name))
    assert len(records) == ROWS[name]


def test_benchmark_fields():
    math500 = load_prompt_records(benchmark_path("math500"))
    assert {"subject", "level", "unique_id"} <= set(math500[0].meta)
    aime = load_prompt_records(benchmark_path("aime24"))
    assert aime[7].answer == "025" and "id" in aime[0].meta  # zero-padded, as published
    with pytest.raises(DataError, match="gsm8k: unknown benchmark"):
        benchmark_path("gsm8k")


def _shuffled(answers: list[str], seed: int) -> list[str]:
    """The answers in a seeded random order in which no answer meets an equal string: MATH-500
    has 19 answers "3", 18 "2", ..., and a shuffle that pairs equal answers tests nothing."""
    rng = random.Random(seed)
    while True:  # about 70 tries for MATH-500's repeated answers; each is cheap
        order = list(range(len(answers)))
        rng.shuffle(order)
        if all(answers[i] != answers[j] for i, j in enumerate(order)):
            return [answers[j] for j in order]


@pytest.mark.parametrize("name", sorted(BENCHMARKS))
def test_grader_on_every_reference_answer(name):
    answers = [r.answer for r in load_prompt_records(benchmark_path(name))]
    correct, timeouts = verify_batch([f"\\boxed{{{a}}}" for a in answers], answers)
    assert timeouts == 0
    assert [a for a, ok in zip(answers, correct) if not ok] == []
    # Each answer graded against another problem's (different) reference. Two different strings
    # can still be equal in value (0.5 and \frac{1}{2}), hence at least 99% rather than all.
    shuffled = _shuffled(answers, seed=0)
    correct, timeouts = verify_batch([f"\\boxed{{{a}}}" for a in shuffled], answers)
    assert timeouts == 0
    assert sum(not ok for ok in correct) >= 0.99 * len(answers), [
        (a, b) for a, b, ok in zip(shuffled, answers, correct) if ok
    ]


# --- intervals -----------------------------------------------------------------------------


def test_wilson_interval():
    low, high = wilson_interval(3, 5)  # the textbook example: 0.2307 to 0.8824
    assert low == pytest.approx(0.2307, abs=1e-4) and high == pytest.approx(0.8824, abs=1e-4)
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == 1.0


def test_pass_at_1_interval_with_several_samples_is_over_problems():
    means = [1.0, 0.5, 0.5, 0.0]
    half = Z95 * math.sqrt(sum((m - 0.5) ** 2 for m in means) / 3) / 2
    low, high = pass_at_1_interval([[True, True], [True, False], [False, True], [False, False]])
    assert (low, high) == pytest.approx((0.5 - half, 0.5 + half))
    assert pass_at_1_interval([[True] * 4] * 3) == pytest.approx((wilson_interval(3, 3)[0], 1.0))
    assert pass_at_1_interval([[True, False]] * 3 + [[True, True]] * 20)[1] == 1.0  # clipped


# --- evaluate_benchmark on a stub generator ------------------------------------------------


class CharTokenizer:
    """One token per character (its code point); id 0 is end-of-sequence."""

    chat_template = None
    eos_token_id = pad_token_id = 0

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) for c in text]}

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids if i != 0)


class StubGenerator:
    """Returns scripted responses: ``responses[question][k]`` is (text, truncated)."""

    def __init__(self, responses):
        self.responses = responses
        self.calls = []

    def generate(self, prompts, n, temperature, top_p, max_new_tokens, seed=None):
        self.calls.append({"prompts": len(prompts), "n": n, "max_new_tokens": max_new_tokens,
                           "temperature": temperature, "top_p": top_p})
        rows, cut = [], []
        for p in prompts:
            for text, truncated in self.responses["".join(map(chr, p))][:n]:
                rows.append([ord(c) for c in text] + ([] if truncated else [0]))
                cut.append(truncated)
        width = max(map(len, rows))
        tokens = torch.tensor([r + [0] * (width - len(r)) for r in rows])
        lengths = torch.tensor([len(r) for r in rows])
        return Rollout([list(p) for p in prompts for _ in range(n)],
                       torch.arange(len(prompts)).repeat_interleave(n), tokens, lengths,
                       torch.tensor(cut), torch.zeros(tokens.shape))

    def update_weights(self, model):
        pass


CUT = "retry retry recheck \\boxed{1"  # stopped by the token limit mid-answer
RESPONSES = {
    "q0": [("\\boxed{5}", False), ("Wait, \\boxed{5}", False)],
    "q1": [("\\boxed{0.5}", False), ("however \\boxed{3}", False)],
    "q2": [("\\boxed{25}", False), ("\\boxed{7}", False)],
    "q3": [(CUT, True), ("alternatively \\boxed{13}", False)],
}
RECORDS = [
    PromptRecord("q0", "5", {"unique_id": "u0", "subject": "A", "level": 1}),
    PromptRecord("q1", "\\frac{1}{2}", {"unique_id": "u1", "subject": "A", "level": 1}),
    PromptRecord("q2", "025", {"unique_id": "u2", "subject": "B", "level": 2}),
    PromptRecord("q3", "12", {"unique_id": "u3", "subject": "B", "level": 2}),
    PromptRecord("q" * 50, "1", {"unique_id": "u4", "subject": "B", "level": 2}),  # too long
]


def test_evaluate_benchmark_scores_and_summarises(capsys):
    generator = StubGenerator(RESPONSES)
    seen = []
    result = evaluate_benchmark(
        generator, CharTokenizer(), RECORDS, samples=2, template=None, chat_template=False,
        max_new_tokens=1000, context_length=len(CUT) + 2, max_prompt_tokens=10, batch_size=4,
        repetition_n=3, progress=False, on_rows=seen.extend,
    )
    rows, s = result.rows, result.summary
    # The context caps new tokens at context - longest prompt (2 tokens), said once on stderr.
    assert [c["max_new_tokens"] for c in generator.calls] == [len(CUT)] * 2
    assert s["max_new_tokens"] == len(CUT) and s["max_new_tokens_requested"] == 1000
    assert capsys.readouterr().err.count("capped") == 1
    assert [c["prompts"] for c in generator.calls] == [2, 2]  # 4 responses per batch
    assert generator.calls[0]["temperature"] == 0.7 and generator.calls[0]["top_p"] == 0.95

    assert seen == rows and len(rows) == 8
    assert [(r["problem"], r["sample"]) for r in rows] == [(i, k) for i in range(4) for k in range(2)]
    assert [r["correct"] for r in rows] == [True, True, True, False, True, False, False, False]
    assert rows[2]["extracted_answer"] == "0.5" and rows[6]["extracted_answer"] is None
    assert rows[0]["unique_id"] == "u0" and rows[0]["subject"] == "A" and rows[0]["level"] == 1
    assert rows[6]["truncated"] and rows[6]["length"] == len(CUT)
    assert not any(r["timed_out"] for r in rows)

    assert s["skipped_prompts"] == 1 and s["skipped"] == [4] and s["n_problems"] == 4
    assert s["n_responses"] == 8 and s["accuracy"] == 0.5
    assert s["ci95"] == pytest.approx(list(pass_at_1_interval(
        [[True, True], [True, False], [True, False], [False, False]])))
    lengths = [len(t) + (0 if cut else 1) for q in RESPONSES.values() for t, cut in q]
    assert s["mean_length"] == sum(lengths) / 8 and s["max_length"] == max(lengths)
    assert s["truncation_rate"] == 1 / 8 and s["verifier_timeouts"] == 0
    assert s["reflection"] == {"wait": 1 / 8, "recheck": 1 / 8, "retry": 2 / 8,
                               "alternatively": 1 / 8, "however": 1 / 8}
    tokens = [[ord(c) for c in t] + ([] if cut else [0]) for q in RESPONSES.values() for t, cut in q]
    width = max(map(len, tokens))
    expected = repetition_ratio_reference(torch.tensor([t + [0] * (width - len(t)) for t in tokens]),
                                          torch.tensor(lengths), 3)
    assert s["repetition_ratio"] == pytest.approx(expected.mean().item()) and s["repetition_ratio"] > 0

    assert s["by_subject"]["A"]["accuracy"] == 0.75 and s["by_subject"]["B"]["accuracy"] == 0.25
    assert list(s["by_level"]) == ["1", "2"] and s["by_level"]["2"]["n_problems"] == 2
    table = format_table(s)
    assert "overall" in table and "subject" in table and "  B" in table and "retry 0.25" in table


def test_one_sample_uses_the_wilson_interval():
    result = evaluate_benchmark(StubGenerator(RESPONSES), CharTokenizer(), RECORDS[:4], samples=1,
                                template=None, chat_template=False, max_new_tokens=len(CUT),
                                progress=False)
    s = result.summary
    assert s["accuracy"] == 0.75 and s["ci_method"] == "wilson"  # the first sample of each
    assert s["ci95"] == pytest.approx(list(wilson_interval(3, 4)))


def test_template_and_prompt_limit():
    generator = StubGenerator({"Q: q0": RESPONSES["q0"]})
    evaluate_benchmark(generator, CharTokenizer(), RECORDS[:1], template="Q: {question}",
                       max_new_tokens=20, progress=False)
    with pytest.raises(DataError, match="max_prompt_tokens: none of the 1 prompts fits in 3 tokens"):
        evaluate_benchmark(generator, CharTokenizer(), RECORDS[:1], max_prompt_tokens=3, progress=False)


def test_eval_config_overrides():
    c = load_eval_config(["samples=4", "temperature=0.6", "top_p=1", "limit=20", "chat_template=false",
                          "template={question} Answer in \\boxed{}.", "verifier_timeout_s=5"])
    assert (c.samples, c.temperature, c.top_p, c.limit, c.chat_template) == (4, 0.6, 1.0, 20, False)
    assert c.template == "{question} Answer in \\boxed{}."
    assert load_eval_config(["template=null"]).template is None
    assert load_eval_config().max_new_tokens == 16384 and load_eval_config().top_p == 0.95


# --- the command line ----------------------------------------------------------------------


@pytest.fixture
def tiny_model(tiny_model_dir):
    return tiny_model_dir


def test_longcot_eval_end_to_end(tiny_model, tmp_path):
    out = tmp_path / "eval"
    proc = subprocess.run(
        [LONGCOT, "eval", "--model", str(tiny_model), "--data", "math500", "limit=20",
         "--samples", "2", "--out", str(out), "max_new_tokens=12", "progress=false"],
        capture_output=True, text=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert "overall" in proc.stdout and "pass@1" in proc.stdout and "Precalculus" in proc.stdout
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 40 and {r["sample"] for r in rows} == {0, 1}
    assert {"problem", "unique_id", "subject", "level", "response", "extracted_answer", "reference",
            "correct", "timed_out", "length", "truncated"} <= set(rows[0])
    assert all(r["length"] <= 12 for r in rows)
    s = json.loads((out / "eval_summary.json").read_text())
    for key in ("accuracy", "ci95", "mean_length", "max_length", "truncation_rate", "reflection",
                "repetition_ratio", "verifier_timeouts", "skipped_prompts", "by_subject", "by_level"):
        assert key in s, key
    assert s["n_problems"] == 20 and s["n_responses"] == 40 and s["samples"] == 2
    assert sum(g["n_problems"] for g in s["by_subject"].values()) == 20
    assert sum(g["n_responses"] for g in s["by_level"].values()) == 40
    assert s["config"]["temperature"] == 0.7 and s["config"]["top_p"] == 0.95
    assert s["max_new_tokens"] == 12 and 0 <= s["accuracy"] <= s["ci95"][1] <= 1


def _bad_input_cases(tmp: Path) -> dict[str, tuple[list[str], str]]:
    empty = tmp / "empty.jsonl"
    empty.write_text("\n")
    broken = tmp / "broken.jsonl"
    broken.write_text('{"problem": "1+1", "answer": "2"}\n{"problem": oops}\n')
    return {
        "unknown key": (["--data", "math500", "tempreature=0.6"], "tempreature: unknown key"),
        "bad value": (["--data", "math500", "top_p=1.5"], "top_p: expected a number in (0, 1]"),
        "bad samples": (["--data", "math500", "--samples", "x"], "samples: expected an integer"),
        "no rows": (["--data", str(empty)], f"{empty}: no rows"),
        "malformed line": (["--data", str(broken)], f"{broken}: line 2: malformed JSON"),
        "unknown dataset": (["--data", "math5000"], "math5000: unknown dataset"),
        "no chat template": (["--data", "aime24", "chat_template=true"], "chat_template: true, but"),
    }


@pytest.mark.parametrize("case", ["unknown key", "bad value", "bad samples", "no rows",
                                  "malformed line", "unknown dataset", "no chat template"])
def test_bad_input_is_one_line_and_exit_2(case, tiny_model, tmp_path, capsys):
    args, message = _bad_input_cases(tmp_path)[case]
    out = tmp_path / "out"
    code = cli.main(["eval", "--model", str(tiny_model), "--out", str(out), *args])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    lines = err.strip().splitlines()
    if case == "no chat template":  # found after loading the model, whose progress bar came first
        lines = lines[-1:]
    assert len(lines) == 1 and lines[0].startswith("longcot: error: ") and message in lines[0]
    assert not out.exists()  # nothing written for bad input


def test_missing_model_folder_subprocess(tmp_path):
    proc = subprocess.run(
        [LONGCOT, "eval", "--model", str(tmp_path / "nope"), "--data", "math500"],
        capture_output=True, text=True, cwd=tmp_path,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"longcot: error: {tmp_path / 'nope'}: model folder does not exist "
        "(models are loaded from local paths only)"
    ]
    assert not (tmp_path / "runs").exists()
