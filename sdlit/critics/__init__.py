"""Frozen critics that turn a solver's answer into a step-aligned critique (the teacher context)."""

from sdlit.critics.arithmetic import ArithmeticStepCritic
from sdlit.critics.base import Critic, Critique, StepVerdict

__all__ = ["ArithmeticStepCritic", "Critic", "Critique", "StepVerdict"]
