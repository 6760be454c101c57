from __future__ import annotations

import json
import math
import signal
import threading
import time

import pytest

from longcot.engine.data.datasets import benchmark_path
from longcot.engine.rewards import MAX_ANSWER_CHARS, extract_boxed, verifier, verify, verify_batch
from longcot.engine.rewards.verifier import _as_integer, _Reference

# Slack for wall-time assertions: the deadline bounds sympy, the rest is Python overhead.
SLACK_S = 0.75
# Inputs on which sympy runs past any reasonable deadline (measured: > 3 s each).
HANGS = r"\boxed{9^{9^{9^{9}}}}"


# --- extract_boxed -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (r"so \boxed{42}.", "42"),
        (r"\boxed{1} then \boxed{2}", "2"),
        (r"\fbox{7}", "7"),
        (r"\boxed{3} and finally \fbox{4}", "4"),
        (r"\boxed {5}", "5"),
        (r"\boxed{\frac{1}{2}}", r"\frac{1}{2}"),
        (r"\boxed{\left\{1, 2\right\}}", r"\left\{1, 2\right\}"),  # escaped braces do not count
        (r"\boxed{\{1,2}", r"\{1,2"),
        (r"\boxed{a \\}", r"a \\"),  # \\ is a line break: the next } closes the box
        (r"\boxed{}", ""),
        (r"\boxed{\boxed{9}}", "9"),  # the last opener is the inner one (as rfind-based graders do)
    ],
)
def test_extract_boxed_returns_last_balanced_content(text: str, expected: str) -> None:
    assert extract_boxed(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        "the answer is 42",
        r"\boxed{12",
        r"\boxed{1} and then \boxed{2",  # the last box decides, even when an earlier one closed
        r"\boxed{\frac{1}{2}",
        r"\boxed 5",
        r"\boxedx{5}",
        r"\boxed{\}",
    ],
)
def test_extract_boxed_none_when_absent_or_unbalanced(text: str) -> None:
    assert extract_boxed(text) is None


def test_extract_boxed_max_chars() -> None:
    assert extract_boxed(r"\boxed{12345}", max_chars=5) == "12345"
    assert extract_boxed(r"\boxed{12345}", max_chars=4) is None
    with pytest.raises(ValueError, match="max_chars"):
        extract_boxed(r"\boxed{1}", max_chars=-1)


def test_extract_boxed_rejects_non_str() -> None:
    with pytest.raises(TypeError, match="text"):
        extract_boxed(None)  # type: ignore[arg-type]


def test_as_integer_canonical_form() -> None:
    assert _as_integer("025") == "25"
    assert _as_integer("+7") == "7"
    assert _as_integer("-0") == "0"
    assert _as_integer("-012") == "-12"
    assert _as_integer("000") == "0"
    assert _as_integer("1.0") is None
    assert _as_integer("١٢") is None  # Arabic-Indic digits are not ASCII integers


# --- verify: equivalence -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("response", "reference"),
    [
        (r"So the answer is $\boxed{0.5}$.", r"\frac{1}{2}"),
        (r"\boxed{\frac{1}{2}}", "0.5"),
        (r"\boxed{\sqrt{117}}", r"3\sqrt{13}"),
        (r"\boxed{25}", "025"),
        (r"\boxed{025}", "25"),
        (r"\boxed{x+1}", "1+x"),
        (r"\boxed{C}", r"\text{(C)}"),
        (r"\boxed{(3, \pi/2)}", r"\left( 3, \frac{\pi}{2} \right)"),
        (r"\boxed{(3,\frac{\pi}{2})}", r"(3,\frac{\pi}{2})"),
        (r"\boxed{5}", "x=5"),
        (r"\boxed{\dfrac{3}{56}}", r"\frac{3}{56}"),
        (r"\boxed{90}", r"90^\circ"),
        (r"\fbox{-2 + 7i}", "-2+7i"),
    ],
)
def test_verify_equivalent(response: str, reference: str) -> None:
    assert verify(response, reference) is True


