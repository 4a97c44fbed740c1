"""Tasks: answer extraction/checking, GSM8K reading (and its errors), procedural arithmetic."""

from __future__ import annotations

import json
import re
import time

import pytest

from sdlit.tasks import arith, gsm8k
from sdlit.tasks.answers import extract_answer, is_correct, normalize_number
from sdlit.tasks.arith import Arith
from sdlit.tasks.base import DataError, Task
from sdlit.tasks.gsm8k import GSM8K, read_problems

SHARED_TEST = "/work/shared/data/gsm8k/test.jsonl"
NATALIA = ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
           "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72")


# ---------------------------------------------------------------- answers

@pytest.mark.parametrize("text", ["1,000", "1000.0", "$1000", " 1000. ", "1000%", "1000"])
def test_normalize_number_thousand(text):
    assert normalize_number(text) == "1000"


@pytest.mark.parametrize("text,expected", [("0.50", "0.5"), ("-3", "-3"), ("3/4", "0.75"), ("$-2.5", "-2.5"),
                                           ("abc", None), ("", None), ("12 apples", None)])
def test_normalize_number_cases(text, expected):
    assert normalize_number(text) == expected


@pytest.mark.parametrize("text,expected", [
    ("She has 16 - 3 = 13 left.\n#### 72", "72"),
    ("so \\boxed{1,200} in all", "1200"),
    ("\\boxed{\\frac{3}{4}}", "0.75"),
    ("The answer is **18**.", "18"),
    ("Final answer: $1,250 dollars.", "1250"),
    ("**Answer:** 48 + 24 = 72 clips", "72"),
    ("The temperature drops to -7 degrees.", "-7"),
    ("It costs 2.50 each", "2.5"),
    ("I do not know.", None),
    ("The answer is Paris.", "Paris"),
    ("#### 5\nAnswer: 9", "5"),  # "####" has priority
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_is_correct_gold_forms():
    assert is_correct("Answer: 1000", "1,000")
    assert is_correct("so the total is $1,000.00", "#### 1000")
    assert is_correct("Step 2: 48 + 24 = 72\nAnswer: 72", NATALIA)
    assert not is_correct("Answer: 71", NATALIA)
    assert not is_correct("no idea", "72")
    assert is_correct("Answer: 0.5", "1/2")


def test_task_modules_export_checkers():
    for module in (gsm8k, arith):
        assert module.extract_answer("The answer is 7.") == "7"
        assert module.is_correct("#### 7", "7")
    assert isinstance(GSM8K(), Task) and GSM8K().is_correct("Answer: 72", "72")


# ---------------------------------------------------------------- gsm8k

def test_read_shared_gsm8k_test():
    problems = read_problems(SHARED_TEST, "gsm8k/test")
    assert len(problems) == 1319
    first = problems[0]
    assert first.question.startswith("Janet") and first.answer == "18" and first.id == "gsm8k/test/0"
    assert first.solution.endswith("#### 18")
    assert all(is_correct(p.solution, p.answer) for p in problems)


def test_vendored_default_and_sizes():
    task = GSM8K(train_size=10, eval_size=5)
    train, test = task.train_problems(), task.eval_problems()
    assert len(train) == 10 and len(test) == 5
    assert train[0].answer == "72" and train[0].id == "gsm8k/train/0"
    assert test[0].id == "gsm8k/test/0"
    assert {p.question for p in GSM8K().train_problems()}.isdisjoint(p.question for p in GSM8K().eval_problems())
    assert len(GSM8K().train_problems()) == 256 and len(GSM8K().eval_problems()) == 128


def _write(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


GOOD = json.dumps({"question": "What is 1+1?", "answer": "1+1=<<1+1=2>>2\n#### 2"})


@pytest.mark.parametrize("bad_line,field", [
    ('{"question": "q", "answer": ', "malformed JSON"),
    (json.dumps({"answer": "#### 3"}), "field 'question'"),
    (json.dumps({"question": "q", "answer": "  "}), "field 'answer'"),
    (json.dumps({"question": "q", "answer": "It is three.\n#### three"}), "gold answer is not a number"),
    (json.dumps({"question": "q", "answer": "no final line"}), "gold answer is not a number"),
    (json.dumps(["q", "a"]), "expected a JSON object"),
])
def test_bad_rows_name_file_row_field(tmp_path, bad_line, field):
    path = _write(tmp_path / "bad.jsonl", [GOOD, GOOD, bad_line])
    with pytest.raises(DataError) as err:
        GSM8K(train_path=str(path)).train_problems()
    message = str(err.value)
    assert str(path) in message and "row 3" in message and field in message


def test_empty_file(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n")
    with pytest.raises(DataError, match="empty"):
        read_problems(path)
    with pytest.raises(DataError, match="not found"):
        read_problems(tmp_path / "missing.jsonl")


def test_skip_mode_counts(tmp_path, caplog):
    path = _write(tmp_path / "mixed.jsonl", [GOOD, "{oops", json.dumps({"question": "q"}), GOOD])
    task = GSM8K(train_path=str(path), on_bad_row="skip")
    with caplog.at_level("WARNING"):
        problems = task.train_problems()
    assert [p.id for p in problems] == ["gsm8k/train/0", "gsm8k/train/3"]
    assert task.skipped_rows == 2
    assert "row 2" in caplog.text


def test_parquet_round_trip(tmp_path):
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    rows = [json.loads(line) for line in open(SHARED_TEST)][:20]
    path = tmp_path / "test.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    from_parquet = read_problems(path, "gsm8k/test")
    assert from_parquet == read_problems(SHARED_TEST, "gsm8k/test")[:20]
    pq.write_table(pa.Table.from_pylist([{"question": "q", "answer": "#### x"}]), path)
    with pytest.raises(DataError, match=r"row 1: field 'answer'"):
        read_problems(path)


def test_dataset_is_loaded_lazily(monkeypatch):
    datasets = pytest.importorskip("datasets")
    calls = []

    def fake_load_dataset(name, config, split):
        calls.append((name, config, split))
        return [{"question": "What is 2+2?", "answer": "2+2=<<2+2=4>>4\n#### 4"}, {"question": "q", "answer": "x"}]

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    task = GSM8K(dataset="openai/gsm8k")
    assert calls == []
    with pytest.raises(DataError, match=r"dataset openai/gsm8k\[test\]: row 2: field 'answer'"):
        task.eval_problems()
    task = GSM8K(dataset="openai/gsm8k", on_bad_row="skip")
    assert [p.answer for p in task.train_problems()] == ["4"] and task.skipped_rows == 1
    assert calls[-1] == ("openai/gsm8k", "main", "train")


# ---------------------------------------------------------------- arith

ANNOTATION = re.compile(r"<<(\d+)([-+*])(\d+)=(\d+)>>")


def _check_solution(problem):
    """Annotations are right, each starts from the previous result, and the last one is the answer."""
    steps = ANNOTATION.findall(problem.solution)
    assert steps, problem.solution
    previous = None
    for a, op, b, c in steps:
        a, b, c = int(a), int(b), int(c)
        assert {"+": a + b, "-": a - b, "*": a * b}[op] == c >= 0
        assert previous is None or a == previous
        previous = c
    assert problem.solution.splitlines()[-1] == f"#### {previous}" and problem.answer == str(previous)
    assert is_correct(problem.solution, problem.answer)
    return len(steps)


def test_arith_solutions_are_right_and_difficulty_is_steps():
    for steps in (1, 2, 3, 5):
        task = Arith(min_steps=steps, max_steps=steps, train_size=100, eval_size=20)
        for problem in task.train_problems() + task.eval_problems():
            assert _check_solution(problem) == steps
            assert len(problem.solution.splitlines()) == steps + 1


def test_arith_deterministic_and_seeded():
    a, b, c = Arith(seed=3), Arith(seed=3), Arith(seed=4)
    assert [a.generate(i) for i in range(30)] == [b.generate(i) for i in range(30)]
    assert [a.generate(i).question for i in range(30)] != [c.generate(i).question for i in range(30)]
    assert a.generate(7, "eval").id == "arith/eval/7" and a.train_problems()[0].id == "arith/train/0"


def test_arith_train_eval_disjoint_and_fast():
    start = time.perf_counter()
    task = Arith(min_steps=1, max_steps=3, train_size=2000, eval_size=200)
    train, evals = task.train_problems(), task.eval_problems()
    assert time.perf_counter() - start < 10
    assert len(train) == 2000 and len(evals) == 200
    assert len({p.question for p in train}) == 2000
    assert {p.question for p in train}.isdisjoint(p.question for p in evals)
    assert len({p.question.split()[0] for p in train}) > 5  # varied people
    assert len({p.question.split(" How many ")[1].split(" does ")[0] for p in train}) > 5  # varied items


def test_arith_rejects_bad_settings():
    with pytest.raises(ValueError):
        Arith(min_steps=3, max_steps=2)
    with pytest.raises(ValueError):
        Arith(max_operand=1)
