"""bench/gpu_check.py: the dry run on CPU writes both report files with every stage, and pytest counts are read."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest

from conftest import REPO_ROOT, load_bench_script, subprocess_env

STATUSES = {"ok", "partial", "failed", "skipped", "timeout"}


def test_junit_counts_and_status(tmp_path):
    stages = load_bench_script("gpu_stages")
    junit = tmp_path / "junit.xml"
    junit.write_text(
        '<testsuites><testsuite name="pytest">'
        '<testcase classname="tests.kernels.test_a" name="test_ok" />'
        '<testcase classname="tests.kernels.test_a" name="test_bad">'
        '<failure message="assert 1 == 2&#10;more" /></testcase>'
        '<testcase classname="tests.kernels.test_a" name="test_skip"><skipped message="needs a GPU" /></testcase>'
        "</testsuite></testsuites>"
    )
    counts = stages.junit_counts(junit)
    assert {k: counts[k] for k in ("tests", "passed", "failed", "errors", "skipped")} == {
        "tests": 3, "passed": 1, "failed": 1, "errors": 0, "skipped": 1}
    assert counts["failures"] == ["tests.kernels.test_a::test_bad: assert 1 == 2"]
    assert stages.tests_status({"a.py": counts}) == "failed"
    assert stages.tests_status({"a.py": {"tests": 1, "skipped": 1}}) == "skipped"
    assert stages.tests_status({"a.py": {"tests": 2, "passed": 2}}) == "ok"


def test_divergence_goals_say_met_or_missed_as_measured():
    stages = load_bench_script("gpu_stages")
    rows = [
        {"kind": "jsd", "input": "logits", "variant": "sdlit", "ms": 5.0, "share_of_copy": 0.8, "loss_per_token": 1},
        {"kind": "jsd", "input": "logits", "variant": "liger_jsd", "ms": 4.0, "share_of_copy": 0.9,
         "loss_per_token": 1},
        {"kind": "jsd", "input": "hidden", "variant": "sdlit", "ms": 7.0, "peak_extra_mib": 10, "loss_per_token": 1},
        {"kind": "jsd", "input": "hidden", "variant": "liger_fused_linear_jsd", "ms": 8.0, "peak_extra_mib": 20,
         "loss_per_token": 1},
        {"kind": "forward_kl", "input": "hidden", "variant": "naive", "error": "OutOfMemoryError: CUDA out of memory"},
    ]
    goals = "\n".join(stages.divergence_goals({"rows": rows}))
    assert "jsd: per_token_divergence at 80% of the copy bandwidth (goal >= 70%): met" in goals
    assert "against liger_jsd 4.00 ms (goal: faster): missed" in goals
    assert "(goal: no slower, no more memory): met" in goals
    table = "\n".join(stages.divergence_tables({"rows": rows, "copy": {"gb_per_s": 4400.0, "bytes_moved": 1.5e10}}))
    assert "device copy: 4400 GB/s (15 GB moved)" in table
    assert "| forward_kl | hidden | naive | OutOfMemoryError: CUDA out of memory |" in table


@pytest.mark.slow
def test_dry_run_writes_every_stage(tmp_path):
    out = tmp_path / "check"
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "bench" / "gpu_check.py"), "--dry-run", "--out", str(out)],
                          cwd=REPO_ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads((out / "gpu_check.json").read_text())
    markdown = (out / "gpu_check.md").read_text()

    assert report["dry_run"] is True and report["versions"]["torch"]
    assert set(report["stages"]) == {"1", "2", "3", "4", "5"}
    assert all(stage["status"] in STATUSES for stage in report["stages"].values())
    assert report["stages"]["1"]["status"] == "skipped"  # the CUDA tests skip themselves on CPU
    ran = {n: s for n, s in report["stages"].items() if n != "1"}
    assert {n: s["status"] for n, s in ran.items()} == {n: "ok" for n in ran}, [s.get("error") for s in ran.values()]
    for number, stage in ran.items():
        assert stage["figures"], number
        for name, value in stage["figures"].items():
            assert isinstance(value, (int, float)) and value > 0, (number, name, value)
    figures = {f"{n}:{k}" for n, s in ran.items() for k in s["figures"]}
    expected = {"2:copy/gb_per_s", "2:jsd/logits/sdlit/ms", "2:forward_kl/hidden/sdlit/ms",
                "3:reference/sdlit/s_per_step", "3:grpo/sdlit, no fused output head/s_per_step",
                "4:4_rows/sdlit_vs_generate", "5:ema (full)/seconds", "5:base/seconds"}
    if importlib.util.find_spec("trl"):  # the bench extra; without it the stage says it skipped TRL
        expected |= {"3:reference/trl/s_per_step", "3:grpo/sdlit_vs_trl/time"}
    else:
        assert "TRL rows skipped" in markdown
    assert expected <= figures, expected - figures
    for line in ("Liger-Kernel rows skipped", "| ema (full) | ok |", "vLLM engine rows: absent",
                 "test_kernels_cuda.py"):
        assert line in markdown