@pytest.mark.parametrize(
    ("response", "reference"),
    [
        (r"\boxed{0.51}", r"\frac{1}{2}"),
        (r"\boxed{2\sqrt{13}}", r"3\sqrt{13}"),
        (r"\boxed{24}", "025"),
        (r"\boxed{-25}", "25"),
        (r"\boxed{x+2}", "1+x"),
        (r"\boxed{D}", r"\text{(C)}"),
        (r"\boxed{(\frac{\pi}{2}, 3)}", r"(3,\frac{\pi}{2})"),
        (r"\boxed{}", "0"),
    ],
)
def test_verify_not_equivalent(response: str, reference: str) -> None:
    assert verify(response, reference) is False


def test_verify_last_boxed_answer_wins() -> None:
    response = r"First guess \boxed{3}. Wait, recheck: the answer is \boxed{4}."
    assert verify(response, "4") is True
    assert verify(response, "3") is False


@pytest.mark.parametrize("response", ["", "The answer is 4.", "4", "$4$", r"\boxed{4"])
def test_verify_without_a_closed_box_is_wrong(response: str) -> None:
    assert verify(response, "4") is False


def test_verify_empty_reference_is_never_matched() -> None:
    assert verify(r"\boxed{}", "") is False
    assert verify(r"\boxed{ }", " ") is False


def test_verify_rejects_bad_timeout() -> None:
    for bad in (0, -1.0, math.nan, math.inf, True, "5"):
        with pytest.raises(ValueError, match="timeout_s"):
            verify(r"\boxed{1}", "1", timeout_s=bad)  # type: ignore[arg-type]


def test_verify_refuses_non_main_thread() -> None:
    errors: list[BaseException] = []

    def run() -> None:
        try:
            verify(r"\boxed{1}", "1")  # a fast-path answer: refused all the same
        except BaseException as error:  # noqa: BLE001 - recorded for the main thread
            errors.append(error)

    worker = threading.Thread(target=run)
    worker.start()
    worker.join()
    assert len(errors) == 1 and isinstance(errors[0], RuntimeError)
    assert "main thread" in str(errors[0])


# --- verify: pathological outputs ------------------------------------------------------------


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        (r"\boxed{" + "{" * 100_000, False),  # unbalanced, 100 KB
        ("x" * 100_000, False),  # 100 KB without a box
        (r"\boxed{" * 15_000, False),  # 100 KB of openers
        ("\\" * 100_000, False),
        (r"\boxed" + " " * 100_000, False),
        ("y" * 100_000 + r"\boxed{5}", True),  # long, answer at the end
        (r"\boxed{5}" + "z" * 100_000, True),  # long, answer followed by text
        (r"\boxed{" + "{" * 5_000 + "5" + "}" * 5_000 + "}", False),  # deep, past the cap
        (r"\boxed{" + "1+" * MAX_ANSWER_CHARS + "1}", False),  # an answer past the cap
    ],
)
def test_pathological_outputs_are_fast(response: str, expected: bool) -> None:
    start = time.perf_counter()
    assert verify(response, "5", timeout_s=1.0) is expected
    assert time.perf_counter() - start < 0.5


@pytest.mark.parametrize(
    "response",
    [HANGS, r"\boxed{" + "{" * 200 + "5" + "}" * 200 + "}"],  # deep nesting within the cap
)
def test_slow_sympy_is_cut_at_the_deadline(response: str) -> None:
    timeout_s = 0.3  # sub-second: math-verify's own signal.alarm could not express it
    start = time.perf_counter()
    assert verify(response, "5", timeout_s=timeout_s) is None
    elapsed = time.perf_counter() - start
    assert timeout_s * 0.9 <= elapsed < timeout_s + SLACK_S


