"""Replicate the paper's three-way comparison with confidence intervals: does GRPO, the reference solution or the
step-aligned critique beat the warm start on held-out problems, and by how much?

Stages, each a real `sdlit` run whose config is written into its run directory first:

1. warmstart: `sdlit fit` of configs/replication/warmstart.yaml (objective sft on step-tagged `arith` reference
   solutions), exported with LoRA merged. The export's sha256 is recorded: every later run, in any session, must
   start from the same solver.
2. filter: `sdlit validate` of configs/replication/filter.yaml: Avg@8 of the warm-started solver on fresh `arith`
   problems; those in the paper's band (0, 5/16) are split into held-out (the headline), validation (choosing the
   learning rate and the checkpoint) and training problems (the rest).
3. per seed: the warm start's Avg@12 on the validation and held-out problems (step 0), then `sdlit fit` of each
   condition (configs/replication/{grpo,reference,critique}.yaml): same solver, training problems, batch and
   epochs; 8 rollouts per problem for GRPO, 1 for self-distillation; Avg@12 on validation + held-out every
   `--eval-every` steps and at the end. Seed 0 runs every learning rate of `--lr-grid`; each condition then keeps
   the rate whose best checkpoint scores highest on the validation problems, and the later seeds run that rate.

What every finished run measured is kept in `results/replication/` (the split, per-problem scores of every
evaluation, training curves, advantage statistics): committed, so a later session or machine resumes from it.
`runs/replication/` is scratch (checkpoints, sample files; a cut fit resumes from its last.ckpt). After every run
results/replication.md, .png and .json, and the status blocks of README.md and docs/replication.md, are rebuilt from
the records (bench/replication_report.py; `python bench/replication_report.py` rebuilds them without running
anything).

    python bench/replicate.py                 # the whole CPU design (docs/replication.md); resumes where it stopped
    python bench/replicate.py --seeds 0       # stop after seed 0 (the learning-rate grid)
    python bench/replicate.py --gpu           # a bigger solver and budget for a GPU machine
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import replication_report as report  # noqa: E402

CONFIGS = ROOT / "configs" / "replication"
CONDITIONS = report.CONDITIONS
STATUS_FILES = {ROOT / name: link for name, link in report.STATUS_FILES.items()}
SPLIT_FILES = ("train.jsonl", "validation.jsonl", "eval.jsonl", "filter.json")

# The CPU design (the defaults) and the GPU one (--gpu): a bigger solver and budget, bf16, vLLM rollouts.
CPU = dict(base_model=None, seeds=[0, 1, 2], lr_grid=[1e-4, 3e-4], steps=[2, 3], candidates=480, filter_k=8,
           held_out=48, validation=24, train_problems=32, epochs=2, eval_every=8, max_new_tokens=96, threads=None,
           accelerator=None, precision=None, sampler=None, lora_r=None)
GPU = dict(CPU, base_model="Qwen/Qwen3-1.7B", seeds=[0, 1, 2, 3, 4], lr_grid=[5e-6, 2e-5, 5e-5], steps=[4, 8],
           candidates=4000, filter_k=16, held_out=120, validation=60, train_problems=256, epochs=6, eval_every=16,
           max_new_tokens=512, accelerator="gpu", precision="bf16-mixed", sampler="vllm", lora_r=64)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gpu", action="store_true", help="the GPU design (bigger solver and budget); flags still apply")
    p.add_argument("--out", default="runs/replication", help="scratch run directories (checkpoints, samples)")
    p.add_argument("--results", default="results", help="replication.md/.png/.json here, records in replication/")
    p.add_argument("--seeds", type=int, nargs="+", help="training seeds; seed 0 runs the learning-rate grid")
    p.add_argument("--conditions", nargs="+", default=list(CONDITIONS), choices=CONDITIONS)
    p.add_argument("--lr-grid", type=float, nargs="+", help="learning rates every condition is tried with (seed 0)")
    p.add_argument("--base-model", help="the solver before the warm start (default: warmstart.yaml's)")
    p.add_argument("--warmstart-steps", type=int, help="default: warmstart.yaml's max_steps")
    p.add_argument("--steps", type=int, nargs=2, metavar=("MIN", "MAX"), help="operations per candidate problem")
    p.add_argument("--candidates", type=int, help="fresh problems the filter scores")
    p.add_argument("--filter-k", type=int, help="samples per candidate (n of the filter's Avg@n)")
    p.add_argument("--held-out", type=int, help="band problems held out for the headline numbers")
    p.add_argument("--validation", type=int, help="band problems for choosing learning rates and checkpoints")
    p.add_argument("--train-problems", type=int, help="band problems trained on (the same for every condition)")
    p.add_argument("--epochs", type=int, help="training epochs of every condition")
    p.add_argument("--eval-every", type=int, help="evaluation every N optimizer steps (and at the end)")
    p.add_argument("--max-new-tokens", type=int, help="longest answer, in rollouts and evaluations")
    p.add_argument("--threads", type=int, help="torch threads of each run (default: torch's)")
    args = p.parse_args(argv)
    for key, value in (GPU if args.gpu else CPU).items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    return args


# ---- configs ----------------------------------------------------------------------------------------------
def callback(config: dict, suffix: str) -> dict | None:
    """The init_args of the first callback whose class_path ends with ``suffix`` (None if absent)."""
    for cb in config["trainer"].get("callbacks") or []:
        if cb["class_path"].endswith(suffix):
            return cb.setdefault("init_args", {})
    return None


def set_key(target: dict, dotted: str, value) -> None:
    """Set ``a.b.c`` in nested dicts (created as needed); None leaves the YAML's value."""
    if value is None:
        return
    *groups, name = dotted.split(".")
    for group in groups:
        target = target.setdefault(group, {})
    target[name] = value


