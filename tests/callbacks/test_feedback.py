"""Feedback callbacks: what each one writes on a rollout, and the critic's counted fallback."""

from __future__ import annotations

import pytest

from sdlit.callbacks import BinaryReward, ReferenceSolution, StepCritique, clean_solution
from sdlit.critics import ArithmeticStepCritic
from sdlit.rollout import Rollout
from sdlit.tasks.arith import Arith

from feedback_examples import FlakyCritic


def make_rollouts(responses):
    problem = Arith(min_steps=2, max_steps=2, train_size=1).train_problems()[0]
    rollouts = [Rollout(problem=problem, prompt_ids=[1], response_ids=[2], response=r) for r in responses]
    for r in rollouts:
        r.correct = Arith().is_correct(r.response, problem.answer)
    return problem, rollouts


def test_binary_reward_follows_correctness():
    problem, rollouts = make_rollouts(["Answer: -1", "Answer: PLACEHOLDER"])
    rollouts[1].response = f"Answer: {problem.answer}"
    rollouts[1].correct = True
    BinaryReward(correct_reward=1.0, wrong_reward=-0.5).annotate(rollouts)
    assert [r.correct for r in rollouts] == [False, True]
    assert [r.reward for r in rollouts] == [-0.5, 1.0]


def test_reference_solution_context_is_the_clean_solution():
    problem, rollouts = make_rollouts(["Step 1: 1 + 1 = 2\nAnswer: 2"])
    ReferenceSolution(header="Reference:").annotate(rollouts)
    assert rollouts[0].context == clean_solution(problem.solution) and "<<" not in rollouts[0].context
    assert rollouts[0].context_header == "Reference:"


def test_step_critique_writes_the_critics_text_and_case():
    problem, rollouts = make_rollouts(["Step 1: 1 + 1 = 3\nAnswer: 3"])
    StepCritique().annotate(rollouts)
    expected = ArithmeticStepCritic().critique(problem.question, problem.solution, rollouts[0].response)
    assert rollouts[0].context == expected.text
    assert rollouts[0].feedback == {"case": "wrong", "first_error": 0}


@pytest.mark.parametrize("fallback", ["reference", "none"])
def test_critic_failure_falls_back_and_is_counted(fallback):
    problem, rollouts = make_rollouts(["Step 1: boom", "Step 1: 1 + 1 = 2\nAnswer: 2", "boom again"])
    feedback = StepCritique(critic=FlakyCritic(), fallback=fallback)
    feedback.annotate(rollouts)
    assert feedback.failures == 2 and feedback.fallbacks == 2
    expected = clean_solution(problem.solution) if fallback == "reference" else None
    assert rollouts[0].context == expected and rollouts[2].context == expected
    assert rollouts[0].feedback["critic_fallback"] == fallback
    assert rollouts[1].feedback["case"] in ("wrong", "incomplete", "missing_step", "correct")
