"""The base class of feedback kinds: a Lightning callback that annotates rollouts before the training step.

A feedback kind is one subclass of :class:`Feedback` listed in ``trainer.callbacks``; the datamodule runs
every such callback on each fresh batch of rollouts, in order, before the training step. For example::

    class AnswerHint(Feedback):
        header = "Hint:"
        def annotate_one(self, rollout):
            rollout.context = f"The final answer is {rollout.problem.answer}."

The shipped kinds (``BinaryReward``, ``ReferenceSolution``, ``StepCritique``) live in :mod:`sdlit.callbacks`.
"""

from __future__ import annotations

from lightning.pytorch import Callback

from sdlit.rollout import Rollout


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
