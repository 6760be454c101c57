from __future__ import annotations

import json
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from longcot.engine.data import (
    CHARSET,
    DataError,
    PromptRecord,
    SFTRecord,
    apply_template,
    benchmark_path,
    demonstrate,
    load_prompt_records,
    load_sft_records,
    make_addition_task,
    make_problem,
    prompt,
)


def _boxed(text: str) -> str:
    match = re.fullmatch(r"(?s).*\\boxed\{([^{}]*)\}", text)
    assert match, f"no trailing \\boxed{{}} in {text!r}"
    return match.group(1)


# ------------------------------------------------------------------------------------------
# Addition task
# ------------------------------------------------------------------------------------------


def test_addition_example_format():
    p = make_problem([47, 85])
    assert p.question == "47+85"
    assert p.prompt == prompt("47+85") == "47+85="
    assert p.answer == "132"
    assert p.demonstration == "7+5=12 c1\n4+8+1=13 c1\n\\boxed{132}"
    # No carry into a column means no "+0" term, and the carry out is always written.
    assert demonstrate([21, 34]) == "1+4=5 c0\n2+3=5 c0\n\\boxed{55}"


def test_addition_task_is_deterministic_per_seed():
    a = make_addition_task(seed=3, n_train=300, n_heldout=50)
    b = make_addition_task(seed=3, n_train=300, n_heldout=50)
    c = make_addition_task(seed=4, n_train=300, n_heldout=50)
    assert a.train == b.train and a.heldout == b.heldout
    assert a.train != c.train
    assert len(a.train) == 300 and len(a.heldout) == 50


def test_addition_default_split_is_disjoint_and_sized():
    task = make_addition_task()
    assert (len(task.train), len(task.heldout)) == (4000, 256)
    train = {p.question for p in task.train}
    heldout = {p.question for p in task.heldout}
    assert len(train) == 4000 and len(heldout) == 256
    assert not train & heldout


def test_addition_validation_split_is_disjoint():
    task = make_addition_task(seed=5, n_train=300, n_heldout=50, n_valid=40)
    splits = [{p.question for p in part} for part in (task.train, task.heldout, task.valid)]
    assert [len(s) for s in splits] == [300, 50, 40]
    assert not (splits[0] & splits[1] or splits[0] & splits[2] or splits[1] & splits[2])


@pytest.mark.parametrize("digits,operands", [(1, 2), (2, 2), (3, 2), (6, 2), (3, 3), (6, 4)])
def test_addition_demonstrations_are_correct(digits, operands):
    n_train = 60 if digits > 1 else 80
    task = make_addition_task(digits=digits, n_train=n_train, n_heldout=20, seed=1, operands=operands)
    for p in task.train + task.heldout:
        numbers = [int(x) for x in p.question.split("+")]
        assert len(numbers) == operands
        low = 0 if digits == 1 else 10 ** (digits - 1)
        assert all(low <= n < 10**digits for n in numbers)
        assert p.answer == str(sum(numbers))
        assert _boxed(p.demonstration) == p.answer
        # Replay the column steps: each line's terms are the column digits plus the previous
        # carry, its sum is right, and the written digits spell the answer.
        lines = p.demonstration.split("\n")
        assert len(lines) == digits + 1
        carry, written = 0, ""
        for col, line in enumerate(lines[:-1]):
            terms, rest = line.split("=")
            total, carry_text = rest.split(" c")
            column = [int(str(n)[::-1][col]) for n in numbers]
            assert [int(t) for t in terms.split("+")] == column + ([carry] if carry else [])
            assert int(total) == sum(column) + carry
            carry = int(carry_text)
            assert carry == int(total) // 10
            written = str(int(total) % 10) + written
        assert (str(carry) if carry else "") + written == p.answer
        assert set(p.prompt + p.demonstration) <= set(CHARSET)


def test_addition_strings_are_short():
    task = make_addition_task()
    longest = max(len(p.prompt) + len(p.demonstration) for p in task.train)
    assert longest <= 40


def test_charset_is_exactly_the_used_characters():
    task = make_addition_task(digits=3, n_train=2000, n_heldout=100, operands=3)
    used = set("".join(p.prompt + p.demonstration for p in task.train))
    assert used == set(CHARSET)
    assert len(CHARSET) == len(set(CHARSET))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"digits": 0}, "digits"),
        ({"digits": 7}, "digits"),
        ({"operands": 1}, "operands"),
        ({"n_train": -1}, "n_train"),
        ({"digits": 1, "n_train": 90, "n_heldout": 20}, "only 100 distinct"),
    ],
)
def test_addition_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_addition_task(**kwargs)


