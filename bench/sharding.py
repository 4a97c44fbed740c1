"""What sharding costs and saves: the same ``sdlit fit`` on 2 processes with DDP and with FSDP2, in one run.

Full fine-tuning of the packaged SmolLM2-135M-Instruct with the EMA teacher (the setting whose weights, gradients,
Adam moments and EMA copy FSDP2 splits across the ranks), reference-solution self-distillation on ``Arith``
problems, ``--steps`` optimizer steps, 2 problems per rank and step, on 2 CPU processes with gloo (one thread each).
Per strategy, each rank reports (``bench/sharding_meter.py``, a Lightning callback):

- the bytes it holds of the trained state: weights, gradients, optimizer state and the EMA teacher (exact, from
  the tensors: its own shards under FSDP2);
- its peak RSS (``resource.getrusage``): everything the process touched, Python, torch and the gathered weights of
  the sampling calls included;
- the seconds of each training step (rollouts, teacher, student, backward, optimizer), the mean over the steps
  after the first.

The table gives each figure for DDP and FSDP2 and the ratio FSDP2 / DDP, measured in the same run; it is written to
``results/sharding.md`` and ``.json``.

    python bench/sharding.py                      # 4 steps each, SmolLM2
    python bench/sharding.py --steps 2 --model /path/to/model --out /tmp/sharding
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
STRATEGIES = ("ddp", "fsdp2")


def fit_config(folder: Path, model: str, steps: int, max_new_tokens: int) -> Path:
    """The benchmark's ``sdlit fit`` config: full fine-tuning, EMA teacher, reference-solution self-distillation."""
    config = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu", "devices": 2, "max_steps": steps, "logger": False, "enable_checkpointing": False,
            "enable_progress_bar": False, "enable_model_summary": False, "limit_val_batches": 0,
            "num_sanity_val_steps": 0, "default_root_dir": str(folder),
            "callbacks": [{"class_path": "sdlit.callbacks.ReferenceSolution"},
                          {"class_path": "sharding_meter.ShardingMeter", "init_args": {"out_dir": str(folder)}}],
        },
        "model": {"class_path": "sdlit.module.SelfDistillationModule",
                  "init_args": {"model": model, "lora": None, "teacher": "ema", "learning_rate": 1e-6}},
        "data": {"class_path": "sdlit.data.RolloutDataModule",
                 "init_args": {"task": {"class_path": "sdlit.tasks.arith.Arith",
                                        "init_args": {"train_size": 64, "eval_size": 2}},
                               "batch_size": 2, "rollouts_per_problem": 1,
                               "sampling": {"max_new_tokens": max_new_tokens}}},
    }
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def run_strategy(strategy: str, args, scratch: Path) -> dict:
    """One ``sdlit fit`` on 2 processes with ``strategy``; the ranks' reports and the wall time."""
    folder = scratch / strategy
    folder.mkdir()
    config = fit_config(folder, args.model, args.steps, args.max_new_tokens)
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "bench"), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "sdlit.cli", "fit", "--config", str(config), "--trainer.strategy", strategy]
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=folder)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"sdlit fit --trainer.strategy {strategy} failed:\n{done.stderr[-4000:]}")
    ranks = [json.loads((folder / f"meter-rank{r}.json").read_text()) for r in (0, 1)]
    return {"wall_seconds": seconds, "ranks": ranks}


def summary(run: dict) -> dict:
    """Per-rank means of the figures the table shows."""
    ranks = run["ranks"]
    return {
        "state_mib": statistics.mean(r["state_bytes"]["total"] for r in ranks) / 2**20,
        "weights_mib": statistics.mean(r["state_bytes"]["weights"] for r in ranks) / 2**20,
        "peak_rss_mib": statistics.mean(r["peak_rss_mib"] for r in ranks),
        "step_seconds": statistics.mean(statistics.mean(r["step_seconds"][1:] or r["step_seconds"]) for r in ranks),
    }


def table(results: dict) -> list[str]:
    ddp, fsdp = summary(results["ddp"]), summary(results["fsdp2"])
    rows = [("trained state per rank (weights, grads, Adam, EMA), MiB", "state_mib", "{:.0f}"),
            ("of which weights, MiB", "weights_mib", "{:.0f}"),
            ("peak RSS per rank, MiB", "peak_rss_mib", "{:.0f}"),
            ("seconds per step (mean after the first)", "step_seconds", "{:.2f}")]
    lines = ["| per rank | DDP | FSDP2 | FSDP2 / DDP |", "|---|---|---|---|"]
    for label, key, fmt in rows:
        lines.append(f"| {label} | {fmt.format(ddp[key])} | {fmt.format(fsdp[key])} | {fsdp[key] / ddp[key]:.2f}x |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--out", default=str(ROOT / "results" / "sharding"))
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as scratch:
        for strategy in STRATEGIES:
            results[strategy] = run_strategy(strategy, args, Path(scratch))
            print(f"{strategy}: {json.dumps(summary(results[strategy]))}", flush=True)
    lines = table(results)
    machine = f"{platform.machine()}, {os.cpu_count()} CPU cores, {platform.python_version()}"
    command = "python bench/sharding.py " + " ".join(sys.argv[1:])
    text = "\n".join([
        f"# Sharding: DDP against FSDP2 on 2 processes ({args.model})", "",
        f"`{command.strip()}` on {machine}; full fine-tuning with the EMA teacher, {args.steps} steps of 2 problems "
        f"per rank, up to {args.max_new_tokens} new tokens, fp32, gloo, one thread per process; per-rank means.", "",
        *lines, "",
        f"Wall time of the whole run: DDP {results['ddp']['wall_seconds']:.0f} s, "
        f"FSDP2 {results['fsdp2']['wall_seconds']:.0f} s.", ""])
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(text)
    out.with_suffix(".json").write_text(json.dumps({"command": command, "machine": machine, "args": vars(args),
                                                    "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
