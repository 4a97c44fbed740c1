"""Teacher/student alignment: both passes score the very same response tokens at the right positions."""

from __future__ import annotations

import pytest
import torch

from sdlit.module import SelfDistillationModule
from sdlit.prompts import student_prompt_ids, teacher_prompt_ids
from sdlit.sampling import sample_rollouts
from sdlit.scoring import build_scoring_batch, response_logits, token_logprobs
from sdlit.settings import SamplingSettings
from sdlit.tasks.arith import Arith


@pytest.fixture()
def module(tiny_model_dir):
    torch.manual_seed(0)
    module = SelfDistillationModule(model=tiny_model_dir, teacher="base")
    module.configure_model()
    with torch.no_grad():  # make the adapter matter, so "base" and "current" differ
        for name, param in module.model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    return module


def some_rollouts(module, contexts):
    problems = Arith(train_size=len(contexts)).train_problems()
    rollouts = sample_rollouts(module.model, module.tokenizer, problems,
                               settings=SamplingSettings(max_new_tokens=10, temperature=1.0))
    for rollout, context in zip(rollouts, contexts, strict=False):
        rollout.context = context
    return rollouts


def separate_logprobs(model, prompt, response):
    """Log-probs of ``response`` after ``prompt`` from one unpadded forward pass."""
    ids = torch.tensor([prompt + response])
    logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1]
    return token_logprobs(logits, torch.tensor(response))


def test_teacher_logprobs_match_a_separate_pass_on_the_full_teacher_text(module):
    contexts = ["short hint", "a much longer context " * 6, None]
    rollouts = some_rollouts(module, contexts)
    batch, has_context, truncated = module.teacher_batch(rollouts)
    assert has_context.tolist() == [True, True, False] and truncated == 0
    with torch.no_grad(), module.teacher.weights(module.model):
        batched = token_logprobs(response_logits(module.model, batch), batch.response_ids)
        for i, r in enumerate(rollouts):
            if r.context is None:
                prompt = r.prompt_ids
            else:
                question, context, header = r.problem.question, r.context, r.context_header
                prompt = teacher_prompt_ids(module.tokenizer, question, context, header, 10**6).ids
            expected = separate_logprobs(module.model, prompt, r.response_ids)
            got = batched[i, : len(r.response_ids)]
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
            # the response ids are the sampled ones, verbatim
            assert batch.response_ids[i, : len(r.response_ids)].tolist() == r.response_ids


def test_student_logprobs_match_a_separate_pass(module):
    rollouts = some_rollouts(module, [None, None, None])
    batch = build_scoring_batch([r.prompt_ids for r in rollouts], [r.response_ids for r in rollouts], 0)
    with torch.no_grad():
        batched = token_logprobs(response_logits(module.model, batch), batch.response_ids)
        for i, r in enumerate(rollouts):
            expected = separate_logprobs(module.model, r.prompt_ids, r.response_ids)
            torch.testing.assert_close(batched[i, : len(r.response_ids)], expected, rtol=1e-4, atol=1e-4)
    assert batch.response_mask.sum().item() == sum(len(r.response_ids) for r in rollouts)


def test_base_teacher_is_the_model_without_adapter(module):
    rollouts = some_rollouts(module, ["ctx"])
    batch, _, _ = module.teacher_batch(rollouts)
    with torch.no_grad():
        with module.teacher.weights(module.model):
            base = response_logits(module.model, batch)
        live = response_logits(module.model, batch)
        with module.model.disable_adapter():
            no_adapter = response_logits(module.model, batch)
    torch.testing.assert_close(base, no_adapter)
    assert not torch.allclose(base, live), "the adapter should change the live model"


def test_too_long_context_is_cut_and_the_response_kept(module):
    rollouts = some_rollouts(module, ["x " * 2000])
    rollout = rollouts[0]
    module.hparams.max_teacher_length = 600
    batch, has_context, truncated = module.teacher_batch(rollouts)
    assert truncated == 1 and has_context.item()
    row = batch.input_ids[0][batch.attention_mask[0].bool()].tolist()
    assert len(row) <= 600
    assert row[-len(rollout.response_ids) :] == rollout.response_ids
    prompt = row[: -len(rollout.response_ids)]
    text = module.tokenizer.decode(prompt)
    assert rollout.problem.question in text and "Now write your own solution" in text


def test_ema_teacher_swaps_weights_and_restores_them(tiny_model_dir):
    module = SelfDistillationModule(model=tiny_model_dir, teacher="ema", ema_decay=0.5, lora=None)
    module.configure_model()
    params = dict(module.model.named_parameters())
    module.teacher.update(module.model)  # first update: snapshot
    name = "model.embed_tokens.weight"
    start = params[name].detach().clone()
    with torch.no_grad():
        params[name].add_(1.0)
    module.teacher.update(module.model)
    torch.testing.assert_close(module.teacher.shadow[name], start + 0.5)
    live = params[name].detach().clone()
    with module.teacher.weights(module.model):
        torch.testing.assert_close(params[name].detach(), start + 0.5)
    torch.testing.assert_close(params[name].detach(), live)
    restored = SelfDistillationModule(model=tiny_model_dir, teacher="ema", lora=None)
    restored.teacher.load_state_dict(module.teacher.state_dict())
    torch.testing.assert_close(restored.teacher.shadow[name], start + 0.5)


def test_student_prompt_uses_chat_template_and_step_instruction(module):
    ids = student_prompt_ids(module.tokenizer, "What is 2+3?")
    text = module.tokenizer.decode(ids)
    assert text.startswith("<|im_start|>user\n") and text.endswith("<|im_start|>assistant\n")
    assert "Step 1:" in text and "What is 2+3?" in text


def test_chat_template_kwargs_reach_student_and_teacher_prompts(tiny_model_dir):
    module = SelfDistillationModule(
        model=tiny_model_dir,
        student_template_kwargs={"enable_thinking": False},
        teacher_template_kwargs={"enable_thinking": True},
    )
    module.configure_model()
    module.tokenizer.chat_template = (  # the kwarg shows in a system turn, so both prompts end alike
        "{% if enable_thinking is defined and not enable_thinking %}<|im_start|>system\n<no-think><|im_end|>\n"
        "{% endif %}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    problems = Arith(train_size=1).train_problems()
    rollouts = sample_rollouts(module.model, module.tokenizer, problems,
                               template_kwargs=module.hparams.student_template_kwargs,
                               settings=SamplingSettings(max_new_tokens=4))
    student_text = module.tokenizer.decode(rollouts[0].prompt_ids)
    assert student_text.startswith("<|im_start|>system\n<no-think>") and student_text.endswith("assistant\n")
    rollouts[0].context = "hint"
    batch, _, _ = module.teacher_batch(rollouts)
    teacher_text = module.tokenizer.decode(batch.input_ids[0][batch.attention_mask[0].bool()])
    assert "hint" in teacher_text and "<no-think>" not in teacher_text
