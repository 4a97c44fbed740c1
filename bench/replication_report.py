"""The replication's results, rebuilt from its records (results/replication/, written by bench/replicate.py):
learning-rate choice, headline numbers with bootstrap intervals, paired differences, curves, training reward and
per-token advantage regions, as results/replication.md, .png and .json.

Protocol. Each condition's learning rate is the grid value whose best checkpoint scores the highest validation
Avg@12 on seed 0. Each seed's checkpoint is the training evaluation (step > 0) with the highest validation Avg@12
(the earliest on ties); the headline is that checkpoint's held-out Avg@12 / Pass@12 / Maj@12. The paper's protocol,
the best checkpoint chosen on the held-out problems themselves, is reported beside it and is optimistic by
construction. Intervals: 95% percentile bootstrap over held-out problems and seeds (sdlit.intervals); differences
are paired (the same problems and seeds on both sides).
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path

from sdlit.intervals import Interval, bootstrap, paired_difference, score_matrix

CONDITIONS = ("grpo", "reference", "critique")
LABELS = {"grpo": "GRPO (binary reward, n=8)", "reference": "Reference solution (n=1)",
          "critique": "Step-aligned critique (n=1)", "warm": "Warm start (step 0)"}
SCORE_COLUMNS = ("step", "problem", "split", "avg", "pass", "maj", "length")
METRICS = ("avg", "pass", "maj")
DIFFERENCES = (("critique", "reference"), ("critique", "grpo"), ("critique", "warm"), ("reference", "warm"),
               ("grpo", "warm"))


@dataclass
class Run:
    """One finished run's records: per evaluation step and split, per problem its scores."""

    name: str
    info: dict
    scores: dict = field(default_factory=dict)  # step -> split -> problem -> {avg, pass, maj, length}
    train: list = field(default_factory=list)
    advantage: dict = field(default_factory=dict)

    @property
    def condition(self) -> str:
        return self.info["condition"]

    @property
    def seed(self) -> int:
        return self.info["seed"]

    def mean(self, step: int, split: str, metric: str = "avg") -> float:
        values = [s[metric] for s in self.scores[step][split].values()]
        return sum(values) / len(values)

    def best_step(self, split: str) -> int:
        """The training evaluation (step > 0) with the highest mean Avg on ``split``; the earliest on ties (to 5
        decimals, as in :func:`choose`)."""
        trained = [s for s in self.scores if s > 0] or list(self.scores)
        return max(trained, key=lambda s: (round(self.mean(s, split), 5), -s))


def load_runs(records: Path) -> list[Run]:
    """Every finished run (one with ``run.json``) under ``records/runs``."""
    runs = []
    for info_path in sorted((records / "runs").glob("**/run.json")):
        folder = info_path.parent
        run = Run(str(folder.relative_to(records / "runs")), json.loads(info_path.read_text()))
        for row in csv.DictReader(open(folder / "scores.csv", newline="")):
            problem = run.scores.setdefault(int(row["step"]), {}).setdefault(row["split"], {})
            problem[row["problem"]] = {k: float(row[k]) for k in (*METRICS, "length")}
        if (folder / "train.csv").exists():
            run.train = [{"step": int(r["step"]), "accuracy": float(r["accuracy"])}
                         for r in csv.DictReader(open(folder / "train.csv", newline=""))]
        if (folder / "advantage.json").exists():
            run.advantage = json.loads((folder / "advantage.json").read_text())
        runs.append(run)
    return runs


def rate_runs(runs: list[Run], condition: str, grid: list[float]) -> dict[float, Run]:
    """Seed 0's runs of ``condition`` per learning rate of the grid (those finished)."""
    found = {r.info["lr"]: r for r in runs if r.condition == condition and r.seed == 0}
    return {lr: found[lr] for lr in grid if lr in found}


def choose(by_rate: dict[float, Run]) -> float:
    """The rate whose best validation checkpoint scores highest (the smaller rate on ties). Means are compared to 5
    decimals: the records keep per-problem scores to 6, so two equal counts of correct samples spread over
    different problems would otherwise differ in the 7th."""
    def score(lr: float) -> tuple[float, float]:
        run = by_rate[lr]
        return round(run.mean(run.best_step("validation"), "validation"), 5), -lr

    return max(sorted(by_rate), key=score)


