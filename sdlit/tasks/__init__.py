"""Problem sources and answer checking: GSM8K, \\boxed{} math, and procedurally generated arithmetic."""

from sdlit.tasks.answers import extract_answer, is_correct, normalize_number
from sdlit.tasks.arith import Arith
from sdlit.tasks.base import DataError, Problem, Task
from sdlit.tasks.gsm8k import GSM8K, read_problems
from sdlit.tasks.math import Math

__all__ = ["Arith", "DataError", "GSM8K", "Math", "Problem", "Task", "extract_answer", "is_correct",
           "normalize_number", "read_problems"]
