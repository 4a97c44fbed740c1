"""The non-finite step guard: NaN/inf steps change no weight, are counted, and too many in a row stop training."""

from __future__ import annotations

import math

import pytest
import torch
import yaml
from lightning.pytorch import Callback

from sdlit.checkpointing import AtomicCheckpointIO
from sdlit.guard import NonFiniteTrainingError, StepGuard
from sdlit.module import SelfDistillationModule


class PoisonedModule(SelfDistillationModule):
    """Returns a NaN loss at the given 1-based steps (a stand-in for a numerical blow-up)."""

    def __init__(self, *args, nan_loss_steps: list[int] = [], **kwargs):  # noqa: B006 - read only
        super().__init__(*args, **kwargs)
        self.nan_loss_steps = nan_loss_steps

    def training_step(self, rollouts, batch_idx):
        loss = super().training_step(rollouts, batch_idx)
        return loss * math.nan if self.global_step + 1 in self.nan_loss_steps else loss


class InfGradient(Callback):
    """Makes one gradient infinite after backward at the given 1-based steps (the loss stays finite)."""

    def __init__(self, steps: list[int]):
        self.steps = steps

    def on_after_backward(self, trainer, pl_module):
        if trainer.global_step + 1 in self.steps:
            next(p for p in pl_module.model.parameters() if p.grad is not None).grad[0] = math.inf


class WeightLog(Callback):
    """Records, per step, the trainable weights, EMA shadow and Adam step counts after the step."""

    def __init__(self):
        self.after = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        state = trainer.optimizers[0].state
        self.after[trainer.global_step] = {
            "weights": {n: p.detach().clone() for n, p in pl_module.model.named_parameters() if p.requires_grad},
            "ema": {k: v.clone() for k, v in pl_module.teacher.state_dict().items()},
            "adam_steps": sorted({float(s["step"]) for s in state.values()}),
        }


def write_config(tmp_path, model_dir, nan_loss_steps=(), max_bad=3, max_steps=4):
    config = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu", "devices": 1, "max_steps": max_steps, "logger": False,
            "enable_progress_bar": False, "enable_model_summary": False, "limit_val_batches": 0,
            "num_sanity_val_steps": 0, "default_root_dir": str(tmp_path),
            "callbacks": [
                {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                 "init_args": {"dirpath": str(tmp_path / "ckpt"), "save_last": True, "save_top_k": 0,
                               "every_n_train_steps": 1}},
                {"class_path": "ReferenceSolution"},
            ],
        },
        "model": {
            "class_path": "test_guard.PoisonedModule",
            "init_args": {"model": model_dir, "teacher": "ema", "learning_rate": 0.01, "lora": {"r": 4, "alpha": 8},
                          "nan_loss_steps": list(nan_loss_steps), "max_consecutive_bad_steps": max_bad},
        },
        "data": {
            "class_path": "sdlit.data.RolloutDataModule",
            "init_args": {"task": {"class_path": "sdlit.tasks.arith.Arith", "init_args": {"train_size": 16}},
                          "batch_size": 2, "sampling": {"max_new_tokens": 8}},
        },
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def fit_with(config, *callbacks):
    """Run ``sdlit fit`` with extra callback objects (added after parsing, like trainer_defaults)."""
    from sdlit.cli import SdlitCLI
    from sdlit.data import RolloutDataModule

    cli = SdlitCLI(SelfDistillationModule, RolloutDataModule, subclass_mode_model=True, subclass_mode_data=True,
                   trainer_defaults={"callbacks": list(callbacks)}, args=["--config", config], run=False,
                   save_config_callback=None)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return cli


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("poison", ["nan_loss", "inf_gradient"])
def test_bad_step_is_skipped_and_counted(tmp_path, tiny_model_dir, poison):
    log = WeightLog()
    if poison == "nan_loss":
        cli = fit_with(write_config(tmp_path, tiny_model_dir, nan_loss_steps=[2]), log)
    else:
        cli = fit_with(write_config(tmp_path, tiny_model_dir), log, InfGradient([2]))
    assert cli.trainer.global_step == 4
    assert float(cli.trainer.callback_metrics["train/skipped_steps"]) == 1.0
    assert cli.model.guard.skipped == 1 and cli.model.guard.consecutive == 0
    after = log.after
    assert same(after[1]["weights"], after[2]["weights"]), "the bad step changed the weights"
    assert same(after[1]["ema"], after[2]["ema"]), "the bad step moved the EMA teacher"
    assert after[1]["adam_steps"] == after[2]["adam_steps"] == [1.0], "the optimizer counted the bad step"
    assert not same(after[2]["weights"], after[3]["weights"]), "training did not go on after the bad step"
    assert after[4]["adam_steps"] == [3.0]
    assert all(torch.isfinite(w).all() for w in after[4]["weights"].values())


def test_consecutive_bad_steps_stop_training_and_keep_the_last_good_checkpoint(tmp_path, tiny_model_dir):
    log = WeightLog()
    config = write_config(tmp_path, tiny_model_dir, nan_loss_steps=[3, 4, 5], max_bad=3, max_steps=8)
    with pytest.raises(NonFiniteTrainingError, match=r"training stopped at step 5: 3 consecutive steps had a "
                       r"non-finite loss or gradient \(limit model.max_consecutive_bad_steps=3"):
        fit_with(config, log)
    assert sorted(log.after) == [1, 2, 3, 4]
    checkpoint = AtomicCheckpointIO().load_checkpoint(tmp_path / "ckpt" / "last.ckpt")
    saved = {k.removeprefix("model."): v for k, v in checkpoint["state_dict"].items()}
    assert same(saved, log.after[2]["weights"]), "the checkpoint does not hold the last good weights"
    assert all(torch.isfinite(v).all() for v in saved.values())
    assert checkpoint["step_guard"] == {"skipped": 2, "consecutive": 2}


def test_guard_counts_and_limit():
    guard = StepGuard(max_consecutive=2)
    model = torch.nn.Linear(2, 1)
    model(torch.ones(1, 2)).sum().backward()
    assert guard.step_is_finite(torch.tensor(1.0), model)
    assert not guard.step_is_finite(torch.tensor(math.inf), model)
    model.weight.grad[0, 0] = math.nan
    assert not guard.step_is_finite(torch.tensor(1.0), model)
    assert guard.step_is_finite(torch.tensor(1.0), model, check_grads=False)
    guard.record(False, 1, torch.tensor(math.nan))
    guard.record(True, 2, torch.tensor(0.5))
    guard.record(False, 3, None)
    with pytest.raises(NonFiniteTrainingError, match="step 4: 2 consecutive"):
        guard.record(False, 4, None)
    assert guard.skipped == 3
    never = StepGuard(max_consecutive=0)
    for step in range(10):
        never.record(False, step, None)
    assert never.skipped == 10
    with pytest.raises(ValueError, match="max_consecutive_bad_steps"):
        StepGuard(-1)
