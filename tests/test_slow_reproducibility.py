"""The first run on a machine (which converts the packaged model) draws the same random numbers as every later
run: the conversion must not touch the global random state (slow: converts the packaged SmolLM2 twice)."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from sdlit.cli import run_cli
from sdlit.models import SMOLLM2_ALIAS, resolve_model_path

QUICKSTART = str(Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml")

pytestmark = pytest.mark.slow


def draws():
    return torch.rand(4).tolist(), random.random(), float(np.random.rand())


def seed_all(seed=0):
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def test_converting_the_packaged_model_leaves_the_random_state_alone(tmp_path, monkeypatch):
    monkeypatch.setenv("SDLIT_CACHE", str(tmp_path / "cache"))
    seed_all()
    expected = draws()
    seed_all()
    path = resolve_model_path(SMOLLM2_ALIAS)  # converts: the cache is empty
    assert (Path(path) / "model.safetensors").exists()
    assert draws() == expected


def test_validate_gives_the_same_numbers_with_and_without_a_fresh_cache(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SDLIT_CACHE", str(tmp_path / "fresh-cache"))
    args = ["validate", "--config", QUICKSTART, "--data.evaluation.num_problems", "2", "--data.evaluation.k", "3",
            "--data.evaluation.max_new_tokens", "24"]
    names = ("val/avg@3", "val/pass@3", "val/maj@3", "val/mean_length")
    first = run_cli(args).trainer.callback_metrics  # converts the packaged model first
    first = {n: float(first[n]) for n in names}
    again = run_cli(args).trainer.callback_metrics  # the cached copy
    assert {n: float(again[n]) for n in names} == first
