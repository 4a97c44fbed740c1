"""The four-case critique prompt and the parser of an LLM critic's reply."""

from __future__ import annotations

import pytest

from sdlit.critics import CritiqueParseError, CritiqueParser, CritiquePrompt, strip_thinking
from sdlit.critics.prompt import render_steps
from sdlit.steps import split_steps

RESPONSE = "Step 1: 3 + 4 = 7\nStep 2: 7 * 2 = 15\nStep 3: 15 - 1 = 14\nAnswer: 14"

WRONG_REPLY = """Verdicts:
Step 1: correct
Step 2: wrong - 7 * 2 is 14, not 15
Step 3: wrong - it builds on step 2
Answer: wrong
Case: D
Corrected solution:
Step 1: 3 + 4 = 7
Step 2: 7 * 2 = 14
Step 3: 14 - 1 = 13
Answer: 13"""


def test_good_reply_gives_the_first_error_and_the_corrected_context():
    critique = CritiqueParser().parse(WRONG_REPLY, RESPONSE)
    assert critique.case == "wrong" and critique.first_error == 1
    assert [v.verdict for v in critique.steps] == ["correct", "wrong", "wrong", "wrong"]
    assert [v.index for v in critique.steps] == [0, 1, 2, 3]
    assert critique.steps[1].reason == "7 * 2 is 14, not 15" and critique.steps[0].reason == ""
    # the headline keeps the reason but not the wrong value (a critique that quotes the error reinforces it)
    assert critique.text.startswith("Step 2 is wrong: 7 * 2 is 14.\nCorrected solution:\nStep 1: 3 + 4 = 7")
    assert critique.text.endswith("Answer: 13") and "Verdicts" not in critique.text
    assert critique.tagged


@pytest.mark.parametrize("wrap", [
    "<think>Step 1 looks fine. Case: A\nCorrected solution: nothing</think>\n{reply}",
    "The student adds 3 and 4... Case: A\nCorrected solution: x\n</think>\n\n{reply}",  # opening tag in the prompt
    "<think>first</think>{reply}<think>a trace cut off by max_tokens, Case: A",
])
def test_thinking_traces_are_stripped(wrap):
    critique = CritiqueParser().parse(wrap.format(reply=WRONG_REPLY), RESPONSE)
    assert critique.first_error == 1 and "think" not in critique.text
    assert CritiqueParser(context="full").parse(wrap.format(reply=WRONG_REPLY), RESPONSE).text == WRONG_REPLY


def test_unterminated_leading_think_leaves_nothing_and_is_an_error():
    assert strip_thinking("<think>still reasoning when max_tokens ran out") == ""
    with pytest.raises(CritiqueParseError, match="empty"):
        CritiqueParser().parse("<think>still reasoning when max_tokens ran out", RESPONSE)


@pytest.mark.parametrize("case_line,expected", [
    ("Case: A", "correct"), ("**Case:** B (missing step)", "missing_step"), ("Case - C", "incomplete"),
    ("case: unfinished", "incomplete"), ("Case: missing step", "missing_step"),
])
def test_case_names_and_letters(case_line, expected):
    reply = f"Verdicts:\nStep 1: correct\nStep 2: correct\nStep 3: correct\nAnswer: correct\n{case_line}\n" \
            "Corrected solution:\nStep 1: 3 + 4 = 7\nAnswer: 14"
    critique = CritiqueParser().parse(reply, RESPONSE)
    assert critique.case == expected and critique.first_error is None
    assert all(v.verdict == "correct" for v in critique.steps)


def test_markdown_decorated_reply_parses():
    reply = ("**Verdicts:**\n- **Step 1:** correct\n- **Step 2:** incorrect: 7 * 2 is 14\n- **Step 3**: correct\n"
             "- **Answer:** wrong\n**Case:** D\n**Corrected solution:**\nStep 1: 3 + 4 = 7\nStep 2: 7 * 2 = 14")
    critique = CritiqueParser().parse(reply, RESPONSE)
    assert critique.first_error == 1 and critique.steps[1].reason == "7 * 2 is 14"


def test_answer_line_error_points_at_the_answer_step():
    reply = ("Verdicts:\nStep 1: correct\nStep 2: correct\nStep 3: correct\nAnswer: wrong - the answer is 13\n"
             "Case: D\nCorrected solution:\nAnswer: 13")
    critique = CritiqueParser().parse(reply, RESPONSE)
    assert critique.first_error == 3 and critique.text.startswith("The final answer is wrong: the answer is 13.")


@pytest.mark.parametrize("reason,headline", [
    ("7 * 2 is 14, not 15", "Step 2 is wrong: 7 * 2 is 14."),
    ("the student wrote 15 instead of 14", "Step 2 is wrong."),  # names the wrong value another way: dropped
    ("15 is wrong; 7 * 2 is 14", "Step 2 is wrong."),
    ("7 * 2 is 14", "Step 2 is wrong: 7 * 2 is 14."),
    ("", "Step 2 is wrong."),
])
def test_case_d_headline_never_quotes_the_wrong_value(reason, headline):
    reply = WRONG_REPLY.replace("Step 2: wrong - 7 * 2 is 14, not 15", f"Step 2: wrong - {reason}" if reason
                                else "Step 2: wrong")
    critique = CritiqueParser().parse(reply, RESPONSE)
    first_line = critique.text.splitlines()[0]
    assert first_line == headline and "15" not in first_line


