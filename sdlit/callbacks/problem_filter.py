"""ProblemBandFilter: keep the problems the solver solves sometimes but rarely, and split them train / held-out.

The paper trains only on problems its solver mostly fails (Avg@16 below 5/16) yet sometimes solves: where the
solver never succeeds GRPO has no signal, and where it mostly succeeds there is little left to learn. This
callback rides on Lightning's validation loop (``sdlit validate`` with this callback): the datamodule samples
``evaluation.k`` graded answers per candidate problem, the callback keeps each problem's Avg@n, and at the end writes
the problems whose Avg@n lies strictly inside ``(low, high)``, shuffled and split into two JSONL files in GSM8K
format (``question``, ``answer`` = the worked solution ending ``#### N``). The training configs read them with
``sdlit.tasks.gsm8k.GSM8K(train_path=..., eval_path=...)``.
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

from lightning.pytorch import Callback, LightningModule, Trainer

from sdlit.callbacks.evaluation import gather_rows
from sdlit.tasks.base import DataError

log = logging.getLogger(__name__)


class ProblemBandFilter(Callback):
    """Write the candidate problems whose sampled accuracy Avg@n lies in ``(low, high)`` as a train/held-out split.

    Use it with ``sdlit validate``: the candidates are the datamodule's held-out problems (``data.task``,
    ``data.evaluation.num_problems``) and ``n`` is ``data.evaluation.k``. Output in ``output_dir``: ``train.jsonl``,
    ``eval.jsonl`` (kept problems), ``validation.jsonl`` (with ``validation`` > 0) and ``filter.json`` (the settings,
    every candidate's Avg@n and which split it went to).

    Args:
        output_dir: Directory of the split files (created; existing files are replaced).
        low: Keep problems with Avg@n strictly above this (default 0: solved at least once).
        high: Keep problems with Avg@n strictly below this (default 5/16, the paper's band).
        held_out: Kept problems that go to the held-out file ``eval.jsonl`` (the rest are for training).
        validation: Kept problems that go to ``validation.jsonl``, for choosing checkpoints and learning rates
            without touching the held-out problems (0: no validation file).
        seed: Seed of the shuffle that decides which kept problems are held out, validation or training.
    """

    def __init__(self, output_dir: str, low: float = 0.0, high: float = 5 / 16, held_out: int = 12,
                 validation: int = 0, seed: int = 0):
        if not 0.0 <= low < high <= 1.0:
            raise ValueError(f"ProblemBandFilter needs 0 <= low < high <= 1, got low={low}, high={high}")
        if held_out < 1:
            raise ValueError(f"ProblemBandFilter.held_out must be at least 1, got {held_out}")
        if validation < 0:
            raise ValueError(f"ProblemBandFilter.validation must be at least 0, got {validation}")
        self.output_dir = Path(output_dir)
        self.low, self.high, self.held_out, self.validation, self.seed = low, high, held_out, validation, seed
        self.rows: list[dict] = []
        self.summary: dict | None = None  # what was written, for users and tests

    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Start a fresh table of candidates."""
        self.rows = []

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int, dataloader_idx: int = 0):
        """Record each candidate of the batch (the datamodule's EvalBatch) with its Avg@n."""
        if not hasattr(batch, "correct"):
            return
        for i, problem in enumerate(batch.problems):
            correct = batch.correct[i]
            self.rows.append({
                "id": problem.id,
                "question": problem.question,
                "answer": problem.solution,
                "gold": problem.answer,
                "correct": int(correct.sum()),
                "n": int(correct.numel()),
            })

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Select the band, split it and write the files (rank zero; candidates gathered from every rank)."""
        if trainer.sanity_checking:
            return
        rows = gather_rows(trainer, self.rows)
        if trainer.is_global_zero:
            self.summary = self.write(rows)

    def in_band(self, row: dict) -> bool:
        """Whether a candidate's Avg@n lies strictly inside (low, high)."""
        return self.low < row["correct"] / row["n"] < self.high

    def write(self, rows: list[dict]) -> dict:
        """Split the candidates in the band and write ``train.jsonl``, ``eval.jsonl``, ``validation.jsonl`` (with
        ``validation`` > 0) and ``filter.json``."""
        kept = sorted((r for r in rows if self.in_band(r)), key=lambda r: r["id"])
        reserved = self.held_out + self.validation
        if len(kept) <= reserved:
            raise DataError(
                f"ProblemBandFilter: only {len(kept)} of {len(rows)} candidate problems have Avg@n in "
                f"({self.low:g}, {self.high:g}), not more than held_out + validation = {reserved}: evaluate more "
                "candidates (data.evaluation.num_problems), widen the band or hold out fewer"
            )
        random.Random(self.seed).shuffle(kept)
        held_out, validation, train = kept[: self.held_out], kept[self.held_out:reserved], kept[reserved:]
        self.output_dir.mkdir(parents=True, exist_ok=True)
        _write_jsonl(self.output_dir / "train.jsonl", train)
        _write_jsonl(self.output_dir / "eval.jsonl", held_out)
        if self.validation:
            _write_jsonl(self.output_dir / "validation.jsonl", validation)
        split = ({r["id"]: "train" for r in train} | {r["id"]: "eval" for r in held_out}
                 | {r["id"]: "validation" for r in validation})
        summary = {
            "low": self.low, "high": self.high, "seed": self.seed, "candidates": len(rows), "kept": len(kept),
            "train": len(train), "held_out": len(held_out), "validation": len(validation),
            "problems": [{"id": r["id"], "correct": r["correct"], "n": r["n"], "split": split.get(r["id"])}
                         for r in rows],
        }
        (self.output_dir / "filter.json").write_text(json.dumps(summary, indent=1) + "\n")
        log.info("ProblemBandFilter: kept %d of %d candidates (%d train, %d held out, %d validation) in %s",
                 len(kept), len(rows), len(train), len(held_out), len(validation), self.output_dir)
        return summary


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    """GSM8K-format rows (question, answer = solution) plus id and the Avg@n that selected them."""
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        for r in rows:
            f.write(json.dumps({"question": r["question"], "answer": r["answer"], "id": r["id"],
                                "avg": r["correct"] / r["n"]}) + "\n")
    tmp.replace(path)
