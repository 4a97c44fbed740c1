"""The quickstart config on the packaged SmolLM2-135M-Instruct (slow: a real pretrained model on CPU)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from sdlit.cli import run_cli

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = str(ROOT / "configs" / "quickstart.yaml")

pytestmark = pytest.mark.slow


def test_quickstart_config_trains_two_steps_on_the_packaged_model(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the config's run directories are relative
    cli = run_cli([
        "fit", "--config", QUICKSTART,
        "--trainer.max_steps", "2",
        "--trainer.limit_val_batches", "0",
    ])  # the config's own sampling: GRPO needs groups with right and wrong answers to move the weights
    assert cli.trainer.global_step == 2
    assert math.isfinite(float(cli.trainer.callback_metrics["train/loss"]))
    assert float(cli.trainer.callback_metrics["train/tokens"]) > 0
    moved = [p for n, p in cli.model.model.named_parameters() if "lora_B" in n and p.abs().sum() > 0]
    assert moved, "LoRA weights did not change"
    assert (tmp_path / "runs/quickstart/checkpoints/last.ckpt").exists()
    assert sum(1 for _ in (tmp_path / "runs/quickstart/logs").rglob("metrics.csv")) == 1


def test_quickstart_config_validates_on_the_packaged_model(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = run_cli([
        "validate", "--config", QUICKSTART,
        "--data.evaluation.num_problems", "2",
        "--data.evaluation.k", "2",
        "--data.evaluation.max_new_tokens", "48",
    ])
    metrics = cli.trainer.callback_metrics
    for name in ("val/avg@2", "val/pass@2", "val/maj@2"):
        assert 0.0 <= float(metrics[name]) <= 1.0
    assert 0 < float(metrics["val/mean_length"]) <= 48
