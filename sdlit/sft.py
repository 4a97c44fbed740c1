"""Supervised warm start: reference solutions written in the solver's step-tagged format, as rollouts.

The ``sft`` objective trains the solver with cross-entropy on a problem's reference solution instead of on a
sampled answer. The solution is first rewritten the way the solver is asked to answer (``Step 1: ...``, ...,
``Answer: N``; see :data:`sdlit.steps.STEP_FORMAT_INSTRUCTION`), so that after the warm start the solver writes
step-tagged answers that a critic can point into. The targets are built as :class:`~sdlit.rollout.Rollout`
objects, so the student pass, logging and checkpoints are those of every other objective.
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

from sdlit.rollout import Rollout
from sdlit.tasks.base import Problem
from sdlit.tasks.solutions import tagged_solution


def reference_rollouts(
    problems: list[Problem],
    tokenizer: PreTrainedTokenizerBase,
    policy_version: int = 0,
    template_kwargs: dict | None = None,
) -> list[Rollout]:
    """One rollout per problem whose response is its step-tagged reference solution, ending with EOS.

    Each is marked correct and carries ``feedback["target"] = "reference"``; rollouts of problem i have
    ``group == i`` as sampled ones do.
    """
    return [
        Rollout.from_text(problem, tagged_solution(problem.solution, problem.answer), tokenizer,
                          template_kwargs=template_kwargs, policy_version=policy_version, group=i, correct=True,
                          feedback={"target": "reference"})
        for i, problem in enumerate(problems)
    ]
