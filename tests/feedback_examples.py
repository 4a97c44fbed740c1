"""Feedback kinds and a task defined outside sdlit, as a user would: one subclass each, selected from YAML."""

from sdlit.critics import ArithmeticStepCritic
from sdlit.feedback import Feedback
from sdlit.tasks.arith import Arith


class AnswerHint(Feedback):
    """The teacher is told the final answer."""

    header = "Hint:"

    def annotate_one(self, rollout):
        rollout.context = f"The final answer is {rollout.problem.answer}."
        rollout.context_header = self.header


class LengthParityReward(Feedback):
    """A reward with variance even for a random model: 1 when the response's token ids sum to an even number."""

    def annotate_one(self, rollout):
        rollout.reward = float(sum(rollout.response_ids) % 2 == 0)


class ParityArith(Arith):
    """Arith problems graded by a rule the random tiny model meets about half the time, so the metrics are not 0.

    A response is correct when its number of characters is even; its extracted answer is its length mod 3, except
    that lengths divisible by 5 are unparseable (None), so Maj@k sees ties, misses and majorities.
    """

    def extract_answer(self, text):
        return None if len(text) % 5 == 0 else str(len(text) % 3)

    def is_correct(self, response, gold):
        return len(response) % 2 == 0


PARITY_TASK = {"class_path": "feedback_examples.ParityArith", "init_args": {"train_size": 16, "eval_size": 6}}


class FlakyCritic:
    """The arithmetic critic, except that it fails on responses that mention 'boom' (as a remote critic might time
    out on some)."""

    def critique(self, question, reference, response):
        if "boom" in response:
            raise TimeoutError("critic timed out")
        return ArithmeticStepCritic().critique(question, reference, response)

    def critique_batch(self, items):
        return [self.critique(*item) for item in items]
