"""The rule-based step critic on planted errors, for each case of the four-case protocol."""

from __future__ import annotations

import json
import re

import pytest

from sdlit.critics import ArithmeticStepCritic, Critic
from sdlit.tasks.arith import Arith

GSM8K_TRAIN = "/work/shared/data/gsm8k/train.jsonl"
GSM8K_TEST = "/work/shared/data/gsm8k/test.jsonl"


def _row(path, index):
    with open(path) as f:
        return json.loads(f.readlines()[index])


def _reference_steps(solution):
    """The reference's work lines with annotations removed (what a perfect solver would write)."""
    return [re.sub(r"<<[^>]*>>", "", line) for line in solution.splitlines() if not line.startswith("####")]


def _tagged(lines, answer=None):
    out = [f"Step {i}: {line}" for i, line in enumerate(lines, start=1)]
    return "\n".join(out + ([f"Answer: {answer}"] if answer is not None else []))


def _plant(line):
    """Make the last "= r" claim of a line wrong (r -> r + 1)."""
    matches = list(re.finditer(r"=\s*\$?(\d[\d,]*)", line))
    m = matches[-1]
    wrong = int(m.group(1).replace(",", "")) + 1
    return line[: m.start(1)] + str(wrong) + line[m.end(1) :]


NATALIA = _row(GSM8K_TRAIN, 0)
JOSH = _row(GSM8K_TEST, 2)  # four steps with "$" and thousands separators
GOLD = {"natalia": "72", "josh": "70000"}


def _arith_problems(steps, count=8):
    task = Arith(min_steps=steps, max_steps=steps, train_size=count, eval_size=1, seed=1)
    return task.train_problems()


@pytest.fixture
def critic():
    return ArithmeticStepCritic()


def test_is_a_critic_and_batch(critic):
    assert isinstance(critic, Critic)
    items = [(NATALIA["question"], NATALIA["answer"], _tagged(_reference_steps(NATALIA["answer"]), 72))] * 2
    assert critic.critique_batch(items) == [critic.critique(*items[0])] * 2


@pytest.mark.parametrize("row", [NATALIA, JOSH])
def test_correct_gsm8k(critic, row):
    lines = _reference_steps(row["answer"])
    gold = row["answer"].split("####")[1].strip()
    result = critic.critique(row["question"], row["answer"], _tagged(lines, gold))
    assert result.case == "correct" and result.first_error is None and result.tagged
    assert [v.verdict for v in result.steps] == ["correct"] * (len(lines) + 1)
    assert result.text.endswith(_tagged(lines, gold))


def test_correct_arith(critic):
    for problem in _arith_problems(3):
        lines = _reference_steps(problem.solution)
        result = critic.critique(problem.question, problem.solution, _tagged(lines, problem.answer))
        assert result.case == "correct", (problem.solution, result)


def test_missing_step_is_inserted(critic):
    step2 = "Altogether she sold 48 + 24 = 72 clips."
    result = critic.critique(NATALIA["question"], NATALIA["answer"], _tagged([step2], 72))
    assert result.case == "missing_step" and result.first_error is None
    assert result.text.endswith("Step 1: Natalia sold 48/2 = 24 clips in May.\nStep 2: " + step2 + "\nAnswer: 72")


def test_missing_step_arith(critic):
    def given(p):
        return set(re.findall(r"\d+", p.question))

    problems = [p for p in _arith_problems(2, 30)
                if _reference_steps(p.solution)[0].split("=")[-1].split()[0] not in given(p)]
    for problem in problems[:5]:
        first, second = _reference_steps(problem.solution)
        result = critic.critique(problem.question, problem.solution, _tagged([second], problem.answer))
        assert result.case == "missing_step", (problem.solution, result)
        assert result.text.endswith(f"Step 1: {first}\nStep 2: {second}\nAnswer: {problem.answer}")


@pytest.mark.parametrize("row,gold", [(NATALIA, "72"), (JOSH, "70000")])
def test_incomplete_is_finished(critic, row, gold):
    lines = _reference_steps(row["answer"])
    result = critic.critique(row["question"], row["answer"], _tagged(lines[:1]))
    assert result.case == "incomplete" and result.first_error is None
    assert result.text.endswith(_tagged(lines, gold))
    assert len(result.steps) == 1


