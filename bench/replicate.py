"""Replicate the paper's three-way comparison (GRPO vs reference solution vs step-aligned critique) in one command.

Stages, each a real `sdlit` run whose config is written into its run directory first:

1. warm start: `sdlit fit` of configs/replication/warmstart.yaml (objective sft on step-tagged `arith`
   reference solutions), exported with LoRA merged;
2. filter: `sdlit validate` of configs/replication/filter.yaml: Avg@n of the warm-started solver on candidate
   problems; those in the band (0, 5/16) become the train / held-out split;
3. per seed: the warm start's held-out Avg@12 (step 0), then `sdlit fit` of configs/replication/{grpo,reference,
   critique}.yaml: same solver, problems, batch and epochs, held-out Avg@12 / Pass@12 / Maj@12 / mean length
   every `--eval-every` steps.

After every stage the results are rebuilt from the held-out sample files the runs wrote (never typed in):
results/replication.md (best checkpoint per metric and its step, per-token advantage regions), replication.png
(held-out Avg@12 against training step) and replication.json. Interrupted, it resumes where it stopped: finished
stages are skipped and a fit that was cut short continues from its last.ckpt.

    python bench/replicate.py                      # the whole CPU budget (see README)
    python bench/replicate.py --seeds 0 --epochs 1  # a shorter run
"""

from __future__ import annotations

import argparse
import csv
import functools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs" / "replication"
CONDITIONS = ("grpo", "reference", "critique")
LABELS = {"grpo": "GRPO (binary reward, n=8)", "reference": "Reference solution (n=1)",
          "critique": "Step-aligned critique (n=1)", "warm": "Warm start (step 0)"}
METRICS = ("avg", "pass", "maj", "mean_length")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/replication", help="run directories (checkpoints, logs, samples)")
    p.add_argument("--results", default="results", help="where replication.md / .png / .json go")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="one training run per condition and seed")
    p.add_argument("--conditions", nargs="+", default=list(CONDITIONS), choices=CONDITIONS)
    p.add_argument("--warmstart-steps", type=int, default=None, help="default: warmstart.yaml's max_steps")
    p.add_argument("--candidates", type=int, default=None, help="problems the filter scores (filter.yaml)")
    p.add_argument("--filter-k", type=int, default=None, help="samples per candidate (n of Avg@n; filter.yaml)")
    p.add_argument("--held-out", type=int, default=None, help="kept problems held out (filter.yaml)")
    p.add_argument("--epochs", type=int, default=None, help="training epochs of every condition")
    p.add_argument("--eval-every", type=int, default=None, help="held-out evaluation every N optimizer steps")
    p.add_argument("--threads", type=int, default=None, help="torch threads of each run (default: torch's)")
    return p.parse_args(argv)


# ---- configs ----------------------------------------------------------------------------------------------
def callback(config: dict, suffix: str) -> dict | None:
    """The init_args of the first callback whose class_path ends with ``suffix`` (None if absent)."""
    for cb in config["trainer"].get("callbacks") or []:
        if cb["class_path"].endswith(suffix):
            return cb.setdefault("init_args", {})
    return None


def run_config(name: str, run_dir: Path, seed: int = 0, **settings) -> dict:
    """A stage's YAML with every path pointed into ``run_dir`` and the given settings applied."""
    config = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())
    config["seed_everything"] = seed
    trainer, model, data = config["trainer"], config["model"]["init_args"], config["data"]["init_args"]
    trainer["default_root_dir"] = str(run_dir)  # loggers, checkpoints and the HF export follow it
    band_filter = callback(config, "ProblemBandFilter")
    if band_filter is not None and settings.get("split_dir") is not None:
        band_filter["output_dir"] = str(settings["split_dir"])
    if settings.get("model"):
        model["model"] = str(settings["model"])
    task = data["task"].setdefault("init_args", {})
    if settings.get("split_dir") and "train_path" in task:
        task["train_path"] = str(settings["split_dir"] / "train.jsonl")
        task["eval_path"] = str(settings["split_dir"] / "eval.jsonl")
    for key, value in settings.get("trainer", {}).items():
        if value is not None:
            trainer[key] = value
    for key, value in settings.get("data", {}).items():  # "evaluation.k": a key of a settings group
        *groups, name = key.split(".")
        if value is not None:
            target = data
            for group in groups:
                target = target.setdefault(group, {})
            target[name] = value
    for key, value in settings.get("task", {}).items():
        if value is not None:
            task[key] = value
    for key, value in settings.get("callbacks", {}).items():
        suffix, arg = key.split(".")
        if value is not None:
            callback(config, suffix)[arg] = value
    return config


