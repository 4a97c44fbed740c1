"""Feedback kinds defined outside sdlit, as a user would: one subclass each, selected from YAML."""

from sdlit.callbacks import Feedback


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
