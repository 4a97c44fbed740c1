"""HFCritic on the tiny random Llama: frozen, greedy, batched, own dtype; outputs have the right shape."""

from __future__ import annotations

import pytest
import torch

from sdlit.callbacks import StepCritique
from sdlit.critics import Critique, CritiqueParseError, CritiquePrompt, HFCritic

ITEMS = [
    ("What is 3 + 4?", "3 + 4 = 7\n#### 7", "Step 1: 3 + 4 = 7\nAnswer: 7"),
    ("What is 2 * 5?", "2 * 5 = 10\n#### 10", "Step 1: 2 * 5 = 12\nAnswer: 12"),
    ("What is 9 - 1?", "9 - 1 = 8\n#### 8", "It is 8, since nine minus one leaves eight."),
]


@pytest.fixture(scope="module")
def critic(tiny_model_dir):
    short = CritiquePrompt(template="Problem: {question}\nReference: {reference}\nAnswer to review:\n{response}")
    hf = HFCritic(tiny_model_dir, device="cpu", max_new_tokens=10, batch_size=2, prompt=short)
    hf.load()
    return hf


def test_model_is_frozen_in_eval_mode_on_its_device(critic):
    model = critic._model
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert model.device.type == "cpu" and next(model.parameters()).dtype == torch.float32


def test_replies_and_outcomes_have_one_entry_per_item(critic):
    replies = critic.replies(ITEMS)
    assert len(replies) == 3 and all(isinstance(r, str) for r in replies)
    outcomes = critic.critique_outcomes(ITEMS)
    assert len(outcomes) == 3
    assert all(isinstance(o, (Critique, CritiqueParseError)) for o in outcomes)


def test_batched_greedy_equals_one_at_a_time(critic, tiny_model_dir):
    single = HFCritic(tiny_model_dir, device="cpu", max_new_tokens=10, batch_size=1, prompt=critic.prompt)
    single._model, single._tokenizer = critic._model, critic._tokenizer
    assert critic.replies(ITEMS) == single.replies(ITEMS)
    assert critic.replies(ITEMS) == critic.replies(ITEMS)  # greedy: deterministic


def test_reply_is_the_greedy_continuation_of_the_chat_prompt(critic):
    """Independent check: an explicit argmax loop over the rendered chat prompt gives the same reply."""
    model, tokenizer = critic._model, critic._tokenizer
    text = critic.render(critic.prompt.messages(*ITEMS[0]))
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        for _ in range(10):
            next_id = model(ids).logits[0, -1].argmax()
            ids = torch.cat([ids, next_id.view(1, 1)], dim=1)
            if next_id.item() == tokenizer.eos_token_id:
                break
    expected = tokenizer.decode(ids[0, -(ids.shape[1] - len(tokenizer(text, add_special_tokens=False)["input_ids"])):],
                                skip_special_tokens=True)
    assert critic.replies(ITEMS[:1]) == [expected]


def test_autocast_of_the_training_step_does_not_reach_the_critic(critic):
    plain = critic.replies(ITEMS)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert critic.replies(ITEMS) == plain


def test_own_dtype_and_lazy_loading(tiny_model_dir):
    """Also runs the default four-case prompt through the chat template."""
    hf = HFCritic(tiny_model_dir, device="cpu", dtype="bfloat16", max_new_tokens=4, batch_size=3)
    assert hf._model is None  # nothing loaded until the first critique
    assert len(hf.replies(ITEMS)) == 3
    assert next(hf._model.parameters()).dtype == torch.bfloat16


def test_step_critique_with_hf_critic_counts_unparseable_replies(critic):
    from conftest import critic_rollouts as rollouts

    feedback = StepCritique(critic=critic, fallback="reference")
    batch = rollouts(3)
    feedback.annotate(batch)
    parsed = sum(feedback.cases.values())
    assert parsed + feedback.failures == 3 and feedback.fallbacks == feedback.failures
    assert all(r.context for r in batch)


def test_bad_settings_are_clear_errors():
    with pytest.raises(ValueError, match="batch_size"):
        HFCritic("x", batch_size=0)