def run_config(name: str, run_dir: Path, seed: int = 0, **settings) -> dict:
    """A stage's YAML with every path pointed into ``run_dir`` and the given settings applied: ``model`` (the
    solver's path), ``split_dir``, and dotted keys under ``trainer``, ``module``, ``data``, ``task``, ``callbacks``
    (``"<class suffix>.<arg>"``)."""
    config = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())
    config["seed_everything"] = seed
    trainer, model, data = config["trainer"], config["model"]["init_args"], config["data"]["init_args"]
    trainer["default_root_dir"] = str(run_dir)  # loggers, checkpoints and the HF export follow it
    split_dir = settings.get("split_dir")
    band_filter = callback(config, "ProblemBandFilter")
    if band_filter is not None and split_dir is not None:
        band_filter["output_dir"] = str(split_dir)
    if settings.get("model"):
        model["model"] = str(settings["model"])
    task = data["task"].setdefault("init_args", {})
    if split_dir is not None and "train_path" in task:
        task["train_path"] = str(split_dir / "train.jsonl")
        task["eval_path"] = str(split_dir / "evaluation.jsonl")
    for group, target in (("trainer", trainer), ("module", model), ("data", data), ("task", task)):
        for key, value in settings.get(group, {}).items():
            set_key(target, key, value)
    for key, value in settings.get("callbacks", {}).items():
        suffix, arg = key.split(".")
        if value is not None:
            callback(config, suffix)[arg] = value
    return config


def common_settings(args) -> dict:
    """The settings every stage shares: device, precision, sampler and answer lengths."""
    return dict(
        trainer={"accelerator": args.accelerator, "precision": args.precision},
        data={"sampler": args.sampler, "sampling.max_new_tokens": args.max_new_tokens,
              "evaluation.max_new_tokens": args.max_new_tokens},
    )


def lora_settings(args) -> dict:
    """The LoRA rank of the trained stages (alpha = 2 r), when the design sets one."""
    return {"module": {"lora.r": args.lora_r, "lora.alpha": 2 * args.lora_r if args.lora_r else None}}


def training_settings(args, lr: float) -> dict:
    """What every condition shares when it trains: problems, epochs, evaluation schedule, LoRA, learning rate."""
    return merged(lora_settings(args), {
        "module": {"learning_rate": lr},
        "task": {"train_size": args.train_problems},
        "trainer": {"max_epochs": args.epochs},
        "callbacks": {"AvgAtKEvaluation.every_n_steps": args.eval_every},
    })


