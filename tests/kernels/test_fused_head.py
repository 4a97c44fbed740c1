"""The fused output head (losses from hidden states, no [B, R, V] logits) gives the logits path's loss and gradients."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from sdlit.module import SelfDistillationModule
from sdlit.rollout import Rollout
from sdlit.sampling import sample_rollouts
from sdlit.scoring import output_head_weight
from sdlit.settings import SamplingSettings
from sdlit.tasks.arith import Arith


def make_module(tiny_model_dir, objective, fused, **kwargs) -> SelfDistillationModule:
    torch.manual_seed(0)
    module = SelfDistillationModule(model=tiny_model_dir, objective=objective, fused_output_head=fused, **kwargs)
    module.configure_model()
    with torch.no_grad():  # a non-zero adapter, so that the student differs from the base teacher
        for name, param in module.model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.3)
    module.log = lambda *args, **kwargs: None  # training_step is called outside a Trainer
    return module


def rollouts_for(module) -> list[Rollout]:
    problems = Arith(train_size=3).train_problems()
    torch.manual_seed(1)
    rollouts = sample_rollouts(module.model, module.tokenizer, problems, n=2,
                               settings=SamplingSettings(max_new_tokens=12, temperature=1.0))
    for i, rollout in enumerate(rollouts):
        rollout.reward = float(i % 3 == 0)
        rollout.context = None if i == 1 else f"A worked solution: {rollout.problem.answer}"
    return rollouts


def loss_and_grads(module, rollouts):
    module.model.zero_grad()
    loss = module.training_step(rollouts, 0)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in module.model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, module.last_token_logprobs


@pytest.mark.parametrize("objective", ["self_distillation", "grpo", "hybrid", "sft"])
def test_fused_and_logits_paths_agree(tiny_model_dir, objective):
    logits_module = make_module(tiny_model_dir, objective, fused=False)
    fused_module = make_module(tiny_model_dir, objective, fused=True)
    rollouts = rollouts_for(logits_module)
    if objective == "sft":
        for rollout in rollouts:
            rollout.response_ids = rollout.response_ids[:5] or [3]

    student = fused_module._student_batch(rollouts)
    assert fused_module.head_is_linear and fused_module.uses_fused_head(student)
    assert not logits_module.uses_fused_head(student)
    expected, expected_grads, expected_lp = loss_and_grads(logits_module, rollouts)
    got, got_grads, got_lp = loss_and_grads(fused_module, rollouts)

    # on-policy GRPO's loss can be 0 (ratio 1, advantages summing to 0): not its gradient
    assert torch.isfinite(expected)
    assert any(g.abs().max() > 1e-4 for g in expected_grads.values())
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    assert got_grads.keys() == expected_grads.keys() and len(got_grads) > 0
    for name in expected_grads:
        torch.testing.assert_close(got_grads[name], expected_grads[name], atol=1e-6, rtol=1e-3, msg=name)
    if objective in ("self_distillation", "hybrid"):  # the logged token log-probs, on the real tokens
        mask = expected_lp["mask"]
        assert (~mask).any()  # a rollout without context: its row is outside the distillation mask
        for side in ("teacher", "student"):
            torch.testing.assert_close(got_lp[side][mask], expected_lp[side][mask], atol=1e-5, rtol=1e-5)
            assert (got_lp[side][~mask] == 0).all() and (expected_lp[side][~mask] == 0).all()
            assert not got_lp[side].requires_grad


@pytest.mark.parametrize("objective", ["self_distillation", "grpo"])
def test_auto_fuses_wherever_the_head_is_linear(tiny_model_dir, objective):
    module = make_module(tiny_model_dir, objective, fused=None)
    batch = module._student_batch(rollouts_for(module))
    assert module.uses_fused_head(batch)  # even for a few hundred bytes of logits
    assert not make_module(tiny_model_dir, objective, fused=False).uses_fused_head(batch)


def test_a_trained_head_with_a_base_teacher_keeps_the_logits(tiny_model_dir):
    module = make_module(tiny_model_dir, "self_distillation", fused=True, lora=None)
    batch = module._student_batch(rollouts_for(module))
    assert module.output_head().requires_grad and not module.uses_fused_head(batch)


class SoftCapped(torch.nn.Module):
    """A causal LM whose logits are soft-capped (as Gemma 2 does): not a plain product of hidden and head."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def get_output_embeddings(self):
        return self.model.get_output_embeddings()

    def get_decoder(self):
        return self.model.get_decoder()

    def forward(self, **kwargs):
        out = self.model(**kwargs)
        out.logits = 0.5 * torch.tanh(out.logits / 0.5)
        return out


def test_the_head_check_accepts_a_plain_head_and_rejects_soft_capped_logits(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert output_head_weight(model) is model.get_output_embeddings().weight
    assert output_head_weight(SoftCapped(model)) is None
