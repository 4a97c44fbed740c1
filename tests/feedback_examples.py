"""Feedback kinds defined outside sdlit, as a user would: one subclass each, selected from YAML."""

from sdlit.callbacks import Feedback
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
    """Arith whose answer check is a coin flip a random model can win: correct when the response has an even
    number of characters (so a tiny random model gets a spread of Avg@n)."""

    def is_correct(self, response, gold):
        return len(response) % 2 == 0