def run_sdlit(command: str, config: dict, run_dir: Path, threads: int | None, resume: bool = False) -> float:
    """Write ``config`` to ``run_dir/config.yaml`` and run ``sdlit <command>`` on it; return its wall seconds."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    args = [sys.executable, "-m", "sdlit.cli", command, "--config", str(path)]
    last = run_dir / "checkpoints" / "last.ckpt"
    if resume and last.exists():
        args += ["--ckpt_path", str(last)]
        print(f"   resuming from {last}", flush=True)
    env = dict(os.environ)
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    started = time.perf_counter()
    with open(run_dir / f"{command}.log", "a") as log:
        code = subprocess.run(args, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    if code != 0:
        raise SystemExit(f"sdlit {command} failed (exit {code}): see {run_dir / (command + '.log')}")
    return time.perf_counter() - started


# ---- held-out metrics from the sample files ----------------------------------------------------------------
def sample_files(run_dir: Path) -> list[Path]:
    """The held-out sample CSVs a run wrote (AvgAtKEvaluation), oldest step first."""
    return sorted(run_dir.glob("logs/version_*/samples/val_step*.csv"))


def evaluation_metrics(path: Path) -> dict:
    """Avg@k / Pass@k / Maj@k / mean length of one evaluation, recomputed from its samples with sdlit.metrics."""
    import torch

    from sdlit.metrics import AvgAtK, MajAtK, PassAtK

    problems: dict[str, list[dict]] = {}
    for row in csv.DictReader(open(path, newline="")):
        problems.setdefault(row["problem"], []).append(row)
    rows = [sorted(group, key=lambda r: int(r["sample"])) for group in problems.values()]
    k = min(len(group) for group in rows)
    correct = torch.tensor([[r["correct"] == "True" for r in group[:k]] for group in rows])
    answers = [[r["extracted"] or None for r in group[:k]] for group in rows]
    scores = {}
    for name, metric in (("avg", AvgAtK(k)), ("pass", PassAtK(k)), ("maj", MajAtK(k))):
        metric.update(correct, answers)
        scores[name] = float(metric.compute())
    scores["mean_length"] = sum(int(r["tokens"]) for g in rows for r in g[:k]) / (k * len(rows))
    scores.update(step=int(rows[0][0]["step"]), problems=len(rows), k=k)
    return scores


def advantage_regions(run_dir: Path) -> dict:
    """Mean over training steps of the logged per-token advantage region statistics (advantage/*)."""
    sums: dict[str, list[float]] = {}
    for path in run_dir.glob("logs/version_*/metrics.csv"):
        for row in csv.DictReader(open(path, newline="")):
            for key, value in row.items():
                if key.startswith("advantage/") and value not in ("", None):
                    sums.setdefault(key.removeprefix("advantage/"), []).append(float(value))
    return {key: sum(v) / len(v) for key, v in sorted(sums.items())}


# ---- results -----------------------------------------------------------------------------------------------
def collect(out: Path, conditions: list[str]) -> dict:
    """Every evaluation of every seed run so far (any ``seed*`` directory) and condition, plus the advantage
    statistics; a later invocation with other ``--seeds`` adds to the same results."""
    runs = {}
    seeds = sorted(int(p.name.removeprefix("seed")) for p in out.glob("seed*") if p.name[4:].isdigit())
    for seed in seeds:
        warm = [evaluation_metrics(p) for p in sample_files(out / f"seed{seed}" / "warm")]
        for condition in conditions:
            run_dir = out / f"seed{seed}" / condition
            curve = warm[:1] + [evaluation_metrics(p) for p in sample_files(run_dir)]
            if len(curve) > 1:
                runs[f"{condition}/seed{seed}"] = {
                    "condition": condition, "seed": seed, "curve": curve,
                    "advantage": advantage_regions(run_dir), "finished": (run_dir / "done.json").exists(),
                }
    return runs


def best(curve: list[dict], metric: str) -> dict:
    """The training evaluation (step > 0) with the highest ``metric``; the earliest one on ties."""
    trained = [e for e in curve if e["step"] > 0] or curve
    return max(trained, key=lambda e: (e[metric], -e["step"]))


def spread(values: list[float], scale: float = 100.0) -> str:
    """Mean over seeds, with min-max when there are several."""
    mean = sum(values) / len(values) * scale
    if len(values) == 1:
        return f"{mean:.2f}"
    return f"{mean:.2f} ({min(values) * scale:.2f}-{max(values) * scale:.2f})"


def results_table(runs: dict, conditions: list[str]) -> list[str]:
    lines = ["| condition | seeds | best Avg@12 (step) | best Pass@12 (step) | best Maj@12 (step) "
             "| mean length at best Avg@12 |",
             "|---|---|---|---|---|---|"]
    warm = [r["curve"][0] for r in runs.values() if r["curve"][0]["step"] == 0]
    by_seed = {r["seed"]: r["curve"][0] for r in runs.values() if r["curve"][0]["step"] == 0}
    if warm:
        first = list(by_seed.values())
        cells = [spread([e[m] for e in first]) + " (0)" for m in ("avg", "pass", "maj")]
        lines.append(f"| {LABELS['warm']} | {len(first)} | " + " | ".join(cells)
                     + f" | {spread([e['mean_length'] for e in first], 1.0)} |")
    for condition in conditions:
        group = [r for r in runs.values() if r["condition"] == condition]
        if not group:
            continue
        cells = []
        for metric in ("avg", "pass", "maj"):
            picks = [best(r["curve"], metric) for r in group]
            steps = "/".join(str(p["step"]) for p in picks)
            cells.append(f"{spread([p[metric] for p in picks])} ({steps})")
        lengths = [best(r["curve"], "avg")["mean_length"] for r in group]
        done = "" if all(r["finished"] for r in group) else " (unfinished)"
        lines.append(f"| {LABELS[condition]}{done} | {len(group)} | " + " | ".join(cells)
                     + f" | {spread(lengths, 1.0)} |")
    return lines


def curves_table(runs: dict) -> list[str]:
    lines = ["| run | step | Avg@12 | Pass@12 | Maj@12 | mean length |", "|---|---|---|---|---|---|"]
    for name, run in sorted(runs.items()):
        for e in run["curve"]:
            lines.append(f"| {name} | {e['step']} | {e['avg'] * 100:.2f} | {e['pass'] * 100:.2f} | "
                         f"{e['maj'] * 100:.2f} | {e['mean_length']:.1f} |")
    return lines


def advantage_table(runs: dict) -> list[str]:
    lines = ["| run | region | mean A_t | mean abs A_t | negative fraction |", "|---|---|---|---|---|"]
    for name, run in sorted(runs.items()):
        adv = run["advantage"]
        for region in ("before", "at", "after", "all"):
            if f"{region}_mean" in adv:
                lines.append(f"| {name} | {region} | {adv[f'{region}_mean']:+.4f} | {adv.get(f'{region}_abs', 0):.4f} "
                             f"| {adv.get(f'{region}_neg_frac', 0):.3f} |")
    return lines


def plot(runs: dict, path: Path) -> None:
    """Held-out Avg@12 against training step: one line per seed, the mean across seeds bold."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    colors = {"grpo": "tab:gray", "reference": "tab:blue", "critique": "tab:red"}
    for condition in CONDITIONS:
        group = [r["curve"] for r in runs.values() if r["condition"] == condition]
        if not group:
            continue
        for curve in group:
            ax.plot([e["step"] for e in curve], [e["avg"] * 100 for e in curve], color=colors[condition],
                    alpha=0.35, linewidth=1)
        steps = sorted(set.intersection(*[{e["step"] for e in c} for c in group]))
        mean = [sum(next(e["avg"] for e in c if e["step"] == s) for c in group) / len(group) * 100 for s in steps]
        ax.plot(steps, mean, color=colors[condition], linewidth=2.2, marker="o", label=LABELS[condition])
    batch = yaml.safe_load((CONFIGS / "grpo.yaml").read_text())["data"]["init_args"]["batch_size"]
    ax.set_xlabel(f"training step (optimizer steps of {batch} problems)")
    ax.set_ylabel("held-out Avg@12 (%)")
    ax.set_title("SmolLM2-135M, warm-started on arith: held-out Avg@12")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_results(out: Path, results: Path, args, state: dict) -> None:
    runs = collect(out, list(CONDITIONS))
    if not runs:
        return
    results.mkdir(parents=True, exist_ok=True)
    split = json.loads((out / "split" / "filter.json").read_text())
    wall = sum(state["seconds"].values())
    text = [
        "# Replication: GRPO vs reference solution vs step-aligned critique",
        "",
        f"Written by `{state.get('command', 'python bench/replicate.py')}` on {state['machine']}.",
        f"Wall time of the stages so far: {wall / 60:.1f} min "
        + "(" + ", ".join(f"{k} {v / 60:.1f}" for k, v in state["seconds"].items()) + ").",
        "",
        f"Problems: {split['kept']} of {split['candidates']} candidate `arith` problems had the warm-started "
        f"solver's Avg@{split['problems'][0]['n']} in ({split['low']:g}, {split['high']:g}); "
        f"{split['train']} train, {split['held_out']} held out. Values in % as mean over seeds "
        "(min-max); the step of each seed's best checkpoint in parentheses.",
        "",
        *results_table(runs, list(CONDITIONS)),
        "",
        f"![held-out Avg@12]({'replication.png'})",
        "",
        "## Every evaluation",
        "",
        *curves_table(runs),
        "",
        "## Per-token advantage by region (training rollouts; first error placed by the rule-based critic)",
        "",
        *advantage_table(runs),
        "",
    ]
    (results / "replication.md").write_text("\n".join(text))
    (results / "replication.json").write_text(json.dumps({"runs": runs, "split": {k: v for k, v in split.items()
                                                          if k != "problems"}, "state": state}, indent=1) + "\n")
    plot(runs, results / "replication.png")


# ---- stages ------------------------------------------------------------------------------------------------
def stage(state: dict, state_path: Path, name: str, done: Path, work) -> None:
    """Run ``work`` unless ``done`` exists; add its wall time to the state file."""
    if done.exists():
        print(f"== {name}: done already ({done})", flush=True)
        return
    print(f"== {name}", flush=True)
    seconds = work()
    state["seconds"][name] = state["seconds"].get(name, 0.0) + seconds
    state_path.write_text(json.dumps(state, indent=1) + "\n")
    print(f"   {seconds / 60:.1f} min", flush=True)


def main(argv=None) -> None:
    args = parse_args(argv)
    out, results = (ROOT / args.out).resolve(), (ROOT / args.results).resolve()
    out.mkdir(parents=True, exist_ok=True)
    state_path = out / "state.json"
    state = json.loads(state_path.read_text()) if state_path.exists() else {"seconds": {}}
    state["machine"] = machine()
    state["command"] = " ".join(["python bench/replicate.py", *(sys.argv[1:] if argv is None else argv)])
    warm_dir, split_dir = out / "warmstart", out / "split"
    warm_model = warm_dir / "hf"

    stage(state, state_path, "warmstart", warm_model / "sdlit_export.json", lambda: run_sdlit(
        "fit", run_config("warmstart", warm_dir, trainer={"max_steps": args.warmstart_steps}),
        warm_dir, args.threads, resume=True))
    stage(state, state_path, "filter", split_dir / "filter.json", lambda: run_sdlit(
        "validate", run_config("filter", out / "filter", model=warm_model, split_dir=split_dir,
                               data={"evaluation.k": args.filter_k}, task={"eval_size": args.candidates},
                               callbacks={"ProblemBandFilter.held_out": args.held_out}),
        out / "filter", args.threads))
    for seed in args.seeds:
        seed_dir = out / f"seed{seed}"
        common = dict(model=warm_model, split_dir=split_dir, trainer={"max_epochs": args.epochs},
                      callbacks={"AvgAtKEvaluation.every_n_steps": args.eval_every})
        warm_eval = seed_dir / "warm"
        stage(state, state_path, f"seed{seed}/warm", warm_eval / "done.json", functools.partial(
            finished_run, "validate", run_config("critique", warm_eval, seed, **common), warm_eval, args.threads))
        for condition in args.conditions:
            run_dir = seed_dir / condition
            stage(state, state_path, f"seed{seed}/{condition}", run_dir / "done.json", functools.partial(
                finished_run, "fit", run_config(condition, run_dir, seed, **common), run_dir, args.threads,
                resume=True))
            write_results(out, results, args, state)
    write_results(out, results, args, state)
    print(f"results: {results / 'replication.md'}", flush=True)


def finished_run(command: str, config: dict, run_dir: Path, threads: int | None, resume: bool = False) -> float:
    """``run_sdlit``, then the run marked finished (:func:`finish`); its wall seconds."""
    return finish(run_dir, run_sdlit(command, config, run_dir, threads, resume))


def finish(run_dir: Path, seconds: float) -> float:
    """Mark a run finished (so a rerun skips it) and pass its wall time on."""
    (run_dir / "done.json").write_text(json.dumps({"seconds": seconds}) + "\n")
    return seconds


def machine() -> str:
    """A short description of this machine: CPU count and model, or the GPU."""
    import platform

    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} (torch {torch.__version__})"
    threads = torch.get_num_threads()
    return f"{os.cpu_count()}-core {platform.machine()} CPU, no GPU (torch {torch.__version__}, {threads} threads)"


if __name__ == "__main__":
    main()
