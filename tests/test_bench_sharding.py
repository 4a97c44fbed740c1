"""bench/sharding.py on the tiny model: both strategies run, and FSDP2 holds half the trained state per rank."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import REPO_ROOT, subprocess_env


def test_sharding_benchmark_halves_the_state_each_rank_holds(tmp_path, tiny_model_dir):
    out = tmp_path / "sharding"
    cmd = [sys.executable, str(REPO_ROOT / "bench" / "sharding.py"), "--model", tiny_model_dir, "--steps", "2",
           "--max-new-tokens", "8", "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=400, env=subprocess_env())
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.with_suffix(".json").read_text())["results"]
    for strategy in ("ddp", "fsdp2"):
        ranks = report[strategy]["ranks"]
        assert [len(r["step_seconds"]) for r in ranks] == [2, 2]
        assert all(r["state_bytes"]["gradients"] > 0 and r["state_bytes"]["ema_teacher"] > 0 for r in ranks)
    ddp = report["ddp"]["ranks"][0]["state_bytes"]
    fsdp = [r["state_bytes"] for r in report["fsdp2"]["ranks"]]
    for part in ("weights", "gradients", "optimizer", "ema_teacher"):  # the two ranks' shards make up one replica
        assert sum(f[part] for f in fsdp) == ddp[part], part
        assert max(f[part] for f in fsdp) < 0.6 * ddp[part], part
    assert "| FSDP2 / DDP |" in out.with_suffix(".md").read_text()
