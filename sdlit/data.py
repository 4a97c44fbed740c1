"""RolloutDataModule: problems in, feedback-annotated rollouts out.

The dataloaders yield plain problem batches (cheap, so Lightning's prefetching costs nothing). Right before
each training step, :meth:`RolloutDataModule.on_after_batch_transfer` has the live solver sample the
rollouts, grades them and runs the trainer's feedback callbacks, so every rollout is sampled by the weights
that are about to be trained on it (its ``policy_version`` records which). Validation and test batches
become ``evaluation.k`` graded samples per held-out problem. Offline mode streams already-annotated rollouts
from JSONL/Parquet instead of sampling.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Literal

import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader

from sdlit.checkpointing import EpochSampler, ResumableLoader
from sdlit.feedback import Feedback
from sdlit.models import resolve_model_path
from sdlit.offline import (  # noqa: F401  (public here too)
    GroupBatches,
    RowBatches,
    batch_group_indices,
    group_indices,
    keep_batch,
    offline_rollout,
    read_offline_rollouts,
    read_offline_rollouts_counted,
)
from sdlit.rollout import Rollout
from sdlit.sampling import SAMPLERS, Sampler, sample_rollouts
from sdlit.sampling.vllm_engine import check_installed as check_vllm_installed
from sdlit.sampling.vllm_engine import engine_for
from sdlit.settings import EvalSettings, SamplingSettings, VLLMSettings
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
        task: Problem source and answer checker (e.g. ``Arith``, ``GSM8K``); default ``Arith()``. The default is
            built here rather than declared, so a config naming another task gets that task's own defaults (a
            declared ``Arith`` default handed its ``train_size``/``eval_size`` to any task named in YAML).
        batch_size: Problems per training batch.
        rollouts_per_problem: Answers sampled per problem (1 for self-distillation, 8 for GRPO).
        sampling: How training rollouts are sampled: ``temperature`` (paper: 1.1), ``top_p``, ``max_new_tokens``.
        evaluation: What held-out evaluation samples: ``k`` answers per problem (Avg@k / Pass@k / Maj@k), their
            ``temperature`` and ``max_new_tokens``, ``batch_size`` problems per generation call, and the first
            ``num_problems`` held-out problems (default: all the task provides).
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
            models that cannot take a static cache fall back to ``generate``), ``generate`` (plain
            ``model.generate``) or ``vllm`` (a vLLM engine in this process, synced with the live weights before
            each call: :mod:`sdlit.sampling.vllm_engine`; needs the ``vllm`` extra). All sample from the same
            distribution.
        llama_step: The ``static_cache`` loop decodes Llama-architecture models with sdlit's lean decode step
            (:mod:`sdlit.sampling.llama_step`: q/k/v and gate/up as one product each, attention over the written
            cache columns); false: every decode step through the model's own forward. Same tokens either way.
        vllm: The vLLM engine of ``sampler: vllm``: memory share or KV-cache size, longest sequence, concurrent
            sequences, tensor parallel size, eager mode, dtype.
    """

    def __init__(
        self,
        task: Task | None = None,
        batch_size: int = 8,
        rollouts_per_problem: int = 1,
        sampling: SamplingSettings = SamplingSettings(),
        evaluation: EvalSettings = EvalSettings(),
        offline_path: str | None = None,
        shuffle: bool = True,
        on_bad_row: Literal["error", "skip"] = "error",
        sampler: Sampler = "static_cache",
        llama_step: bool = True,
        vllm: VLLMSettings = VLLMSettings(),
    ):
        super().__init__()
        for name, value in (("batch_size", batch_size), ("rollouts_per_problem", rollouts_per_problem)):
            if value < 1:
                raise ValueError(f"data.{name} must be at least 1, got {value}")
        if on_bad_row not in ("error", "skip"):
            raise ValueError(f"data.on_bad_row must be 'error' or 'skip', got {on_bad_row!r}")
        for name, value, kind in (("sampling", sampling, SamplingSettings), ("evaluation", evaluation, EvalSettings)):
            if not isinstance(value, kind):
                raise TypeError(f"data.{name} must be a {kind.__name__}, got {type(value).__name__}")
        if sampler not in SAMPLERS:
            raise ValueError(f"data.sampler must be one of {SAMPLERS}, got {sampler!r}")
        if sampler == "vllm":
            check_vllm_installed()
        self.task = task if task is not None else Arith()
        self.batch_size = batch_size
        self.rollouts_per_problem = rollouts_per_problem
        self.sampling = sampling
        self.evaluation = evaluation
        self.offline_path = offline_path
        self.shuffle = shuffle
        self.on_bad_row = on_bad_row
        self.sampler = sampler
        self.llama_step = llama_step
        self.vllm = vllm
        self.skipped_rows = 0
        self.seed: int | None = None  # the shuffle seed: seed_everything's, fixed at the first train_dataloader()
        self.position = {"epoch": 0, "batches": 0}  # training batches handed to the model this epoch

    # ---- the vLLM engine ---------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        """With ``sampler: vllm``, start this process's engine before training or evaluating: a model vLLM cannot
        serve, or a LoRA rank above its largest, stops the run here."""
        if self.sampler == "vllm" and self.trainer is not None:
            self.engine(self.trainer.lightning_module)

    def engine(self, module):
        """This process's vLLM engine for ``module``'s solver (``sampler: vllm``), else None."""
        if self.sampler != "vllm":
            return None
        hp = module.hparams
        if hp.get("quantization"):
            raise ValueError("data.sampler 'vllm' serves the solver's full-precision weights, not a quantised "
                             "solver's: sample with data.sampler static_cache")
        lora = getattr(module, "lora", None)
        rank = lora.r if lora is not None else None
        return engine_for(resolve_model_path(hp.model), rank, self.vllm, hp.get("dtype"))

    def _synced_engine(self, module):
        """The engine with the live weights of this policy version in it (None unless ``sampler: vllm``)."""
        engine = self.engine(module)
        if engine is not None:
            engine.sync(module.model, module.global_step)
        return engine

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
        trainer = self.trainer
        sampler = EpochSampler(len(rows), self.shuffle, self.seed, num_replicas=trainer.world_size if trainer else 1,
                               rank=trainer.global_rank if trainer else 0)
        return ResumableLoader(  # Lightning saves and restores its position with the fit loop
            rows, batch_size=self.batch_size, sampler=sampler, collate_fn=list, position=self.position,
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
        return DataLoader(problems, batch_size=self.evaluation.batch_size, collate_fn=list, sampler=sampler)

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
                f"data.evaluation.num_problems: {len(problems)} held-out problems cannot be shared by "
                f"{trainer.world_size} processes (each needs at least one): evaluate more problems or on fewer devices"
            )
        return UnrepeatedDistributedSampler(
            problems, num_replicas=trainer.world_size, rank=trainer.global_rank, shuffle=False
        )

    def test_dataloader(self) -> DataLoader:
        """The held-out problems, as for validation."""
        return self.val_dataloader()

    def eval_problems(self) -> list[Problem]:
        """The held-out problems (the first ``evaluation.num_problems`` when set)."""
        problems = self.task.eval_problems()
        if self.evaluation.num_problems is not None:
            problems = problems[: self.evaluation.num_problems]
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
                        for row, group in zip(batch, groups, strict=False)]
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
                settings=self.sampling,
                policy_version=module.global_step,
                template_kwargs=module.hparams.student_template_kwargs,
                sampler=self.sampler,
                llama_step=self.llama_step,
                engine=self._synced_engine(module),
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
        """``evaluation.k`` samples per held-out problem, each graded by the task."""
        k = self.evaluation.k
        rollouts = sample_rollouts(
            module.model,
            module.tokenizer,
            problems,
            n=k,
            settings=self.evaluation.sampling,
            policy_version=module.global_step,
            template_kwargs=module.hparams.student_template_kwargs,
            sampler=self.sampler,
            llama_step=self.llama_step,
            engine=self._synced_engine(module),
        )
        self.grade(rollouts)
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
