"""The GSM8K solution format, in one place.

A worked solution (GSM8K's ``answer`` field, the ``arith`` task's solutions, ``Problem.solution``) is one line
per step, each with optional calculator annotations ``<<a op b=c>>``, then a last line ``#### <final answer>``::

    Natalia sold 48/2 = <<48/2=24>>24 clips in May.
    Natalia sold 48+24 = <<48+24=72>>72 clips altogether.
    #### 72

Every other module reads solutions through these functions: the reader's text (annotations removed), the
worked lines, the final answer, the annotations, and the step-tagged form the solver is asked to write
(``Step 1: ...``, ..., ``Answer: N``; used by the ``sft`` warm start).
"""

from __future__ import annotations

import re

from sdlit.tasks.base import DataError

FINAL_MARK = "####"
ANNOTATION = re.compile(r"<<([^<>]*)>>")


def clean_solution(solution: str) -> str:
    """The solution as a reader sees it: ``<<a*b=c>>`` calculator annotations removed."""
    return ANNOTATION.sub("", solution)


def annotations(text: str) -> list[str]:
    """The insides of the ``<<...>>`` annotations of a text, in order (``"48/2=24"``, ...)."""
    return ANNOTATION.findall(text)


def solution_lines(solution: str) -> list[str]:
    """The worked lines of a solution, stripped, without empty lines and without the ``####`` line.

    Annotations are kept (see :func:`clean_solution`).
    """
    lines = (line.strip() for line in solution.splitlines())
    return [line for line in lines if line and not line.startswith(FINAL_MARK)]


def final_answer(solution: str) -> str | None:
    """The text after the last ``####`` (stripped), or None when the solution has no ``####``."""
    if FINAL_MARK not in solution:
        return None
    return solution.rsplit(FINAL_MARK, 1)[1].strip()


def tagged_solution(solution: str, answer: str | None = None) -> str:
    """A solution as step-tagged text: one ``Step k:`` per worked line, then ``Answer: N``.

    Annotations are removed; the final answer comes from the ``#### N`` line, or from ``answer`` when the
    solution has none. Raises :class:`DataError` when neither gives an answer.
    """
    final = final_answer(solution)
    if final is None:
        final = answer
    if not final:
        raise DataError(f"reference solution has no final answer ('#### <number>' line): {solution[:80]!r}")
    steps = [f"Step {k}: {line}" for k, line in enumerate(solution_lines(clean_solution(solution)), start=1)]
    return "\n".join(steps + [f"Answer: {final}"])
