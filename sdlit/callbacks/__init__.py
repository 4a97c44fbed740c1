"""Lightning callbacks of sdlit: feedback kinds (and, later, evaluation and analysis)."""

from sdlit.callbacks.advantages import TokenAdvantageLogger
from sdlit.callbacks.feedback import BinaryReward, Feedback, ReferenceSolution, StepCritique, clean_solution

__all__ = ["BinaryReward", "Feedback", "ReferenceSolution", "StepCritique", "TokenAdvantageLogger", "clean_solution"]
