"""Sharded training with FSDP2 (``--trainer.strategy fsdp2``) on 2 CPU processes with gloo, through real ``sdlit fit``
runs: teacher and student log-probs against an unsharded reference for every teacher mode, the weights after 2
steps against one process on the same rollouts, greedy sampling, SIGKILL-and-resume, and 2 torchrun "nodes"."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from sdlit.cli import run_cli

from conftest import free_port, offline_rows, subprocess_env, write_config

# (teacher, lora): the LoRA base teacher disables the adapter; the others swap weights in place (or use the live ones)
TEACHER_SETUPS = [("base", True), ("base", False), ("current", True), ("ema", False)]


def offline_config(tmp_path: Path, model_dir: str, teacher: str, lora: bool, batch_size: int, probe: bool) -> str:
    """2 optimizer steps of self-distillation on the 16 offline rollouts, a checkpoint after the last."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    data = tmp_path / "rollouts.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in offline_rows()) + "\n")
    callbacks = [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                  "init_args": {"dirpath": str(tmp_path / "ckpt"), "save_last": True, "save_top_k": 0}}]
    if probe:
        callbacks.append({"class_path": "probes.ShardingProbe", "init_args": {"out_dir": str(tmp_path)}})
    config = write_config(tmp_path, model_dir, teacher=teacher, lora=lora, callbacks=callbacks,
                          extra_trainer={"enable_checkpointing": True})
    parsed = yaml.safe_load(open(config))
    parsed["model"]["init_args"].update(learning_rate=1e-3, ema_decay=0.5)
    parsed["data"]["init_args"].update(offline_path=str(data), batch_size=batch_size)
    open(config, "w").write(yaml.safe_dump(parsed))
    return config


def sharded_fit(config: str, cwd: Path, *args: str, timeout: int = 400) -> subprocess.CompletedProcess:
    """``sdlit fit`` on 2 CPU processes with FSDP2."""
    cmd = [sys.executable, "-m", "sdlit.cli", "fit", "--config", config,
           "--trainer.devices", "2", "--trainer.strategy", "fsdp2", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=cwd, env=subprocess_env())


def checkpoint_weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path / "ckpt" / "last.ckpt", weights_only=True)["state_dict"]


def assembled_shards(path: Path) -> dict[str, torch.Tensor]:
    """The trainable weights of the two ranks' own shards, put together (FSDP2 shards along dim 0)."""
    ranks = [torch.load(path / f"shards-rank{r}.pt", weights_only=True) for r in (0, 1)]
    return {f"model.{name}": torch.cat([ranks[0][name], ranks[1][name]]) for name in ranks[0]}


def update_size(trained: dict[str, torch.Tensor], model_dir: str) -> float:
    """How far training moved the weights: LoRA B from its zero start, or full weights from the saved model's."""
    from transformers import AutoModelForCausalLM

    if any("lora_B" in k for k in trained):
        return max(float(v.abs().max()) for k, v in trained.items() if "lora_B" in k)
    initial = {f"model.{k}": v for k, v in AutoModelForCausalLM.from_pretrained(model_dir).state_dict().items()}
    return max(float((v - initial[k]).abs().max()) for k, v in trained.items())


@pytest.mark.parametrize("teacher,lora", TEACHER_SETUPS)
def test_sharded_fit_matches_one_process(tmp_path, tiny_model_dir, teacher, lora):
    single = offline_config(tmp_path / "single", tiny_model_dir, teacher, lora, batch_size=8, probe=False)
    run_cli(["fit", "--config", single])
    sharded = offline_config(tmp_path / "sharded", tiny_model_dir, teacher, lora, batch_size=4, probe=True)
    done = sharded_fit(sharded, tmp_path / "sharded")
    assert done.returncode == 0, done.stderr[-4000:]
    assert "Starting with 2 processes" in done.stdout + done.stderr

    for rank in (0, 1):  # inside the run: what each rank trained on, against an unsharded reference
        probe = json.loads((tmp_path / "sharded" / f"probe-rank{rank}.json").read_text())
        assert len(probe["student"]) == len(probe["teacher"]) == 2
        assert max(probe["student"]) < 1e-5, probe
        assert max(probe["teacher"]) < 1e-5, probe
        assert probe["greedy"] == {"static_cache": True, "generate": True}

    expected = checkpoint_weights(tmp_path / "single")
    assert update_size(expected, tiny_model_dir) > 1e-4  # the comparison below is finer than the update itself
    for got in (assembled_shards(tmp_path / "sharded"), checkpoint_weights(tmp_path / "sharded")):
        assert got.keys() == expected.keys() and got
        worst = max(float((got[k] - expected[k]).abs().max()) for k in expected)
        assert worst < 1e-5, f"sharded weights differ from one process by {worst}"


