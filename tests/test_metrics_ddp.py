"""Avg@k / Pass@k / Maj@k under distributed evaluation: hand-computed cases, a 2-process gloo run against an
independent reference, and held-out problems shared across ranks without repeats."""

from __future__ import annotations

import itertools
from collections import Counter
from math import comb
from types import SimpleNamespace

import pytest
import torch
import torch.multiprocessing as mp
from torchmetrics import MeanMetric

from sdlit.data import RolloutDataModule
from sdlit.metrics import AvgAtK, MajAtK, PassAtK
from sdlit.settings import EvalSettings
from sdlit.tasks.base import DataError, Problem

from conftest import free_port, gloo_group


def _bool(rows):
    return torch.tensor(rows, dtype=torch.bool)


# ---- hand-computed cases ------------------------------------------------------------------------------
def test_pass_at_k_with_more_samples_than_k_by_hand():
    m = PassAtK(2)
    # n=5, c=1: 1 - C(4,2)/C(5,2) = 1 - 6/10 = 0.4 ; c=4: n-c=1 < k -> 1 ; c=0 -> 0
    m.update(_bool([[0, 0, 1, 0, 0], [1, 1, 0, 1, 1], [0, 0, 0, 0, 0]]))
    assert float(m.compute()) == pytest.approx((0.4 + 1.0 + 0.0) / 3)


def test_avg_at_k_uses_all_n_samples():
    m = AvgAtK(2)
    m.update(_bool([[1, 0, 0, 0], [1, 1, 1, 0]]))  # 1/4 and 3/4
    assert float(m.compute()) == pytest.approx(0.5)


def test_maj_at_k_tie_break_and_unparseable_by_hand():
    m = MajAtK(4)
    m.update(
        _bool([[1, 0, 0, 1], [0, 1, 1, 0], [0, 0, 0, 1], [1, 1, 1, 1]]),
        [
            ["2", "1", "1", "2"],  # tie 2:2 -> "2" (first seen first) -> correct[0] = True
            ["2", "1", "1", "2"],  # same answers, "2" wins again -> correct[0] = False
            [None, None, None, "8"],  # three unparseable never outvote one parseable answer -> True
            [None, None, None, None],  # nothing parseable -> wrong even though `correct` says True
        ],
    )
    assert float(m.compute()) == pytest.approx(2 / 4)


# ---- two processes (gloo) ------------------------------------------------------------------------------
K = 3


def _data():
    """12 problems x 5 samples, answers among "0".."3" and None, golds; fixed seed."""
    g = torch.Generator().manual_seed(7)
    correct = torch.rand(12, 5, generator=g) < 0.35
    choices = ["0", "1", "2", "3", None]
    answers = [[choices[int(i)] for i in torch.randint(0, 5, (5,), generator=g)] for _ in range(12)]
    golds = [str(int(i)) for i in torch.randint(0, 4, (12,), generator=g)]
    lengths = torch.randint(1, 50, (12, 5), generator=g).float()
    return correct, answers, golds, lengths


def _reference(correct, answers, golds, lengths):
    """Slow independent reference: brute force over k-subsets for Pass@k, a plain Counter for Maj@k."""
    n = correct.shape[1]
    avg = sum(row.float().mean().item() for row in correct) / len(correct)
    passed = 0.0
    for row in correct.tolist():
        subsets = list(itertools.combinations(range(n), K))
        passed += sum(any(row[j] for j in s) for s in subsets) / comb(n, K)
    maj_with_gold, maj_correct = 0.0, 0.0
    for i, row in enumerate(answers):
        first_k = row[:K]
        votes = Counter(a for a in first_k if a is not None)
        if not votes:
            continue
        top = max(votes.values())
        winner = next(a for a in first_k if a is not None and votes[a] == top)
        maj_with_gold += float(winner == golds[i])
        maj_correct += float(correct[i, first_k.index(winner)])
    count = len(correct)
    return [avg, passed / count, maj_with_gold / count, maj_correct / count, lengths.mean().item()]


def _metrics():
    return [AvgAtK(K), PassAtK(K), MajAtK(K), MajAtK(K), MeanMetric()]


def _update(metrics, correct, answers, golds, lengths):
    avg, passed, maj_gold, maj, mean_length = metrics
    avg.update(correct)
    passed.update(correct)
    maj_gold.update(correct, answers, golds)
    maj.update(correct, answers)
    mean_length.update(lengths)


def _worker(rank, world_size, port, expected):
    with gloo_group(rank, world_size, port):
        correct, answers, golds, lengths = _data()
        # uneven shares and a different number of updates per rank: rank 0 gets problems 0-2 in two updates,
        # rank 1 gets 3-11 in three updates
        chunks = [[(0, 1), (1, 3)], [(3, 4), (4, 9), (9, 12)]][rank]
        metrics = _metrics()
        for lo, hi in chunks:
            _update(metrics, correct[lo:hi], answers[lo:hi], golds[lo:hi], lengths[lo:hi])
        got = [float(m.compute()) for m in metrics]
        for name, g, e in zip(["avg", "pass", "maj(gold)", "maj", "mean_length"], got, expected, strict=True):
            assert abs(g - e) < 1e-5, (name, rank, g, e)



