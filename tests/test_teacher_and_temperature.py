"""The teacher pass is deterministic (eval mode, no LoRA dropout) and leaves the training mode as it was; GRPO's
log-probs are taken at the sampling temperature; group advantages use TRL's Bessel-corrected std."""

from __future__ import annotations

import pytest
import torch
import yaml

from sdlit.cli import run_cli
from sdlit.models import LoraSettings
from sdlit.module import SelfDistillationModule
from sdlit.objectives import group_advantages

from conftest import rollouts_with_context, write_config


@pytest.mark.parametrize("teacher", ["current", "ema"])
def test_teacher_pass_is_deterministic_under_lora_dropout_and_restores_the_mode(tiny_model_dir, teacher):
    module = SelfDistillationModule(model=tiny_model_dir, lora=LoraSettings(r=4, alpha=8, dropout=0.5),
                                    teacher=teacher)
    module.configure_model()
    module.log = lambda *args, **kwargs: None  # called outside a fit loop
    with torch.no_grad():  # a LoRA B of zeros would make dropout invisible
        for name, param in module.model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    module.model.train()
    rollouts = rollouts_with_context(module.tokenizer)
    first, _ = module._teacher_outputs(rollouts)
    second, _ = module._teacher_outputs(rollouts)
    assert torch.equal(first, second)
    assert module.model.training and all(m.training for m in module.model.modules())
    # and the student pass (train mode) does see dropout: the check above could fail
    batch = module._student_batch(rollouts)
    from sdlit.scoring import response_logits

    with torch.no_grad():
        assert not torch.equal(response_logits(module.model, batch), response_logits(module.model, batch))


def test_grpo_logprobs_use_the_sampling_temperature(tmp_path, tiny_model_dir):
    """Stored log-probs of the sampling policy at T = 0.7, computed independently: the importance ratio is then
    exactly 1, so each token's GRPO loss is -advantage (at T = 1 it would not be)."""
    config = write_config(tmp_path, tiny_model_dir, objective="grpo", extra_trainer={"max_steps": 0})
    parsed = yaml.safe_load(open(config))
    parsed["data"]["init_args"]["sampling"] = {"temperature": 0.7, "max_new_tokens": 12}
    open(config, "w").write(yaml.safe_dump(parsed))
    module = run_cli(["fit", "--config", config]).model
    module.log = lambda *args, **kwargs: None
    module.model.eval()
    rollouts = rollouts_with_context(module.tokenizer)
    for r in rollouts:  # independent reference: the full sequence through the model, log_softmax(logits / T)
        ids = torch.tensor([r.prompt_ids + r.response_ids])
        with torch.no_grad():
            logits = module.model(input_ids=ids).logits[0, len(r.prompt_ids) - 1 : -1].float()
        r.logprobs = torch.log_softmax(logits / 0.7, dim=-1).gather(1, ids[0, len(r.prompt_ids):, None])[:, 0].tolist()
    assert module.grpo_temperature() == 0.7
    loss = module.training_step(rollouts, 0)
    advantages = group_advantages(torch.tensor([0.0, 1.0]), torch.tensor([0, 0]))
    expected = -sum(float(a) * len(r.response_ids) for a, r in zip(advantages, rollouts, strict=False))
    assert float(loss) == pytest.approx(expected, abs=1e-4)


def test_group_advantages_match_trl_bessel_corrected_std():
    rewards = torch.tensor([0.0, 1.0, 1.0, 1.0, 1.0, 0.0, 5.0])
    groups = torch.tensor([0, 0, 0, 0, 1, 1, 2])
    # by hand: group 0 mean 0.75, sample std sqrt((0.5625 + 3 * 0.0625) / 3) = 0.5; group 1: mean 0.5,
    # std sqrt(0.5) ; group 2: one rollout, no signal
    expected = torch.tensor([-0.75 / 0.5001, 0.25 / 0.5001, 0.25 / 0.5001, 0.25 / 0.5001,
                             0.5 / (0.5 ** 0.5 + 1e-4), -0.5 / (0.5 ** 0.5 + 1e-4), 0.0])
    assert torch.allclose(group_advantages(rewards, groups), expected, atol=1e-6)
    assert torch.equal(group_advantages(torch.ones(3), torch.zeros(3, dtype=torch.long)), torch.zeros(3))


def test_skip_first_response_tokens_leaves_them_out_of_the_distillation_loss(tiny_model_dir):
    module = SelfDistillationModule(model=tiny_model_dir, lora=None, skip_first_response_tokens=2)
    module.configure_model()
    rollouts = rollouts_with_context(module.tokenizer)
    rollouts[1].context = None  # no teacher context: none of its tokens is a loss token
    batch = module._student_batch(rollouts)
    mask = module.distillation_mask(batch, torch.tensor([True, False]))
    expected = batch.response_mask.clone()
    expected[:, :2] = False
    expected[1] = False
    assert torch.equal(mask, expected) and mask[0].sum() == len(rollouts[0].response_ids) - 2
    with pytest.raises(ValueError, match="skip_first_response_tokens"):
        SelfDistillationModule(model=tiny_model_dir, skip_first_response_tokens=-1)
