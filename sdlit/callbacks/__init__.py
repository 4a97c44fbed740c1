"""Lightning callbacks of sdlit: feedback kinds, held-out evaluation, HF export, token-advantage logging
and the phase progress bar."""

from sdlit.callbacks.advantages import TokenAdvantageLogger
from sdlit.callbacks.evaluation import AvgAtKEvaluation
from sdlit.callbacks.export import HFExport
from sdlit.callbacks.feedback import BinaryReward, ReferenceSolution, StepCritique
from sdlit.callbacks.problem_filter import ProblemBandFilter
from sdlit.callbacks.progress import PhaseProgressBar
from sdlit.feedback import Feedback
from sdlit.tasks.solutions import clean_solution

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
