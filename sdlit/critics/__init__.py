"""Frozen critics that turn a solver's answer into a step-aligned critique (the teacher context).

``ArithmeticStepCritic`` is rule-based; ``HFCritic`` (a local transformers model) and ``HTTPCritic`` (an
OpenAI-compatible endpoint) are LLM critics driven by the four-case prompt of ``sdlit.critics.prompt``.
"""

from sdlit.critics.arithmetic import ArithmeticStepCritic
from sdlit.critics.base import Critic, Critique, StepVerdict, critique_outcomes
from sdlit.critics.cache import ReplyCache
from sdlit.critics.hf import HFCritic
from sdlit.critics.http import CriticHTTPError, CriticReplyError, HTTPCritic
from sdlit.critics.llm import LLMCritic
from sdlit.critics.prompt import CritiqueParseError, CritiqueParser, CritiquePrompt, strip_thinking

__all__ = [
    "ArithmeticStepCritic",
    "Critic",
    "CriticHTTPError",
    "CriticReplyError",
    "Critique",
    "CritiqueParseError",
    "CritiqueParser",
    "CritiquePrompt",
    "HFCritic",
    "HTTPCritic",
    "LLMCritic",
    "ReplyCache",
    "StepVerdict",
    "critique_outcomes",
    "strip_thinking",
]
