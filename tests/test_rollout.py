"""Rollout.from_text: a rollout from given text, tokenized once, as offline data, SFT and analysis build them."""

from __future__ import annotations

from sdlit.prompts import student_prompt_ids
from sdlit.rollout import Rollout
from sdlit.tasks.base import Problem

from conftest import build_thinking_tokenizer, build_tokenizer

PROBLEM = Problem(question="What is 2 + 3?", solution="2+3=<<2+3=5>>5\n#### 5", answer="5", id="p0")
TEXT = "Step 1: 2 + 3 = 5\nAnswer: 5"


def test_a_finished_answer_ends_with_eos_and_keeps_its_text():
    tokenizer = build_tokenizer()
    rollout = Rollout.from_text(PROBLEM, TEXT, tokenizer, policy_version=3, group=2, reward=1.0)
    assert rollout.response_ids == tokenizer(TEXT, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert tokenizer.decode(rollout.response_ids, skip_special_tokens=True) == rollout.response == TEXT
    assert rollout.prompt_ids == student_prompt_ids(tokenizer, PROBLEM.question)
    assert (rollout.policy_version, rollout.group, rollout.reward) == (3, 2, 1.0)


def test_an_unfinished_answer_has_no_eos():
    tokenizer = build_tokenizer()
    rollout = Rollout.from_text(PROBLEM, TEXT, tokenizer, finished=False)
    assert rollout.response_ids == tokenizer(TEXT, add_special_tokens=False)["input_ids"]


def test_the_prompt_follows_the_template_kwargs():
    tokenizer = build_thinking_tokenizer()
    kwargs = {"enable_thinking": False}
    rollout = Rollout.from_text(PROBLEM, TEXT, tokenizer, template_kwargs=kwargs)
    assert rollout.prompt_ids == student_prompt_ids(tokenizer, PROBLEM.question, **kwargs)
    assert rollout.prompt_ids != student_prompt_ids(tokenizer, PROBLEM.question)