def chosen_rate(records: Path, condition: str, grid: list[float]) -> float:
    """``condition``'s learning rate, chosen on the validation problems once seed 0 ran the whole grid."""
    by_rate = rate_runs(load_runs(records), condition, grid)
    if len(by_rate) < len(grid):
        missing = sorted(set(grid) - set(by_rate))
        raise SystemExit(f"{condition}: seed 0 has not run learning rates {missing} of the grid yet; run --seeds 0 "
                         "first (it chooses the rate the other seeds use)")
    return choose(by_rate)


def headline_runs(runs: list[Run], grid: list[float]) -> dict[str, list[Run]]:
    """Per condition, every seed's run at the chosen rate (once seed 0's grid is complete), and the warm start."""
    chosen = {"warm": sorted((r for r in runs if r.condition == "warm"), key=lambda r: r.seed)}
    for condition in CONDITIONS:
        by_rate = rate_runs(runs, condition, grid)
        if by_rate and len(by_rate) == len(grid):
            lr = choose(by_rate)
            chosen[condition] = sorted((r for r in runs if r.condition == condition and r.info["lr"] == lr),
                                       key=lambda r: r.seed)
    return chosen


def held_out(run: Run, protocol: str) -> dict:
    """The held-out per-problem scores of ``run`` at its step under ``protocol`` ("validation": best on the
    validation problems; "held-out": best on the held-out ones; the warm start: step 0)."""
    if run.condition == "warm":
        return run.scores[0]["eval"]
    return run.scores[run.best_step("validation" if protocol == "validation" else "eval")]["eval"]


def intervals(group: list[Run], protocol: str) -> dict[str, Interval]:
    scored = [held_out(r, protocol) for r in group]
    out = {m: bootstrap(score_matrix(scored, m)) for m in METRICS}
    out["length"] = bootstrap(score_matrix(scored, "length"))
    return out


def difference(chosen: dict[str, list[Run]], a: str, b: str, protocol: str) -> tuple[list[int], dict]:
    """Paired ``a - b`` on the seeds both have and the held-out problems: per metric an Interval."""
    seeds = sorted({r.seed for r in chosen.get(a, [])} & {r.seed for r in chosen.get(b, [])})
    if not seeds:
        return [], {}
    first = [held_out(next(r for r in chosen[a] if r.seed == s), protocol) for s in seeds]
    second = [held_out(next(r for r in chosen[b] if r.seed == s), protocol) for s in seeds]
    problems = sorted(first[0])
    return seeds, {m: paired_difference(score_matrix(first, m, problems), score_matrix(second, m, problems))
                   for m in METRICS}


def curve(group: list[Run], warm: list[Run]) -> list[tuple[int, Interval]]:
    """Held-out Avg@12 with its interval at every step all seeds evaluated (step 0: their warm starts)."""
    seeds = [r.seed for r in group]
    warm_by_seed = {r.seed: r for r in warm}
    points = []
    if all(s in warm_by_seed for s in seeds):
        points.append((0, bootstrap(score_matrix([warm_by_seed[s].scores[0]["eval"] for s in seeds], "avg"))))
    steps = sorted(set.intersection(*(set(r.scores) for r in group)) - {0})
    points += [(s, bootstrap(score_matrix([r.scores[s]["eval"] for r in group], "avg"))) for s in steps]
    return points


