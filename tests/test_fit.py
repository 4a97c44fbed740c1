"""End-to-end `sdlit fit` / `sdlit validate` runs on a tiny random Llama through the real CLI and Trainer."""

from __future__ import annotations

import math

import pytest
import torch
import yaml

from sdlit.cli import run_cli
from sdlit.module import SelfDistillationModule

from conftest import write_config


def trainable_snapshot(module):
    return {n: p.detach().clone() for n, p in module.model.named_parameters() if p.requires_grad}


CONDITIONS = [
    ("self_distillation", ["sdlit.callbacks.BinaryReward", "sdlit.callbacks.StepCritique"], 1),
    ("self_distillation", ["BinaryReward", "ReferenceSolution"], 1),
    ("grpo", ["feedback_examples.LengthParityReward"], 4),
    ("hybrid", ["feedback_examples.LengthParityReward", "feedback_examples.AnswerHint"], 2),
]


@pytest.mark.parametrize("objective,callbacks,n", CONDITIONS, ids=["critique", "reference", "grpo", "hybrid"])
def test_fit_two_steps_changes_weights(tmp_path, tiny_model_dir, objective, callbacks, n):
    config = write_config(tmp_path, tiny_model_dir, objective, callbacks, rollouts_per_problem=n)
    # LoRA with activation checkpointing too (the reference-solution case)
    extra = ["--model.gradient_checkpointing", "true"] if "ReferenceSolution" in callbacks else []
    cli = run_cli(["fit", "--config", config, *extra])
    module = cli.model
    assert cli.trainer.global_step == 2
    loss = cli.trainer.callback_metrics["train/loss"]
    assert math.isfinite(float(loss))
    lora_b = [p for n_, p in module.model.named_parameters() if "lora_B" in n_]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b), "LoRA B weights never moved from zero"
    assert float(cli.trainer.callback_metrics["train/tokens"]) > 0
    # rollouts are sampled right before their step, by the weights being trained: no off-policy lag
    assert float(cli.trainer.callback_metrics["train/policy_lag"]) == 0.0


@pytest.mark.parametrize("teacher", ["current", "ema"])
def test_fit_full_weights_with_other_teachers(tmp_path, tiny_model_dir, teacher):
    config = write_config(tmp_path, tiny_model_dir, callbacks=["ReferenceSolution"], lora=False, teacher=teacher)
    config_override = yaml.safe_load(open(config))
    config_override["model"]["init_args"]["gradient_checkpointing"] = teacher == "ema"
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config_override))
    from transformers import AutoModelForCausalLM

    initial = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    cli = run_cli(["fit", "--config", config])
    after = cli.model.model.state_dict()
    changed = [k for k in initial if not torch.equal(initial[k], after[k])]
    assert changed, "no weight changed after two steps"
    assert math.isfinite(float(cli.trainer.callback_metrics["train/loss"]))
    if teacher == "ema":
        shadow = cli.model.teacher.shadow
        assert shadow and any(not torch.equal(shadow[k], dict(cli.model.model.named_parameters())[k]) for k in shadow)


@pytest.mark.parametrize("objective,callbacks,message", [
    ("self_distillation", ["BinaryReward"], "needs a teacher context"),
    ("grpo", ["ReferenceSolution"], "needs a reward on every rollout"),
])
def test_missing_feedback_is_a_clear_error(tmp_path, tiny_model_dir, objective, callbacks, message):
    config = write_config(tmp_path, tiny_model_dir, objective, callbacks, rollouts_per_problem=2)
    with pytest.raises(ValueError, match=message):
        run_cli(["fit", "--config", config])


def test_bf16_mixed_precision_trains_on_cpu(tmp_path, tiny_model_dir):
    config = write_config(tmp_path, tiny_model_dir, callbacks=["StepCritique"],
                          extra_trainer={"precision": "bf16-mixed"})
    cli = run_cli(["fit", "--config", config])
    assert cli.trainer.precision == "bf16-mixed"
    assert math.isfinite(float(cli.trainer.callback_metrics["train/loss"]))


