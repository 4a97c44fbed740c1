"""Turn token-advantage records into the analysis outputs: PNG per rollout, HTML heatmap, region table."""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass, field
from pathlib import Path

from sdlit.analysis.plots import plot_advantages, write_heatmap
from sdlit.analysis.records import TokenRecord
from sdlit.analysis.regions import REGIONS, RegionStats

__all__ = ["AnalysisOutputs", "group_records", "region_rows", "write_outputs"]

TABLE_FIELDS = ("problem_id", "step", "condition", "region", "rollouts", "tokens", "mean", "mean_abs", "neg_frac")


@dataclass
class AnalysisOutputs:
    """What an analysis wrote: one PNG per rollout, the HTML heatmap, the region table (CSV and rows)."""

    figures: list[Path] = field(default_factory=list)
    heatmap: Path | None = None
    table: Path | None = None
    rows: list[dict] = field(default_factory=list)


def group_records(records: list[TokenRecord]) -> list[list[TokenRecord]]:
    """Records of the same rollout (same problem, step and tokens) together, in first-seen order."""
    groups: dict[tuple, list[TokenRecord]] = {}
    for record in records:
        groups.setdefault(record.key(), []).append(record)
    return list(groups.values())


def region_rows(groups: list[list[TokenRecord]]) -> list[dict]:
    """Region statistics per rollout and condition, then pooled over all rollouts per condition
    (``problem_id`` ``ALL``)."""
    rows, pooled = [], {}
    for group in groups:
        for record in group:
            stats = RegionStats()
            stats.add(record.advantages, record.step_spans, record.first_error)
            rows += _rows(record.problem_id, record.step, record.condition, stats)
            pooled.setdefault(record.condition, RegionStats()).add(
                record.advantages, record.step_spans, record.first_error
            )
    for condition, stats in pooled.items():
        rows += _rows("ALL", "", condition, stats)
    return rows


def _rows(problem_id: str, step, condition: str, stats: RegionStats) -> list[dict]:
    summary = stats.summary()
    return [
        {"problem_id": problem_id, "step": step, "condition": condition, "region": region, **summary[region]}
        for region in REGIONS
        if region in summary
    ]


def write_outputs(records: list[TokenRecord], output_dir: str | Path, max_rollouts: int | None = None,
                  print_table: bool = True) -> AnalysisOutputs:
    """Write ``<output_dir>/<n>_<problem>.png`` per rollout, ``tokens.html`` and ``regions.csv``; print the
    table. ``max_rollouts`` keeps only the first rollouts (records of one rollout stay together)."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    groups = group_records(records)[:max_rollouts]
    outputs = AnalysisOutputs()
    for number, group in enumerate(groups):
        first = group[0]
        name = f"{number:02d}_{_slug(first.problem_id)}_step{first.step}.png"
        verdict = {True: "right", False: "wrong", None: "not graded"}[first.correct]
        title = f"{first.problem_id or 'rollout'} (global step {first.step}): final answer {verdict}"
        outputs.figures.append(plot_advantages(group, output_dir / name, title))
    outputs.heatmap = write_heatmap(groups, output_dir / "tokens.html")
    outputs.rows = region_rows(groups)
    outputs.table = _write_csv(outputs.rows, output_dir / "regions.csv")
    if print_table:
        print_region_table(outputs.rows)
    return outputs


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-")[:60] or "rollout"


def _write_csv(rows: list[dict], path: Path) -> Path:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=TABLE_FIELDS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: f"{v:.6f}" if isinstance(v, float) else v for k, v in row.items()})
    return path


def print_region_table(rows: list[dict]) -> None:
    """Print the region table with rich."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title="Per-token advantage A_t by region (relative to the first wrong step)")
    for name in TABLE_FIELDS:
        table.add_column(name, justify="left" if name in ("problem_id", "condition", "region") else "right")
    for row in rows:
        table.add_row(*(f"{row[k]:+.4f}" if k == "mean" else f"{row[k]:.4f}" if isinstance(row[k], float)
                        else str(row[k]) for k in TABLE_FIELDS))
    console = Console()
    if not console.is_terminal:  # a pipe or a log file: wide enough that no column is cut
        console = Console(width=160)
    console.print(table)