def _check_wrong(result, lines, wrong_index, wrong_line, gold):
    assert result.case == "wrong" and result.first_error == wrong_index
    assert result.steps[wrong_index].verdict == "wrong" and result.steps[wrong_index].reason
    assert all(v.verdict == "correct" for v in result.steps[:wrong_index])
    assert wrong_line not in result.text
    assert result.text.startswith(f"Step {wrong_index + 1} is wrong: ")
    corrected = result.text.split("Corrected solution:\n")[1]
    assert corrected == _tagged(lines, gold)  # correct prefix verbatim, then the reference from the error


@pytest.mark.parametrize("row,at", [(NATALIA, 0), (NATALIA, 1), (JOSH, 0), (JOSH, 2), (JOSH, 3)])
def test_wrong_step_gsm8k(critic, row, at):
    lines = _reference_steps(row["answer"])
    gold = row["answer"].split("####")[1].strip()
    wrong_line = _plant(lines[at])
    response = _tagged(lines[:at] + [wrong_line] + lines[at + 1 :], gold)
    result = critic.critique(row["question"], row["answer"], response)
    _check_wrong(result, lines, at, wrong_line, gold)
    assert " is " in result.steps[at].reason and ", not " in result.steps[at].reason


@pytest.mark.parametrize("at", [0, 1, 2])
def test_wrong_step_arith(critic, at):
    for problem in _arith_problems(3, 5):
        lines = _reference_steps(problem.solution)
        wrong_line = _plant(lines[at])
        response = _tagged(lines[:at] + [wrong_line], int(problem.answer) + 1)  # the error propagates
        result = critic.critique(problem.question, problem.solution, response)
        _check_wrong(result, lines, at, wrong_line, problem.answer)
        assert result.steps[-1].verdict == "wrong"  # the answer line too


def test_wrong_answer_only(critic):
    lines = _reference_steps(NATALIA["answer"])
    result = critic.critique(NATALIA["question"], NATALIA["answer"], _tagged(lines, 73))
    assert result.case == "wrong" and result.first_error == 2
    assert result.text.startswith("The final answer is wrong: the answer is 72.\n")  # 73 is not quoted
    assert result.steps[2].reason == "the final answer is 72, not 73"  # the verdict does name it
    assert result.text.endswith(_tagged(lines, 72))
    assert "Answer: 73" not in result.text


def test_irrelevant_quantity(critic):
    lines = _reference_steps(NATALIA["answer"])
    extra = "Twice that is 72 * 2 = 144 clips."
    result = critic.critique(NATALIA["question"], NATALIA["answer"], _tagged(lines + [extra], 72))
    assert result.case == "wrong" and result.first_error == 2
    assert result.steps[2].reason == "144 is not a quantity this problem needs"
    assert extra not in result.text and result.text.endswith(_tagged(lines, 72))
    assert not _mentions(result.text, "144")  # the verdict names the stray quantity, the teacher context does not


def test_unsupported_number_without_claim(critic):
    result = critic.critique(NATALIA["question"], NATALIA["answer"], "Step 1: In May she sold 30 clips.\nAnswer: 78")
    assert result.case == "wrong" and result.first_error == 0
    assert "30" in result.steps[0].reason and "sold 30 clips" not in result.text
    assert not _mentions(result.text, "30") and not _mentions(result.text, "78")


def test_untagged(critic):
    lines = _reference_steps(NATALIA["answer"])
    wrong = _plant(lines[1])
    result = critic.critique(NATALIA["question"], NATALIA["answer"], "\n".join([lines[0], wrong, "The answer is 73."]))
    assert not result.tagged and result.case == "wrong" and result.first_error == 1
    assert "no step tags" in result.text and wrong not in result.text
    assert result.text.endswith(f"Step 1: {lines[0]}\nStep 2: {lines[1]}\nAnswer: 72")
    fine = critic.critique(NATALIA["question"], NATALIA["answer"], "\n".join(lines + ["#### 72"]))
    assert not fine.tagged and fine.case == "correct"


def test_empty_response_is_incomplete(critic):
    result = critic.critique(NATALIA["question"], NATALIA["answer"], "")
    assert result.case == "incomplete" and result.steps == []
    assert result.text.endswith(_tagged(_reference_steps(NATALIA["answer"]), 72))


def test_gsm8k_references_judge_themselves_correct(critic):
    """Written out as tagged steps, GSM8K's own solutions are (almost always) judged correct."""
    with open(GSM8K_TEST) as f:
        rows = [json.loads(line) for line in f][:300]
    correct = 0
    for row in rows:
        gold = row["answer"].split("####")[1].strip()
        result = critic.critique(row["question"], row["answer"], _tagged(_reference_steps(row["answer"]), gold))
        correct += result.case == "correct"
    assert correct >= 0.97 * len(rows)


