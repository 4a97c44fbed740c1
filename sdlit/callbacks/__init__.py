"""Lightning callbacks of sdlit: feedback kinds, held-out evaluation, HF export, token-advantage logging
and the phase progress bar."""

from sdlit.callbacks.advantages import TokenAdvantageLogger
from sdlit.callbacks.evaluation import AvgAtKEvaluation
from sdlit.callbacks.export import HFExport
from sdlit.callbacks.feedback import BinaryReward, Feedback, ReferenceSolution, StepCritique, clean_solution
from sdlit.callbacks.problem_filter import ProblemBandFilter
from sdlit.callbacks.progress import PhaseProgressBar

__all__ = [
    "AvgAtKEvaluation",
    "BinaryReward",
    "Feedback",
    "HFExport",
    "PhaseProgressBar",
    "ProblemBandFilter",
    "ReferenceSolution",
    "StepCritique",
    "TokenAdvantageLogger",
    "clean_solution",
]