def test_deadline_refires_when_the_first_alarm_is_swallowed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[str] = []

    def stubborn_parse(text: str, parsing_timeout: object = None) -> list:
        calls.append(text)
        try:
            time.sleep(5)
        except BaseException:  # noqa: BLE001 - what a bare `except:` in mpmath would do
            pass
        time.sleep(5)
        return []

    monkeypatch.setattr(verifier, "_math_verify", lambda: (stubborn_parse, None))
    start = time.perf_counter()
    assert verify(r"\boxed{x}", "y", timeout_s=0.2) is None
    assert time.perf_counter() - start < 0.2 + SLACK_S
    assert calls == [r"\boxed{y}"]  # the reference's parse hit the deadline; no further work


def test_deadline_restores_previous_alarm_handler_and_timer() -> None:
    fired: list[int] = []

    def handler(signum: int, frame: object) -> None:
        fired.append(signum)

    old_handler = signal.signal(signal.SIGALRM, handler)
    try:
        signal.setitimer(signal.ITIMER_REAL, 30.0)
        assert verify(HANGS, "5", timeout_s=0.2) is None
        assert signal.getsignal(signal.SIGALRM) is handler
        remaining, _ = signal.getitimer(signal.ITIMER_REAL)
        assert 28.0 < remaining < 30.0  # the caller's timer still runs, minus the elapsed time
        assert fired == []
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old_handler)


# --- verify_batch --------------------------------------------------------------------------


def test_verify_batch_counts_timeouts_as_wrong_and_judges_duplicates_once() -> None:
    responses = [HANGS, r"\boxed{\frac{10}{2}}", HANGS, "no answer", r"\boxed{6}"]
    references = ["5"] * len(responses)
    start = time.perf_counter()
    correct, timeouts = verify_batch(responses, references, timeout_s=0.4)
    elapsed = time.perf_counter() - start
    assert correct == [False, True, False, False, False]
    assert timeouts == 2
    assert elapsed < 0.4 + SLACK_S  # the duplicate hang was not run a second time


def test_verify_batch_mixed_references() -> None:
    responses = [r"\boxed{0.5}", r"\boxed{0.5}", r"\boxed{025}", r"\boxed{26}"]
    references = [r"\frac{1}{2}", r"\frac{1}{3}", "25", "25"]
    assert verify_batch(responses, references) == ([True, False, True, False], 0)


def test_verify_batch_validates() -> None:
    with pytest.raises(ValueError, match="same length"):
        verify_batch([r"\boxed{1}"], ["1", "2"])
    with pytest.raises(ValueError, match="timeout_s"):
        verify_batch([r"\boxed{1}"], ["1"], timeout_s=-1)
    assert verify_batch([], []) == ([], 0)


# --- real reference answers ----------------------------------------------------------------


def _rows(name: str) -> list[dict]:
    return [json.loads(line) for line in benchmark_path(name).read_text().splitlines()]


def test_math500_solutions_verify_against_their_answers() -> None:
    rows = _rows("math500")
    correct, timeouts = verify_batch([r["solution"] for r in rows], [r["answer"] for r in rows])
    assert timeouts == 0
    assert all(correct)


def test_math500_mismatched_answers_are_rejected() -> None:
    rows = _rows("math500")[:30]
    shifted = [r["answer"] for r in rows[1:] + rows[:1]]
    correct, timeouts = verify_batch([r["solution"] for r in rows], shifted)
    assert timeouts == 0
    # The one coincidence in these rows: solution 22 boxes "5" and answer 23 is "x=5".
    assert [i for i, ok in enumerate(correct) if ok] == [22]
    assert shifted[22] == "x=5"


@pytest.mark.parametrize("name", ["math500", "aime24"])
def test_reference_answers_parse(name: str) -> None:
    rows = _rows(name)[::10]  # a sample: parsing all of MATH-500 takes seconds
    for row in rows:
        parsed = _Reference(row["answer"]).parsed(5.0)
        assert parsed, row["answer"]
