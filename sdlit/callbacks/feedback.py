"""The shipped feedback kinds: they annotate each rollout with a reward and/or the self-teacher's context.

``BinaryReward`` (GRPO's signal), ``ReferenceSolution`` and ``StepCritique`` (a frozen critic's step-aligned
critique). Each is a :class:`sdlit.feedback.Feedback`; a new kind is one more subclass of it.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Literal

from jsonargparse import lazy_instance

from sdlit.critics import ArithmeticStepCritic, Critic, critique_outcomes
from sdlit.feedback import Feedback
from sdlit.rollout import Rollout
from sdlit.tasks.solutions import clean_solution

log = logging.getLogger(__name__)

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

    The whole batch goes to the critic in one call (an LLM critic batches or parallelises it). When the
    critic fails on a rollout (timeout, HTTP error, unparseable reply, any exception), that rollout falls
    back to ``fallback``, the failure is counted and logged (``critic/failures``, ``critic/fallbacks``) and
    training goes on; a batch the critic fails wholesale still trains.

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
        self.failure_kinds: Counter[str] = Counter()  # failures by exception type

    def annotate(self, rollouts: list[Rollout]) -> None:
        """Critique the batch in one call; a rollout whose critique failed falls back (counted, logged)."""
        items = [(r.problem.question, r.problem.solution, r.response) for r in rollouts]
        outcomes = critique_outcomes(self.critic, items)
        errors = [o for o in outcomes if isinstance(o, Exception)]
        if errors:
            first = errors[0]
            log.warning("critic failed on %d of %d rollouts (first: %s: %s); fallback %r",
                        len(errors), len(items), type(first).__name__, first, self.fallback)
        for rollout, outcome in zip(rollouts, outcomes, strict=False):
            if isinstance(outcome, Exception):
                self.failures += 1
                self.failure_kinds[type(outcome).__name__] += 1
                self._fall_back(rollout, outcome)
                continue
            self.set_context(rollout, outcome.text)
            rollout.feedback.update(case=outcome.case, first_error=outcome.first_error)
            self.cases[outcome.case] += 1

    def _fall_back(self, rollout: Rollout, error: Exception) -> None:
        context = clean_solution(rollout.problem.solution) if self.fallback == "reference" else None
        self.set_context(rollout, context)
        rollout.feedback["critic_fallback"] = self.fallback
        rollout.feedback["critic_error"] = type(error).__name__
        self.fallbacks += 1

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        """Log the critic's failure count and the share of each critique case so far."""
        size = len(batch)
        pl_module.log("critic/failures", float(self.failures), batch_size=size)
        pl_module.log("critic/fallbacks", float(self.fallbacks), batch_size=size)
        total = sum(self.cases.values())
        for case in ("correct", "missing_step", "incomplete", "wrong"):
            pl_module.log(f"critic/case_{case}", self.cases[case] / max(1, total), batch_size=size)
