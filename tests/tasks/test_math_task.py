"""The \\boxed{} math task: rows with configurable fields, LaTeX-aware answer checking, clear errors."""

from __future__ import annotations

import json

import pytest

from sdlit.tasks import Math
from sdlit.tasks.base import DataError
from sdlit.tasks.math import extract_answer, is_correct, normalize_math_answer

MATH_ROWS = [
    {"problem": "What is $\\frac{1}{2} + \\frac{1}{4}$?", "solution": "We get $\\boxed{\\dfrac{3}{4}}$."},
    {"problem": "Simplify $x^2 + 2x + 1$.", "solution": "It factors as $\\boxed{(x + 1)^2}$."},
    {"problem": "Angle?", "solution": "The angle is $\\boxed{90^\\circ}$."},
]


def write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


@pytest.mark.parametrize(
    "text,expected",
    [
        ("\\dfrac{3}{4}", "0.75"),
        ("\\frac{3}{4}", "0.75"),
        ("$1,000$", "1000"),
        ("90^\\circ", "90"),
        ("50\\%", "50"),
        ("\\left( x+1 \\right)^2", "(x+1)^2"),
        ("\\text{(A)}", "(A)"),
        ("", None),
    ],
)
def test_normalize_math_answer(text, expected):
    assert normalize_math_answer(text) == expected


def test_extract_and_check_latex_answers():
    assert extract_answer("so \\boxed{\\frac{\\sqrt{3}}{2}} done") == "\\frac{\\sqrt{3}}{2}"
    assert is_correct("the sum is \\boxed{\\dfrac{3}{4}}", "0.75")
    assert is_correct("\\boxed{(x + 1)^2}", "(x+1)^2")
    assert is_correct("Answer: 12", "12")
    assert not is_correct("\\boxed{(x - 1)^2}", "(x+1)^2")
    assert not is_correct("no answer at all", "3")


def test_reads_math_rows_with_boxed_gold(tmp_path):
    task = Math(train_path=write_jsonl(tmp_path / "train.jsonl", MATH_ROWS),
                eval_path=write_jsonl(tmp_path / "test.jsonl", MATH_ROWS[:1]))
    problems = task.train_problems()
    assert [p.answer for p in problems] == ["0.75", "(x+1)^2", "90"]
    assert problems[0].id == "math/train/0" and task.eval_problems()[0].question.startswith("What is")
    assert task.is_correct("Step 1: add.\nAnswer: \\boxed{3/4}", problems[0].answer)


def test_reads_openmathreasoning_fields(tmp_path):
    rows = [{"problem": "p?", "generated_solution": "long work", "expected_answer": "\\frac{1}{3}"}]
    task = Math(train_path=write_jsonl(tmp_path / "omr.jsonl", rows), solution_field="generated_solution",
                answer_field="expected_answer")
    assert task.train_problems()[0].answer == normalize_math_answer("1/3")


def test_row_without_final_answer_names_file_row_and_field(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [MATH_ROWS[0], {"problem": "p", "solution": "no box here"}])
    with pytest.raises(DataError, match=r"bad\.jsonl: row 2: field 'solution': no final answer"):
        Math(train_path=path).train_problems()


def test_missing_field_and_missing_path_are_clear(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"question": "wrong field name", "solution": "\\boxed{1}"}])
    with pytest.raises(DataError, match=r"row 1: field 'problem' is missing or empty"):
        Math(train_path=path).train_problems()
    with pytest.raises(DataError, match="train_path"):
        Math().train_problems()


def test_math_task_is_selectable_from_the_cli(capsys):
    import yaml

    from sdlit.cli import run_cli

    with pytest.raises(SystemExit):
        run_cli(["fit", "--data.task", "Math", "--data.task.train_path", "t.jsonl", "--print_config"])
    task = yaml.safe_load(capsys.readouterr().out)["data"]["init_args"]["task"]
    assert task["class_path"].endswith("Math") and task["init_args"]["question_field"] == "problem"
