"""RolloutDataModule: problems in, feedback-annotated rollouts out.

The dataloaders yield plain problem batches (cheap, so Lightning's prefetching costs nothing). Right before
each training step, :meth:`RolloutDataModule.on_after_batch_transfer` has the live solver sample the
rollouts, grades them and runs the trainer's feedback callbacks, so every rollout is sampled by the weights
that are about to be trained on it (its ``policy_version`` records which). Validation and test batches
become ``eval_k`` graded samples per held-out problem. Offline mode streams already-annotated rollouts
from JSONL/Parquet instead of sampling.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Literal

import torch
from jsonargparse import lazy_instance
from lightning.pytorch import LightningDataModule
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader

from sdlit.callbacks.feedback import Feedback
from sdlit.checkpointing import EpochSampler, ResumableLoader
from sdlit.offline import GroupBatches, RowBatches, batch_group_indices, group_indices, keep_batch, offline_rollout
from sdlit.offline import read_offline_rollouts, read_offline_rollouts_counted  # noqa: F401  (public here too)
from sdlit.rollout import Rollout, Sampler, sample_rollouts
from sdlit.sft import reference_rollouts
from sdlit.tasks.arith import Arith
from sdlit.tasks.base import DataError, Problem, Task
from sdlit.timing import PhaseTimer

log = logging.getLogger(__name__)


@dataclass
class EvalBatch:
    """``k`` graded samples for each of a batch of held-out problems."""

    problems: list[Problem]
    responses: list[list[str]]
    answers: list[list[str | None]]
    correct: torch.Tensor  # [problems, k] bool
    lengths: torch.Tensor  # [problems, k] response tokens


class RolloutDataModule(LightningDataModule):
    """Streams critic-annotated rollouts sampled from the live solver (or read from a file).

    Args:
        task: Problem source and answer checker (e.g. ``Arith``, ``GSM8K``).
        batch_size: Problems per training batch.
        rollouts_per_problem: Answers sampled per problem (1 for self-distillation, 8 for GRPO).
        temperature: Sampling temperature of training rollouts (paper: 1.1).
        top_p: Nucleus sampling threshold of training rollouts.
        max_new_tokens: Longest training rollout in tokens.
        eval_k: Samples per held-out problem for Avg@k / Pass@k / Maj@k.
        eval_temperature: Sampling temperature of held-out samples.
        eval_max_new_tokens: Longest held-out sample in tokens.
        eval_batch_size: Held-out problems per generation batch (``eval_k`` samples each).
        eval_size: Use only the first ``eval_size`` held-out problems (default: all the task provides).
        offline_path: JSONL or Parquet file of already-annotated rollouts to train on instead of sampling;
            each row needs ``question``, ``solution``, ``answer``, ``response`` and optionally ``context``,
            ``context_header``, ``reward``, ``logprobs`` (one per response token), ``response_ids`` (checked
            against the tokenized response), ``group``, ``finished`` (default true: EOS appended). Rows sharing a
            ``group`` id stay together in one batch of at most ``batch_size`` rows (groups are shuffled, not rows);
            a row without one is a group of its own (:mod:`sdlit.offline`).
        shuffle: Shuffle training problems every epoch; the order is fixed by (``seed_everything``'s seed,
            epoch), so a run resumed with ``--ckpt_path`` sees the same problems in the same order.
        on_bad_row: Offline rows that are malformed or miss a field: ``error`` stops with a message naming
            file, row and field; ``skip`` leaves them out, logs each one and counts them (``skipped_rows``).
        sampler: How rollouts and held-out samples are decoded: ``static_cache`` (sdlit's loop: each prompt
            prefilled once for its n samples, a KV cache allocated once, finished rows dropped from the batch;
            models that cannot take a static cache fall back to ``generate``) or ``generate`` (plain
            ``model.generate``). Both sample from the same distribution.
    """

    def __init__(
        self,
        task: Task = lazy_instance(Arith),
        batch_size: int = 8,
        rollouts_per_problem: int = 1,
        temperature: float = 1.0,
        top_p: float = 1.0,
        max_new_tokens: int = 256,
        eval_k: int = 12,
        eval_temperature: float = 1.0,
        eval_max_new_tokens: int = 256,
        eval_batch_size: int = 8,
        eval_size: int | None = None,
        offline_path: str | None = None,
        shuffle: bool = True,
        on_bad_row: Literal["error", "skip"] = "error",
        sampler: Sampler = "static_cache",
    ):
        super().__init__()
        for name, value in (("batch_size", batch_size), ("rollouts_per_problem", rollouts_per_problem),
                            ("eval_k", eval_k), ("eval_batch_size", eval_batch_size)):
            if value < 1:
                raise ValueError(f"data.{name} must be at least 1, got {value}")
        if on_bad_row not in ("error", "skip"):
            raise ValueError(f"data.on_bad_row must be 'error' or 'skip', got {on_bad_row!r}")
        if sampler not in ("static_cache", "generate"):
            raise ValueError(f"data.sampler must be 'static_cache' or 'generate', got {sampler!r}")
        self.task = task
        self.batch_size = batch_size
        self.rollouts_per_problem = rollouts_per_problem
        self.temperature = temperature
        self.top_p = top_p
        self.max_new_tokens = max_new_tokens
        self.eval_k = eval_k
        self.eval_temperature = eval_temperature
        self.eval_max_new_tokens = eval_max_new_tokens
        self.eval_batch_size = eval_batch_size
        self.eval_size = eval_size
        self.offline_path = offline_path
        self.shuffle = shuffle
        self.on_bad_row = on_bad_row
        self.sampler = sampler
        self.skipped_rows = 0
        self.seed: int | None = None  # the shuffle seed: seed_everything's, fixed at the first train_dataloader()
        self.position = {"epoch": 0, "batches": 0}  # training batches handed to the model this epoch

    # ---- dataloaders -------------------------------------------------------------------------------
    def train_dataloader(self) -> DataLoader:
        """Batches of problems (online) or of annotated rows, whole groups each (offline)."""
        if self.seed is None:
            self.seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
        if self.offline_path:
            return self._offline_loader()
        rows = self.task.train_problems()
        if not rows:
            raise DataError(f"the training split of task {self.task.name!r} is empty")
        return ResumableLoader(  # Lightning saves and restores its position with the fit loop
            rows, batch_size=self.batch_size, sampler=EpochSampler(len(rows), self.shuffle, self.seed),
            collate_fn=list, position=self.position,
        )

    def _offline_loader(self) -> DataLoader:
        """Batches of whole groups of offline rows; under several processes each rank gets its own batches."""
        rows = self._offline_rows()
        trainer = self.trainer
        sampler = GroupBatches(
            group_indices(rows, self.batch_size, self.offline_path), self.batch_size, self.shuffle, self.seed,
            num_replicas=trainer.world_size if trainer else 1, rank=trainer.global_rank if trainer else 0,
        )
        return ResumableLoader(RowBatches(rows), batch_size=None, sampler=sampler, collate_fn=keep_batch,
                               position=self.position)

    def _offline_rows(self) -> list[dict]:
        rows, skipped = read_offline_rollouts_counted(self.offline_path, self.on_bad_row)
        self.skipped_rows = skipped
        return rows

    # ---- resume ------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The shuffle seed and the count of skipped bad rows, for checkpoints (the position is the loader's)."""
        return {"seed": self.seed, "skipped_rows": self.skipped_rows}

    def load_state_dict(self, state: dict) -> None:
        """Restore the shuffle seed, so a resumed run sees the same order."""
        self.seed = state.get("seed", self.seed)

    def _count_training_batch(self) -> None:
        """Advance the data-stream position (shared with the loader) by the batch about to be trained on."""
        epoch = self.trainer.current_epoch
        if epoch != self.position["epoch"]:
            self.position.update(epoch=epoch, batches=0)
        self.position["batches"] += 1

    def val_dataloader(self) -> DataLoader:
        """Batches of held-out problems (under several processes: this rank's share, each problem once)."""
        problems = self.eval_problems()
        sampler = self.eval_sampler(problems)
        return DataLoader(problems, batch_size=self.eval_batch_size, collate_fn=list, sampler=sampler)

    def eval_sampler(self, problems: list[Problem]) -> UnrepeatedDistributedSampler | None:
        """Under several processes, split the held-out problems across ranks without repeating any.

        Lightning's default DistributedSampler pads the ranks to equal size by repeating problems, which would
        count those problems twice in Avg@k / Pass@k / Maj@k; this sampler gives rank r the problems r, r + W, ...
        """
        trainer = self.trainer
        if trainer is None or trainer.world_size <= 1:
            return None
        if len(problems) < trainer.world_size:
            raise DataError(
                f"data.eval_size: {len(problems)} held-out problems cannot be shared by {trainer.world_size} "
                "processes (each needs at least one): evaluate more problems or on fewer devices"
            )
        return UnrepeatedDistributedSampler(
            problems, num_replicas=trainer.world_size, rank=trainer.global_rank, shuffle=False
        )

    def test_dataloader(self) -> DataLoader:
        """The held-out problems, as for validation."""
        return self.val_dataloader()

    def eval_problems(self) -> list[Problem]:
        """The held-out problems (the first ``eval_size`` when set)."""
        problems = self.task.eval_problems()
        if self.eval_size is not None:
            problems = problems[: self.eval_size]
        if not problems:
            raise DataError(f"the held-out split of task {self.task.name!r} is empty")
        return problems

    # ---- turning problems into rollouts ------------------------------------------------------------
    def transfer_batch_to_device(self, batch, device, dataloader_idx: int):
        """Problem batches are plain Python; rollouts are sampled on the model's device afterwards."""
        return batch

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        """Problems -> annotated rollouts (training) or graded samples (validation/test)."""
        trainer = self.trainer
        module = trainer.lightning_module
        with trainer.precision_plugin.forward_context():
            if trainer.training:
                self._count_training_batch()
                return self.annotated_rollouts(batch, module)
            return self.graded_samples(batch, module)

    def annotated_rollouts(self, batch: list, module) -> list[Rollout]:
        """Sample rollouts, grade them and let every feedback callback annotate them (offline: read, grade;
        a module that samples nothing, objective ``sft``: the problems' step-tagged reference solutions)."""
        if self.offline_path:
            kwargs = module.hparams.student_template_kwargs
            groups = batch_group_indices(batch)
            rollouts = [offline_rollout(row, module.tokenizer, module.global_step, kwargs, group)
                        for row, group in zip(batch, groups)]
            self.grade(rollouts)
            return rollouts
        if not getattr(module, "samples_rollouts", True):  # objective sft: the targets are reference solutions
            return reference_rollouts(batch, module.tokenizer, module.global_step,
                                      module.hparams.student_template_kwargs)
        timer = getattr(module, "phase_timer", None) or PhaseTimer()  # a module of one's own may have none
        with timer.phase("rollout"):
            rollouts = sample_rollouts(
                module.model,
                module.tokenizer,
                batch,
                n=self.rollouts_per_problem,
                temperature=self.temperature,
                top_p=self.top_p,
                max_new_tokens=self.max_new_tokens,
                policy_version=module.global_step,
                template_kwargs=module.hparams.student_template_kwargs,
                sampler=self.sampler,
            )
        with timer.phase("feedback"):
            self.grade(rollouts)
            for feedback in self.feedback_callbacks():
                feedback.annotate(rollouts)
        return rollouts

    def grade(self, rollouts: list[Rollout]) -> None:
        """Mark each rollout correct or not by the task's answer check."""
        for rollout in rollouts:
            rollout.correct = self.task.is_correct(rollout.response, rollout.problem.answer)

    def feedback_callbacks(self) -> list[Feedback]:
        """The trainer's feedback callbacks, in the order they were given."""
        return [cb for cb in self.trainer.callbacks if isinstance(cb, Feedback)]

    def graded_samples(self, problems: list[Problem], module) -> EvalBatch:
        """``eval_k`` samples per held-out problem, each graded by the task."""
        rollouts = sample_rollouts(
            module.model,
            module.tokenizer,
            problems,
            n=self.eval_k,
            temperature=self.eval_temperature,
            max_new_tokens=self.eval_max_new_tokens,
            policy_version=module.global_step,
            template_kwargs=module.hparams.student_template_kwargs,
            sampler=self.sampler,
        )
        self.grade(rollouts)
        k = self.eval_k
        groups = [rollouts[i * k : (i + 1) * k] for i in range(len(problems))]
        return EvalBatch(
            problems=problems,
            responses=[[r.response for r in group] for group in groups],
            answers=[[self.task.extract_answer(r.response) for r in group] for group in groups],
            correct=torch.tensor([[r.correct for r in group] for group in groups], device=module.device),
            lengths=torch.tensor(
                [[len(r.response_ids) for r in group] for group in groups], dtype=torch.float32, device=module.device
            ),
        )