def design(args) -> dict:
    """The settings a run's record keeps, so the report can say what was run."""
    return {key: getattr(args, key) for key in ("train_problems", "epochs", "eval_every", "max_new_tokens")}


def merged(*parts: dict) -> dict:
    """Settings dicts merged group by group (later ones win)."""
    out: dict = {}
    for part in parts:
        for group, values in part.items():
            out[group] = {**out.get(group, {}), **values} if isinstance(values, dict) else values
    return out


# ---- sdlit runs -------------------------------------------------------------------------------------------
def run_sdlit(command: str, config: dict, run_dir: Path, threads: int | None, resume: bool = False) -> float:
    """Write ``config`` to ``run_dir/config.yaml`` and run ``sdlit <command>`` on it; return its wall seconds."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "config.yaml"
    last = run_dir / "checkpoints" / "last.ckpt"
    resuming = resume and last.exists()
    if resuming:
        log_into_new_version(config, run_dir)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    args = [sys.executable, "-m", "sdlit.cli", command, "--config", str(path)]
    if resuming:
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


def log_versions(run_dir: Path) -> list[Path]:
    """The run's logger folders (logs/version_N), oldest first."""
    found = [p for p in (run_dir / "logs").glob("version_*") if p.name.removeprefix("version_").isdigit()]
    return sorted(found, key=lambda p: int(p.name.removeprefix("version_")))


def log_into_new_version(config: dict, run_dir: Path) -> None:
    """Point a resumed fit's loggers at a new version folder. Reopening the old one would lose its history:
    Lightning's CSVLogger deletes the metrics.csv of a version it opens again."""
    versions = log_versions(run_dir)
    version = int(versions[-1].name.removeprefix("version_")) + 1 if versions else 0
    for logger in config["trainer"].get("logger") or []:
        logger.setdefault("init_args", {})["version"] = version


# ---- durable records --------------------------------------------------------------------------------------
def problem_splits(split_dir: Path) -> dict[str, tuple[str, str]]:
    """Question text -> (problem id of the filter, split: "validation" or "eval") of the evaluated problems."""
    splits = {}
    for split, name in (("validation", "validation.jsonl"), ("eval", "eval.jsonl")):
        for line in (split_dir / name).read_text().splitlines():
            row = json.loads(line)
            splits[row["question"].strip()] = (row["id"], split)
    return splits


