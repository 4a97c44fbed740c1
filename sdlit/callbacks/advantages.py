"""TokenAdvantageLogger: per-token advantages A_t of every training step, by region, plus saved samples.

A_t = log p_teacher(y_t | x, c, y<t) - log p_student(y_t | x, y<t) comes from the log-probs the training
step already computed (``SelfDistillationModule.last_token_logprobs``): no forward pass of its own.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from lightning.pytorch import Callback

from sdlit.analysis.records import TokenRecord, token_texts, write_records
from sdlit.analysis.regions import RegionStats
from sdlit.callbacks.feedback import Feedback
from sdlit.critics import Critic
from sdlit.rollout import Rollout, tag_step_spans

log = logging.getLogger(__name__)

__all__ = ["TokenAdvantageLogger"]


class TokenAdvantageLogger(Callback):
    """Logs region statistics of the per-token advantage A_t every ``every_n_steps`` training steps and saves
    a sample of per-token records as JSONL (read them with ``sdlit analyze --records FILE``).

    Regions are relative to the rollout's first wrong step (from the critique, ``rollout.feedback``):
    ``before``, ``at`` and ``after`` it; a rollout without one is the region ``all``. Logged per region:
    ``advantage/<region>_mean`` (mean A_t), ``advantage/<region>_abs`` (mean |A_t|) and
    ``advantage/<region>_neg_frac`` (fraction of tokens with A_t < 0), pooled over the step's tokens of
    every process. Rollouts without a teacher context have no A_t and are left out; so are rollouts whose A_t is
    not finite or whose first error names none of their steps (counted in ``advantage/skipped_rollouts``).

    Args:
        every_n_steps: Log (and save records) at every n-th training step.
        max_records_per_step: Most rollouts saved as records per logged step (0 saves none).
        path: JSONL file of the records; default ``token_advantages.jsonl`` in the run directory
            (``trainer.log_dir``, else ``trainer.default_root_dir``).
        critic: Locates the first wrong step of rollouts whose feedback did not (e.g. ``ReferenceSolution``
            training); default none: such rollouts count in the ``all`` region.
    """

    def __init__(
        self,
        every_n_steps: int = 1,
        max_records_per_step: int = 4,
        path: str | None = None,
        critic: Critic | None = None,
    ):
        if every_n_steps < 1:
            raise ValueError(f"TokenAdvantageLogger.every_n_steps must be at least 1, got {every_n_steps}")
        if max_records_per_step < 0:
            raise ValueError(f"TokenAdvantageLogger.max_records_per_step must be >= 0, got {max_records_per_step}")
        self.every_n_steps = every_n_steps
        self.max_records_per_step = max_records_per_step
        self.path = Path(path) if path else None
        self.critic = critic
        self.saved = (-1, 0)  # (global step, records saved at it)
        self.skipped = 0  # rollouts left out: non-finite A_t, or a first error that names none of their steps
        self.step = 0  # global step of the batch being trained

    def setup(self, trainer, pl_module, stage: str) -> None:
        """Resolve the records file in the run directory."""
        if self.path is None:
            self.path = Path(trainer.log_dir or trainer.default_root_dir) / "token_advantages.jsonl"

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        """Note the global step the batch trains (it has moved on by the end of the batch)."""
        self.step = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        """Region statistics of this batch's A_t, and a few records."""
        step = self.step
        if step % self.every_n_steps:
            return
        logprobs = getattr(pl_module, "last_token_logprobs", None)
        if logprobs is None or logprobs["teacher"].shape[0] != len(batch):
            log.debug("TokenAdvantageLogger: no teacher log-probs for this batch (objective without a teacher?)")
            return
        advantages = (logprobs["teacher"] - logprobs["student"]).detach().float().cpu()
        has_context = logprobs["mask"].any(dim=1).cpu()
        stats, records = RegionStats(), []
        already = self.saved[1] if self.saved[0] == step else 0
        for row, rollout in enumerate(batch):
            if not has_context[row]:
                continue
            values = advantages[row, : len(rollout.response_ids)]
            spans, first_error = self._steps(rollout, pl_module.tokenizer)
            try:
                if not torch.isfinite(values).all():
                    raise ValueError("its A_t is not finite (NaN/inf log-probs)")
                stats.add(values, spans, first_error)
            except ValueError as err:
                self.skipped += 1
                log.warning("TokenAdvantageLogger: rollout of %s left out (%d so far): %s",
                            rollout.problem.id, self.skipped, err)
                continue
            if already + len(records) < self.max_records_per_step:
                records.append(self._record(rollout, values, spans, first_error, step, trainer, pl_module))
        self._log(trainer, pl_module, stats, len(batch))
        if records and trainer.is_global_zero:
            write_records(records, self.path, append=True)
        self.saved = (step, already + len(records))

    def _steps(self, rollout: Rollout, tokenizer) -> tuple[list[tuple[int, int]], int | None]:
        """Token spans of the rollout's steps and its first wrong step (critic's, or ours when it has none)."""
        spans = rollout.step_spans if rollout.step_spans is not None else tag_step_spans(rollout, tokenizer)
        if "first_error" not in rollout.feedback and self.critic is not None:
            critique = self.critic.critique(rollout.problem.question, rollout.problem.solution, rollout.response)
            rollout.feedback.update(case=critique.case, first_error=critique.first_error)
        return spans, rollout.feedback.get("first_error")

    def _record(self, rollout, values, spans, first_error, step, trainer, pl_module) -> TokenRecord:
        return TokenRecord(
            tokens=token_texts(pl_module.tokenizer, rollout.response_ids),
            advantages=values.tolist(),
            step_spans=spans,
            first_error=first_error,
            condition=_condition(trainer, rollout),
            step=step,
            problem_id=rollout.problem.id,
            correct=rollout.correct,
            case=rollout.feedback.get("case"),
            context_header=rollout.context_header,
        )

    def _log(self, trainer, pl_module, stats: RegionStats, batch_size: int) -> None:
        """Pool the sums of every process, then log the statistics of regions that have tokens."""
        table = stats.as_tensor().to(pl_module.device)
        if trainer.world_size > 1:
            table = trainer.strategy.reduce(table, reduce_op="sum")
        pooled = RegionStats.from_tensor(table.cpu())
        for region, values in pooled.summary().items():
            for name, key in (("mean", "mean"), ("abs", "mean_abs"), ("neg_frac", "neg_frac")):
                pl_module.log(f"advantage/{region}_{name}", values[key], batch_size=batch_size, rank_zero_only=True)
        pl_module.log("advantage/skipped_rollouts", float(self.skipped), batch_size=batch_size, rank_zero_only=True)


def _condition(trainer, rollout: Rollout) -> str:
    """The feedback kind that set the rollout's context: the class of the feedback callback with its header."""
    if "critic_fallback" in rollout.feedback:
        return f"{rollout.feedback['critic_fallback']} (critic fallback)"
    for callback in trainer.callbacks:
        if isinstance(callback, Feedback) and callback.header == rollout.context_header:
            return type(callback).__name__
    return rollout.context_header