def test_claim_parsing():
    from sdlit.critics.claims import evaluate_claims

    def claims(text):
        return [(c.expr, c.ok) for c in evaluate_claims(text)]

    assert claims("She has $80,000 + $50,000 = $130,000 now") == [("$80,000 + $50,000", True)]
    assert claims("0.2 x 50 = $10 and 12 miles / 4 mph = 4 hours") == [("0.2 x 50", True), ("12 / 4", False)]
    assert claims("(5 + 3) * 2 = 16, 2 + 3 * 4 = 14, 27(1/3) = 9") == [
        ("( 5 + 3 ) * 2", True), ("2 + 3 * 4", True), ("27 * ( 1 / 3 )", True)]
    assert claims("10/3 = 3.33 and 12/20 x 100% = 60%") == [("10 / 3", True), ("12 / 20 x 100%", True)]
    assert claims("3x + 4 = 28, so x = 8, and 14 * 1/2 = 14 / 2 = 7") == [("14 / 2", True)]
    # a claim inside prose parentheses is still read (the "(" before it is prose, not the expression's)
    assert claims("as many as before (15 / 2 = 4)") == [("15 / 2", False)]
    assert claims("so ((2 + 3) * 4 = 20) here") == [("( 2 + 3 ) * 4", True)]


def test_wrong_claim_in_parentheses_is_the_first_error(critic):
    problem = Arith(min_steps=1, max_steps=1).eval_problems()[0]  # Lena: 15 * 4 = 60
    response = "Step 1: Lena has 15 stickers.\nStep 2: 4 times as many (15 / 2 = 4).\nStep 3: 15 + 4 = 19.\nAnswer: 19"
    critique = critic.critique(problem.question, problem.solution, response)
    assert critique.case == "wrong" and critique.first_error == 1
    assert "4 times as many (15 / 2 = 4)" not in critique.text and "15 / 2 is 7.5." in critique.text
    assert "not 4" not in critique.text and critique.steps[1].reason == "15 / 2 is 7.5, not 4"
    assert critique.text.rstrip().endswith("Answer: 60")


# ---- case D never quotes the error ------------------------------------------------------------------
def _mentions(text, value):
    """True when the number ``value`` (e.g. "125000") is written in ``text`` (thousands separators allowed)."""
    return any(m.replace(",", "") == value for m in re.findall(r"(?<![\d.])\d[\d,]*(?:\.\d+)?(?![\d])", text))


def _check_not_quoted(result, wrong_value, right_value, prefix):
    assert result.case == "wrong"
    assert not _mentions(result.text, wrong_value), result.text
    assert _mentions(result.text, right_value), result.text
    assert result.text.split("Corrected solution:\n")[1].startswith(_tagged(prefix) if prefix else "")


@pytest.mark.parametrize("row,at,wrong_line,wrong_value,right_value", [
    (NATALIA, 0, "Natalia sold 48/2 = 25 clips in May.", "25", "24"),  # step 1
    (JOSH, 1, "He increased the value of the house by 80,000*1.5=125,000", "125000", "120000"),  # a middle step
    (JOSH, 2, "So the new value of the house is 120,000+80,000=$210,000", "210000", "200000"),
    (NATALIA, 0, "Natalia sold 47/2 = 24 clips in May.", "47", "24"),  # a miscopied operand is not quoted either
])
def test_wrong_step_text_does_not_quote_the_wrong_value(critic, row, at, wrong_line, wrong_value, right_value):
    lines = _reference_steps(row["answer"])
    response = _tagged(lines[:at] + [wrong_line] + lines[at + 1 :], GOLD["natalia" if row is NATALIA else "josh"])
    result = critic.critique(row["question"], row["answer"], response)
    assert result.first_error == at and wrong_value in result.steps[at].reason.replace(",", "")  # the verdict says it
    _check_not_quoted(result, wrong_value, right_value, lines[:at])
    assert result.text.splitlines()[0].startswith(f"Step {at + 1} is wrong: ")


