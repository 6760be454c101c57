"""The reflection task: demonstrations that make a column mistake, check it and carry on."""

from __future__ import annotations

import random

import pytest

from longcot.engine.config import ConfigError, load_config
from longcot.engine.data import addition
from longcot.engine.data.addition_reflect import (
    CHARSET,
    ReflectRates,
    audit,
    check_line,
    column_terms,
    make_reflect_task,
    reflect_demonstration,
)
from longcot.engine.metrics import reflection_counts
from longcot.engine.rewards.verifier import verify_batch


def test_column_terms_carry_in_last():
    # 47 + 85 + 19: units 7+5+9 = 21 (carry 2), tens 4+8+1+2 = 15; the last carry goes to the answer.
    assert column_terms([47, 85, 19]) == [[7, 5, 9], [4, 8, 1, 2]]
    assert column_terms([5, 90]) == [[5, 0], [9]]


def test_check_line_adds_two_terms_at_a_time():
    assert check_line([7, 5, 9]) == "wait 7+5=12 12+9=21 c2"
    assert check_line([4, 8, 1, 2], "recheck") == "recheck 4+8=12 12+1=13 13+2=15 c1"


def test_a_mistake_is_always_checked_and_the_check_is_right():
    rng = random.Random(0)
    demo = reflect_demonstration([47, 85, 19], rng, ReflectRates(mistake_rate=1.0, check_rate=0.0, recheck_rate=0.0))
    lines = demo.split("\n")
    assert lines[-1] == "\\boxed{151}"
    assert lines[1] == "wait 7+5=12 12+9=21 c2" and lines[3] == "wait 4+8=12 12+1=13 13+2=15 c1"
    assert lines[0] != "7+5+9=21 c2" and lines[0].startswith("7+5+9=")
    assert audit(demo) == {"lines": 2, "lines_wrong": 2, "checks": 2, "checks_wrong": 0, "other": 0}


def test_no_draws_give_the_plain_tasks_lines():
    demo = reflect_demonstration([47, 85], random.Random(0), ReflectRates(0.0, 0.0, 0.0))
    assert demo == addition.demonstrate([47, 85])


def test_recheck_repeats_the_check_word_for_word_after_its_first_word():
    demo = reflect_demonstration([6, 7, 3, 8], random.Random(1), ReflectRates(0.0, 1.0, 1.0))
    assert demo == "6+7+3+8=24 c2\nwait 6+7=13 13+3=16 16+8=24 c2\nrecheck 6+7=13 13+3=16 16+8=24 c2\n\\boxed{24}"
    assert reflection_counts([demo]) == pytest.approx(
        {"reflection/wait": 1, "reflection/recheck": 1, "reflection/retry": 0,
         "reflection/alternatively": 0, "reflection/however": 0})


def test_task_demonstrations_verify_audit_clean_and_use_the_charset():
    task = make_reflect_task(digits=1, operands=4, n_train=400, n_heldout=50, seed=3, n_valid=20)
    problems = task.train + task.heldout + task.valid
    correct, _ = verify_batch([p.demonstration for p in problems], [p.answer for p in problems])
    assert all(correct)
    counts = [audit(p.demonstration) for p in problems]
    assert all(c["checks_wrong"] == 0 and c["other"] == 0 for c in counts)
    # Every mistake is checked: wrong one-shot lines never outnumber the checks.
    assert all(c["lines_wrong"] <= c["checks"] for c in counts)
    reflecting = sum(c["checks"] > 0 for c in counts) / len(counts)
    assert 0.55 < reflecting < 0.75  # defaults, one column: 0.3 mistakes + 0.7 x 0.5 checks = 0.65
    assert set("".join(p.prompt + p.demonstration for p in problems)) <= set(CHARSET)
    # The same problems as the plain task with the same arguments, and deterministic per seed.
    plain = addition.make_addition_task(1, 400, 50, seed=3, operands=4, n_valid=20)
    assert [p.question for p in task.train] == [p.question for p in plain.train]
    again = make_reflect_task(digits=1, operands=4, n_train=400, n_heldout=50, seed=3, n_valid=20)
    assert [p.demonstration for p in again.train] == [p.demonstration for p in task.train]


def test_audit_counts_wrong_checks_and_other_lines():
    text = "6+7+3+8=23 c2\nwait 6+7=13 13+3=16 16+8=23 c2\nhello\n\\boxed{23}"
    assert audit(text) == {"lines": 1, "lines_wrong": 1, "checks": 1, "checks_wrong": 1, "other": 1}
    # A check of other terms than its column's is wrong even when its sums add up.
    assert audit("6+7+3+8=24 c2\nwait 1+1=2 2+1=3 3+1=4 c0")["checks_wrong"] == 1


@pytest.mark.parametrize("name,value", [("mistake_rate", -0.1), ("check_rate", 1.5), ("recheck_rate", True)])
def test_rates_are_checked(name, value):
    with pytest.raises(ValueError, match=name):
        ReflectRates(**{name: value})


def test_config_names_bad_reflect_and_operand_values():
    with pytest.raises(ConfigError, match=r"^data\.reflect\.check_rate"):
        load_config(None, ["data.task=addition_reflect", "data.reflect.check_rate=2"])
    with pytest.raises(ConfigError, match=r"^data\.addition\.operands"):
        load_config(None, ["data.addition.operands=5"])
    # 1-digit, 2 operands: 100 problems, fewer than the default splits ask for.
    with pytest.raises(ConfigError, match="2-operand 1-digit"):
        load_config(None, ["data.task=addition_reflect", "data.addition.digits=1"])


def test_setup_task_builds_the_reflect_task_and_its_tokenizer():
    from longcot.engine.task import setup_task

    cfg = load_config(None, ["data.task=addition_reflect", "data.addition.digits=1", "data.addition.operands=4",
                             "data.addition.n_train=64", "data.addition.n_heldout=8", "eval_size=8",
                             "sft.eval_size=8", "model.tiny.layers=1", "model.device=cpu"])
    s = setup_task(cfg)
    assert len(s.sft_examples) == 64 and len(s.heldout.ids) == 8
    tok = s.tokenizer
    prompt, response = s.sft_examples[0]
    assert response[-1] == tok.eos_token_id
    text = tok.decode(response[:-1])
    assert "\\boxed{" in text and tok.decode(prompt).endswith("=")
    ids = tok("wait recheck", add_special_tokens=False)["input_ids"]
    assert len(ids) == len("wait recheck") and tok.decode(ids) == "wait recheck"  # no letter dropped
