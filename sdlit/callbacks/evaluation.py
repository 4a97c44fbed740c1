"""AvgAtKEvaluation: held-out Avg@k / Pass@k / Maj@k every N optimizer steps and at the end of fit.

The evaluation itself is Lightning's validation loop: the datamodule turns each batch of held-out problems into
``k`` graded samples (:meth:`RolloutDataModule.graded_samples`) and the module's ``validation_step`` updates the
metrics, logged as ``val/avg@k``, ``val/pass@k``, ``val/maj@k`` and ``val/mean_length``. This callback decides
*when* that loop runs during fit and writes what was sampled (*what* is sampled is the datamodule's
``data.evaluation`` settings group): a CSV file per
evaluation in the log directory, a text table in TensorBoard and a short table on the console. Because it only
schedules and records Lightning's own loop, ``sdlit validate`` with the same config gives the same numbers.
"""

from __future__ import annotations

import csv
import logging
import sys
import time
from pathlib import Path

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info

from sdlit.metrics import majority_answer

log = logging.getLogger(__name__)

SAMPLE_COLUMNS = ("step", "problem", "sample", "question", "gold", "response", "extracted", "correct", "tokens")

class AvgAtKEvaluation(Callback):
    """Evaluate on held-out problems every ``every_n_steps`` optimizer steps and at the end of fit.

    This callback decides *when*; what is sampled (k, temperature, max_new_tokens, batch size, number of problems)
    is the datamodule's ``data.evaluation`` group, so validation during fit, ``sdlit validate`` and ``sdlit test``
    with one config sample the same way. ``every_n_steps`` replaces ``trainer.val_check_interval`` (it counts
    optimizer steps, so gradient accumulation is accounted for); Lightning's validation loop does the evaluating.
    A ``ModelCheckpoint`` monitoring ``val/avg@K`` must use the same K as ``data.evaluation.k`` (checked at fit start).

    Args:
        every_n_steps: Evaluate every this many optimizer steps during fit; ``null``: only at the end (with
            ``at_end``). Either way this schedule replaces ``trainer.val_check_interval`` and
            ``trainer.check_val_every_n_epoch``, and a ``ModelCheckpoint`` saves after each evaluation.
        at_end: Also evaluate after the last training step (once, even if that step is also on the schedule),
            so the best checkpoint can be the final one.
        write_samples: Write every sample (question, gold, response, extracted answer, correct, tokens) as
            ``<log_dir>/samples/<val|test>_step<N>.csv`` and, with a TensorBoard logger, as text.
        console_problems: Problems shown in the console table after each evaluation (0: no table).
        tensorboard_rows: Sample rows in the TensorBoard text table.
    """

    def __init__(
        self,
        every_n_steps: int | None = 50,
        at_end: bool = True,
        write_samples: bool = True,
        console_problems: int = 5,
        tensorboard_rows: int = 24,
    ):
        if every_n_steps is not None and every_n_steps < 1:
            raise ValueError(f"AvgAtKEvaluation.every_n_steps must be at least 1 (or null), got {every_n_steps}")
        self.every_n_steps = every_n_steps
        self.at_end = at_end
        self.write_samples = write_samples
        self.console_problems = console_problems
        self.tensorboard_rows = tensorboard_rows
        self.samples: list[dict] = []
        self.written: list[Path] = []  # sample files written so far (for users and tests)
        self.started = time.perf_counter()
        self.seconds: float | None = None  # wall time of the last evaluation (sampling, grading, metrics)

    # ---- settings and schedule ---------------------------------------------------------------------
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """For fit, put this callback's schedule on the trainer."""
        if stage == "fit":
            self._schedule(trainer)

    def _schedule(self, trainer: Trainer) -> None:
        if self.every_n_steps is None:
            interval = sys.maxsize  # never on a schedule: only at the end (at_end)
        else:
            interval = self.every_n_steps * trainer.accumulate_grad_batches  # Lightning counts training batches
        if isinstance(trainer.val_check_interval, int) and trainer.val_check_interval != interval:
            rank_zero_info(
                f"AvgAtKEvaluation.every_n_steps={self.every_n_steps} replaces "
                f"trainer.val_check_interval={trainer.val_check_interval}"
            )
        trainer.val_check_interval = interval
        # count batches across epochs, not within one; ModelCheckpoint then saves after each evaluation
        trainer.check_val_every_n_epoch = None

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Fail early when a checkpoint monitors an ``avg@K`` this evaluation does not log."""
        k = getattr(getattr(trainer.datamodule, "evaluation", None), "k", None)
        for callback in trainer.callbacks:
            monitor = getattr(callback, "monitor", None) if isinstance(callback, ModelCheckpoint) else None
            if (k is not None and monitor and "@" in monitor
                    and monitor.startswith(("val/avg@", "val/pass@", "val/maj@"))):
                if monitor.rsplit("@", 1)[1] != str(k):
                    raise ValueError(
                        f"ModelCheckpoint monitors {monitor!r} but the evaluation samples k={k} answers per problem "
                        f"and logs val/avg@{k}: change the monitor or data.evaluation.k"
                    )

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int) -> None:
        """After the last training batch, ask Lightning to stop here, which runs the validation loop once more."""
        if self.at_end and self._is_last_batch(trainer, batch_idx):
            trainer.should_stop = True  # Lightning validates when a stop is requested (as for early stopping)

    @staticmethod
    def _is_last_batch(trainer: Trainer, batch_idx: int) -> bool:
        if trainer.max_steps not in (None, -1) and trainer.global_step >= trainer.max_steps:
            return True
        last_epoch = trainer.max_epochs not in (None, -1) and trainer.current_epoch + 1 >= trainer.max_epochs
        return last_epoch and batch_idx + 1 >= trainer.num_training_batches

    # ---- samples -----------------------------------------------------------------------------------
    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Start a new samples table and the evaluation's clock."""
        self.samples = []
        self.started = time.perf_counter()

    on_test_epoch_start = on_validation_epoch_start

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int, dataloader_idx: int = 0):
        """Keep the batch's graded samples (the batch is the datamodule's EvalBatch)."""
        if not hasattr(batch, "responses"):
            return
        step = trainer.global_step
        for i, problem in enumerate(batch.problems):
            for j, response in enumerate(batch.responses[i]):
                self.samples.append({
                    "step": step,
                    "problem": problem.id or f"{batch_idx}:{i}",
                    "sample": j,
                    "question": problem.question,
                    "gold": problem.answer,
                    "response": response,
                    "extracted": batch.answers[i][j],
                    "correct": bool(batch.correct[i, j]),
                    "tokens": int(batch.lengths[i, j]),
                })

    on_test_batch_end = on_validation_batch_end

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Write and show the samples of this evaluation (not during the sanity check)."""
        if not trainer.sanity_checking:
            self._report(trainer, "val")

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Write and show the samples of the test run."""
        self._report(trainer, "test")

    def _report(self, trainer: Trainer, prefix: str) -> None:
        self.seconds = time.perf_counter() - self.started
        samples = gather_rows(trainer, self.samples)
        log_dir = Path(trainer.log_dir or trainer.default_root_dir)  # a collective (broadcast): every rank asks
        if not trainer.is_global_zero or not samples:
            return
        if self.write_samples:
            self.written.append(self._write_csv(log_dir, trainer.global_step, prefix, samples))
            self._write_tensorboard(trainer, prefix, samples)
        if self.console_problems > 0:
            print_console_table(trainer, prefix, samples, self.console_problems, self.seconds)

    def _write_csv(self, log_dir: Path, step: int, prefix: str, samples: list[dict]) -> Path:
        path = log_dir / "samples" / f"{prefix}_step{step:06d}.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=SAMPLE_COLUMNS)
            writer.writeheader()
            writer.writerows(samples)
        log.info("wrote %d held-out samples to %s", len(samples), path)
        return path

    def _write_tensorboard(self, trainer: Trainer, prefix: str, samples: list[dict]) -> None:
        loggers = [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
        if not loggers:
            return
        text = markdown_table(samples[: self.tensorboard_rows])
        for logger in loggers:
            logger.experiment.add_text(f"{prefix}/samples", text, global_step=trainer.global_step)


def gather_rows(trainer: Trainer, samples: list[dict]) -> list[dict]:
    """Every rank's rows, on every rank (one list per rank, concatenated in rank order)."""
    if trainer.world_size <= 1 or not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return samples
    parts: list = [None] * trainer.world_size
    torch.distributed.all_gather_object(parts, samples)
    return [row for part in parts for row in part]


def _cell(text, width: int = 60) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[: width - 1] + "…"


def markdown_table(samples: list[dict]) -> str:
    """Samples as a Markdown table (TensorBoard renders it)."""
    lines = ["| problem | question | gold | response | extracted | correct |", "|---|---|---|---|---|---|"]
    for s in samples:
        cells = [s["problem"], s["question"], s["gold"], s["response"], s["extracted"], s["correct"]]
        lines.append("| " + " | ".join(_cell(c, 80).replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)


def print_console_table(trainer: Trainer, prefix: str, samples: list[dict], problems: int, seconds: float) -> None:
    """A short rich table: per problem the majority answer, the gold and how many samples were right."""
    from rich import get_console
    from rich.table import Table

    by_problem: dict[str, list[dict]] = {}
    for s in samples:
        by_problem.setdefault(s["problem"], []).append(s)
    scores = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(f"{prefix}/")}
    title = f"{prefix} at step {trainer.global_step}: " + "  ".join(
        f"{k.split('/', 1)[1]} {v:.3f}" for k, v in sorted(scores.items())
    ) + f"  ({len(by_problem)} problems, {len(samples)} samples, {seconds:.1f} s)"
    table = Table(title=title, title_justify="left")
    for column in ("problem", "question", "gold", "majority", "correct"):
        table.add_column(column)
    for problem, rows in list(by_problem.items())[:problems]:
        majority, _ = majority_answer([r["extracted"] for r in rows])
        right = sum(r["correct"] for r in rows)
        table.add_row(_cell(problem, 12), _cell(rows[0]["question"], 50), _cell(rows[0]["gold"], 12),
                      _cell(majority, 12), f"{right}/{len(rows)}")
    get_console().print(table)
