"""The built-in `arith` task: multi-step arithmetic word problems with worked solutions ending in `#### N`."""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass

SPLITS = ("train", "test")
#: One problem in TEST_BUCKETS out of NUM_BUCKETS (by a hash of its expression) belongs to the test split.
NUM_BUCKETS = 10
TEST_BUCKETS = (0,)

_NAMES = [
    ("Mia", "she"), ("Leo", "he"), ("Ava", "she"), ("Sam", "he"), ("Zoe", "she"), ("Omar", "he"),
    ("Lena", "she"), ("Ravi", "he"), ("Nora", "she"), ("Ben", "he"), ("Ines", "she"), ("Kai", "he"),
]
_ITEMS = ["apples", "marbles", "stickers", "coins", "books", "pencils", "cards", "shells", "stamps", "cookies"]

_OPENINGS = [
    "{name} has {n} {item}.",
    "{name} starts the day with {n} {item}.",
    "There are {n} {item} in {name}'s box.",
]
_STEPS = {
    "+": [
        "{Pron} buys {k} more {item}.",
        "A friend gives {name} {k} {item}.",
        "{Pron} finds {k} more {item}.",
    ],
    "-": [
        "{Pron} gives away {k} {item}.",
        "{Pron} loses {k} {item}.",
        "{name} uses {k} of the {item}.",
    ],
    "*": [
        "Then the number of {item} is multiplied by {k}.",
        "Then {name} ends up with {k} times as many {item} as before.",
    ],
    "/": [
        "{Pron} splits the {item} into {k} equal groups and keeps one group.",
        "{Pron} shares the {item} equally among {k} people, {pron_self} included, and keeps one share.",
    ],
}
_QUESTIONS = [
    "How many {item} does {name} have now?",
    "How many {item} are left at the end?",
    "What is the final number of {item}?",
]
_WORDS = {"+": "adds", "-": "takes away", "*": "multiplies by", "/": "divides by"}
_ANSWER_RE = re.compile(r"####\s*(-?[\d,]*\.?\d+)")


@dataclass(frozen=True)
class ArithProblem:
    """One generated problem: the question, its worked solution, the expression and its value."""

    question: str
    answer: str
    expression: str
    result: int

    def to_record(self) -> dict:
        """Return a JSON-able dict in question/answer format (plus the expression and result)."""
        return {"question": self.question, "answer": self.answer, "expression": self.expression,
                "result": self.result}


def _apply(op: str, value: int, k: int) -> int:
    """Apply one integer operation."""
    if op == "+":
        return value + k
    if op == "-":
        return value - k
    if op == "*":
        return value * k
    return value // k


def _pick_operand(rng: random.Random, op: str, value: int) -> int | None:
    """Pick an operand that keeps the value a positive integer below 1000, or None if impossible."""
    if op == "+":
        return rng.randint(2, 50) if value < 950 else None
    if op == "-":
        return rng.randint(2, value - 1) if value > 3 else None
    if op == "*":
        choices = [k for k in range(2, 6) if value * k < 1000]
        return rng.choice(choices) if choices else None
    divisors = [k for k in range(2, 10) if value % k == 0 and value // k > 1]
    return rng.choice(divisors) if divisors else None


def generate_problem(rng: random.Random) -> ArithProblem:
    """Generate one problem with 2-4 operations from `rng`."""
    name, pron = rng.choice(_NAMES)
    item = rng.choice(_ITEMS)
    fill = {"name": name, "item": item, "Pron": pron.capitalize(), "pron": pron,
            "pron_self": "herself" if pron == "she" else "himself"}
    value = rng.randint(2, 60)
    sentences = [rng.choice(_OPENINGS).format(n=value, **fill)]
    lines = [f"{name} starts with {value} {item}."]
    expression = str(value)
    num_ops = rng.randint(2, 4)
    while num_ops > 0:
        op = rng.choice("+-*/")
        k = _pick_operand(rng, op, value)
        if k is None:
            continue
        new_value = _apply(op, value, k)
        sentences.append(rng.choice(_STEPS[op]).format(k=k, **fill))
        lines.append(f"{value} {op} {k} = {new_value}.")
        expression = f"({expression} {op} {k})"
        value = new_value
        num_ops -= 1
    sentences.append(rng.choice(_QUESTIONS).format(**fill))
    lines.append(f"#### {value}")
    return ArithProblem(" ".join(sentences), "\n".join(lines), expression[1:-1], value)


def split_of(expression: str) -> str:
    """Return 'train' or 'test' for a problem, from a stable hash of its expression."""
    bucket = int(hashlib.sha256(expression.encode()).hexdigest(), 16) % NUM_BUCKETS
    return "test" if bucket in TEST_BUCKETS else "train"


def generate_arith(split: str = "train", num_examples: int = 1000, seed: int = 0) -> list[dict]:
    """Return `num_examples` distinct problems of `split` as question/answer records.

    Deterministic given (split, seed); a smaller request is a prefix of a larger one, and the
    train and test splits never share an expression (whatever the seeds).
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r} for arith; choose one of: {', '.join(SPLITS)}")
    if num_examples < 1:
        raise ValueError(f"num_examples must be >= 1, got {num_examples}")
    rng = random.Random(f"arith-{split}-{seed}")
    seen: set[str] = set()
    records = []
    attempts = 0
    while len(records) < num_examples:
        attempts += 1
        if attempts > 50 * num_examples + 1000:
            raise ValueError(f"could not generate {num_examples} distinct arith problems; ask for fewer")
        problem = generate_problem(rng)
        if problem.expression in seen or split_of(problem.expression) != split:
            continue
        seen.add(problem.expression)
        records.append(problem.to_record())
    return records


def extract_answer(text: str) -> str | None:
    """Return the number after the last `####` in `text` (commas removed), or None."""
    matches = _ANSWER_RE.findall(text)
    if not matches:
        return None
    number = matches[-1].replace(",", "")
    try:
        value = float(number)
    except ValueError:
        return None
    return str(int(value)) if value == int(value) else str(value)


def is_correct(prediction: str, reference: str) -> bool:
    """Exact match of the final `#### <number>` of a prediction against the reference's."""
    gold = extract_answer(reference)
    return gold is not None and extract_answer(prediction) == gold
