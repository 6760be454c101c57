"""The built-in synthetic task: multi-digit addition worked column by column, with carries.

The default ``longcot train`` run must show learning within minutes on a 2-core CPU with a
~1M-parameter model and a character tokenizer, so every string here is short and drawn from a
small alphabet (``CHARSET``). A problem looks like::

    prompt         "47+85="
    demonstration  "7+5=12 c1\\n4+8+1=13 c1\\n\\\\boxed{132}"

One line per column, least significant first: the column's digits, then ``+carry`` when the
previous column carried, ``=`` the column sum, and ``c`` the carry out. The final line is the
answer in ``\\boxed{...}``, which is what the rule-based verifier reads. Every column line has
the same shape (the ``c0``/``c1`` is always written) so that the model can copy the carry into
the next line by looking back one line, instead of having to infer it.

The end-of-sequence token is not part of the demonstration: the tokenizer/trainer appends it.
"""

from __future__ import annotations

import random
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field

# Sorted so that a tokenizer built from it gives the same ids whatever produced the string.
CHARSET: str = "".join(sorted(set("0123456789+= \nc\\boxed{}")))

#: The prompt format, as an ``apply_template`` template: the question followed by ``=``.
TEMPLATE: str = "{question}="

MIN_DIGITS, MAX_DIGITS = 1, 6
MIN_OPERANDS, MAX_OPERANDS = 2, 4


@dataclass(frozen=True)
class Problem:
    """One addition problem. ``question`` is e.g. ``"47+85"``; the model sees ``prompt(question)``
    and should generate ``demonstration``, whose boxed value equals ``answer``."""

    question: str
    answer: str
    demonstration: str

    @property
    def prompt(self) -> str:
        return prompt(self.question)


@dataclass(frozen=True)
class AdditionTask:
    """Seeded train/held-out/validation splits of addition problems (disjoint operand tuples).

    ``valid`` is for decisions taken during a run (when the SFT warm start stops), so that the
    held-out split stays untouched until it is reported.
    """

    digits: int
    operands: int
    seed: int
    train: list[Problem] = field(repr=False)
    heldout: list[Problem] = field(repr=False)
    valid: list[Problem] = field(default_factory=list, repr=False)
    charset: str = CHARSET
    template: str = TEMPLATE

    def prompt(self, question: str) -> str:
        return prompt(question)


def prompt(question: str) -> str:
    """The text the model is conditioned on: ``"47+85"`` -> ``"47+85="``."""
    return TEMPLATE.replace("{question}", question)


def demonstrate(numbers: Sequence[int]) -> str:
    """The column-by-column worked solution for ``sum(numbers)``, ending in ``\\boxed{...}``."""
    if len(numbers) < 2:
        raise ValueError(f"demonstrate: expected at least two numbers, got {list(numbers)}")
    if any(isinstance(n, bool) or not isinstance(n, int) or n < 0 for n in numbers):
        raise ValueError(f"demonstrate: expected non-negative integers, got {list(numbers)}")
    # Columns past an operand's length are left out rather than written as 0: the operands all
    # have the same number of digits in generated problems, so this only matters for callers.
    digit_lists = [str(n)[::-1] for n in numbers]
    width = max(len(d) for d in digit_lists)
    lines = []
    carry = 0
    for col in range(width):
        terms = [d[col] for d in digit_lists if col < len(d)]
        if carry:
            terms.append(str(carry))
        total = sum(int(t) for t in terms)
        carry = total // 10
        lines.append(f"{'+'.join(terms)}={total} c{carry}")
    lines.append(f"\\boxed{{{sum(numbers)}}}")
    return "\n".join(lines)


def make_problem(numbers: Sequence[int]) -> Problem:
    """The ``Problem`` for adding ``numbers`` (e.g. ``(47, 85)``)."""
    numbers = list(numbers)
    return Problem(
        question="+".join(str(n) for n in numbers),
        answer=str(sum(numbers)),
        demonstration=demonstrate(numbers),
    )


def _operand_range(digits: int) -> tuple[int, int]:
    # Operands have exactly `digits` digits (no leading zeros), so all problems of a task have
    # the same shape; one-digit operands include 0.
    low = 0 if digits == 1 else 10 ** (digits - 1)
    return low, 10**digits


def problem_count(digits: int, operands: int = 2) -> int:
    """How many distinct problems exist with ``operands`` operands of ``digits`` digits."""
    low, high = _operand_range(digits)
    return (high - low) ** operands


def _sample_indices(rng: random.Random, space: int, k: int) -> list[int]:
    """``k`` distinct integers from ``range(space)``, deterministic given the rng state."""
    if space <= sys.maxsize:
        return rng.sample(range(space), k)
    # range() cannot have a length past sys.maxsize; with so large a space, rejection sampling
    # needs almost no retries.
    seen: set[int] = set()
    out: list[int] = []
    while len(out) < k:
        i = rng.randrange(space)
        if i not in seen:
            seen.add(i)
            out.append(i)
    return out


def make_addition_task(
    digits: int = 2,
    n_train: int = 4000,
    n_heldout: int = 256,
    seed: int = 0,
    operands: int = 2,
    n_valid: int = 0,
) -> AdditionTask:
    """A seeded split of ``digits``-digit addition problems with ``operands`` operands.

    The splits are drawn together without replacement, so no operand tuple appears twice or in
    two splits (``47+85`` and ``85+47`` count as different problems).
    """
    for name, value, low, high in (
        ("digits", digits, MIN_DIGITS, MAX_DIGITS),
        ("operands", operands, MIN_OPERANDS, MAX_OPERANDS),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise ValueError(f"make_addition_task: {name} must be an int in [{low}, {high}], got {value!r}")
    for name, value in (("n_train", n_train), ("n_heldout", n_heldout), ("n_valid", n_valid)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"make_addition_task: {name} must be a non-negative int, got {value!r}")
    low, high = _operand_range(digits)
    base = high - low
    space = base**operands
    total = n_train + n_heldout + n_valid
    if total > space:
        raise ValueError(
            f"make_addition_task: {total} problems requested (n_train={n_train} + "
            f"n_heldout={n_heldout} + n_valid={n_valid}) but only {space} distinct {operands}-operand "
            f"{digits}-digit problems exist"
        )
    rng = random.Random(seed)
    problems = []
    for index in _sample_indices(rng, space, total):
        numbers = []
        for _ in range(operands):
            index, r = divmod(index, base)
            numbers.append(low + r)
        problems.append(make_problem(numbers))
    return AdditionTask(
        digits=digits,
        operands=operands,
        seed=seed,
        heldout=problems[:n_heldout],
        valid=problems[n_heldout : n_heldout + n_valid],
        train=problems[n_heldout + n_valid :],
    )