def test_validate_logs_all_four_metrics(tmp_path, tiny_model_dir):
    config = write_config(tmp_path, tiny_model_dir, extra_trainer={"limit_val_batches": None})
    cli = run_cli(["validate", "--config", config])
    metrics = cli.trainer.callback_metrics
    for name in ("val/avg@3", "val/pass@3", "val/maj@3", "val/mean_length"):
        assert name in metrics, sorted(metrics)
        assert 0.0 <= float(metrics[name]) or name == "val/mean_length"
    assert 0 < float(metrics["val/mean_length"]) <= 8
    tested = run_cli(["test", "--config", config]).trainer.callback_metrics
    assert {"test/avg@3", "test/pass@3", "test/maj@3", "test/mean_length"} <= set(tested)


def test_checkpoint_keeps_adapter_only_and_resumes_into_validate(tmp_path, tiny_model_dir):
    config = write_config(
        tmp_path, tiny_model_dir, callbacks=["ReferenceSolution"],
        extra_trainer={"enable_checkpointing": True},
    )
    cli = run_cli(["fit", "--config", config])
    ckpt_path = cli.trainer.checkpoint_callback.best_model_path or cli.trainer.checkpoint_callback.last_model_path
    checkpoint = torch.load(ckpt_path, weights_only=False)
    assert checkpoint["state_dict"] and all("lora_" in k for k in checkpoint["state_dict"])
    trained = trainable_snapshot(cli.model)
    cli2 = run_cli(["validate", "--config", config, "--ckpt_path", ckpt_path, "--trainer.limit_val_batches", "1"])
    reloaded = trainable_snapshot(cli2.model)
    assert trained.keys() == reloaded.keys()
    assert all(torch.equal(trained[k], reloaded[k]) for k in trained)
    # and outside the CLI, as a user would in a notebook
    loaded = SelfDistillationModule.load_from_checkpoint(ckpt_path)
    assert loaded.model is not None and loaded.lora.r == 4
    from_ckpt = trainable_snapshot(loaded)
    assert all(torch.equal(trained[k], from_ckpt[k]) for k in trained)


def test_ema_teacher_state_is_checkpointed(tmp_path, tiny_model_dir):
    config = write_config(tmp_path, tiny_model_dir, callbacks=["ReferenceSolution"], teacher="ema",
                          extra_trainer={"enable_checkpointing": True})
    cli = run_cli(["fit", "--config", config])
    ckpt_path = cli.trainer.checkpoint_callback.last_model_path or cli.trainer.checkpoint_callback.best_model_path
    saved = torch.load(ckpt_path, weights_only=True)["teacher"]
    live = cli.model.teacher.state_dict()
    assert saved and saved.keys() == live.keys()
    assert all(torch.equal(saved[k], live[k]) for k in live)


def test_ddp_on_two_cpu_processes(tmp_path, tiny_model_dir):
    """Lightning's own DDP (gloo on CPU): each rank samples its own problems; metrics are synced."""
    import csv
    import subprocess
    import sys

    config = write_config(tmp_path, tiny_model_dir, callbacks=["BinaryReward", "StepCritique"],
                          extra_trainer={"limit_val_batches": None, "val_check_interval": 2})
    cmd = [sys.executable, "-m", "sdlit.cli", "fit", "--config", config,
           "--trainer.devices", "2", "--trainer.strategy", "ddp", "--trainer.log_every_n_steps", "1",
           "--trainer.logger", "CSVLogger", "--trainer.logger.save_dir", str(tmp_path / "logs")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Starting with 2 processes" in done.stdout + done.stderr
    rows = list(csv.DictReader(open(next((tmp_path / "logs").rglob("metrics.csv")))))
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    evals = [float(r["val/avg@3"]) for r in rows if r.get("val/avg@3")]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    assert len(evals) == 1 and 0.0 <= evals[0] <= 1.0
