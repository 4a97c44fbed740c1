"""Supervised warm start: reference solutions written in the solver's step-tagged format, as rollouts.

The ``sft`` objective trains the solver with cross-entropy on a problem's reference solution instead of on a
sampled answer. The solution is first rewritten the way the solver is asked to answer (``Step 1: ...``, ...,
``Answer: N``; see :data:`sdlit.steps.STEP_FORMAT_INSTRUCTION`), so that after the warm start the solver writes
step-tagged answers that a critic can point into. The targets are built as :class:`~sdlit.rollout.Rollout`
objects, so the student pass, logging and checkpoints are those of every other objective.
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

from sdlit.callbacks.feedback import clean_solution
from sdlit.prompts import student_prompt_ids
from sdlit.rollout import Rollout
from sdlit.tasks.base import DataError, Problem

_FINAL = "####"


def tagged_solution(solution: str, answer: str | None = None) -> str:
    """A GSM8K-format solution as step-tagged text: one ``Step k:`` per worked line, then ``Answer: N``.

    ``<<a*b=c>>`` calculator annotations are removed; the final answer comes from the ``#### N`` line, or
    from ``answer`` when the solution has none. Raises :class:`DataError` when neither gives an answer.
    """
    lines = [line.strip() for line in clean_solution(solution).split("\n")]
    work = [line for line in lines if line and not line.startswith(_FINAL)]
    final = next((line[len(_FINAL):].strip() for line in lines if line.startswith(_FINAL)), None)
    if final is None:
        final = answer
    if not final:
        raise DataError(f"reference solution has no final answer ('#### <number>' line): {solution[:80]!r}")
    steps = [f"Step {k}: {text}" for k, text in enumerate(work, start=1)]
    return "\n".join(steps + [f"Answer: {final}"])


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
    rollouts = []
    for i, problem in enumerate(problems):
        text = tagged_solution(problem.solution, problem.answer)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if tokenizer.eos_token_id is not None:
            ids.append(tokenizer.eos_token_id)  # the solver learns to stop after the answer line
        rollouts.append(
            Rollout(
                problem=problem,
                prompt_ids=student_prompt_ids(tokenizer, problem.question, **(template_kwargs or {})),
                response_ids=ids,
                response=text,
                policy_version=policy_version,
                group=i,
                correct=True,
                feedback={"target": "reference"},
            )
        )
    return rollouts