def test_two_torchrun_nodes(tmp_path, tiny_model_dir):
    """Multi-node as Lightning runs it: one torchrun per "node" (here both on 127.0.0.1), ``--trainer.num_nodes 2``."""
    config = offline_config(tmp_path, tiny_model_dir, "base", True, batch_size=4, probe=True)
    port = free_port()
    nodes = []
    for rank in (0, 1):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
               "--node_rank", str(rank), "--master_addr", "127.0.0.1", "--master_port", str(port),
               "-m", "sdlit.cli", "fit", "--config", config,
               "--trainer.num_nodes", "2", "--trainer.devices", "1", "--trainer.strategy", "fsdp2"]
        log = open(tmp_path / f"node{rank}.log", "w")
        nodes.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path, env=subprocess_env()))
    codes = [node.wait(timeout=400) for node in nodes]
    logs = [(tmp_path / f"node{rank}.log").read_text() for rank in (0, 1)]
    assert codes == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    assert "GLOBAL_RANK: 0, MEMBER: 1/2" in logs[0] and "GLOBAL_RANK: 1, MEMBER: 2/2" in logs[1]
    for rank in (0, 1):
        probe = json.loads((tmp_path / f"probe-rank{rank}.json").read_text())
        assert max(probe["student"] + probe["teacher"]) < 1e-5 and all(probe["greedy"].values())
    assert (tmp_path / "ckpt" / "last.ckpt").exists()


def test_sharded_bf16_checkpointed_hybrid_fit_exports_its_weights(tmp_path, tiny_model_dir):
    """bf16-mixed, gradient checkpointing, the hybrid objective on sampled rollouts, held-out evaluation and an HF
    export of the live (gathered) weights, all under FSDP2."""
    from peft import get_peft_model  # noqa: F401  (peft is what add_lora uses)
    from transformers import AutoModelForCausalLM

    from sdlit.models import LoraSettings, add_lora, load_model

    checkpoint = {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                  "init_args": {"dirpath": str(tmp_path / "ckpt"), "save_last": True, "save_top_k": 0}}
    config = write_config(tmp_path, tiny_model_dir, objective="hybrid", rollouts_per_problem=2,
                          callbacks=["BinaryReward", "ReferenceSolution", checkpoint, "HFExport"],
                          extra_trainer={"enable_checkpointing": True, "limit_val_batches": None,
                                         "val_check_interval": 2, "precision": "bf16-mixed"})
    done = sharded_fit(config, tmp_path, "--model.gradient_checkpointing", "true", "--trainer.log_every_n_steps", "1",
                       "--trainer.logger", "CSVLogger", "--trainer.logger.save_dir", str(tmp_path / "logs"))
    assert done.returncode == 0, done.stderr[-4000:]
    assert "the solver is sharded (FSDP2)" in done.stderr
    metrics = (next((tmp_path / "logs").rglob("metrics.csv"))).read_text()
    assert "val/avg@3" in metrics and "train/loss_grpo" in metrics

    trained = {k.removeprefix("model."): v for k, v in checkpoint_weights(tmp_path).items()}
    expected = add_lora(load_model(tiny_model_dir), LoraSettings(r=4, alpha=8))
    expected.load_state_dict(trained, strict=False)
    expected = expected.merge_and_unload().state_dict()
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").state_dict()
    assert exported.keys() == expected.keys()
    assert max(float((exported[k] - expected[k]).abs().max()) for k in expected) < 1e-6
    assert json.loads((tmp_path / "hf" / "sdlit_export.json").read_text())["source"] == "current weights"


