"""What a critic returns: a per-step verdict and a teacher context, following the paper's four cases."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Protocol, Sequence, runtime_checkable

__all__ = ["Critic", "Critique", "StepVerdict", "critique_outcomes"]


@dataclass(frozen=True)
class StepVerdict:
    """The verdict on one solver step.

    Attributes:
        index: 0-based index of the step (as in sdlit.steps.split_steps).
        text: the step's text.
        verdict: "correct" or "wrong".
        reason: why the step is wrong ("" when correct).
    """

    index: int
    text: str
    verdict: Literal["correct", "wrong"]
    reason: str = ""


@dataclass(frozen=True)
class Critique:
    """A critic's judgement of one rollout.

    Attributes:
        case: "correct" (A), "missing_step" (B: right answer, a step skipped), "incomplete" (C: no final
            answer) or "wrong" (D).
        first_error: 0-based index (into steps) of the earliest wrong step; None unless case == "wrong".
        steps: one verdict per step of split_steps(response), the answer line last when present.
        text: the teacher context (the critique itself).
        tagged: False when the response had no step tags (each line was then treated as a step).
    """

    case: Literal["correct", "missing_step", "incomplete", "wrong"]
    first_error: int | None
    steps: list[StepVerdict] = field(default_factory=list)
    text: str = ""
    tagged: bool = True


@runtime_checkable
class Critic(Protocol):
    """Anything that critiques solver answers given the question and a reference solution."""

    def critique(self, question: str, reference: str, response: str) -> Critique:
        """Critique one response."""
        ...

    def critique_batch(self, items: Sequence[tuple[str, str, str]]) -> list[Critique]:
        """Critique many (question, reference, response) triples, in order."""
        ...


def critique_outcomes(critic: Critic, items: Sequence[tuple[str, str, str]]) -> list[Critique | Exception]:
    """A critique, or the exception that prevented it, per (question, reference, response) item.

    Critics that report failures per item (``critique_outcomes`` method, e.g. the LLM critics) are asked
    once. For any other critic the batch is tried whole, and when it raises, item by item, so that one bad
    item costs only itself.
    """
    if hasattr(critic, "critique_outcomes"):
        try:
            outcomes = list(critic.critique_outcomes(items))
        except Exception as err:  # noqa: BLE001 - a critic that fails wholesale fails every item
            return [err] * len(items)
        if len(outcomes) != len(items):
            return [RuntimeError(f"{type(critic).__name__} returned {len(outcomes)} critiques for "
                                 f"{len(items)} answers")] * len(items)
        return outcomes
    try:
        return list(critic.critique_batch(items))
    except Exception:  # noqa: BLE001 - retry one by one below
        pass
    outcomes: list[Critique | Exception] = []
    for item in items:
        try:
            outcomes.append(critic.critique(*item))
        except Exception as err:  # noqa: BLE001
            outcomes.append(err)
    return outcomes