def test_addition_one_digit_can_use_whole_space():
    task = make_addition_task(digits=1, n_train=90, n_heldout=10)
    pairs = {p.question for p in task.train + task.heldout}
    assert len(pairs) == 100


# ------------------------------------------------------------------------------------------
# Dataset loaders
# ------------------------------------------------------------------------------------------


def _write_jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_load_prompt_records_jsonl(tmp_path):
    path = _write_jsonl(
        tmp_path / "p.jsonl",
        [
            json.dumps({"problem": "1+1?", "answer": "2", "level": 1}),
            "",
            "   ",
            json.dumps({"problem": "Ω is?", "answer": 25, "id": "x"}),
            json.dumps({"problem": "third", "answer": "3"}),
        ],
    )
    records = load_prompt_records(path)
    assert records == [
        PromptRecord("1+1?", "2", {"level": 1}),
        PromptRecord("Ω is?", "25", {"id": "x"}),
        PromptRecord("third", "3", {}),
    ]
    assert load_prompt_records(path, limit=2) == records[:2]
    custom = _write_jsonl(tmp_path / "c.jsonl", [json.dumps({"q": "a", "a": "b", "answer": "z"})])
    assert load_prompt_records(custom, "q", "a") == [PromptRecord("a", "b", {"answer": "z"})]


def test_load_records_parquet(tmp_path):
    path = tmp_path / "p.parquet"
    pq.write_table(
        pa.table({"problem": ["a", "b", "c"], "answer": [1, 2, 3], "subject": ["x", "y", "z"]}),
        path,
        row_group_size=2,
    )
    assert load_prompt_records(path) == [
        PromptRecord("a", "1", {"subject": "x"}),
        PromptRecord("b", "2", {"subject": "y"}),
        PromptRecord("c", "3", {"subject": "z"}),
    ]
    sft = tmp_path / "s.parquet"
    pq.write_table(pa.table({"prompt": ["1+2="], "response": ["\\boxed{3}"]}), sft)
    assert load_sft_records(sft) == [SFTRecord("1+2=", "\\boxed{3}")]


def test_load_sft_records_jsonl(tmp_path):
    path = _write_jsonl(
        tmp_path / "s.jsonl",
        [json.dumps({"prompt": "47+85=", "response": "7+5=12 c1\n\\boxed{132}", "extra": 1})],
    )
    assert load_sft_records(path) == [SFTRecord("47+85=", "7+5=12 c1\n\\boxed{132}")]


@pytest.mark.parametrize(
    "lines,message",
    [
        (['{"problem": "a", "answer": "1"}', '{"problem": "b", "answer": '], r"line 2: malformed JSON"),
        (['{"problem": "a", "answer": "1"}', "", '["not", "an object"]'], r"line 3: expected a JSON object"),
        (['{"answer": "1"}'], r"line 1: missing field 'problem'"),
        (['{"problem": "a"}'], r"line 1: missing field 'answer'"),
        (['{"problem": "", "answer": "1"}'], r"line 1: field 'problem' is empty"),
        (['{"problem": "  \\n", "answer": "1"}'], r"line 1: field 'problem' is empty"),
        (['{"problem": 7, "answer": "1"}'], r"line 1: field 'problem' must be a string"),
        (['{"problem": "a", "answer": null}'], r"line 1: field 'answer' must be a string or an integer"),
        (['{"problem": "a", "answer": true}'], r"line 1: field 'answer' must be a string or an integer"),
        (['{"problem": "a", "answer": 1.5}'], r"line 1: field 'answer' must be a string or an integer"),
        (['{"problem": "a", "answer": ""}'], r"line 1: field 'answer' is empty"),
        (["", "  "], r": no rows"),
    ],
)
def test_prompt_records_bad_jsonl(tmp_path, lines, message):
    path = _write_jsonl(tmp_path / "bad.jsonl", lines)
    with pytest.raises(DataError, match=message) as info:
        load_prompt_records(path)
    text = str(info.value)
    assert text.startswith(str(path) + ":")
    assert "\n" not in text


def test_bad_utf8_names_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"problem": "a", "answer": "1"}\n{"problem": "\xff\xfe", "answer": "2"}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl: line 2: not valid UTF-8"):
        load_prompt_records(path)


