"""The GSM8K solution format has one owner: sdlit.tasks.solutions."""

from __future__ import annotations

import pytest

from sdlit.tasks.base import DataError
from sdlit.tasks.solutions import annotations, clean_solution, final_answer, solution_lines, tagged_solution

SOLUTION = ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n\n"
            "  Natalia sold 48+24 = <<48+24=72>>72 clips altogether.  \n#### 72")


def test_clean_solution_removes_every_annotation_and_nothing_else():
    assert clean_solution(SOLUTION) == SOLUTION.replace("<<48/2=24>>", "").replace("<<48+24=72>>", "")
    assert clean_solution("no annotations <here>") == "no annotations <here>"


def test_annotations_are_listed_in_order():
    assert annotations(SOLUTION) == ["48/2=24", "48+24=72"]
    assert annotations("none") == []


def test_solution_lines_are_the_worked_lines_without_the_final_one():
    assert solution_lines(SOLUTION) == ["Natalia sold 48/2 = <<48/2=24>>24 clips in May.",
                                        "Natalia sold 48+24 = <<48+24=72>>72 clips altogether."]


@pytest.mark.parametrize("text, final", [(SOLUTION, "72"), ("a\n#### 1,000 ", "1,000"), ("x #### 1\n#### 2", "2"),
                                         ("no final line", None)])
def test_final_answer_is_the_text_after_the_last_mark(text, final):
    assert final_answer(text) == final


def test_tagged_solution_numbers_the_clean_lines_and_ends_with_the_answer():
    assert tagged_solution(SOLUTION) == ("Step 1: Natalia sold 48/2 = 24 clips in May.\n"
                                         "Step 2: Natalia sold 48+24 = 72 clips altogether.\nAnswer: 72")
    assert tagged_solution("Add 2 and 3.", answer="5") == "Step 1: Add 2 and 3.\nAnswer: 5"
    with pytest.raises(DataError, match="no final answer"):
        tagged_solution("Add 2 and 3.")
