"""Rule-based verifier: a response's last ``\\boxed{...}`` against a reference answer.

The model's output is untrusted text. It is never executed; it is only scanned by linear regular
expressions and, when a cheap comparison cannot decide, parsed by ``math-verify`` (LaTeX -> sympy)
under a wall-clock deadline, because sympy can spend unbounded time on adversarial input such as
``9^{9^{9^{9}}}``.

Why the deadline is ours rather than math-verify's own ``timeout`` arguments (math-verify 0.9):

- math-verify arms ``signal.alarm(seconds)``, which takes whole seconds only: a float such as 5.0
  raises TypeError inside ``parse``, which swallows it and returns ``[]``, so every answer would
  silently be scored wrong;
- its timeouts apply per parse and per comparison pair (gold and prediction each parse to a sympy
  object and a string, so up to 2 parses + 4 comparisons), so the worst case per response is a
  multiple of the nominal timeout; and with ``raise_on_error=False`` a timeout is indistinguishable
  from a wrong answer, while the trainer wants to count timeouts.

So math-verify runs with its timeouts disabled inside one ``setitimer`` deadline per response,
whose handler raises a ``BaseException`` subclass (math-verify and sympy catch ``Exception``
widely, which must not swallow it) and re-fires every 50 ms after the deadline in case
a bare ``except:`` in mpmath swallowed the first one. Signals are delivered to the main thread
only, hence the main-thread requirement (a worker process's main thread qualifies). A signal
cannot interrupt a single long C call; no input found here produced one (sympy evaluates huge
powers and factorials in interruptible Python), but a hard guarantee would need a killable process.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import re
import signal
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

# The extracted answer that may reach sympy is capped: MATH-500's longest reference answer is 53
# characters, and sympy's cost grows much faster than linearly with expression size.
MAX_ANSWER_CHARS = 512

# After the deadline the alarm re-fires at this period until it is disarmed (see module docstring).
_REFIRE_S = 0.05

# Greedy ``.*`` backtracks from the end of the text, so the regex engine (C, linear) finds the
# LAST box opener without a Python-level loop over every occurrence.
_LAST_BOX = re.compile(r".*\\(?:boxed|fbox)\s*\{", re.DOTALL)
# A backslash escapes the next character (``\{``, ``\}`` and ``\\`` do not open or close groups).
_BRACE_TOKEN = re.compile(r"\\.|[{}]", re.DOTALL)
# ASCII digits only: ``\d`` would accept other scripts' digits, which sympy does not read as numbers.
_INTEGER = re.compile(r"([+-]?)0*([0-9]+)")


def extract_boxed(text: str, max_chars: int | None = None) -> str | None:
    """Content of the last ``\\boxed{...}`` or ``\\fbox{...}`` in ``text``.

    None when there is none, or when the last one is unbalanced (a response cut mid-answer has no
    final answer, even if an earlier box closed). With ``max_chars``, a content longer than that is
    also None: the scan stops there, which bounds the work on adversarial text.
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    if max_chars is not None and (isinstance(max_chars, bool) or max_chars < 0):
        raise ValueError(f"max_chars must be None or an int >= 0, got {max_chars!r}")
    match = _LAST_BOX.match(text)
    if match is None:
        return None
    start = match.end()
    stop = len(text) if max_chars is None else min(len(text), start + max_chars + 1)
    depth = 1
    for token in _BRACE_TOKEN.finditer(text, start, stop):
        brace = token.group()
        if brace == "{":
            depth += 1
        elif brace == "}":
            depth -= 1
            if depth == 0:
                return text[start : token.start()]
    return None


def _as_integer(text: str) -> str | None:
    """Canonical decimal string of a plain integer ("025" -> "25", "-0" -> "0"), else None.

    Strings, not ints: Python refuses int() on more than 4,300 digits, and equal canonical strings
    are equal integers anyway.
    """
    match = _INTEGER.fullmatch(text)
    if match is None:
        return None
    sign, digits = match.groups()
    return digits if sign != "-" or digits == "0" else "-" + digits


class _Deadline(BaseException):
    """Raised by the SIGALRM handler; a BaseException so that ``except Exception`` misses it."""


_armed = False


def _on_alarm(signum: int, frame: Any) -> None:
    if _armed:
        raise _Deadline


def _disarm() -> None:
    global _armed
    while True:
        try:
            _armed = False
            signal.setitimer(signal.ITIMER_REAL, 0)
            return
        except _Deadline:  # fired between entering this function and clearing the flag
            continue


def _require_main_thread() -> None:
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError(
            "the verifier bounds sympy with SIGALRM, which only the main thread receives: call it "
            "from the main thread or from worker processes, not from a thread pool"
        )


@contextlib.contextmanager
def _time_limit(seconds: float) -> Iterator[None]:
    """Raise _Deadline in the body after ``seconds``; restores any previous SIGALRM handler/timer."""
    global _armed
    _require_main_thread()
    previous_handler = signal.signal(signal.SIGALRM, _on_alarm)
    previous_delay, previous_interval = signal.setitimer(signal.ITIMER_REAL, 0)
    started = time.monotonic()
    _armed = True
    signal.setitimer(signal.ITIMER_REAL, seconds, _REFIRE_S)
    try:
        yield
    finally:
        _disarm()
        signal.signal(
            signal.SIGALRM, signal.SIG_DFL if previous_handler is None else previous_handler
        )
        if previous_delay > 0:
            remaining = previous_delay - (time.monotonic() - started)
            signal.setitimer(signal.ITIMER_REAL, max(remaining, 1e-6), previous_interval)


