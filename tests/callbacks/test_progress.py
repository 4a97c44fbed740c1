"""PhaseProgressBar and the phase timer: phase seconds are measured, logged and rendered by a real Trainer run."""

from __future__ import annotations

import time

import pytest
import rich

from sdlit.callbacks.progress import PhaseProgressBar, phase_items
from sdlit.cli import run_cli
from sdlit.timing import PHASES, PhaseTimer

from conftest import write_config


def test_phase_items_by_hand():
    items = phase_items({"rollout": 1.0, "feedback": 0.5, "teacher": 0.25, "student": 0.25}, 100, 4.0)
    assert items == {
        "rollout": "1.00s 25%", "feedback": "0.50s 12%", "teacher": "0.25s 6%", "student": "0.25s 6%",
        "other": "2.00s 50%", "tok/s": "25",
    }
    # unknown step time: shares of the phases' sum, no "other"
    assert phase_items({"rollout": 3.0, "student": 1.0}, 8, None) == {
        "rollout": "3.00s 75%", "student": "1.00s 25%", "tok/s": "2"}


def test_phase_timer_accumulates_and_finishes_steps():
    timer = PhaseTimer()
    with timer.phase("rollout"):
        time.sleep(0.02)
    with timer.phase("rollout"):
        time.sleep(0.01)
    with pytest.raises(RuntimeError), timer.phase("teacher"):
        raise RuntimeError("a failing phase is still timed")
    timer.add_tokens(7)
    last = timer.finish_step()
    assert last["rollout"] >= 0.03 and "teacher" in last and timer.last_tokens == 7
    assert timer.current == {} and timer.current_tokens == 0


def test_bar_renders_phases_of_a_real_run(tmp_path, tiny_model_dir):
    bar = {"class_path": "sdlit.callbacks.PhaseProgressBar",
           "init_args": {"console_kwargs": {"record": True, "force_terminal": True, "width": 250}}}
    config = write_config(tmp_path, tiny_model_dir, callbacks=["BinaryReward", "StepCritique", bar],
                          extra_trainer={"max_steps": 3, "enable_progress_bar": True})
    try:
        cli = run_cli(["fit", "--config", config])
        text = rich.get_console().export_text()  # what the bar rendered
    finally:
        rich.reconfigure()  # the bar reconfigured rich's global console (recording): give the default back
    trainer, module = cli.trainer, cli.model
    (used,) = [c for c in trainer.callbacks if isinstance(c, PhaseProgressBar)]
    assert trainer.progress_bar_callback is used
    for name in (*PHASES, "other", "tok/s", "train/loss"):
        assert f"{name}: " in text, name
    # the module logged the phase times of the last step, and they fit inside the step's wall time
    logged = {p: float(trainer.callback_metrics[f"time/{p}"]) for p in PHASES}
    assert all(seconds > 0 for seconds in logged.values()), logged
    assert sum(module.phase_timer.last.values()) <= used.step_seconds
    assert module.phase_timer.last_tokens > 0
    shown = used.get_metrics(trainer, module)
    assert shown["rollout"].endswith("%") and float(shown["tok/s"]) > 0