def test_sft_records_bad_fields(tmp_path):
    path = _write_jsonl(tmp_path / "s.jsonl", ['{"prompt": "p", "response": "r"}', '{"prompt": "p"}'])
    with pytest.raises(DataError, match=r"s\.jsonl: line 2: missing field 'response'"):
        load_sft_records(path)
    # Integers are accepted for answers only, never for SFT text.
    path = _write_jsonl(tmp_path / "t.jsonl", ['{"prompt": "p", "response": 3}'])
    with pytest.raises(DataError, match=r"t\.jsonl: line 1: field 'response' must be a string,"):
        load_sft_records(path)


def test_bad_parquet_names_row(tmp_path):
    path = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"problem": ["a", "b", None], "answer": ["1", "2", "3"]}), path, row_group_size=1)
    with pytest.raises(DataError, match=r"bad\.parquet: row 3: field 'problem' must be a string"):
        load_prompt_records(path)
    empty = tmp_path / "empty.parquet"
    pq.write_table(pa.table({"problem": pa.array([], pa.string()), "answer": pa.array([], pa.string())}), empty)
    with pytest.raises(DataError, match=r"empty\.parquet: no rows"):
        load_prompt_records(empty)
    garbage = tmp_path / "garbage.parquet"
    garbage.write_bytes(b"this is not parquet")
    with pytest.raises(DataError, match=r"garbage\.parquet: not a readable Parquet file"):
        load_prompt_records(garbage)


def test_missing_file_unknown_extension_and_limit(tmp_path):
    with pytest.raises(DataError, match=r"nope\.jsonl: file does not exist"):
        load_prompt_records(tmp_path / "nope.jsonl")
    csv = tmp_path / "data.csv"
    csv.write_text("problem,answer\na,1\n")
    with pytest.raises(DataError, match=r"data\.csv: unknown extension '\.csv'"):
        load_prompt_records(csv)
    with pytest.raises(DataError, match="not a regular file"):
        load_sft_records(tmp_path)
    good = _write_jsonl(tmp_path / "g.jsonl", ['{"problem": "a", "answer": "1"}'])
    with pytest.raises(DataError, match="limit"):
        load_prompt_records(good, limit=0)


def test_limit_stops_before_later_bad_lines(tmp_path):
    path = _write_jsonl(tmp_path / "p.jsonl", ['{"problem": "a", "answer": "1"}', "{broken"])
    assert len(load_prompt_records(path, limit=1)) == 1
    with pytest.raises(DataError, match="line 2"):
        load_prompt_records(path)


def test_real_math500_and_aime24():
    math500 = load_prompt_records(benchmark_path("math500"))
    assert len(math500) == 500
    assert set(math500[0].meta) == {"solution", "subject", "level", "unique_id"}
    assert math500[0].answer == "\\left( 3, \\frac{\\pi}{2} \\right)"
    aime = load_prompt_records(benchmark_path("aime24"))
    assert len(aime) == 30
    assert set(aime[0].meta) == {"id", "solution", "url"}
    assert all(r.answer.isdigit() for r in aime)
    assert any(r.answer.startswith("0") for r in aime)  # zero-padded answers stay strings


# ------------------------------------------------------------------------------------------
# Templates
# ------------------------------------------------------------------------------------------


class _ChatTokenizer:
    name_or_path = "fake-chat"

    def __init__(self, chat_template):
        self.chat_template = chat_template

    def apply_chat_template(self, messages, tokenize, add_generation_prompt):
        assert tokenize is False and add_generation_prompt is True
        (message,) = messages
        return f"<user>{message['content']}</user><assistant>"


def test_apply_template():
    assert apply_template("1+1", None) == "1+1"
    assert apply_template("47+85", "{question}=") == "47+85="
    # Braces other than the placeholder are literal: no str.format escaping needed.
    instruction = "{question}\nPut the answer in \\boxed{}."
    assert apply_template("x {y}", instruction) == "x {y}\nPut the answer in \\boxed{}."
    chat = _ChatTokenizer("{{ messages }}")
    assert apply_template("q", None, chat, use_chat_template=True) == "<user>q</user><assistant>"
    assert apply_template("q", "Solve: {question}", chat, True) == "<user>Solve: q</user><assistant>"
    # A chat tokenizer is ignored unless asked for.
    assert apply_template("q", None, chat) == "q"


def test_apply_template_errors():
    with pytest.raises(DataError, match=r"lacks the \{question\} placeholder"):
        apply_template("q", "Solve: {problem}")
    with pytest.raises(DataError, match="needs a tokenizer"):
        apply_template("q", None, None, use_chat_template=True)
    with pytest.raises(DataError, match="'fake-chat' has no chat template"):
        apply_template("q", None, _ChatTokenizer(None), use_chat_template=True)
