"""The built-in reflection task: addition of several numbers, where checking a column pays.

The plain addition task has one way to write its answer, so a longer response never helps and
length dynamics say nothing there. Here each column is first summed in one shot, which a small
model gets wrong more often than a chain of two-term sums; a response may then *reflect*: write
``wait``, add the column again two terms at a time, and carry on from the checked value. A check
costs tokens and catches a mistake, so the policy has a real length / accuracy trade-off for RL
to shift (section 4 of Yeo et al., 2025). A problem looks like::

    prompt         "47+85+19="
    demonstration  "7+5+9=20 c2\\nwait 7+5=12 12+9=21 c2\\n4+8+1+2=15 c1\\n\\\\boxed{151}"

The first line is a deliberate mistake (20); the ``wait`` line re-adds the column in steps and
its value is the one the next column's carry and the answer take. Demonstrations draw, per
column: a mistake (always followed by a check) with ``mistake_rate``, a check of a correct line
with ``check_rate``, and after any check a second, identical one (``recheck ...``) with
``recheck_rate`` -- the repetition a length-hungry policy can grow into a loop, which the n-gram
repetition penalty is there to see. Lines have the shapes of the plain task (`addition`), so the
verifier and the repetition metrics read both the same way.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass

from .addition import CHARSET as ADDITION_CHARSET
from .addition import AdditionTask, Problem, make_addition_task

#: The words a check line starts with (both are in metrics.REFLECTION_WORDS).
CHECK_WORD, RECHECK_WORD = "wait", "recheck"
CHARSET: str = "".join(sorted(set(ADDITION_CHARSET + CHECK_WORD + RECHECK_WORD + " ")))


@dataclass(frozen=True)
class ReflectRates:
    """Per-column draws of the demonstrations (see the module docstring)."""

    mistake_rate: float = 0.3
    check_rate: float = 0.5
    recheck_rate: float = 0.1

    def __post_init__(self) -> None:
        for name in ("mistake_rate", "check_rate", "recheck_rate"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
                raise ValueError(f"{name}: expected a number in [0, 1], got {value!r}")


def column_terms(numbers: Sequence[int]) -> list[list[int]]:
    """The digits summed in each column, least significant first, carry-in last (when not 0)."""
    digits = [str(n)[::-1] for n in numbers]
    columns, carry = [], 0
    for col in range(max(len(d) for d in digits)):
        terms = [int(d[col]) for d in digits if col < len(d)] + ([carry] if carry else [])
        columns.append(terms)
        carry = sum(terms) // 10
    return columns


def column_line(terms: Sequence[int], total: int) -> str:
    """The one-shot line of a column, e.g. ``7+5+9=21 c2`` (``total`` may be a mistake)."""
    return f"{'+'.join(map(str, terms))}={total} c{total // 10}"


def check_line(terms: Sequence[int], word: str = CHECK_WORD) -> str:
    """A column re-added two terms at a time, e.g. ``wait 7+5=12 12+9=21 c2``."""
    running, steps = terms[0], []
    for t in terms[1:]:
        steps.append(f"{running}+{t}={running + t}")
        running += t
    return f"{word} {' '.join(steps)} c{running // 10}"


def _mistake(total: int, rng: random.Random) -> int:
    # The slips a column sum invites: off by one, or the tens digit (a carry) dropped or doubled.
    options = [v for v in (total - 1, total + 1, total - 10, total + 10) if v >= 0]
    return rng.choice(options)


def reflect_demonstration(numbers: Sequence[int], rng: random.Random, rates: ReflectRates = ReflectRates()) -> str:
    """A worked solution of ``sum(numbers)`` with the drawn mistakes and checks."""
    if len(numbers) < 2 or any(isinstance(n, bool) or not isinstance(n, int) or n < 0 for n in numbers):
        raise ValueError(f"reflect_demonstration: expected two or more non-negative integers, got {list(numbers)}")
    lines = []
    for terms in column_terms(numbers):
        total = sum(terms)
        # A one-term column (numbers of different lengths) has nothing to re-add.
        checkable = len(terms) > 1
        wrong = checkable and rng.random() < rates.mistake_rate
        lines.append(column_line(terms, _mistake(total, rng) if wrong else total))
        if wrong or (checkable and rng.random() < rates.check_rate):
            lines.append(check_line(terms))
            if rng.random() < rates.recheck_rate:
                lines.append(check_line(terms, RECHECK_WORD))
    lines.append(f"\\boxed{{{sum(numbers)}}}")
    return "\n".join(lines)


def make_reflect_task(
    digits: int = 2,
    operands: int = 3,
    n_train: int = 4000,
    n_heldout: int = 256,
    seed: int = 0,
    n_valid: int = 0,
    rates: ReflectRates = ReflectRates(),
) -> AdditionTask:
    """The splits of `make_addition_task` (same problems for the same arguments), with
    demonstrations that make and catch mistakes, drawn from ``seed``."""
    base = make_addition_task(digits, n_train, n_heldout, seed=seed, operands=operands, n_valid=n_valid)
    rng = random.Random(f"reflect-{seed}")

    def redo(problems: list[Problem]) -> list[Problem]:
        return [Problem(p.question, p.answer, reflect_demonstration([int(x) for x in p.question.split("+")], rng, rates))
                for p in problems]

    return AdditionTask(digits=digits, operands=operands, seed=seed, train=redo(base.train),
                        heldout=redo(base.heldout), valid=redo(base.valid), charset=CHARSET)


_LINE = re.compile(r"^([0-9+]+)=([0-9]+) c([0-9]+)$")
_CHECK = re.compile(rf"^(?:{CHECK_WORD}|{RECHECK_WORD}) ((?:[0-9]+\+[0-9]+=[0-9]+ ?)+) c([0-9]+)$")


def audit(response: str) -> dict[str, int]:
    """Counts over one response's lines: one-shot column lines and how many are wrong, check
    lines and how many are wrong (a check is right when each of its steps adds up and its terms
    are the preceding column line's), and lines of neither shape. What `longcot replicate s4`
    reads to tell whether checking catches mistakes."""
    out = {"lines": 0, "lines_wrong": 0, "checks": 0, "checks_wrong": 0, "other": 0}
    previous: list[int] | None = None
    for line in response.split("\n"):
        if line.startswith("\\boxed"):
            break
        m = _LINE.match(line)
        if m:
            terms = [int(t) for t in m.group(1).split("+") if t]
            out["lines"] += 1
            out["lines_wrong"] += int(not terms or int(m.group(2)) != sum(terms) or int(m.group(3)) != int(m.group(2)) // 10)
            previous = terms
            continue
        m = _CHECK.match(line)
        if m:
            steps = [tuple(map(int, re.split(r"[+=]", s))) for s in m.group(1).split()]
            ok = all(a + b == c for a, b, c in steps) and all(steps[i][2] == steps[i + 1][0] for i in range(len(steps) - 1))
            chained = [steps[0][0]] + [b for _, b, _ in steps]
            ok = ok and previous is not None and chained == previous and int(m.group(2)) == steps[-1][2] // 10
            out["checks"] += 1
            out["checks_wrong"] += int(not ok)
            continue
        out["other"] += 1
    return out