def test_two_gloo_processes_equal_one_process_and_the_reference():
    correct, answers, golds, lengths = _data()
    single = _metrics()
    _update(single, correct, answers, golds, lengths)
    expected = [float(m.compute()) for m in single]
    reference = _reference(correct, answers, golds, lengths)
    assert expected == pytest.approx(reference, abs=1e-5)
    assert 0 < expected[0] < 1 and 0 < expected[2] < 1  # not a degenerate case
    mp.spawn(_worker, args=(2, free_port(), expected), nprocs=2, join=True)


# ---- held-out problems shared across ranks ---------------------------------------------------------------
def _problems(count):
    return [Problem(f"q{i}", "#### 1", "1", f"p/{i}") for i in range(count)]


def _datamodule_on_rank(rank, world_size, eval_batch_size=2):
    dm = RolloutDataModule(evaluation=EvalSettings(batch_size=eval_batch_size))
    dm.trainer = SimpleNamespace(world_size=world_size, global_rank=rank)
    return dm


def test_eval_problems_are_split_across_ranks_without_repeats():
    problems = _problems(5)
    seen = []
    for rank in range(2):
        dm = _datamodule_on_rank(rank, 2)
        dm.eval_problems = lambda: problems
        batches = list(dm.val_dataloader())
        seen += [p.id for batch in batches for p in batch]
    # Lightning's default DistributedSampler would give 6 (one repeated to even out the ranks)
    assert sorted(seen) == sorted(p.id for p in problems)


def test_fewer_problems_than_ranks_is_a_clear_error():
    dm = _datamodule_on_rank(0, 4)
    dm.eval_problems = lambda: _problems(3)
    with pytest.raises(DataError, match="3 held-out problems cannot be shared by 4 processes"):
        dm.val_dataloader()


def test_single_process_keeps_plain_order():
    dm = RolloutDataModule(evaluation=EvalSettings(batch_size=2))
    dm.eval_problems = lambda: _problems(3)
    assert [[p.id for p in b] for b in dm.val_dataloader()] == [["p/0", "p/1"], ["p/2"]]


def test_ddp_fit_evaluation_counts_each_problem_once(tmp_path, tiny_model_dir):
    """Lightning DDP on 2 CPU processes, 3 held-out problems (uneven: 2 + 1), greedy: the evaluation at the end of
    fit equals a single-process `sdlit validate` of the saved checkpoint (a repeated problem would change it)."""
    import csv
    import subprocess
    import sys

    import yaml

    from sdlit.cli import run_cli

    from conftest import subprocess_env, write_config
    from feedback_examples import PARITY_TASK

    evaluation = {"class_path": "sdlit.callbacks.AvgAtKEvaluation",
                  "init_args": {"every_n_steps": None, "console_problems": 0}}
    checkpoint = {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                  "init_args": {"dirpath": str(tmp_path / "ckpt"), "save_last": True}}
    config = write_config(tmp_path, tiny_model_dir, callbacks=["ReferenceSolution", evaluation, checkpoint],
                          extra_trainer={"limit_val_batches": None, "enable_checkpointing": True,
                                         "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger",
                                                    "init_args": {"save_dir": str(tmp_path / "logs")}}})
    parsed = yaml.safe_load(open(config))
    parsed["data"]["init_args"].update(task=PARITY_TASK)
    parsed["data"]["init_args"]["evaluation"].update(num_problems=3, temperature=0.0, batch_size=1)
    open(config, "w").write(yaml.safe_dump(parsed))
    cmd = [sys.executable, "-m", "sdlit.cli", "fit", "--config", config,
           "--trainer.devices", "2", "--trainer.strategy", "ddp"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=400, cwd=tmp_path, env=subprocess_env())
    assert done.returncode == 0, done.stderr[-3000:]

    (row,) = [r for r in csv.DictReader(open(next((tmp_path / "logs").rglob("metrics.csv")))) if r.get("val/avg@3")]
    samples = next((tmp_path / "logs").rglob("samples/val_step000002.csv"))
    problems = sorted(r["problem"] for r in csv.DictReader(open(samples)))  # both ranks' samples, each once
    assert problems == sorted(["arith/eval/0", "arith/eval/1", "arith/eval/2"] * 3)
    single = run_cli(["validate", "--config", config, "--ckpt_path", str(tmp_path / "ckpt" / "last.ckpt")])
    for name in ("val/avg@3", "val/pass@3", "val/maj@3", "val/mean_length"):
        assert float(row[name]) == pytest.approx(float(single.trainer.callback_metrics[name]), abs=1e-5), name