def test_wrong_answer_headline_drops_the_wrong_answer():
    reply = ("Verdicts:\nStep 1: correct\nStep 2: correct\nStep 3: correct\nAnswer: wrong - 14 is wrong, it is 13\n"
             "Case: D\nCorrected solution:\nAnswer: 13")
    critique = CritiqueParser().parse(reply, "Step 1: 3 + 4 = 7\nStep 2: 7 * 2 = 14\nStep 3: 14 - 1 = 13\nAnswer: 14")
    assert critique.text.startswith("The final answer is wrong.\n")


def test_wrong_verdict_outweighs_a_case_line_saying_correct():
    reply = WRONG_REPLY.replace("Case: D", "Case: A")
    assert CritiqueParser().parse(reply, RESPONSE).case == "wrong"


def test_case_is_inferred_unless_required():
    no_case = WRONG_REPLY.replace("Case: D\n", "")
    assert CritiqueParser().parse(no_case, RESPONSE).case == "wrong"
    unfinished = "Step 1: 3 + 4 = 7"
    reply = "Verdicts:\nStep 1: correct\nCorrected solution:\nStep 1: 3 + 4 = 7\nAnswer: 14"
    assert CritiqueParser().parse(reply, unfinished).case == "incomplete"
    with pytest.raises(CritiqueParseError, match="Case"):
        CritiqueParser(require_case=True).parse(no_case, RESPONSE)


@pytest.mark.parametrize("reply,message", [
    ("I think the student did fine.", "Corrected solution"),
    ("Verdicts:\nStep 1: correct\nCase: A\nCorrected solution:\n   ", "empty"),
    ("Case: A\nCorrected solution:\nStep 1: 3 + 4 = 7", "no step verdicts"),
    ("Verdicts:\nStep 1: correct\nCase: Z\nCorrected solution:\nx", "none of A, B, C, D"),
    ("Verdicts:\nStep 1: correct\nCase: D\nCorrected solution:\nx", "marks no step wrong"),
    ("", "empty"),
])
def test_unparseable_replies_raise_a_specific_error(reply, message):
    with pytest.raises(CritiqueParseError, match=message):
        CritiqueParser().parse(reply, RESPONSE)


def test_missing_verdicts_count_as_correct_unless_all_are_required():
    reply = "Verdicts:\nStep 1: correct\nCase: A\nCorrected solution:\nStep 1: 3 + 4 = 7"
    assert [v.verdict for v in CritiqueParser().parse(reply, RESPONSE).steps] == ["correct"] * 4
    with pytest.raises(CritiqueParseError, match="step 2"):
        CritiqueParser(require_all_verdicts=True).parse(reply, RESPONSE)


def test_prompt_shows_the_steps_numbered_as_the_parser_reads_them():
    untagged = "First 3 + 4 = 7\nthen 7 * 2 = 14\nAnswer: 14"
    messages = CritiquePrompt().messages("What is (3 + 4) * 2?", "3 + 4 = 7\n7 * 2 = 14\n#### 14", untagged)
    assert [m["role"] for m in messages] == ["system", "user"]
    user = messages[1]["content"]
    assert "Step 1: First 3 + 4 = 7\nStep 2: then 7 * 2 = 14\nAnswer: 14" in user
    assert "What is (3 + 4) * 2?" in user and "#### 14" in user
    for case in ("A.", "B.", "C.", "D.", "verbatim"):
        assert case in user
    assert render_steps(split_steps(RESPONSE)) == RESPONSE
    critique = CritiqueParser().parse("Verdicts:\nStep 2: wrong\nCorrected solution:\nStep 1: ...", untagged)
    assert critique.first_error == 1 and not critique.tagged


def test_prompt_template_is_a_setting_and_checked():
    prompt = CritiquePrompt(template="Q: {question}\nA: {response}\nBraces {{kept}}", system="")
    messages = prompt.messages("2+2?", "4", "Answer: 4")
    assert messages == [{"role": "user", "content": "Q: 2+2?\nA: Answer: 4\nBraces {kept}"}]
    assert CritiquePrompt(template="{response}", retag_response=False).messages("q", "r", "raw {x}")[1][
        "content"] == "raw {x}"
    with pytest.raises(ValueError, match="unknown field.*solution"):
        CritiquePrompt(template="{solution} {response}")
    with pytest.raises(ValueError, match="must contain the field"):
        CritiquePrompt(template="{question}")


def test_critique_outcomes_isolates_failures_of_any_critic():
    from sdlit.critics import critique_outcomes

    from feedback_examples import FlakyCritic

    class Wholesale:
        def critique_outcomes(self, items):
            raise ConnectionError("server gone")

    items = [("q", "1 + 1 = 2\n#### 2", "Step 1: 1 + 1 = 2\nAnswer: 2"), ("q", "#### 2", "boom")]
    first, second = critique_outcomes(FlakyCritic(), items)
    assert first.case == "correct" and isinstance(second, TimeoutError)
    assert all(isinstance(o, ConnectionError) for o in critique_outcomes(Wholesale(), items))
