"""Pictures of per-token advantages: a bar chart per context (the paper's Fig. 4) and an HTML token heatmap."""

from __future__ import annotations

import html
from pathlib import Path

from sdlit.analysis.records import TokenRecord

__all__ = ["POSITIVE_COLOR", "NEGATIVE_COLOR", "plot_advantages", "write_heatmap"]

POSITIVE_COLOR = "#2b83ba"  # blue: the teacher likes the token more than the student does
NEGATIVE_COLOR = "#d7191c"  # red: the teacher likes it less


def plot_advantages(records: list[TokenRecord], path: str | Path, title: str = "") -> Path:
    """Save a PNG with one panel per record (the same rollout under different contexts): A_t against token
    position, positive and negative bars in two colours, a dashed line where the first wrong step begins."""
    from matplotlib.figure import Figure  # no pyplot: renders with Agg, leaves the user's backend alone

    if not records:
        raise ValueError("plot_advantages needs at least one record")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    limit = max((abs(a) for r in records for a in r.advantages), default=1.0) or 1.0
    fig = Figure(figsize=(10, 2.4 * len(records) + 0.6))
    axes = fig.subplots(len(records), 1, sharex=True, squeeze=False)
    for ax, record in zip(axes[:, 0], records, strict=False):
        _panel(ax, record, limit)
    axes[-1, 0].set_xlabel("token position in the response")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def _panel(ax, record: TokenRecord, limit: float) -> None:
    positions = range(len(record.advantages))
    colors = [POSITIVE_COLOR if a >= 0 else NEGATIVE_COLOR for a in record.advantages]
    ax.bar(positions, record.advantages, width=1.0, color=colors, linewidth=0)
    ax.axhline(0.0, color="black", linewidth=0.5)
    span = record.error_span
    if span is not None:
        ax.axvspan(span[0] - 0.5, span[1] - 0.5, color="#fdae61", alpha=0.2, linewidth=0, zorder=0)
        ax.axvline(span[0] - 0.5, color="black", linestyle="--", linewidth=1.0,
                   label=f"first error (step {record.first_error + 1})")
        ax.legend(loc="best", fontsize=8, framealpha=0.8)
    ax.set_ylim(-1.05 * limit, 1.05 * limit)
    ax.set_xlim(-0.5, max(1, len(record.advantages)) - 0.5)
    ax.set_ylabel("A_t")
    ax.set_title(record.condition, fontsize=10, loc="left")


def write_heatmap(groups: list[list[TokenRecord]], path: str | Path, title: str = "Per-token advantages") -> Path:
    """Write an HTML page: for each rollout (a group of records), one row per context with the rollout's
    tokens coloured by A_t (blue positive, red negative, stronger for larger |A_t|); hovering a token shows
    its value. The first wrong step is underlined."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    parts = [_HEAD.format(title=html.escape(title))]
    for group in groups:
        first = group[0]
        verdict = {True: "correct", False: "wrong", None: "not graded"}[first.correct]
        error = "none" if first.first_error is None else f"step {first.first_error + 1}"
        parts.append(
            f"<h2>{html.escape(first.problem_id or 'rollout')} (step {first.step}): answer {verdict}, "
            f"first error: {html.escape(error)}</h2>"
        )
        for record in group:
            parts.append(_row(record))
    parts.append("</body></html>\n")
    path.write_text("\n".join(parts), encoding="utf-8")
    return path


def _row(record: TokenRecord) -> str:
    limit = max((abs(a) for a in record.advantages), default=1.0) or 1.0
    span = record.error_span or (-1, -1)
    cells = []
    for i, (token, value) in enumerate(zip(record.tokens, record.advantages, strict=False)):
        alpha = min(1.0, abs(value) / limit)
        rgb = "43,131,186" if value >= 0 else "215,25,28"
        style = f"background: rgba({rgb},{alpha:.3f})"
        css = ' class="err"' if span[0] <= i < span[1] else ""
        label = html.escape(f"token {i}: A_t = {value:+.4f}", quote=True)
        cells.append(f'<span{css} style="{style}" title="{label}">{html.escape(token)}</span>')
    mean = sum(record.advantages) / max(1, len(record.advantages))
    return (
        f'<h3>{html.escape(record.condition)} <small>(mean A_t {mean:+.3f}, max |A_t| {limit:.3f})</small></h3>\n'
        f'<div class="tokens">{"".join(cells)}</div>'
    )


_HEAD = """<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: sans-serif; margin: 2em; }}
.tokens {{ font-family: monospace; white-space: pre-wrap; line-height: 1.7; border: 1px solid #ccc; padding: 0.6em; }}
.tokens span {{ border-radius: 2px; }}
.tokens span.err {{ text-decoration: underline dashed black; }}
small {{ color: #555; font-weight: normal; }}
</style></head><body>
<h1>{title}</h1>
<p>Each token is coloured by its advantage A_t = log p(y_t | x, c, y&lt;t) - log p(y_t | x, y&lt;t):
blue where the teacher with context c gives it more probability than the student, red where less; the stronger
the colour, the larger |A_t| (scaled per row). Hover a token to read its value. The first wrong step is
underlined.</p>"""
