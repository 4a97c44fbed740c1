"""One optimizer step's update does not depend on how its rollouts are split: one batch of 8, 4 accumulated
micro-batches of 2, or 2 gloo ranks of 4 end with the same LoRA weights (token-level normalisation over the step)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import yaml

from sdlit.cli import run_cli
from sdlit.objectives import loss_sum

from conftest import offline_rows, subprocess_env, write_config


def split_config(tmp_path, model_dir, objective, batch_size, accumulate, rows):
    data = tmp_path / "rollouts.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    checkpoint = {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                  "init_args": {"dirpath": str(tmp_path / "ckpt"), "save_last": True, "save_top_k": 0}}
    config = write_config(tmp_path, model_dir, objective=objective, callbacks=[checkpoint],
                          extra_trainer={"enable_checkpointing": True, "accumulate_grad_batches": accumulate})
    parsed = yaml.safe_load(open(config))
    parsed["model"]["init_args"]["learning_rate"] = 1e-3
    parsed["data"]["init_args"].update(offline_path=str(data), batch_size=batch_size)
    open(config, "w").write(yaml.safe_dump(parsed))
    return config


def final_lora(tmp_path) -> dict[str, torch.Tensor]:
    return torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)["state_dict"]


def train_split(tmp_path, model_dir, objective, batch_size, accumulate=1, devices=1, groups_of=1):
    """Train 2 optimizer steps on the 16 rollouts split as asked; the final trainable weights."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    config = split_config(tmp_path, model_dir, objective, batch_size, accumulate, offline_rows(groups_of))
    if devices == 1:
        cli = run_cli(["fit", "--config", config])
        assert cli.trainer.global_step == 2
        return final_lora(tmp_path)
    cmd = [sys.executable, "-m", "sdlit.cli", "fit", "--config", config,
           "--trainer.devices", str(devices), "--trainer.strategy", "ddp"]
    env = subprocess_env()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=400, cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return final_lora(tmp_path)


def assert_same_weights(a: dict, b: dict, initial_gap: float) -> None:
    assert a.keys() == b.keys() and a
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst < 1e-5, f"weights differ by {worst} (the update itself is {initial_gap})"


def update_size(weights: dict) -> float:
    """How far LoRA B moved from its zero start: the size of the whole update."""
    return max(float(v.abs().max()) for k, v in weights.items() if "lora_B" in k)


@pytest.mark.parametrize("objective,groups_of", [("self_distillation", 1), ("grpo", 2), ("hybrid", 2)])
def test_accumulated_micro_batches_make_the_same_update_as_one_batch(tmp_path, tiny_model_dir, objective, groups_of):
    whole = train_split(tmp_path / "whole", tiny_model_dir, objective, batch_size=8, groups_of=groups_of)
    split = train_split(tmp_path / "split", tiny_model_dir, objective, batch_size=2, accumulate=4, groups_of=groups_of)
    assert update_size(whole) > 1e-4  # the comparison below is two orders finer than the update
    assert_same_weights(whole, split, update_size(whole))


@pytest.mark.parametrize("objective,groups_of", [("self_distillation", 1), ("grpo", 2)])
def test_two_ranks_make_the_same_update_as_one_batch(tmp_path, tiny_model_dir, objective, groups_of):
    whole = train_split(tmp_path / "whole", tiny_model_dir, objective, batch_size=8, groups_of=groups_of)
    ranks = train_split(tmp_path / "ranks", tiny_model_dir, objective, batch_size=4, devices=2, groups_of=groups_of)
    assert_same_weights(whole, ranks, update_size(whole))


def test_sft_accumulated_micro_batches_make_the_same_update(tmp_path, tiny_model_dir):
    def run(path, batch_size, accumulate):
        path.mkdir()
        config = write_config(path, tiny_model_dir, objective="sft",
                              extra_trainer={"accumulate_grad_batches": accumulate})
        cli = run_cli(["fit", "--config", config, "--data.batch_size", str(batch_size)])
        return {n: p.detach().clone() for n, p in cli.model.model.named_parameters() if p.requires_grad}

    whole, split = run(tmp_path / "whole", 8, 1), run(tmp_path / "split", 2, 4)
    assert_same_weights(whole, split, update_size(whole))


def test_loss_sum_by_hand():
    losses = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[True, True, False], [True, False, False]])
    total, count = loss_sum(losses, mask, "tokens")
    assert float(total) == 7.0 and count == 3
    total, count = loss_sum(losses, mask, "sequences")
    assert float(total) == pytest.approx(1.5 + 4.0) and count == 2
    empty = torch.zeros_like(mask)
    assert loss_sum(losses, empty, "sequences")[1] == 0 and float(loss_sum(losses, empty, "tokens")[0]) == 0.0
    with pytest.raises(ValueError, match="loss_normalization"):
        loss_sum(losses, mask, "rows")


def test_logged_step_loss_is_the_token_mean_over_the_whole_step(tmp_path, tiny_model_dir):
    """train/loss of an accumulated step equals the same step's loss trained as one batch (SFT: a cross-entropy
    far from 0, and reference solutions of different lengths)."""
    losses = {}
    for name, batch_size, accumulate in (("whole", 8, 1), ("split", 2, 4)):
        path = tmp_path / name
        path.mkdir()
        config = write_config(path, tiny_model_dir, objective="sft",
                              extra_trainer={"accumulate_grad_batches": accumulate, "max_steps": 1})
        cli = run_cli(["fit", "--config", config, "--data.batch_size", str(batch_size)])
        losses[name] = float(cli.trainer.callback_metrics["train/loss"])
    assert losses["whole"] > 1.0
    assert losses["whole"] == pytest.approx(losses["split"], rel=1e-5)
