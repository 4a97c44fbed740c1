"""Feedback callbacks: they annotate each rollout with a reward and/or the self-teacher's context.

A feedback kind is one subclass of :class:`Feedback` listed in ``trainer.callbacks``; the datamodule runs
every such callback on each fresh batch of rollouts, in order, before the training step. For example::

    class AnswerHint(Feedback):
        header = "Hint:"
        def annotate_one(self, rollout):
            rollout.context = f"The final answer is {rollout.problem.answer}."
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from typing import Literal

from jsonargparse import lazy_instance
from lightning.pytorch import Callback

from sdlit.critics import ArithmeticStepCritic, Critic
from sdlit.rollout import Rollout

log = logging.getLogger(__name__)

_ANNOTATION = re.compile(r"<<[^<>]*>>")


def clean_solution(solution: str) -> str:
    """A reference solution as a reader sees it: ``<<a*b=c>>`` calculator annotations removed."""
    return _ANNOTATION.sub("", solution)


class Feedback(Callback):
    """Base class of feedback kinds: override :meth:`annotate_one` (or :meth:`annotate` for batching).

    A subclass sets ``rollout.reward`` (a float) and/or ``rollout.context`` (the text the self-teacher sees,
    introduced by ``header``); it may add anything to ``rollout.feedback``. Rollouts are already graded
    (``rollout.correct``) when feedback runs.
    """

    header: str = "Feedback:"

    def annotate(self, rollouts: list[Rollout]) -> None:
        """Annotate a batch of rollouts in place (default: one by one)."""
        for rollout in rollouts:
            self.annotate_one(rollout)

    def annotate_one(self, rollout: Rollout) -> None:
        """Annotate one rollout in place."""
        raise NotImplementedError(f"{type(self).__name__} must implement annotate_one or annotate")

    def set_context(self, rollout: Rollout, context: str | None) -> None:
        """Give ``rollout`` a teacher context introduced by this callback's header."""
        rollout.context = context
        rollout.context_header = self.header


class BinaryReward(Feedback):
    """GRPO's signal: a reward for a right final answer and another for a wrong one.

    Args:
        correct_reward: Reward of a rollout whose final answer matches the gold answer.
        wrong_reward: Reward of any other rollout.
    """

    def __init__(self, correct_reward: float = 1.0, wrong_reward: float = 0.0):
        self.correct_reward = correct_reward
        self.wrong_reward = wrong_reward

    def annotate_one(self, rollout: Rollout) -> None:
        rollout.reward = self.correct_reward if rollout.correct else self.wrong_reward


class ReferenceSolution(Feedback):
    """The self-teacher sees a full worked solution of the problem.

    Args:
        header: Line introducing the solution in the teacher prompt.
    """

    def __init__(self, header: str = "Here is a correct reference solution to this problem:"):
        self.header = header

    def annotate_one(self, rollout: Rollout) -> None:
        self.set_context(rollout, clean_solution(rollout.problem.solution))


class StepCritique(Feedback):
    """The self-teacher sees a frozen critic's step-aligned critique of this very rollout.

    When the critic fails on a rollout, the rollout falls back to ``fallback`` and the failure is counted
    (``critic/failures``, ``critic/fallbacks``); training goes on.

    Args:
        critic: The frozen critic (``ArithmeticStepCritic`` by default).
        header: Line introducing the critique in the teacher prompt.
        fallback: Context when the critic fails: ``reference`` (the reference solution) or ``none``
            (no teacher context: the rollout only contributes its reward).
    """

    def __init__(
        self,
        critic: Critic = lazy_instance(ArithmeticStepCritic),
        header: str = "Here is a step-by-step review of your previous answer to this problem:",
        fallback: Literal["reference", "none"] = "reference",
    ):
        self.critic = critic
        self.header = header
        self.fallback = fallback
        self.failures = 0
        self.fallbacks = 0
        self.cases: Counter[str] = Counter()

    def annotate(self, rollouts: list[Rollout]) -> None:
        items = [(r.problem.question, r.problem.solution, r.response) for r in rollouts]
        try:
            critiques = self.critic.critique_batch(items)
        except Exception as err:  # noqa: BLE001 - any critic fault falls back, counted and logged
            log.warning("critic failed on a batch of %d rollouts (%s); falling back per rollout", len(items), err)
            critiques = [self._critique_one(item) for item in items]
        for rollout, critique in zip(rollouts, critiques):
            if critique is None:
                self._fall_back(rollout)
                continue
            self.set_context(rollout, critique.text)
            rollout.feedback.update(case=critique.case, first_error=critique.first_error)
            self.cases[critique.case] += 1

    def _critique_one(self, item: tuple[str, str, str]):
        try:
            return self.critic.critique(*item)
        except Exception as err:  # noqa: BLE001
            log.warning("critic failed (%s: %s); using fallback %r", type(err).__name__, err, self.fallback)
            self.failures += 1
            return None

    def _fall_back(self, rollout: Rollout) -> None:
        context = clean_solution(rollout.problem.solution) if self.fallback == "reference" else None
        self.set_context(rollout, context)
        rollout.feedback["critic_fallback"] = self.fallback
        self.fallbacks += 1

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        """Log the critic's failure count and the share of each critique case so far."""
        size = len(batch)
        pl_module.log("critic/failures", float(self.failures), batch_size=size)
        pl_module.log("critic/fallbacks", float(self.fallbacks), batch_size=size)
        total = sum(self.cases.values())
        for case in ("correct", "missing_step", "incomplete", "wrong"):
            pl_module.log(f"critic/case_{case}", self.cases[case] / max(1, total), batch_size=size)