def test_tensor_parallel_model_parallel_strategy_is_refused(tmp_path, tiny_model_dir):
    config = write_config(tmp_path, tiny_model_dir, callbacks=["ReferenceSolution"])
    cmd = [sys.executable, "-m", "sdlit.cli", "fit", "--config", config, "--trainer.devices", "2",
           "--trainer.strategy", '{"class_path": "ModelParallelStrategy"}']  # one node: tensor_parallel_size 2
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path, env=subprocess_env())
    assert done.returncode != 0
    assert "tensor_parallel_size=2" in done.stderr and "--trainer.strategy fsdp2" in done.stderr


def test_sharded_checkpoint_folder_resumes_and_exports(tmp_path, tiny_model_dir):
    """``save_distributed_checkpoint``: each rank writes its shards to a folder; resuming and HFExport read it."""
    from transformers import AutoModelForCausalLM

    from sdlit.callbacks.export import read_trainable_weights
    from sdlit.models import LoraSettings, add_lora, load_model

    best = {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
            "init_args": {"dirpath": str(tmp_path / "ckpt"), "save_last": True, "monitor": "train/loss"}}
    config = write_config(tmp_path, tiny_model_dir, callbacks=["ReferenceSolution", best, "HFExport"],
                          extra_trainer={"enable_checkpointing": True, "log_every_n_steps": 1, "strategy": {
                              "class_path": "sdlit.sharding.FSDP2Strategy",
                              "init_args": {"save_distributed_checkpoint": True}}})
    cmd = [sys.executable, "-m", "sdlit.cli", "fit", "--config", config, "--trainer.devices", "2"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=400, cwd=tmp_path, env=subprocess_env())
    assert done.returncode == 0, done.stderr[-4000:]
    assert {p.name for p in (tmp_path / "ckpt" / "last.ckpt").iterdir()} >= {"__0_0.distcp", "__1_0.distcp",
                                                                               "meta.pt"}
    source = json.loads((tmp_path / "hf" / "sdlit_export.json").read_text())["source"]
    assert Path(source).is_dir() and Path(source).parent == tmp_path / "ckpt"
    weights, _ = read_trainable_weights(source)
    expected = add_lora(load_model(tiny_model_dir), LoraSettings(r=4, alpha=8))
    expected.load_state_dict(weights, strict=True)  # the folder keeps every weight, frozen ones too
    expected = expected.merge_and_unload().state_dict()
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").state_dict()
    assert max(float((exported[k] - expected[k]).abs().max()) for k in expected) < 1e-6

    resumed = subprocess.run(cmd + ["--trainer.max_steps", "3", "--ckpt_path", "last"], capture_output=True,
                             text=True, timeout=400, cwd=tmp_path, env=subprocess_env())
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    meta = torch.load(tmp_path / "ckpt" / "last.ckpt" / "meta.pt", weights_only=True)
    assert meta["global_step"] == 3


def test_checkpoint_of_two_ranks_resumes_on_one_process(tmp_path, tiny_model_dir):
    config = offline_config(tmp_path, tiny_model_dir, "ema", False, batch_size=4, probe=False)
    first = sharded_fit(config, tmp_path, "--trainer.max_steps", "1")
    assert first.returncode == 0, first.stderr[-4000:]
    # (the run saved its resolved config over config.yaml: name the one-process settings)
    cmd = [sys.executable, "-m", "sdlit.cli", "fit", "--config", config, "--trainer.devices", "1",
           "--trainer.strategy", "auto", "--trainer.max_steps", "2", "--ckpt_path", "last"]
    resumed = subprocess.run(cmd, capture_output=True, text=True, timeout=400, cwd=tmp_path, env=subprocess_env())
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "resuming 1 processes from a checkpoint of 2" in resumed.stderr
    assert torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)["global_step"] == 2


def test_lightning_fsdp1_strategy_is_refused(tiny_model_dir):
    """Lightning's FSDPStrategy (FSDP1) would wrap the solver in flat parameters that the sampler and the teacher swap
    cannot read: configure_model stops with a pointer to fsdp2 (FSDP1 itself refuses a CPU, so no real run here)."""
    from types import SimpleNamespace

    from lightning.pytorch.strategies import FSDPStrategy

    from sdlit.module import SelfDistillationModule

    module = SelfDistillationModule(model=tiny_model_dir)
    module._trainer = SimpleNamespace(strategy=FSDPStrategy())
    with pytest.raises(ValueError, match="--trainer.strategy fsdp2"):
        module.configure_model()
