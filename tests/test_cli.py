"""The `sdlit` command: help, shipped configs, and clear errors for bad settings."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from sdlit.cli import run_cli

from conftest import REPO_ROOT as ROOT
from conftest import print_config, write_config

CONFIGS = sorted((ROOT / "configs").rglob("*.yaml"))
FRAGMENTS = sorted((ROOT / "callbacks").glob("*.yaml"))


@pytest.mark.parametrize("config", CONFIGS, ids=[str(c.relative_to(ROOT)) for c in CONFIGS])
def test_every_shipped_config_parses(config, capsys):
    parsed = print_config(["--config", str(config)], capsys)
    assert parsed["model"]["class_path"].endswith("SelfDistillationModule")
    assert parsed["data"]["init_args"]["evaluation"]["k"] >= 1
    assert isinstance(parsed["seed_everything"], int)


@pytest.mark.parametrize("fragment", FRAGMENTS, ids=[f.name for f in FRAGMENTS])
def test_every_callback_fragment_composes_with_a_config(fragment, capsys):
    base = print_config(["--config", str(ROOT / "configs/quickstart.yaml")], capsys)
    composed = print_config(["--config", str(ROOT / "configs/quickstart.yaml"), "--config", str(fragment)], capsys)
    text = yaml.safe_load(fragment.read_text())
    if "callbacks+" in text.get("trainer", {}):
        assert len(composed["trainer"]["callbacks"]) == len(base["trainer"]["callbacks"]) + 1
    alone = print_config(["--config", str(fragment)], capsys)
    assert alone["trainer"]


def test_gsm8k_conditions_have_the_same_token_budget(capsys):
    budgets = {}
    for name in ("grpo", "reference", "critique"):
        cfg = print_config(["--config", str(ROOT / f"configs/gsm8k/{name}.yaml")], capsys)
        data, trainer = cfg["data"]["init_args"], cfg["trainer"]
        per_step = data["batch_size"] * data["rollouts_per_problem"] * trainer["accumulate_grad_batches"]
        budgets[name] = (per_step, data["sampling"]["max_new_tokens"], trainer["max_steps"])
    assert len(set(budgets.values())) == 1, budgets


def test_short_class_names_resolve(capsys):
    parsed = print_config(
        ["--model", "SelfDistillationModule", "--data", "RolloutDataModule", "--data.task", "GSM8K",
         "--trainer.callbacks+=StepCritique", "--trainer.callbacks+=BinaryReward"],
        capsys,
    )
    assert parsed["data"]["init_args"]["task"]["class_path"].rsplit(".", 1)[-1] == "GSM8K"
    paths = [c["class_path"] for c in parsed["trainer"]["callbacks"]]
    assert [p.rsplit(".", 1)[-1] for p in paths] == ["StepCritique", "BinaryReward"]


def test_a_named_task_gets_its_own_defaults_not_the_default_tasks(capsys, tmp_path, tiny_model_dir):
    """A declared ``Arith`` default once handed its train_size=1000 / eval_size=64 to a GSM8K task named in YAML,
    so every held-out evaluation of such a config silently stopped after 64 problems."""
    parsed = print_config(["--config", str(ROOT / "configs/gsm8k/reference.yaml")], capsys)
    task = parsed["data"]["init_args"]["task"]
    assert task["class_path"].endswith("GSM8K")
    assert task["init_args"]["train_size"] is None and task["init_args"]["eval_size"] is None
    assert print_config([], capsys)["data"]["init_args"]["task"] is None  # built in __init__: Arith()

    rows = tmp_path / "problems.jsonl"
    rows.write_text("".join(json.dumps({"question": f"What is {i} + 1?", "answer": f"{i}+1=<<{i}+1={i + 1}>>{i + 1}"
                                                   f"\n#### {i + 1}"}) + "\n" for i in range(70)))
    config = yaml.safe_load(open(write_config(tmp_path, tiny_model_dir, evaluation={
        "k": 1, "max_new_tokens": 2, "batch_size": 35, "num_problems": None})))
    config["data"]["init_args"]["task"] = {"class_path": "sdlit.tasks.gsm8k.GSM8K",
                                           "init_args": {"train_path": str(rows), "eval_path": str(rows)}}
    config["trainer"]["limit_val_batches"] = None
    (tmp_path / "gsm8k.yaml").write_text(yaml.safe_dump(config))
    cli = run_cli(["validate", "--config", str(tmp_path / "gsm8k.yaml")])
    assert len(cli.datamodule.eval_problems()) == 70 and len(cli.datamodule.task.train_problems()) == 70
    assert cli.trainer.num_val_batches == [2]  # 70 problems in batches of 35, not 64
    from sdlit.data import RolloutDataModule
    from sdlit.tasks.arith import Arith

    assert type(RolloutDataModule().task) is Arith


def test_help_lists_subcommands_and_documented_settings():
    out = subprocess.run([sys.executable, "-m", "sdlit.cli", "--help"], capture_output=True, text=True, check=True)
    for sub in ("fit", "validate", "test", "analyze"):
        assert sub in out.stdout
    assert "predict" not in out.stdout  # the module has no predict step
    fit = subprocess.run(
        [sys.executable, "-m", "sdlit.cli", "fit", "--model.help", "SelfDistillationModule"],
        capture_output=True, text=True, check=True,
    )
    text = " ".join(fit.stdout.split())
    assert "--model.teacher {base,current,ema}" in text and "adapter disabled" in text


def test_wrong_type_in_config_names_the_setting(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  init_args:\n    batch_size: eight\n")
    with pytest.raises(SystemExit) as exit_info:
        run_cli(["fit", "--config", str(bad), "--print_config"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "batch_size" in err and "eight" in err


def test_unknown_key_in_config_is_rejected(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  init_args:\n    learning_rat: 0.1\n")
    with pytest.raises(SystemExit):
        run_cli(["fit", "--config", str(bad), "--print_config"])
    assert "learning_rat" in capsys.readouterr().err


def test_unknown_model_alias_gives_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="no-such-model.*not a packaged alias.*smollm2-135m-instruct"):
        run_cli(["fit", "--model.model", "no-such-model", "--trainer.max_steps", "1",
              "--trainer.default_root_dir", str(tmp_path)])


@pytest.mark.parametrize("name", ["grpo", "reference", "critique"])
def test_gsm8k_configs_run_a_step_on_a_tiny_model(name, tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the configs write under runs/
    cli = run_gsm8k_config_step(name, tiny_model_dir)
    metrics = cli.trainer.callback_metrics
    assert cli.trainer.global_step == 1 and "val/avg@12" in metrics  # what ModelCheckpoint monitors
    last = tmp_path / f"runs/gsm8k-{name}/checkpoints/last.ckpt"
    assert last.exists()
    assert list((tmp_path / f"runs/gsm8k-{name}").rglob("config.yaml")), "the resolved config is saved per run"
    if name == "critique":  # a rerun replaces last.ckpt instead of writing last-v1.ckpt beside a stale one
        first = last.stat().st_mtime_ns
        run_gsm8k_config_step(name, tiny_model_dir)
        assert last.stat().st_mtime_ns > first
        assert not list(last.parent.glob("last-v*.ckpt"))


def run_gsm8k_config_step(name, tiny_model_dir):
    return run_cli([
        "fit", "--config", str(ROOT / f"configs/gsm8k/{name}.yaml"),
        "--model.model", tiny_model_dir,
        "--trainer.max_steps", "1", "--trainer.accumulate_grad_batches", "1",
        "--trainer.val_check_interval", "1", "--trainer.limit_val_batches", "1",
        "--data.sampling.max_new_tokens", "8", "--data.evaluation.max_new_tokens", "4",
        "--data.evaluation.batch_size", "1", "--data.batch_size", "1" if name == "grpo" else "2",
    ])


def without_run_dir(config: dict) -> dict:
    config["trainer"].pop("default_root_dir")
    return config


@pytest.mark.parametrize("name, feedback", [("reference", "ReferenceSolution"), ("critique", "StepCritique")])
def test_gsm8k_base_plus_feedback_fragments_is_the_condition_config(name, feedback, capsys):
    fragments = [str(ROOT / "callbacks/BinaryReward.yaml"), str(ROOT / f"callbacks/{feedback}.yaml")]
    composed = print_config(["--config", str(ROOT / "configs/gsm8k/base.yaml"),
                             *(arg for f in fragments for arg in ("--config", f))], capsys)
    condition = print_config(["--config", str(ROOT / f"configs/gsm8k/{name}.yaml")], capsys)
    assert without_run_dir(composed) == without_run_dir(condition)
    base = print_config(["--config", str(ROOT / "configs/gsm8k/base.yaml")], capsys)
    assert not [c for c in base["trainer"]["callbacks"] if c["class_path"].split(".")[-1] in
                ("BinaryReward", "ReferenceSolution", "StepCritique")]


def test_paper_critic_settings_agree_with_the_http_critic_fragment():
    paper = yaml.safe_load((ROOT / "configs/paper/critique.yaml").read_text())
    fragment = yaml.safe_load((ROOT / "callbacks/StepCritique.HTTPCritic.yaml").read_text())
    in_paper = [c for c in paper["trainer"]["callbacks"] if c["class_path"].endswith("StepCritique")]
    assert in_paper == fragment["trainer"]["callbacks+"]


@pytest.mark.parametrize("config", CONFIGS, ids=[str(c.relative_to(ROOT)) for c in CONFIGS])
def test_configs_name_their_run_directory_once(config):
    """Outputs follow trainer.default_root_dir: no logger save_dir, checkpoint or export dirpath of their own."""
    text = yaml.safe_load(config.read_text())
    trainer = text["trainer"]
    assert trainer.get("default_root_dir"), "every shipped config names its run directory"
    loggers = trainer.get("logger") or []
    assert not [lg for lg in loggers if (lg.get("init_args") or {}).get("save_dir")]
    for callback in trainer.get("callbacks") or []:
        if callback["class_path"].endswith(("ModelCheckpoint", "HFExport")):
            assert not (callback.get("init_args") or {}).get("dirpath"), callback


def test_every_output_follows_the_run_directory(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root = tmp_path / "elsewhere"
    cli = run_cli([
        "fit", "--config", str(ROOT / "configs/gsm8k/reference.yaml"),
        "--config", str(ROOT / "callbacks/HFExport.yaml"),
        "--model.model", tiny_model_dir, "--trainer.default_root_dir", str(root),
        "--trainer.max_steps", "1", "--trainer.accumulate_grad_batches", "1", "--trainer.limit_val_batches", "1",
        "--data.sampling.max_new_tokens", "8", "--data.evaluation.max_new_tokens", "4",
        "--data.evaluation.batch_size", "1", "--data.evaluation.num_problems", "1",
    ])
    assert cli.trainer.global_step == 1
    assert (root / "checkpoints/last.ckpt").exists()
    assert list((root / "logs").rglob("metrics.csv")) and list((root / "tb").rglob("events.out.tfevents.*"))
    assert (root / "hf/config.json").exists()
    assert not (tmp_path / "runs").exists(), "nothing is written under the config's own run directory"


def test_moved_flat_keys_name_their_new_key(tmp_path, capsys):
    old = tmp_path / "old.yaml"
    old.write_text("data:\n  init_args:\n    eval_k: 4\n")
    with pytest.raises(SystemExit) as exit_info:
        run_cli(["fit", "--config", str(old), "--data.temperature", "1.1", "--print_config"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "data.eval_k is now data.evaluation.k" in err and "data.temperature is now data.sampling.temperature" in err
