"""bench/step.py: the phase recorder on a real Trainer run, and the report from recorded steps."""

from __future__ import annotations

import pytest

from conftest import load_bench_script


@pytest.fixture(scope="module")
def step():
    return load_bench_script("step")


def recorded(seconds: list[float], rollout: float = 1.0) -> dict:
    steps = [{"seconds": s, "generated_tokens": 100, "rollouts": 8,
              "phases": {"rollout": rollout, "feedback": 0.0, "teacher": 0.5, "student": 0.5, "backward": 1.0,
                         "optimizer and rest": s - rollout - 2.0}} for s in seconds]
    return {"steps": steps, "peak_rss_mib": 1000.0}


def test_steady_leaves_out_the_first_step(step):
    assert step.steady([10.0, 4.0, 6.0]) == 5.0
    assert step.steady([7.0]) == 7.0


def test_phase_table_shares_add_up_to_the_step(step):
    rows = step.phase_table(recorded([9.0, 4.0, 4.0]))
    shares = [int(r.split("|")[4].strip().rstrip("%")) for r in rows[2:-1]]
    assert abs(sum(shares) - 100) <= len(shares)  # rounding of each share
    assert rows[-1].startswith("| **step** | **4.00**") and "| 25 |" in rows[-1]  # 100 tokens / 4 s


def test_report_prints_the_ratio_against_the_peer(step, capsys):
    args = step.parse_args(["--conditions", "reference", "--steps", "3"])
    results = {"reference/sdlit": recorded([9.0, 4.0, 4.0]),
               "reference/sdlit-no-length_groups": recorded([9.0, 5.0, 5.0]),
               "reference/peer": {"peer": "trl x", "seconds_per_step": [20.0, 8.0, 8.0], "peak_rss_mib": 2000.0},
               "reference/generation": {"rows": 8, "runs": {
                   "generate": [{"seconds": 2.0, "tokens": 100}],
                   "static_cache": [{"seconds": 1.0, "tokens": 100}],
                   "static_cache_model_forward": [{"seconds": 1.25, "tokens": 100}],
                   "static_cache_plain_linears": [{"seconds": 1.6, "tokens": 100}]}}}
    step.report(args, results)
    out = capsys.readouterr().out
    assert "| **sdlit / peer** | **0.50x** | **0.50x** |" in out
    assert "| sdlit, one padded pass (no length groups) | 5.00 |" in out
    assert "**2.00x**" in out
    assert "not the lean Llama step: 80.0 tokens/s, 1.60x" in out
    assert "not merged and packed: 62.5 tokens/s, 1.25x" in out


def test_rounds_each_side_is_its_fastest_round_and_every_round_is_printed(step, capsys):
    args = step.parse_args(["--conditions", "reference", "--steps", "3", "--rounds", "2"])
    results = {"reference/sdlit/round0": recorded([9.0, 6.0, 6.0]),
               "reference/peer/round0": {"peer": "trl x", "seconds_per_step": [20.0, 10.0, 10.0],
                                         "peak_rss_mib": 2000.0},
               "reference/sdlit/round1": recorded([9.0, 4.0, 4.0]),
               "reference/peer/round1": {"peer": "trl x", "seconds_per_step": [20.0, 12.0, 12.0],
                                         "peak_rss_mib": 2000.0}}
    step.pick_fastest_rounds(results, "reference")
    assert results["reference/sdlit"] is results["reference/sdlit/round1"]
    assert results["reference/peer"] is results["reference/peer/round0"]
    step.report(args, results)
    out = capsys.readouterr().out
    assert "| **sdlit / peer** | **0.40x** |" in out  # 4 s against 10 s
    assert "round 1: 6.00 / 10.00 (0.60x); round 2: 4.00 / 12.00 (0.33x)" in out


def test_recorder_splits_a_real_training_step_into_phases(step, tiny_model_dir):
    import lightning as L

    from sdlit.callbacks import ReferenceSolution
    from sdlit.data import RolloutDataModule
    from sdlit.module import SelfDistillationModule
    from sdlit.settings import SamplingSettings
    from sdlit.tasks.arith import Arith

    L.seed_everything(0, verbose=False)
    module = SelfDistillationModule(model=tiny_model_dir, learning_rate=1e-3)
    data = RolloutDataModule(task=Arith(train_size=4), batch_size=2, sampling=SamplingSettings(max_new_tokens=4))
    recorder = step.StepRecorder()
    trainer = L.Trainer(accelerator="cpu", max_steps=2, callbacks=[ReferenceSolution(), recorder], logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, limit_val_batches=0,
                        enable_model_summary=False)
    trainer.fit(module, datamodule=data)
    assert len(recorder.steps) == 2
    for record in recorder.steps:
        phases = record["phases"]
        assert {"rollout", "feedback", "teacher", "student", "backward", "optimizer and rest"} <= set(phases)
        assert all(v >= 0 for v in phases.values())
        assert sum(phases.values()) == pytest.approx(record["seconds"])
        assert record["rollouts"] == 2 and 2 <= record["generated_tokens"] <= 8
