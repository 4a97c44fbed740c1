"""Exact resume after SIGKILL, and atomic checkpoints: a crash while saving leaves the previous one usable."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch import Callback

from sdlit.checkpointing import (
    AtomicCheckpointIO,
    EpochSampler,
    ResumableLoader,
    capture_rng_states,
    restore_rng_states,
)
from sdlit.cli import run_cli, with_atomic_checkpoints

from conftest import subprocess_env

ROOT = Path(__file__).resolve().parents[1]


class KillWhileSaving(Callback):
    """At step ``step``, makes the checkpoint write stop half-way with SIGKILL (a crash during the save)."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step != self.step:
            return
        real_save = torch.save

        def half_save(obj, f, *args, **kwargs):
            import io

            buffer = io.BytesIO()
            real_save(obj, buffer, *args, **kwargs)
            data = buffer.getvalue()
            f.write(data[: len(data) // 2])
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)

        torch.save = half_save


def write_config(tmp_path: Path, model_dir: str, callbacks: list) -> str:
    config = {
        "seed_everything": 7,
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "max_steps": 6,
            "deterministic": True,
            "logger": False,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "limit_val_batches": 0,
            "num_sanity_val_steps": 0,
            "default_root_dir": str(tmp_path),
            "callbacks": [
                {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                 "init_args": {"dirpath": str(tmp_path / "ckpt"), "save_last": True, "save_top_k": 0,
                               "every_n_train_steps": 1, "enable_version_counter": False}},
                {"class_path": "BinaryReward"},
                {"class_path": "ReferenceSolution"},
                *callbacks,
            ],
        },
        "model": {
            "class_path": "sdlit.module.SelfDistillationModule",
            "init_args": {"model": model_dir, "teacher": "ema", "ema_decay": 0.5, "learning_rate": 0.01,
                          "warmup_steps": 5, "lora": {"r": 4, "alpha": 8}},
        },
        "data": {
            "class_path": "sdlit.data.RolloutDataModule",
            "init_args": {
                # 8 problems in batches of 2: 4 steps per epoch, so steps 4-6 cross an epoch boundary
                "task": {"class_path": "sdlit.tasks.arith.Arith", "init_args": {"train_size": 8, "eval_size": 2}},
                "batch_size": 2, "sampling": {"max_new_tokens": 10, "temperature": 1.0},
                "evaluation": {"num_problems": 2},
            },
        },
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def recorder(path: Path) -> dict:
    return {"class_path": "probes.StepRecorder", "init_args": {"path": str(path)}}


def run_in_subprocess(config: str, tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    env = subprocess_env()
    cmd = [sys.executable, "-m", "sdlit.cli", "fit", "--config", config, *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)


def read_steps(path: Path) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, path.read_text().splitlines())}


def trainable(module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.model.named_parameters() if p.requires_grad}


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, tiny_model_dir):
    """An uninterrupted 6-step fit: its recorded steps and its CLI (final weights, optimizer, teacher)."""
    sys.path.insert(0, str(ROOT / "tests"))
    folder = tmp_path_factory.mktemp("straight")
    cli = run_cli(["fit", "--config", write_config(folder, tiny_model_dir, [recorder(folder / "steps.jsonl")])])
    steps = read_steps(folder / "steps.jsonl")
    assert sorted(steps) == [1, 2, 3, 4, 5, 6]
    return steps, cli, folder