class _DropDisabledTimeoutWarning(logging.Filter):
    """math-verify warns once that its timeouts are off; here they are off on purpose."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Timeout is disabled")


@functools.cache
def _math_verify() -> tuple[Any, Any]:
    # Imported on first use: importing math-verify (sympy, antlr) costs most of a second, which
    # users of the length rewards alone should not pay.
    import math_verify

    for name in ("math_verify.parser", "math_verify.grader"):
        logging.getLogger(name).addFilter(_DropDisabledTimeoutWarning())
    return math_verify.parse, math_verify.verify


def _check_timeout(timeout_s: object) -> float:
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)):
        raise ValueError(f"timeout_s must be a number of seconds, got {timeout_s!r}")
    if not (math.isfinite(timeout_s) and timeout_s > 0):
        raise ValueError(f"timeout_s must be finite and > 0, got {timeout_s!r}")
    return float(timeout_s)


class _Reference:
    """A reference answer, parsed at most once however many responses are compared with it."""

    def __init__(self, text: str) -> None:
        if not isinstance(text, str):
            raise TypeError(f"reference must be a str, got {type(text).__name__}")
        self.text = text.strip()
        self.integer = _as_integer(self.text)
        self._parsed: list[Any] | None = None
        self._timed_out = False

    def parsed(self, timeout_s: float) -> list[Any] | None:
        """math-verify's parse of the reference; None when parsing it timed out."""
        if self._parsed is None and not self._timed_out:
            parse, _ = _math_verify()
            try:
                with _time_limit(timeout_s):
                    self._parsed = parse("\\boxed{" + self.text + "}", parsing_timeout=None)
            except _Deadline:
                self._timed_out = True
        return self._parsed


def _judge(answer: str | None, reference: _Reference, timeout_s: float) -> bool | None:
    if answer is None:
        return False
    answer = answer.strip()
    if not answer or not reference.text:
        return False
    # Identical text makes math-verify's own string comparison succeed, so skip sympy.
    if answer == reference.text:
        return True
    if reference.integer is not None:
        integer = _as_integer(answer)
        if integer is not None:
            return integer == reference.integer
    gold = reference.parsed(timeout_s)
    if gold is None:
        return None
    if not gold:
        return False
    parse, equivalent = _math_verify()
    try:
        with _time_limit(timeout_s):
            predicted = parse("\\boxed{" + answer + "}", parsing_timeout=None)
            return bool(predicted) and bool(equivalent(gold, predicted, timeout_seconds=None))
    except _Deadline:
        return None
    except Exception:  # math-verify catches its own errors; anything else is a wrong answer
        return False


def _extract_answer(response: str) -> str | None:
    return extract_boxed(response, max_chars=MAX_ANSWER_CHARS)


def verify(response: str, reference: str, timeout_s: float = 5.0) -> bool | None:
    """Whether the response's last boxed answer equals ``reference`` mathematically.

    False when the response has no (balanced, at most MAX_ANSWER_CHARS long) boxed answer; None
    when the comparison ran out of ``timeout_s`` (callers count those and score them wrong). Must
    run in the main thread (see the module docstring).
    """
    timeout_s = _check_timeout(timeout_s)
    _require_main_thread()  # up front, so that fast-path answers do not hide the misuse
    return _judge(_extract_answer(response), _Reference(reference), timeout_s)


def verify_batch(
    responses: Sequence[str], references: Sequence[str], timeout_s: float = 5.0
) -> tuple[list[bool], int]:
    """Correctness of each response against its reference, and how many timed out (as wrong).

    Each distinct reference is parsed once, and each distinct (reference, answer) pair is judged
    once: the samples of one prompt share a reference and often reach the same answer.
    """
    verdicts = verify_batch_verdicts(responses, references, timeout_s)
    return [v is True for v in verdicts], sum(v is None for v in verdicts)


def verify_batch_verdicts(
    responses: Sequence[str], references: Sequence[str], timeout_s: float = 5.0
) -> list[bool | None]:
    """``verify_batch`` per response: True, False, or None where the comparison timed out.

    For callers that report which responses timed out (evaluation), not only how many.
    """
    timeout_s = _check_timeout(timeout_s)
    _require_main_thread()
    if len(responses) != len(references):
        raise ValueError(
            f"responses and references must have the same length, got {len(responses)} "
            f"and {len(references)}"
        )
    parsed_references: dict[str, _Reference] = {}
    judged: dict[tuple[str, str | None], bool | None] = {}
    verdicts: list[bool | None] = []
    for response, reference_text in zip(responses, references):
        reference = parsed_references.get(reference_text)
        if reference is None:
            reference = parsed_references[reference_text] = _Reference(reference_text)
        answer = _extract_answer(response)
        key = (reference_text, answer)
        if key not in judged:
            judged[key] = _judge(answer, reference, timeout_s)
        verdicts.append(judged[key])
    return verdicts