def test_wrong_middle_step_arith_does_not_quote_the_wrong_value(critic):
    for problem in _arith_problems(3, 5):
        lines = _reference_steps(problem.solution)
        wrong_line = _plant(lines[1])
        wrong_value = re.findall(r"\d+", wrong_line)[-1]
        right_value = re.findall(r"\d+", lines[1])[-1]
        assert not _mentions(problem.question + problem.solution, wrong_value)
        result = critic.critique(problem.question, problem.solution, _tagged([lines[0], wrong_line], problem.answer))
        assert result.first_error == 1, (problem.solution, result)
        _check_not_quoted(result, wrong_value, right_value, lines[:1])


@pytest.mark.parametrize("row,answer,wrong_value", [(NATALIA, "73", "73"), (JOSH, "$75,000", "75000")])
def test_wrong_answer_line_text_does_not_quote_the_wrong_answer(critic, row, answer, wrong_value):
    lines = _reference_steps(row["answer"])
    gold = GOLD["natalia" if row is NATALIA else "josh"]
    result = critic.critique(row["question"], row["answer"], _tagged(lines, answer))
    assert result.first_error == len(lines) and result.steps[-1].verdict == "wrong"
    _check_not_quoted(result, wrong_value, gold, lines)
    assert result.text.startswith(f"The final answer is wrong: the answer is {gold}.")
    assert result.text.endswith(_tagged(lines, gold))


# ---- a chain stopped short, its partial result answered as final -------------------------------------
def _result(line):
    """The result of a reference line ("... = 24 clips" -> "24")."""
    return re.findall(r"=\s*\$?([\d,]+)", line)[-1].replace(",", "")


def _check_stopped_short(result, lines, stop, partial, gold):
    """Case D at the last work step (index ``stop``): its verdict is wrong, no earlier one is."""
    assert result.case == "wrong" and result.first_error == stop, result
    assert [v.verdict for v in result.steps[:stop]] == ["correct"] * stop
    assert result.steps[stop].verdict == "wrong" and result.steps[stop + 1].verdict == "wrong"
    headline = result.text.split("Corrected solution:\n")[0]
    assert headline.startswith(f"Step {stop + 1} is wrong: ") and "stops" in headline
    assert not _mentions(headline, partial) and f"Answer: {partial}" not in result.text
    assert result.text.endswith(_tagged(lines, gold))  # every solver step copied, then continued from there


@pytest.mark.parametrize("steps,stop", [(2, 0), (3, 1)])  # stops after one of two steps, after two of three
def test_stopped_short_after_some_of_the_steps(critic, steps, stop):
    for problem in _arith_problems(steps, 5):
        lines = _reference_steps(problem.solution)
        partial = _result(lines[stop])
        result = critic.critique(problem.question, problem.solution, _tagged(lines[: stop + 1], partial))
        _check_stopped_short(result, lines, stop, partial, problem.answer)


@pytest.mark.parametrize("row,stop", [(NATALIA, 0), (JOSH, 0), (JOSH, 2)])
def test_stopped_short_answers_an_intermediate_of_the_reference(critic, row, stop):
    lines = _reference_steps(row["answer"])
    partial = _result(lines[stop])  # a quantity of the reference solution, not its answer
    result = critic.critique(row["question"], row["answer"], _tagged(lines[: stop + 1], f"${int(partial):,}"))
    _check_stopped_short(result, lines, stop, partial, GOLD["natalia" if row is NATALIA else "josh"])


def test_stopped_short_at_a_step_that_restates_the_partial_result(critic):
    lines = _reference_steps(NATALIA["answer"])
    restated = "So she sold 24 clips in May."
    result = critic.critique(NATALIA["question"], NATALIA["answer"], _tagged([lines[0], restated], 24))
    assert result.case == "wrong" and result.first_error == 1  # the last work step is where it stopped
    assert result.text.endswith(_tagged([lines[0], restated, lines[1]], 72))


def test_answering_an_intermediate_after_finishing_blames_the_answer_line(critic):
    lines = _reference_steps(NATALIA["answer"])
    result = critic.critique(NATALIA["question"], NATALIA["answer"], _tagged(lines, 24))  # 72 was computed
    assert result.case == "wrong" and result.first_error == 2 and result.steps[1].verdict == "correct"
    assert result.text.endswith(_tagged(lines, 72)) and "Answer: 24" not in result.text


def test_stopped_short_without_an_answer_line_is_incomplete(critic):
    lines = _reference_steps(NATALIA["answer"])
    result = critic.critique(NATALIA["question"], NATALIA["answer"], _tagged(lines[:1]))
    assert result.case == "incomplete" and result.first_error is None