# killed mid-epoch 0, at the end of epoch 0 (4 steps an epoch), and mid-epoch 1
@pytest.mark.parametrize("kill_after", [3, 4, 5])
def test_sigkill_then_resume_matches_an_uninterrupted_run(tmp_path, tiny_model_dir, straight_run, kill_after):
    expected, straight, _ = straight_run
    crash_log = tmp_path / "steps.jsonl"
    config = write_config(tmp_path, tiny_model_dir,
                          [recorder(crash_log),
                           {"class_path": "probes.KillAtStep", "init_args": {"step": kill_after}}])
    killed = run_in_subprocess(config, tmp_path)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert sorted(read_steps(crash_log)) == list(range(1, kill_after + 1))
    assert (tmp_path / "ckpt" / "last.ckpt").exists()

    resumed_config = write_config(tmp_path, tiny_model_dir, [recorder(crash_log)])
    resumed = run_cli(["fit", "--config", resumed_config, "--ckpt_path", "last"])
    got = read_steps(crash_log)
    assert sorted(got) == [1, 2, 3, 4, 5, 6] and resumed.trainer.global_step == 6
    for step in range(kill_after + 1, 7):
        assert got[step]["problems"] == expected[step]["problems"], f"step {step}: other problems"
        assert got[step]["responses"] == expected[step]["responses"], f"step {step}: other rollouts"
        assert got[step]["epoch"] == expected[step]["epoch"]
        assert abs(got[step]["loss"] - expected[step]["loss"]) <= 1e-6, (
            step, got[step]["loss"], expected[step]["loss"])
    assert [got[s]["epoch"] for s in range(1, 7)] == [0, 0, 0, 0, 1, 1]
    seen = [p for s in range(1, 5) for p in got[s]["problems"]]
    assert len(seen) == len(set(seen)) == 8, "an epoch skipped or repeated a problem"
    # the end state agrees too: LoRA weights, EMA teacher, optimizer moments, learning rate
    a, b = trainable(straight.model), trainable(resumed.model)
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    ema_a, ema_b = straight.model.teacher.state_dict(), resumed.model.teacher.state_dict()
    assert ema_a and all(torch.allclose(ema_a[k], ema_b[k], atol=1e-6) for k in ema_a)
    opt_a, opt_b = straight.trainer.optimizers[0], resumed.trainer.optimizers[0]
    moments_a = [s["exp_avg"] for s in opt_a.state.values()]
    moments_b = [s["exp_avg"] for s in opt_b.state.values()]
    assert all(torch.allclose(x, y, atol=1e-6) for x, y in zip(moments_a, moments_b, strict=False))
    assert opt_a.param_groups[0]["lr"] == opt_b.param_groups[0]["lr"]