def reward_change(group: list[Run]) -> tuple[float, float, list[float]]:
    """Mean training accuracy over the first and the last quarter of the steps, across seeds, and each seed's
    change."""
    early, late, changes = [], [], []
    for run in group:
        values = [r["accuracy"] for r in sorted(run.train, key=lambda r: r["step"])]
        quarter = max(1, len(values) // 4)
        first, last = sum(values[:quarter]) / quarter, sum(values[-quarter:]) / quarter
        early.append(first)
        late.append(last)
        changes.append(last - first)
    return sum(early) / len(early), sum(late) / len(late), changes


# ---- the report ---------------------------------------------------------------------------------------------
def cell(interval: Interval, signed: bool = False, mark: bool = False) -> str:
    text = interval.format(100.0, signed=signed)
    return f"**{text}**" if mark and interval.excludes_zero else text


def rate_table(runs: list[Run], grid: list[float]) -> list[str]:
    lines = ["| condition | learning rate | seed 0: best validation Avg@12 (step) | held-out Avg@12 there | chosen |",
             "|---|---|---|---|---|"]
    for condition in CONDITIONS:
        by_rate = rate_runs(runs, condition, grid)
        pick = choose(by_rate) if len(by_rate) == len(grid) else None
        for lr, run in sorted(by_rate.items()):
            step = run.best_step("validation")
            lines.append(f"| {LABELS[condition]} | {lr:g} | {run.mean(step, 'validation') * 100:.2f} ({step}) | "
                         f"{run.mean(step, 'eval') * 100:.2f} | {'yes' if lr == pick else ''} |")
    return lines


def headline_table(chosen: dict[str, list[Run]], protocol: str) -> list[str]:
    lines = ["| condition | learning rate | seeds | steps | Avg@12 | Pass@12 | Maj@12 | mean length |",
             "|---|---|---|---|---|---|---|---|"]
    for condition in ("warm", *CONDITIONS):
        group = chosen.get(condition)
        if not group:
            continue
        scores = intervals(group, protocol)
        steps = "/".join(str(0 if r.condition == "warm" else r.best_step("validation" if protocol == "validation"
                                                                          else "eval")) for r in group)
        lr = "" if condition == "warm" else f"{group[0].info['lr']:g}"
        lines.append(f"| {LABELS[condition]} | {lr} | {len(group)} | {steps} | {cell(scores['avg'])} | "
                     f"{cell(scores['pass'])} | {cell(scores['maj'])} | {scores['length'].mean:.1f} |")
    return lines


def difference_table(chosen: dict[str, list[Run]], protocol: str) -> tuple[list[str], dict]:
    lines = ["| difference (held-out, paired) | seeds | Avg@12 | Pass@12 | Maj@12 |", "|---|---|---|---|---|"]
    found = {}
    for a, b in DIFFERENCES:
        seeds, diff = difference(chosen, a, b, protocol)
        if not seeds:
            continue
        found[f"{a} - {b}"] = diff
        name = f"{LABELS[a].split(' (')[0]} - {LABELS[b].split(' (')[0]}"
        lines.append(f"| {name} | {len(seeds)} | " + " | ".join(cell(diff[m], True, True) for m in METRICS) + " |")
    return lines, found


def reward_table(runs: list[Run]) -> list[str]:
    """Training accuracy early and late, per condition and learning rate (every recorded seed)."""
    lines = ["| condition | learning rate | seeds | steps | training accuracy, first quarter of steps | last quarter "
             "| change per seed |", "|---|---|---|---|---|---|---|"]
    for condition in CONDITIONS:
        for lr in sorted({r.info["lr"] for r in runs if r.condition == condition}):
            group = sorted((r for r in runs if r.condition == condition and r.info["lr"] == lr and r.train),
                           key=lambda r: r.seed)
            if group:
                early, late, changes = reward_change(group)
                lines.append(f"| {LABELS[condition]} | {lr:g} | {len(group)} | {len(group[0].train)} | "
                             f"{early * 100:.1f} | {late * 100:.1f} | "
                             + ", ".join(f"{c * 100:+.1f}" for c in changes) + " |")
    return lines


def evaluations_table(runs: list[Run]) -> list[str]:
    """Every evaluation of every run: validation and held-out Avg@12, held-out Pass/Maj@12, and the held-out
    Avg@12 against the same seed's warm start, paired, with its 95% interval."""
    warm = {r.seed: r.scores[0]["eval"] for r in runs if r.condition == "warm"}
    lines = ["| run | step | validation Avg@12 | held-out Avg@12 [95%] | held-out Pass@12 | held-out Maj@12 "
             "| held-out Avg@12 - warm start [95%] | mean length |", "|---|---|---|---|---|---|---|---|"]
    for run in sorted(runs, key=lambda r: r.name):
        for step in sorted(run.scores):
            held = run.scores[step]["eval"]
            problems = sorted(held)
            against = ""
            if run.condition != "warm" and run.seed in warm:
                against = cell(paired_difference(score_matrix([held], "avg", problems),
                                                 score_matrix([warm[run.seed]], "avg", problems)), True, True)
            lines.append(f"| {run.name} | {step} | {run.mean(step, 'validation') * 100:.2f} | "
                         f"{cell(bootstrap(score_matrix([held], 'avg', problems)))} | "
                         + " | ".join(f"{run.mean(step, 'eval', m) * 100:.2f}" for m in ("pass", "maj"))
                         + f" | {against} | {run.mean(step, 'eval', 'length'):.1f} |")
    return lines


def advantage_table(runs: list[Run]) -> list[str]:
    lines = ["| run | region | mean A_t | mean abs A_t | negative fraction |", "|---|---|---|---|---|"]
    for run in sorted(runs, key=lambda r: r.name):
        if run.condition in ("reference", "critique"):
            adv = run.advantage
            for region in ("before", "at", "after", "all"):
                if f"{region}_mean" in adv:
                    lines.append(f"| {run.name} | {region} | {adv[f'{region}_mean']:+.4f} | "
                                 f"{adv.get(f'{region}_abs', 0):.4f} | {adv.get(f'{region}_neg_frac', 0):.3f} |")
    return lines


def missing_note(runs: list[Run]) -> list[str]:
    """A line per run whose record lacks scheduled evaluations (a fit cut during one and resumed after it)."""
    return [f"Missing evaluations: {run.name} has none at steps {run.info['missing_evaluations']} (cut during the "
            "evaluation and resumed after it); its choices use the evaluations it has.\n"
            for run in sorted(runs, key=lambda r: r.name) if run.info.get("missing_evaluations")]


def or_none(table: list[str], message: str = "None recorded yet.") -> list[str]:
    """A table, or ``message`` when it has no rows (only its header)."""
    return table if len(table) > 2 else [message]


def reading(found: dict) -> list[str]:
    """One sentence per paired difference of held-out Avg@12: what its interval allows one to conclude."""
    lines = []
    for name, diff in found.items():
        avg = diff["avg"]
        a, b = (LABELS[x].split(" (")[0] for x in name.split(" - "))
        if avg.excludes_zero:
            verdict = f"{a} is {'above' if avg.mean > 0 else 'below'} {b.lower() if b.startswith('Warm') else b}"
        else:
            verdict = "the interval contains 0: these runs cannot tell the two apart"
        lines.append(f"- {a} - {b}: {avg.mean * 100:+.2f} points of held-out Avg@12, 95% interval "
                     f"[{avg.low * 100:+.2f}, {avg.high * 100:+.2f}]: {verdict}.")
    return lines


def plot(runs: list[Run], chosen: dict[str, list[Run]], path: Path) -> None:
    """Held-out Avg@12 against training step: every recorded run thin (from its seed's warm start), each
    condition's chosen runs bold with a 95% band; below, the training accuracy per step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"grpo": "tab:gray", "reference": "tab:blue", "critique": "tab:red"}
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 7), sharex=True)
    warm = {r.seed: r.mean(0, "eval") for r in runs if r.condition == "warm"}
    for run in (r for r in runs if r.condition in colors):
        steps = ([0] if run.seed in warm else []) + sorted(run.scores)
        values = ([warm[run.seed]] if run.seed in warm else []) + [run.mean(s, "eval") for s in sorted(run.scores)]
        top.plot(steps, [v * 100 for v in values], color=colors[run.condition], alpha=0.35, linewidth=1,
                 linestyle="-" if run.info["lr"] == min(r.info["lr"] for r in runs if "lr" in r.info) else "--")
        bottom.plot([r["step"] + 1 for r in run.train], [r["accuracy"] * 100 for r in run.train],
                    color=colors[run.condition], alpha=0.35, linewidth=1)
    for condition in CONDITIONS:
        group = chosen.get(condition)
        if not group:
            continue
        points = curve(group, chosen.get("warm", []))
        steps = [s for s, _ in points]
        top.plot(steps, [i.mean * 100 for _, i in points], color=colors[condition], marker="o", linewidth=2,
                 label=f"{LABELS[condition]}, lr {group[0].info['lr']:g}")
        top.fill_between(steps, [i.low * 100 for _, i in points], [i.high * 100 for _, i in points],
                         color=colors[condition], alpha=0.15)
        train_steps = sorted(set.intersection(*({r["step"] for r in run.train} for run in group)))
        if train_steps:
            mean = [sum(next(r["accuracy"] for r in run.train if r["step"] == s) for run in group) / len(group)
                    for s in train_steps]
            bottom.plot([s + 1 for s in train_steps], [m * 100 for m in mean], color=colors[condition], alpha=0.8)
    top.set_ylabel("held-out Avg@12 (%)")
    top.set_title("thin: every run (dashed: the higher rate); bold: chosen rate, mean of seeds, 95% band",
                  fontsize=8)
    top.grid(alpha=0.3)
    if top.get_legend_handles_labels()[0]:
        top.legend(fontsize=8)
    bottom.set_ylabel("training accuracy (%)")
    bottom.set_xlabel("optimizer step")
    bottom.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def wall_times(records: Path, runs: list[Run]) -> dict[str, float]:
    seconds = {}
    for stage, name in (("warmstart", "warmstart.json"), ("filter", "split/filter.json")):
        path = records / name
        recorded = json.loads(path.read_text()) if path.exists() else {}
        if "seconds" in recorded:
            seconds[stage] = recorded["seconds"]
    for run in runs:
        seconds[run.name] = run.info["seconds"]
    return seconds


def problems_sentence(split: dict, design: dict) -> str:
    """Where the problems came from and how they were split, from the filter's record and a run's design."""
    return (f"Problems: {split['kept']} of {split['candidates']} fresh `arith` problems had the warm-started solver's "
            f"Avg@{split['problems'][0]['n']} in ({split['low']:g}, {split['high']:g}): {split['held_out']} held "
            f"out, {split.get('validation', 0)} for validation, {split['train']} for training, of which every "
            f"condition trains on the first {design['train_problems']} for {design['epochs']} epochs (answers up to "
            f"{design['max_new_tokens']} tokens).")


def wall_time_sentence(seconds: dict[str, float]) -> str:
    return (f"{sum(seconds.values()) / 60:.1f} min in all ("
            + ", ".join(f"{k} {v / 60:.1f}" for k, v in seconds.items()) + ")")


def write(records: Path, results: Path, command: str, machine: str, grid: list[float]) -> None:
    """results/replication.md, .png and .json from every finished run's records."""
    runs = load_runs(records)
    if not runs:
        return
    chosen = headline_runs(runs, grid)
    split = json.loads((records / "split" / "filter.json").read_text())
    seconds = wall_times(records, runs)
    design = next(r.info for r in runs)
    diff_lines, found = difference_table(chosen, "validation")
    held_lines, held_found = difference_table(chosen, "held-out")
    text = [
        "# Replication: GRPO vs reference solution vs step-aligned critique, with 95% intervals",
        "",
        f"Written by `{command}` on {machine}, from the records in `results/replication/`.",
        f"Wall time of the stages: {wall_time_sentence(seconds)}.",
        "",
        problems_sentence(split, design) + " Values in %; mean [95% bootstrap interval over held-out problems "
        "and seeds]. Bold differences exclude 0.",
        "",
        "## Headline: checkpoint and learning rate chosen on the validation problems",
        "",
        *headline_table(chosen, "validation"),
        "",
        *or_none(diff_lines, "No paired difference yet: a condition needs seed 0's whole learning-rate grid first."),
        "",
        "What the intervals allow one to conclude (held-out Avg@12, validation-chosen checkpoints):",
        "",
        *(reading(found) or ["- Nothing yet."]),
        "",
        "## Beside it: the paper's protocol, best checkpoint chosen on the held-out problems (optimistic)",
        "",
        *headline_table(chosen, "held-out"),
        "",
        *or_none(held_lines, "No paired difference yet."),
        "",
        "## Learning rate (seed 0, chosen on validation)",
        "",
        *or_none(rate_table(runs, grid)),
        "",
        "## Training reward (accuracy of the training rollouts, every recorded run by learning rate)",
        "",
        *or_none(reward_table(runs)),
        "",
        "![held-out Avg@12 and training accuracy](replication.png)",
        "",
        "## Per-token advantage by region (training rollouts; first error placed by the rule-based critic)",
        "",
        *or_none(advantage_table(runs)),
        "",
        "## Every evaluation",
        "",
        *evaluations_table(runs),
        "",
        *missing_note(runs),
    ]
    results.mkdir(parents=True, exist_ok=True)
    (results / "replication.md").write_text("\n".join(text))
    summary = {
        "command": command, "machine": machine, "seconds": seconds, "grid": grid,
        "split": {k: v for k, v in split.items() if k != "problems"},
        "chosen_rates": {c: g[0].info["lr"] for c, g in chosen.items() if c != "warm" and g},
        "headline": {c: {m: vars(i) for m, i in intervals(g, "validation").items()} for c, g in chosen.items() if g},
        "differences": {k: {m: vars(i) for m, i in d.items()} for k, d in found.items()},
        "differences_best_on_held_out": {k: {m: vars(i) for m, i in d.items()} for k, d in held_found.items()},
    }
    (results / "replication.json").write_text(json.dumps(summary, indent=1) + "\n")
    plot(runs, chosen, results / "replication.png")


# ---- the status block in README.md and docs/replication.md ------------------------------------------------------
STATUS_BEGIN = "<!-- replication status: from results/replication/ -->"
STATUS_END = "<!-- end replication status -->"
STATUS_FILES = {"README.md": "results/replication.md", "docs/replication.md": "../results/replication.md"}  # -> link


def planned_runs(seeds: list[int], conditions: list[str], grid: list[float]) -> int:
    """The design's runs: per seed the warm start's evaluation and one fit per condition; seed 0 also fits every
    other learning rate of the grid."""
    return len(seeds) * (1 + len(conditions)) + (len(conditions) * (len(grid) - 1) if 0 in seeds else 0)


def status(records: Path, link: str, command: str, machine: str, grid: list[float], seeds: list[int],
           conditions: list[str]) -> list[str]:
    """The status block, built from the records: progress, command, machine, wall time per stage, the split, the
    validation-chosen headline, the paired differences with their reading and the training reward."""
    runs = load_runs(records)
    chosen = headline_runs(runs, grid)
    split = json.loads((records / "split" / "filter.json").read_text())
    planned, done = planned_runs(seeds, conditions, grid), len(runs)
    progress = (f"all {planned} runs of the design are recorded" if done >= planned else
                f"{done} of the design's {planned} runs are recorded (`make replicate` resumes the rest)")
    diff_lines, found = difference_table(chosen, "validation")
    lines = [STATUS_BEGIN,
             f"Written by `{command}` (the latest invocation) on {machine}, from the records in `results/replication/` "
             f"([results/replication.md]({link})): {progress}.", ""]
    if runs:
        lines += [f"- Wall time per stage: {wall_time_sentence(wall_times(records, runs))}.",
                  f"- {problems_sentence(split, next(r.info for r in runs))}", "",
                  "Checkpoints and learning rates chosen on the validation problems; held-out values in %, mean "
                  "[95% bootstrap interval over held-out problems and seeds]; bold differences exclude 0.", "",
                  *headline_table(chosen, "validation"), "",
                  *or_none(diff_lines, "No paired difference yet: a condition needs seed 0's whole learning-rate "
                                       "grid first."), "",
                  "What the intervals allow one to conclude:", "",
                  *(reading(found) or ["- Nothing yet."]), "",
                  "Training accuracy (the rollouts' reward), every recorded run:", "",
                  *or_none(reward_table(runs))]
    return [*lines, STATUS_END]


def replace_status(path: Path, block: list[str]) -> None:
    """Replace the text between the status markers of ``path`` (README.md, docs/replication.md) by ``block``."""
    text = path.read_text()
    begin, end = text.find(STATUS_BEGIN), text.find(STATUS_END)
    if begin < 0 or end < begin:
        raise SystemExit(f"{path}: no replication status markers ({STATUS_BEGIN!r} ... {STATUS_END!r}) to fill")
    path.write_text(text[:begin] + "\n".join(block) + text[end + len(STATUS_END):])


def write_status(records: Path, files: dict[Path, str], grid: list[float], seeds: list[int],
                 conditions: list[str]) -> None:
    """Fill the status block of every file in ``files`` (file -> its link to results/replication.md), with the
    command and machine results/replication.json recorded."""
    summary_path = records.parent / "replication.json"
    if not summary_path.exists():  # no finished run yet: nothing to report
        return
    summary = json.loads(summary_path.read_text())
    for path, link in files.items():
        replace_status(path, status(records, link, summary["command"], summary["machine"], grid, seeds, conditions))


def main(argv=None) -> None:
    """Rebuild results/replication.md, .png, .json and the status blocks from the records, without running
    anything (the command and machine are those the last `bench/replicate.py` recorded)."""
    import argparse

    root = Path(__file__).resolve().parents[1]
    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("--results", default=str(root / "results"), help="replication.md/.png/.json here, records in "
                                                                    "replication/")
    p.add_argument("--lr-grid", type=float, nargs="+", default=[1e-4, 3e-4], help="the design's learning rates")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="the design's seeds")
    p.add_argument("--conditions", nargs="+", default=list(CONDITIONS), choices=CONDITIONS)
    p.add_argument("--status", nargs="*", default=[f"{name}={link}" for name, link in STATUS_FILES.items()],
                   help="FILE=LINK: files (relative to the repository) whose status block to fill, and their link "
                        "to results/replication.md")
    args = p.parse_args(argv)
    results = Path(args.results)
    records = results / "replication"
    summary = json.loads((results / "replication.json").read_text())
    write(records, results, summary["command"], summary["machine"], args.lr_grid)
    files = {root / f.split("=", 1)[0]: f.split("=", 1)[1] for f in args.status}
    write_status(records, files, args.lr_grid, args.seeds, args.conditions)


if __name__ == "__main__":
    main()
