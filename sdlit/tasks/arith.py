"""Procedurally generated multi-step arithmetic word problems in GSM8K format (unlimited, seeded).

A problem follows one person's count of some items through `steps` operations (+, -, *) on small
whole numbers. Its solution has one line per step with a `<<a op b=c>>` annotation and ends with
"#### <answer>", exactly like GSM8K, so every critic and reward works on it unchanged.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from typing import Literal

from sdlit.tasks.answers import extract_answer, is_correct
from sdlit.tasks.base import Problem, Task
from sdlit.tasks.solutions import FINAL_MARK

__all__ = ["Arith", "extract_answer", "is_correct"]

NAMES = [("Tom", "he"), ("Mia", "she"), ("Ravi", "he"), ("Lena", "she"), ("Omar", "he"), ("Sofia", "she"),
         ("Ben", "he"), ("Aisha", "she"), ("Kenji", "he"), ("Grace", "she"), ("Lucas", "he"), ("Nora", "she")]
ITEMS = ["apples", "marbles", "stickers", "pencils", "cookies", "books", "cards", "shells", "balloons",
         "stamps", "crayons", "toy cars"]
CONTAINERS = ["boxes", "bags", "packs", "jars", "baskets"]
MAX_VALUE = 1000  # keep every intermediate result below this

# (question sentence, solution prefix); fields: {He} {he} {him} {his} {b} {items} {friend}
ADD = [
    ("Then {he} buys {b} more {items}.", "{He} buys {b} more"),
    ("{friend} gives {him} {b} {items}.", "{friend} gives {him} {b}"),
    ("{He} finds {b} more {items} at school.", "{He} finds {b} more"),
    ("Later {he} gets {b} {items} as a gift.", "{He} gets {b} as a gift"),
]
SUB = [
    ("{He} gives away {b} {items} to {friend}.", "{He} gives away {b}"),
    ("{He} sells {b} of the {items}.", "{He} sells {b}"),
    ("{He} loses {b} {items} on the way home.", "{He} loses {b}"),
    ("{friend} borrows {b} {items} from {him}.", "{friend} borrows {b}"),
]
TIMES_WORDS = {2: "doubles", 3: "triples", 4: "quadruples"}


@dataclass
class _Story:
    """The running state of a problem being written."""

    words: dict
    value: int
    question: list
    solution: list


def _fill(text: str, words: dict, **extra) -> str:
    """Fill a template and capitalise the first letter."""
    out = text.format(**words, **extra)
    return out[0].upper() + out[1:]


def _line(story: _Story, prefix: str, a: int, op: str, b: int, result: int, tail: str = "") -> str:
    """A solution line: '<prefix>, so <he> has a op b=<<a op b=r>>r <items><tail>.'"""
    who = story.words["he"]
    return f"{prefix}, so {who} has {a}{op}{b}=<<{a}{op}{b}={result}>>{result} {story.words['items']}{tail}."


def _start(rng: random.Random, words: dict, max_operand: int, boxes: bool) -> _Story:
    """The opening sentence; with `boxes` it is a multiplication step ("each box holds ...")."""
    if not boxes:
        a = rng.randint(1, max_operand)
        return _Story(words, a, [f"{words['name']} has {a} {words['items']}."], [])
    container = rng.choice(CONTAINERS)
    a, b = rng.randint(2, max(2, max_operand)), rng.randint(2, max(2, min(10, max_operand)))
    question = f"{words['name']} has {a} {container} of {words['items']}. Each one holds {b} {words['items']}."
    line = (f"Each of the {a} {container} holds {b} {words['items']}, so {words['name']} has "
            f"{a}*{b}=<<{a}*{b}={a * b}>>{a * b} {words['items']}.")
    return _Story(words, a * b, [question], [line])


def _step(rng: random.Random, story: _Story, max_operand: int) -> None:
    """Add one operation (+, - or *) to the story, keeping the value a whole number in [0, MAX_VALUE)."""
    x = story.value
    ops = ["+"] + (["-"] if x > 0 else []) + (["*"] if 0 < x * 2 < MAX_VALUE else [])
    op = rng.choice(ops)
    if op == "*":
        b = rng.randint(2, max(2, min(5, max_operand, (MAX_VALUE - 1) // x)))
        result = x * b
        if b in TIMES_WORDS and rng.random() < 0.5:
            q = f"Then the number of {{items}} {{he}} has {TIMES_WORDS[b]}."
            prefix = f"The number {TIMES_WORDS[b]}"
        else:
            q, prefix = "{He} ends up with {b} times as many {items} as before.", "{He} ends up with {b} times as many"
    elif op == "-":
        b = rng.randint(1, min(x, max_operand))
        q, prefix = rng.choice(SUB)
        result = x - b
    else:
        b = rng.randint(1, max_operand)
        q, prefix = rng.choice(ADD)
        result = x + b
    story.question.append(_fill(q, story.words, b=b))
    tail = " left" if op == "-" else ""
    story.solution.append(_line(story, _fill(prefix, story.words, b=b), x, op, b, result, tail))
    story.value = result


def split_of(question: str) -> Literal["train", "eval"]:
    """The split a question belongs to, decided by a hash of its text (1 in 8 goes to eval)."""
    return "eval" if hashlib.sha256(question.encode()).digest()[0] % 8 == 0 else "train"


class Arith(Task):
    """Multi-step arithmetic word problems, generated on the fly in GSM8K format.

    Difficulty is the number of steps: each step is one operation (+, -, *) on small whole numbers and
    every result is a non-negative whole number. Train and eval problems are disjoint by construction:
    a hash of the question text decides its split, and each split keeps only its own questions.

    Args:
        min_steps: fewest operations in a problem (>= 1).
        max_steps: most operations in a problem (>= min_steps).
        max_operand: largest number given in a question (>= 2).
        train_size: number of training problems returned by train_problems().
        eval_size: number of held-out problems returned by eval_problems().
        seed: generation seed; the same seed always gives the same problems.
    """

    name = "arith"

    def __init__(self, min_steps: int = 1, max_steps: int = 2, max_operand: int = 20, train_size: int = 1000,
                 eval_size: int = 64, seed: int = 0) -> None:
        if not 1 <= min_steps <= max_steps:
            raise ValueError(f"need 1 <= min_steps <= max_steps, got min_steps={min_steps}, max_steps={max_steps}")
        if max_operand < 2:
            raise ValueError(f"max_operand must be >= 2, got {max_operand}")
        self.min_steps, self.max_steps, self.max_operand = min_steps, max_steps, max_operand
        self.train_size, self.eval_size, self.seed = train_size, eval_size, seed
        self._cache: dict[str, list[Problem]] = {}

    def _write(self, rng: random.Random) -> tuple[str, str, int]:
        """One random problem: (question, solution, answer)."""
        name, he = rng.choice(NAMES)
        friend = rng.choice([n for n, _ in NAMES if n != name])
        words = {"name": name, "he": he, "He": he.capitalize(), "him": "him" if he == "he" else "her",
                 "his": "his" if he == "he" else "her", "items": rng.choice(ITEMS), "friend": friend}
        steps = rng.randint(self.min_steps, self.max_steps)
        boxes = rng.random() < 1 / 3
        story = _start(rng, words, self.max_operand, boxes)
        for _ in range(steps - int(boxes)):
            _step(rng, story, self.max_operand)
        ending = "left" if story.solution[-1].endswith(" left.") else "now"
        question = " ".join(story.question) + f" How many {words['items']} does {name} have {ending}?"
        solution = "\n".join(story.solution + [f"{FINAL_MARK} {story.value}"])
        return question, solution, story.value

    def generate(self, index: int, split: Literal["train", "eval"] = "train") -> Problem:
        """The problem number `index` of a split; deterministic for (seed, split, index)."""
        if split not in ("train", "eval"):
            raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
        for attempt in range(10_000):
            rng = random.Random(f"{self.seed}:{split}:{index}:{attempt}")
            question, solution, answer = self._write(rng)
            if split_of(question) == split:
                return Problem(question=question, solution=solution, answer=str(answer), id=f"arith/{split}/{index}")
        raise RuntimeError(f"could not generate an {split} problem for index {index}")

    def _problems(self, split: Literal["train", "eval"], size: int) -> list[Problem]:
        """The first `size` distinct problems of a split (cached)."""
        if split not in self._cache:
            problems, seen, index = [], set(), 0
            while len(problems) < size:
                if index > 50 * size + 1000:
                    raise ValueError(f"only {len(problems)} distinct {split} problems exist for these settings; "
                                     f"lower {split}_size or raise max_operand/max_steps")
                problem = self.generate(index, split)
                if problem.question not in seen:
                    seen.add(problem.question)
                    problems.append(problem)
                index += 1
            self._cache[split] = problems
        return self._cache[split]

    def train_problems(self) -> list[Problem]:
        """`train_size` distinct training problems."""
        return self._problems("train", self.train_size)

    def eval_problems(self) -> list[Problem]:
        """`eval_size` distinct held-out problems (never the same question as a training problem)."""
        return self._problems("eval", self.eval_size)