def test_checkpoint_loads_weights_only(straight_run):
    _, cli, folder = straight_run
    assert isinstance(cli.trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    checkpoint = torch.load(folder / "ckpt" / "last.ckpt", weights_only=True)  # no pickled objects inside
    assert checkpoint["global_step"] == 6
    assert set(checkpoint["rng_states"]) >= {"torch", "python", "numpy"}
    assert checkpoint["step_guard"] == {"skipped": 0, "consecutive": 0}
    assert checkpoint["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [{"epoch": 1, "batches": 2}]
    assert checkpoint["RolloutDataModule"]["seed"] == 7
    assert checkpoint["teacher"] and all(k.startswith("base_model.") for k in checkpoint["teacher"])
    assert not list((folder / "ckpt").glob(".*.tmp")), "a temporary file was left behind"


def test_sigkill_while_saving_leaves_the_previous_checkpoint(tmp_path, tiny_model_dir):
    config = write_config(tmp_path, tiny_model_dir,
                          [{"class_path": "test_resume.KillWhileSaving", "init_args": {"step": 2}}])
    killed = run_in_subprocess(config, tmp_path)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    partial = list((tmp_path / "ckpt").glob(".last.ckpt.*.tmp"))
    assert partial, "the save was not interrupted half-way"
    checkpoint = AtomicCheckpointIO().load_checkpoint(tmp_path / "ckpt" / "last.ckpt")
    assert checkpoint["global_step"] == 1  # the previous checkpoint, whole
    # the half-written file is unreadable (torch reports a cut archive as either error, by where it was cut);
    # it would have replaced last.ckpt
    with pytest.raises((RuntimeError, OSError)):
        torch.load(partial[0], weights_only=True)
    resumed = run_cli(["fit", "--config", write_config(tmp_path, tiny_model_dir, []), "--ckpt_path", "last",
                       "--trainer.max_steps", "2"])
    assert resumed.trainer.global_step == 2
    assert AtomicCheckpointIO().load_checkpoint(tmp_path / "ckpt" / "last.ckpt")["global_step"] == 2
    assert not partial[0].exists(), "the next save did not clear the half-written file"


def test_default_plugin_keeps_user_plugins():
    user_io = AtomicCheckpointIO(weights_only=False)
    assert with_atomic_checkpoints([user_io]) == [user_io]
    other = object()
    plugins = with_atomic_checkpoints(other)
    assert plugins[0] is other and isinstance(plugins[1], AtomicCheckpointIO)
    assert isinstance(with_atomic_checkpoints(None)[0], AtomicCheckpointIO)


def test_rng_states_round_trip():
    import random

    import numpy as np

    states = capture_rng_states()
    expected = (torch.rand(3), random.random(), np.random.rand())
    torch.rand(5), random.random(), np.random.rand()
    restore_rng_states(states)
    again = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(expected[0], again[0]) and expected[1:] == again[1:]


def test_resumable_loader_skips_only_its_first_pass():
    sampler = EpochSampler(10, shuffle=True, seed=3)
    loader = ResumableLoader(list(range(10)), batch_size=2, sampler=sampler, collate_fn=list)
    loader.load_state_dict({"epoch": 0, "batches": 2})
    first = list(loader)
    full = list(ResumableLoader(list(range(10)), batch_size=2, sampler=EpochSampler(10, True, 3), collate_fn=list))
    assert first == full[2:] and len(loader) == 5
    assert list(loader) == full  # the next pass is whole
    sampler.set_epoch(1)
    assert sorted(x for b in loader for x in b) == list(range(10)) and list(loader) != full
    loader.load_state_dict({"epoch": 1, "batches": 5})  # saved at the epoch's last batch: the next pass is whole
    assert len(list(loader)) == 5


@pytest.mark.parametrize("size", [10, 9])
def test_epoch_sampler_shares_one_order_among_ranks(size):
    whole = EpochSampler(size, shuffle=True, seed=3)
    ranks = [EpochSampler(size, shuffle=True, seed=3, num_replicas=2, rank=r) for r in (0, 1)]
    for epoch in (0, 1):
        for sampler in (whole, *ranks):
            sampler.set_epoch(epoch)
        order = list(whole)
        parts = [list(r) for r in ranks]
        assert len(parts[0]) == len(parts[1]) == len(ranks[0]) == 5
        assert parts[0] == order[0::2] and parts[1][: len(order[1::2])] == order[1::2]
        if size % 2:  # the last round is filled with the epoch's first index
            assert parts[1][-1] == order[0]
    assert list(whole) != sorted(whole)


def test_sharded_sigkill_then_resume_matches_an_uninterrupted_run(tmp_path, tiny_model_dir):
    """The same on 2 processes with FSDP2: each rank resumes with its own random state and data position."""
    sharded = ["--trainer.devices", "2", "--trainer.strategy", "fsdp2"]
    straight_dir, crash_dir = tmp_path / "straight", tmp_path / "crash"
    straight_dir.mkdir(), crash_dir.mkdir()
    config = write_config(straight_dir, tiny_model_dir, [recorder(straight_dir / "steps.jsonl")])
    straight = run_in_subprocess(config, straight_dir, *sharded)
    assert straight.returncode == 0, straight.stderr[-3000:]

    crash_log = crash_dir / "steps.jsonl"
    kill = {"class_path": "probes.KillAtStep", "init_args": {"step": 3}}
    killed = run_in_subprocess(write_config(crash_dir, tiny_model_dir, [recorder(crash_log), kill]), crash_dir,
                               *sharded)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    resumed = run_in_subprocess(write_config(crash_dir, tiny_model_dir, [recorder(crash_log)]), crash_dir,
                                *sharded, "--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    def by_rank_and_step(path: Path) -> dict[tuple[int, int], dict]:
        return {(r["rank"], r["step"]): r for r in map(json.loads, path.read_text().splitlines())}

    expected, got = by_rank_and_step(straight_dir / "steps.jsonl"), by_rank_and_step(crash_log)
    assert sorted(got) == sorted(expected) == [(rank, step) for rank in (0, 1) for step in range(1, 7)]
    for rank, step in expected:
        assert got[rank, step]["problems"] == expected[rank, step]["problems"], (rank, step)
        assert got[rank, step]["responses"] == expected[rank, step]["responses"], (rank, step)
        assert abs(got[rank, step]["loss"] - expected[rank, step]["loss"]) <= 1e-6, (rank, step)
    assert expected[0, 4]["problems"] != expected[1, 4]["problems"]  # the ranks sample their own problems
    a = torch.load(straight_dir / "ckpt" / "last.ckpt", weights_only=True)
    b = torch.load(crash_dir / "ckpt" / "last.ckpt", weights_only=True)
    for part in ("state_dict", "teacher"):
        assert a[part] and a[part].keys() == b[part].keys()
        assert all(torch.allclose(a[part][k], b[part][k], atol=1e-6) for k in a[part]), part
    assert len(a["rng_states_by_rank"]) == 2