def write_scores(run_dir: Path, record_dir: Path, splits: dict[str, tuple[str, str]]) -> None:
    """Every evaluation a run wrote (its samples files) as per-problem scores in ``record_dir/scores.csv``:
    step, problem, split, avg, pass, maj, length (sdlit.intervals.problem_scores)."""
    from sdlit.intervals import problem_scores, read_samples

    rows = []
    by_step = {}  # a step evaluated again after a resume: the later version's samples
    for version in log_versions(run_dir):
        for path in sorted(version.glob("samples/val_step*.csv")):
            by_step[path.name] = path
    for path in sorted(by_step.values(), key=lambda p: p.name):
        samples = read_samples(path)
        for problem, scores in problem_scores(samples).items():
            first = samples[problem][0]
            question = first["question"].strip()
            if question not in splits:
                raise ValueError(f"{path}: problem {problem!r} is in neither validation.jsonl nor eval.jsonl")
            rows.append({"step": int(first["step"]), "problem": splits[question][0], "split": splits[question][1],
                         **{k: round(v, 6) for k, v in scores.items()}})
    record_dir.mkdir(parents=True, exist_ok=True)
    with open(record_dir / "scores.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=report.SCORE_COLUMNS)
        writer.writeheader()
        writer.writerows(sorted(rows, key=lambda r: (r["step"], r["split"], r["problem"])))


def write_training(run_dir: Path, record_dir: Path) -> None:
    """Per optimizer step the training accuracy (the binary reward) and loss, and the mean per-token advantage
    statistics (advantage/*) of the run's metrics.csv files."""
    steps, per_step = {}, {}  # a step logged again after a resume: the later version's row
    for version in log_versions(run_dir):
        if not (version / "metrics.csv").exists():
            continue
        for row in csv.DictReader(open(version / "metrics.csv", newline="")):
            step = int(row["step"])
            if row.get("train/accuracy"):
                steps[step] = {"step": step, "accuracy": float(row["train/accuracy"]),
                               "loss": float(row["train/loss"]) if row.get("train/loss") else ""}
            logged = {k.removeprefix("advantage/"): float(v) for k, v in row.items()
                      if k.startswith("advantage/") and v not in ("", None)}
            if logged:
                per_step.setdefault(step, {}).update(logged)
    advantage = {}
    for step in sorted(per_step):
        for key, value in per_step[step].items():
            advantage.setdefault(key, []).append(value)
    with open(record_dir / "train.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=("step", "accuracy", "loss"))
        writer.writeheader()
        writer.writerows(steps[s] for s in sorted(steps))
    means = {key: sum(v) / len(v) for key, v in sorted(advantage.items())}
    (record_dir / "advantage.json").write_text(json.dumps(means, indent=1) + "\n")


def record_run(run_dir: Path, record_dir: Path, splits: dict, info: dict, training: bool) -> None:
    """A finished run's records, then ``run.json`` last (its presence marks the run finished)."""
    write_scores(run_dir, record_dir, splits)
    if training:
        write_training(run_dir, record_dir)
        missing = missing_evaluations(record_dir, info["eval_every"])
        if missing:
            print(f"   WARNING: no evaluation recorded at steps {missing} (a fit cut during one of them and resumed "
                  "after it); run.json lists them, the report marks the run", flush=True)
            info = {**info, "missing_evaluations": missing}
    (record_dir / "run.json").write_text(json.dumps(info, indent=1) + "\n")


def missing_evaluations(record_dir: Path, eval_every: int) -> list[int]:
    """The scheduled evaluation steps (every ``eval_every`` optimizer steps and the last) without scores."""
    trained = [int(r["step"]) for r in csv.DictReader(open(record_dir / "train.csv", newline=""))]
    if not trained:
        return []
    last = max(trained) + 1  # metrics count steps from 0; evaluations run after step N's update, named N
    scheduled = set(range(eval_every, last + 1, eval_every)) | {last}
    evaluated = {int(r["step"]) for r in csv.DictReader(open(record_dir / "scores.csv", newline=""))}
    return sorted(scheduled - evaluated)


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ---- stages -----------------------------------------------------------------------------------------------
def warm_start(args, out: Path, records: Path) -> Path:
    """The warm-started solver (trained here unless this session has it), checked against the recorded hash."""
    warm_dir = out / "warmstart"
    model = warm_dir / "hf"
    record = records / "warmstart.json"
    if not (model / "sdlit_export.json").exists():
        print("== warmstart", flush=True)
        config = run_config("warmstart", warm_dir, model=args.base_model, **merged(
            common_settings(args), lora_settings(args), {"trainer": {"max_steps": args.warmstart_steps}}))
        seconds = run_sdlit("fit", config, warm_dir, args.threads, resume=True)
        print(f"   {seconds / 60:.1f} min", flush=True)
        if not record.exists():
            record.parent.mkdir(parents=True, exist_ok=True)
            record.write_text(json.dumps({"seconds": seconds}) + "\n")
    digest = sha256(model / "model.safetensors")
    saved = json.loads(record.read_text()) if record.exists() else {}
    if saved.get("sha256") not in (None, digest):
        raise SystemExit(f"the warm start in {model} (sha256 {digest[:12]}) is not the one the records in {records} "
                         f"were trained from ({saved['sha256'][:12]}): the runs would not share a starting point. "
                         f"Run with another --results directory to start over.")
    if "sha256" not in saved:
        record.parent.mkdir(parents=True, exist_ok=True)
        record.write_text(json.dumps({**saved, "sha256": digest, "base_model": args.base_model}, indent=1) + "\n")
    return model


def band_split(args, out: Path, records: Path, model: Path) -> Path:
    """The train / validation / held-out problems: recorded ones if any, else the filter stage's."""
    split_dir = out / "split"
    kept = records / "split"
    if not (kept / "filter.json").exists():
        print("== filter", flush=True)
        config = run_config("filter", out / "filter", model=model, split_dir=split_dir, **merged(
            common_settings(args), {"data": {"evaluation.k": args.filter_k},
                                    "task": {"eval_size": args.candidates, "min_steps": args.steps[0],
                                             "max_steps": args.steps[1]},
                                    "callbacks": {"ProblemBandFilter.held_out": args.held_out,
                                                  "ProblemBandFilter.validation": args.validation}}))
        seconds = run_sdlit("validate", config, out / "filter", args.threads)
        print(f"   {seconds / 60:.1f} min", flush=True)
        kept.mkdir(parents=True, exist_ok=True)
        for name in SPLIT_FILES:
            shutil.copy(split_dir / name, kept / name)
        summary = json.loads((kept / "filter.json").read_text())
        (kept / "filter.json").write_text(json.dumps({**summary, "seconds": seconds}, indent=1) + "\n")
    split_dir.mkdir(parents=True, exist_ok=True)
    for name in SPLIT_FILES:
        shutil.copy(kept / name, split_dir / name)
    with open(split_dir / "evaluation.jsonl", "w") as f:  # one evaluation pass scores both
        for name in ("validation.jsonl", "eval.jsonl"):
            f.write((kept / name).read_text())
    return split_dir


def run_stage(args, out: Path, records: Path, name: str, command: str, config_name: str, seed: int,
              settings: dict, splits: dict, info: dict) -> None:
    """One run (warm evaluation or training), skipped when its record says it finished."""
    record_dir = records / "runs" / name
    if (record_dir / "run.json").exists():
        print(f"== {name}: recorded ({record_dir})", flush=True)
        return
    print(f"== {name}", flush=True)
    run_dir = out / name
    seconds = run_sdlit(command, run_config(config_name, run_dir, seed, **settings), run_dir, args.threads,
                        resume=command == "fit")
    record_run(run_dir, record_dir, splits, {**info, "seed": seed, "seconds": seconds}, training=command == "fit")
    print(f"   {seconds / 60:.1f} min", flush=True)


def main(argv=None) -> None:
    args = parse_args(argv)
    out, results = (ROOT / args.out).resolve(), (ROOT / args.results).resolve()
    records = results / "replication"
    out.mkdir(parents=True, exist_ok=True)
    command = " ".join(["python bench/replicate.py", *(sys.argv[1:] if argv is None else argv)])
    model = warm_start(args, out, records)
    split_dir = band_split(args, out, records, model)
    splits = problem_splits(split_dir)
    for seed in args.seeds:
        run_stage(args, out, records, f"seed{seed}/warm", "validate", "critique", seed,
                  merged(common_settings(args), {"model": model, "split_dir": split_dir}), splits,
                  {"condition": "warm", **design(args)})
        for condition in args.conditions:
            rates = args.lr_grid if seed == 0 else [report.chosen_rate(records, condition, args.lr_grid)]
            for lr in rates:
                settings = merged(common_settings(args), training_settings(args, lr),
                                  {"model": model, "split_dir": split_dir})
                run_stage(args, out, records, f"seed{seed}/{condition}/lr{lr:g}", "fit", condition, seed, settings,
                          splits, {"condition": condition, "lr": lr, **design(args)})
                publish(args, records, results, command)
    publish(args, records, results, command)
    print(f"results: {results / 'replication.md'}", flush=True)


def publish(args: argparse.Namespace, records: Path, results: Path, command: str) -> None:
    """Rebuild results/replication.md, .png, .json from the records; with the repository's own results folder,
    also the status blocks of README.md and docs/replication.md."""
    report.write(records, results, command, machine(), args.lr_grid)
    if results == ROOT / "results" and (records / "runs").exists():
        preset = GPU if args.gpu else CPU  # the design's progress, also when this invocation runs part of it
        seeds, conditions = sorted({*args.seeds, *preset["seeds"]}), sorted({*args.conditions, *CONDITIONS})
        report.write_status(records, STATUS_FILES, args.lr_grid, seeds, conditions)


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
