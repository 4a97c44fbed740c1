"""SelfDistillationModule: the solver, its self-teacher pass and the training objective."""

from __future__ import annotations

import logging
from typing import Literal

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from torchmetrics import MeanMetric

from sdlit.checkpointing import capture_rng_states, plain_values, restore_rng_states
from sdlit.guard import StepGuard
from sdlit.kernels import fused_linear_logprobs
from sdlit.metrics import AvgAtK, MajAtK, PassAtK
from sdlit.models import SMOLLM2_ALIAS, LoraSettings, add_lora, base_model, load_model, load_tokenizer
from sdlit.normalization import StepLoss
from sdlit.objectives import (
    Normalization,
    distillation_token_losses,
    distillation_token_losses_with_logprobs,
    group_advantages,
    grpo_token_losses,
    loss_sum,
    sft_token_losses,
    token_advantages,
)
from sdlit.prompts import check_teacher_view, teacher_prompt_ids
from sdlit.quantization import Optimizer, Quantization, build_optimizer, prepare_for_kbit_training
from sdlit.quantization import check_settings as check_quantization_settings
from sdlit.rollout import Rollout
from sdlit.scoring import (
    ScoringBatch,
    build_scoring_batch,
    output_head_weight,
    response_hidden,
    response_logits,
    token_logprobs,
)
from sdlit.sharding import check_strategy, shard_solver
from sdlit.teacher import TeacherMode, TeacherWeights, eval_mode
from sdlit.timing import PhaseTimer

log = logging.getLogger(__name__)

Objective = Literal["self_distillation", "grpo", "hybrid", "sft"]
Divergence = Literal["forward_kl", "reverse_kl", "jsd"]


class SelfDistillationModule(LightningModule):
    """A solver LM trained to match its self-teacher (same weights, feedback in context) token by token.

    Args:
        model: Packaged alias (``smollm2-135m-instruct``), local model directory or Hugging Face model id.
        lora: LoRA adapter settings; ``null`` trains all weights.
        teacher: Teacher weights: ``base`` (initial policy: adapter disabled; the paper's choice), ``current``
            (live weights, stop-gradient) or ``ema`` (moving average of the trainable weights).
        ema_decay: Decay of the EMA teacher (``teacher: ema``).
        objective: ``self_distillation`` (teacher sees feedback context), ``grpo`` (group-normalised binary
            reward, no teacher), ``hybrid`` (weighted sum of both) or ``sft`` (supervised warm start:
            cross-entropy on each problem's step-tagged reference solution; nothing is sampled, no teacher).
        divergence: Per-token divergence of self-distillation: ``forward_kl`` = KL(teacher || student),
            ``reverse_kl`` = KL(student || teacher), ``jsd`` (generalised Jensen-Shannon with ``jsd_beta``).
        jsd_beta: Mixture weight of the teacher in ``jsd``.
        distill_temperature: Both the teacher's and the student's next-token distributions are softened by this
            temperature inside the divergence (``softmax(logits / distill_temperature)``). It is a property of the
            loss only and independent of ``data.sampling.temperature``, the temperature rollouts are sampled at; 1 (the
            default) matches the distributions the model actually has.
        grpo_clip: Clip range of the GRPO importance ratio.
        grpo_temperature: Temperature of GRPO's log-probs (``log_softmax(logits / T)``) in the importance ratio;
            ``null`` (default): the temperature the rollouts were sampled at (``data.sampling.temperature``), as TRL
            does, so that the ratio compares the sampling distribution with itself.
        loss_normalization: How an optimizer step's loss is averaged: ``tokens`` (default): the sum over all the
            step's loss tokens divided by their count, across gradient-accumulation micro-batches and ranks, so the
            update does not depend on how the step's rollouts are split (TRL's token-level normalisation);
            ``sequences``: each rollout's token mean, averaged over the step's rollouts (every answer weighs the
            same, short or long). Loss tokens: the response tokens of rollouts with a teacher context for
            ``self_distillation`` (after ``skip_first_response_tokens``), every response token otherwise.
        skip_first_response_tokens: Leave the first N response tokens of every rollout out of the distillation
            loss (as TRL's SDFT can), e.g. where the teacher's template makes the opening tokens an artefact.
        grpo_weight: Weight of the GRPO term in ``hybrid`` (self-distillation gets ``1 - grpo_weight``).
        learning_rate: Optimizer learning rate (paper: 5e-6).
        weight_decay: Optimizer (decoupled, AdamW) weight decay.
        warmup_steps: Linear learning-rate warm-up steps.
        max_teacher_length: Longest teacher input in tokens (prompt + context + response); a longer one has
            its context cut (counted in ``train/truncations``), never its question or response. Default: the
            model's window.
        dtype: Weight dtype, e.g. ``bfloat16``; default fp32 (use ``trainer.precision: bf16-mixed`` for AMP).
        attn_implementation: Attention kernel; default flash-attn on CUDA when installed, else ``sdpa``.
        gradient_checkpointing: Recompute activations in backward to save memory.
        quantization: Load the solver's linear layers in 4 bits (``nf4`` or ``fp4``) or 8 bits (``int8``) through
            bitsandbytes and train only the LoRA adapter on top of them (QLoRA; needs ``lora``). The output head and
            the embeddings stay unquantised; ``null`` (default): no quantisation.
        quantization_compute_dtype: Dtype of the 4-bit layers' matmuls, e.g. ``bfloat16``; default: ``dtype``, else
            float32.
        double_quantization: 4-bit: quantise the per-block scales too (QLoRA's double quantisation), saving a little
            more memory.
        optimizer: ``adamw`` (torch), ``adamw_8bit`` (bitsandbytes' AdamW8bit: optimizer state in 8 bits) or
            ``paged_adamw_8bit`` (bitsandbytes' PagedAdamW8bit: 8-bit state paged between GPU and CPU memory on
            CUDA; on CPU it is not paged). All use ``learning_rate``, ``weight_decay`` and the linear warm-up.
        trust_remote_code: Allow models whose code lives in their repository (off unless set).
        student_template_kwargs: Extra chat-template arguments of the student prompt, e.g.
            ``{enable_thinking: false}`` for Qwen3 (the paper: student without thinking).
        teacher_template_kwargs: Extra chat-template arguments of the teacher prompt, e.g.
            ``{enable_thinking: true}`` (the paper: teacher with thinking). The response always follows exactly the
            tokens the student saw before it: the teacher prompt is its own template up to its generation prompt,
            then whatever the student's generation prompt has beyond it (Qwen3: the empty think block); a pair of
            settings whose prompts cannot be aligned this way stops the run at its start (:mod:`sdlit.prompts`).
        length_groups: Score rows of similar length together in the teacher and student passes, skipping most
            padding (same logits; :func:`sdlit.scoring.group_by_length`); off: one padded pass per batch. A sharded
            solver (FSDP2) always makes one pass: every rank must run the same forwards.
        fused_output_head: Apply the output head inside the losses, in chunks of rows, so that the batch's
            ``[B, R, V]`` response logits (and their gradient) never exist (:mod:`sdlit.kernels`); the same loss
            and gradients, with the head applied to the real response tokens only and the logged advantages read
            off the same chunks. ``null`` (auto) and ``true``: fused wherever it applies; ``false``: logits. Models
            whose logits are not exactly final hidden state x head (soft-capping, scaling), and a trained head
            with a ``base`` or ``ema`` teacher (two different heads), always use logits.
        max_consecutive_bad_steps: A step whose loss or gradients are NaN/inf is skipped (no weight or EMA
            update) and counted in ``train/skipped_steps``; after this many in a row training stops with an
            error, leaving the saved checkpoints intact (0: skip without ever stopping).
    """

    def __init__(
        self,
        model: str = SMOLLM2_ALIAS,
        lora: LoraSettings | None = LoraSettings(),
        teacher: TeacherMode = "base",
        ema_decay: float = 0.99,
        objective: Objective = "self_distillation",
        divergence: Divergence = "forward_kl",
        jsd_beta: float = 0.5,
        distill_temperature: float = 1.0,
        grpo_clip: float = 0.2,
        grpo_temperature: float | None = None,
        grpo_weight: float = 0.5,
        learning_rate: float = 5e-6,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        max_teacher_length: int | None = None,
        dtype: str | None = None,
        attn_implementation: str | None = None,
        gradient_checkpointing: bool = False,
        trust_remote_code: bool = False,
        student_template_kwargs: dict | None = None,
        teacher_template_kwargs: dict | None = None,
        max_consecutive_bad_steps: int = 3,
        length_groups: bool = True,
        fused_output_head: bool | None = None,
        loss_normalization: Normalization = "tokens",
        skip_first_response_tokens: int = 0,
        quantization: Quantization | None = None,
        quantization_compute_dtype: str | None = None,
        double_quantization: bool = True,
        optimizer: Optimizer = "adamw",
    ):
        super().__init__()
        check_quantization_settings(quantization, optimizer, lora, quantization_compute_dtype)
        if objective not in ("self_distillation", "grpo", "hybrid", "sft"):
            raise ValueError(f"objective must be self_distillation, grpo, hybrid or sft, got {objective!r}")
        if not 0.0 <= grpo_weight <= 1.0:
            raise ValueError(f"grpo_weight must lie in [0, 1], got {grpo_weight}")
        if loss_normalization not in ("tokens", "sequences"):
            raise ValueError(f"loss_normalization must be 'tokens' or 'sequences', got {loss_normalization!r}")
        if skip_first_response_tokens < 0:
            raise ValueError(f"skip_first_response_tokens must be >= 0, got {skip_first_response_tokens}")
        if grpo_temperature is not None and grpo_temperature <= 0:
            raise ValueError(f"grpo_temperature must be > 0, got {grpo_temperature}")
        self.save_hyperparameters()
        if isinstance(lora, dict):  # from a checkpoint's plain hyper-parameters (see on_save_checkpoint)
            lora = LoraSettings(**lora)
        self.lora = lora  # hparams may hold the raw config under LightningCLI; keep the object itself
        self.tokenizer = load_tokenizer(model, trust_remote_code=trust_remote_code)
        self.teacher = TeacherWeights(teacher, ema_decay)
        self.model: nn.Module | None = None
        self.strict_loading = False  # checkpoints hold the trainable weights only
        self.truncations = 0
        self.guard = StepGuard(max_consecutive_bad_steps)
        self._rng_to_restore: dict | None = None  # random state of a resumed checkpoint, put back at train start
        self.phase_timer = PhaseTimer()  # rollout/feedback (datamodule), teacher/student (training_step)
        self.head_is_linear = False  # logits == final hidden @ head.T, checked once in configure_model
        self.step_loss = StepLoss()  # loss sums of the optimizer step in progress (see sdlit.normalization)
        self.sharded = False  # the solver is sharded with FSDP2 (set in configure_model)

    # ---- model -------------------------------------------------------------------------------------
    def configure_model(self) -> None:
        """Load the solver (once), attach LoRA, and shard it under ``ModelParallelStrategy`` (:mod:`sdlit.sharding`)."""
        if self.model is not None:
            return
        hp = self.hparams
        shard = self._shards_solver()  # before loading: a strategy sdlit cannot shard with stops the run here
        self.model = self.unsharded_solver()
        self.model.train()  # from_pretrained returns eval mode; Lightning switches modes per loop
        self.head_is_linear = output_head_weight(self.model) is not None
        if hp.fused_output_head and not self.head_is_linear:
            log.warning("fused_output_head: the logits of %s are not final hidden state x output head; "
                        "the losses use the logits", hp.model)
        if shard:
            self._shard()

    def unsharded_solver(self) -> nn.Module:
        """A fresh solver as this module builds it before any sharding: loaded (quantised when asked), gradient
        checkpointing on when asked, LoRA attached, initial weights. :meth:`configure_model` trains one; the HF export
        of a sharded run fills another with the run's weights (:class:`sdlit.callbacks.HFExport`)."""
        hp = self.hparams
        model = load_model(hp.model, hp.dtype, hp.attn_implementation, hp.trust_remote_code, hp.quantization,
                           hp.quantization_compute_dtype, hp.double_quantization, self._load_device())
        if hp.quantization:
            model = prepare_for_kbit_training(model, hp.gradient_checkpointing)
        elif hp.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return add_lora(model, self.lora) if self.lora is not None else model

    def _shards_solver(self) -> bool:
        """Whether the trainer's strategy asks for a sharded solver (Lightning's ``ModelParallelStrategy``); Lightning's
        FSDP1 strategy is refused: sdlit's sampler and teacher swap work on FSDP2's units (:mod:`sdlit.sharding`)."""
        from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

        if self._trainer is None:
            return False
        if isinstance(self.trainer.strategy, FSDPStrategy):
            raise ValueError("sdlit shards the solver with FSDP2, not with Lightning's FSDPStrategy (FSDP1): use "
                             "--trainer.strategy fsdp2 (docs/scaling.md)")
        if not isinstance(self.trainer.strategy, ModelParallelStrategy):
            return False
        check_strategy(self.trainer.strategy)
        if self.hparams.quantization:
            raise ValueError("model.quantization (bitsandbytes 4/8-bit layers) cannot be sharded with FSDP2 by sdlit: "
                             "train a quantised solver with one process per GPU (DDP)")
        return True

    def _shard(self) -> None:
        """Shard the solver with FSDP2 on the data-parallel mesh (:mod:`sdlit.sharding`)."""
        shard_solver(self.model, self.device_mesh["data_parallel"])
        self.sharded = True
        if self.hparams.length_groups:
            rank_zero_info("length_groups: the solver is sharded (FSDP2), where every rank must run the same forward "
                           "passes (each gathers every layer): one padded pass per batch")
        if self.head_is_linear and self.hparams.fused_output_head is not False:
            rank_zero_info("fused_output_head: the solver is sharded (FSDP2) and the fused losses would read the "
                           "output head outside a forward pass: the losses use the logits")
        self.head_is_linear = False

    def _load_device(self) -> torch.device:
        """The device a quantised solver is loaded on: the strategy's (this rank's) device once attached, else CPU."""
        if self._trainer is None:
            return torch.device("cpu")
        return self.trainer.strategy.root_device

    @property
    def uses_teacher(self) -> bool:
        """Whether the objective needs the self-teacher pass."""
        return self.hparams.objective in ("self_distillation", "hybrid")

    @property
    def uses_reward(self) -> bool:
        """Whether the objective needs rewards."""
        return self.hparams.objective in ("grpo", "hybrid")

    @property
    def samples_rollouts(self) -> bool:
        """Whether training batches are sampled from the solver (``sft`` trains on reference solutions)."""
        return self.hparams.objective != "sft"

    @property
    def length_groups(self) -> bool:
        """Whether the teacher and student passes score rows in length groups (``length_groups``, unsharded)."""
        return self.hparams.length_groups and not self.sharded

    def max_teacher_tokens(self) -> int:
        """The teacher input budget in tokens."""
        if self.hparams.max_teacher_length:
            return self.hparams.max_teacher_length
        return int(getattr(self.model.config, "max_position_embeddings", 4096))

    # ---- training ----------------------------------------------------------------------------------
    def training_step(self, rollouts: list[Rollout], batch_idx: int) -> torch.Tensor:
        """One micro-batch of feedback-annotated rollouts: returns the *sum* of its token losses; the optimizer
        step divides the gradients by the step's loss-token count (``loss_normalization``,
        :mod:`sdlit.normalization`)."""
        student = self._student_batch(rollouts)
        fused = self.uses_fused_head(student)
        score = response_hidden if fused else response_logits  # [B, R, H] states or [B, R, V] logits
        teacher_out, has_context = None, None
        if self.uses_teacher:  # before the student pass: swapping teacher weights must precede its graph
            with self.phase_timer.phase("teacher"):
                teacher_out, has_context = self._teacher_outputs(rollouts, score)
        with self.phase_timer.phase("student"):
            student_out = score(self.model, student, self.length_groups)
        token_losses = {}  # name -> [B, R], 0 outside its mask
        loss_mask = student.response_mask
        if self.uses_teacher:
            distill_mask = self.distillation_mask(student, has_context)
            token_losses["distill"], teacher_lp, student_lp = self._distillation(
                student_out, teacher_out, student, distill_mask, fused
            )
            self._log_advantages(teacher_lp, student_lp, distill_mask)
            if self.hparams.objective == "self_distillation":
                loss_mask = distill_mask
        if self.uses_reward:
            logprobs = self._token_logprobs(student_out, student, fused, self.grpo_temperature())
            token_losses["grpo"] = self._grpo_token_losses(rollouts, logprobs, student)
        if self.hparams.objective == "sft":
            logprobs = self._token_logprobs(student_out, student, fused)
            token_losses["sft"] = sft_token_losses(logprobs, student.response_mask)
        loss = self._accumulate(token_losses, loss_mask)
        self._log_step(rollouts, student)
        self._log_phase_times(student, len(rollouts))
        return loss

    def distillation_mask(self, batch: ScoringBatch, has_context: torch.Tensor) -> torch.Tensor:
        """[B, R] response tokens that enter the distillation loss: rollouts with a teacher context, without the
        first ``skip_first_response_tokens`` of each response."""
        mask = batch.response_mask & has_context.unsqueeze(1)
        skip = self.hparams.skip_first_response_tokens
        if skip:
            mask = mask.clone()
            mask[:, :skip] = False
        return mask

    def grpo_temperature(self) -> float:
        """The temperature of GRPO's log-probs: ``grpo_temperature``, else the datamodule's sampling temperature."""
        if self.hparams.grpo_temperature is not None:
            return self.hparams.grpo_temperature
        sampling = getattr(self._datamodule(), "sampling", None)
        temperature = getattr(sampling, "temperature", None)
        return float(temperature) if temperature and temperature > 0 else 1.0

    def _datamodule(self):
        """The trainer's datamodule, or None (no trainer, or data given as plain dataloaders)."""
        return getattr(self.trainer, "datamodule", None) if self._trainer else None

    def _accumulate(self, token_losses: dict[str, torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
        """The micro-batch's loss sum (the objective's weighted terms), recorded with its count in ``step_loss``."""
        weights = {name: 1.0 for name in token_losses}
        if self.hparams.objective == "hybrid":
            weights = {"distill": 1.0 - self.hparams.grpo_weight, "grpo": self.hparams.grpo_weight}
        total = sum(weights[name] * value for name, value in token_losses.items())
        normalization = self.hparams.loss_normalization
        loss, count = loss_sum(total, mask, normalization)
        sums = {"loss": loss}
        if len(token_losses) > 1:  # hybrid: each term too
            sums.update({f"loss_{n}": loss_sum(v, mask, normalization)[0] for n, v in token_losses.items()})
        self.step_loss.add(sums, count)
        return loss

    def uses_fused_head(self, batch: ScoringBatch) -> bool:
        """Whether this batch's losses apply the output head themselves (see ``fused_output_head``)."""
        if not self.head_is_linear or self.hparams.fused_output_head is False:
            return False
        if self.uses_teacher and self.teacher.mode != "current" and self.output_head().requires_grad:
            return False  # a trained head: the teacher's head is another weight (base snapshot or EMA)
        return True

    def output_head(self) -> torch.Tensor:
        """The output head's weight, [V, H]."""
        return base_model(self.model).get_output_embeddings().weight

    def _token_logprobs(self, outputs: torch.Tensor, batch: ScoringBatch, fused: bool,
                        temperature: float = 1.0) -> torch.Tensor:
        """[B, R] log-probs of the response tokens under ``softmax(logits / temperature)``, from logits, or from
        hidden states and the head (``fused``)."""
        if fused:
            return fused_linear_logprobs(outputs, self.output_head(), batch.response_ids, batch.response_mask,
                                         temperature=temperature)
        return token_logprobs(outputs, batch.response_ids, temperature)

    def _distillation(self, student_out, teacher_out, batch: ScoringBatch, mask: torch.Tensor, fused: bool):
        """The [B, R] distillation token losses, and the teacher's and the student's [B, R] log-probs of the response
        tokens (no gradient, 0 outside ``mask``); fused: all three from one chunked pass over the output head."""
        settings = dict(kind=self.hparams.divergence, beta=self.hparams.jsd_beta,
                        temperature=self.hparams.distill_temperature)
        if fused:  # the outputs are final hidden states
            losses, student_lp, teacher_lp = distillation_token_losses_with_logprobs(
                student_out, teacher_out, self.output_head(), batch.response_ids, mask, **settings
            )
            return losses, teacher_lp, student_lp
        losses = distillation_token_losses(student_out, teacher_out, mask, **settings)
        with torch.no_grad():
            teacher_lp = token_logprobs(teacher_out, batch.response_ids).masked_fill(~mask, 0.0)
            student_lp = token_logprobs(student_out.detach(), batch.response_ids).masked_fill(~mask, 0.0)
        return losses, teacher_lp, student_lp

    def _student_batch(self, rollouts: list[Rollout]) -> ScoringBatch:
        return build_scoring_batch(
            [r.prompt_ids for r in rollouts],
            [r.response_ids for r in rollouts],
            self.tokenizer.pad_token_id,
            self.device,
        )

    def teacher_batch(self, rollouts: list[Rollout]) -> tuple[ScoringBatch, torch.Tensor, int]:
        """Teacher inputs (question + context + the same response ids), which rollouts have a context,
        and how many contexts were cut to fit ``max_teacher_length``."""
        prompts, has_context, truncated = [], [], 0
        for r in rollouts:
            if r.context is None:
                prompts.append(r.prompt_ids)
                has_context.append(False)
                continue
            budget = self.max_teacher_tokens() - len(r.response_ids)
            prompt = teacher_prompt_ids(
                self.tokenizer, r.problem.question, r.context, r.context_header, budget,
                student_template_kwargs=self.hparams.student_template_kwargs or {},
                **(self.hparams.teacher_template_kwargs or {}),
            )
            prompts.append(prompt.ids)
            has_context.append(True)
            truncated += int(prompt.truncated)
        batch = build_scoring_batch(
            prompts, [r.response_ids for r in rollouts], self.tokenizer.pad_token_id, self.device
        )
        return batch, torch.tensor(has_context, device=self.device), truncated

    @torch.no_grad()
    def _teacher_outputs(self, rollouts: list[Rollout], score=response_logits):
        """The teacher's ``score`` (response logits or hidden states) and which rollouts have a context."""
        batch, has_context, truncated = self.teacher_batch(rollouts)
        self._check_contexts(rollouts, has_context)
        self.truncations += truncated
        self.log("train/truncations", float(truncated), reduce_fx="sum", batch_size=len(rollouts))
        with eval_mode(self.model), self.teacher.weights(self.model):  # eval: no dropout in the teacher's target
            outputs = score(self.model, batch, self.length_groups)
        return outputs, has_context

    def _check_contexts(self, rollouts: list[Rollout], has_context: torch.Tensor) -> None:
        """Self-distillation without any teacher context would train on nothing: say so."""
        fallbacks = any("critic_fallback" in r.feedback for r in rollouts)
        if self.hparams.objective == "self_distillation" and not has_context.any() and not fallbacks:
            raise ValueError(
                "objective 'self_distillation' needs a teacher context on the rollouts, and none has one: add a "
                "feedback callback that sets it (ReferenceSolution, StepCritique, ...) to trainer.callbacks, "
                "or a 'context' field to offline data"
            )

    def _grpo_token_losses(self, rollouts: list[Rollout], logprobs: torch.Tensor, batch: ScoringBatch):
        if any(r.reward is None for r in rollouts):
            raise ValueError(
                f"objective {self.hparams.objective!r} needs a reward on every rollout: add the BinaryReward "
                "feedback callback (trainer.callbacks) or provide 'reward' in offline data"
            )
        rewards = torch.tensor([r.reward for r in rollouts], device=self.device)
        groups = torch.tensor([r.group for r in rollouts], device=self.device)
        old = self._old_logprobs(rollouts, logprobs)
        advantages = group_advantages(rewards, groups)
        return grpo_token_losses(logprobs, old, advantages, batch.response_mask, self.hparams.grpo_clip)

    def _old_logprobs(self, rollouts: list[Rollout], logprobs: torch.Tensor) -> torch.Tensor:
        """Log-probs of the sampling policy: stored ones (offline data), else the live ones (on-policy)."""
        old = logprobs.detach().clone()
        for i, r in enumerate(rollouts):
            if r.logprobs is not None:
                old[i, : len(r.logprobs)] = torch.tensor(r.logprobs, device=old.device)
        return old

    # [B, R] teacher and student log-probs of the response tokens (0 outside the mask) and the distillation mask of
    # the last training step, set by _log_advantages for callbacks (TokenAdvantageLogger); None until a step with a
    # teacher pass
    last_token_logprobs: dict[str, torch.Tensor] | None = None

    @torch.no_grad()
    def _log_advantages(self, teacher: torch.Tensor, student: torch.Tensor, mask: torch.Tensor) -> None:
        # kept for callbacks (TokenAdvantageLogger) so that they need no forward pass of their own
        self.last_token_logprobs = {"teacher": teacher, "student": student, "mask": mask.detach()}
        advantages = token_advantages(teacher, student)
        count = mask.sum().clamp(min=1)
        self.log("train/abs_advantage", (advantages.abs() * mask).sum() / count, batch_size=int(count))
        self.log("train/advantage", (advantages * mask).sum() / count, batch_size=int(count))

    def _log_step(self, rollouts: list[Rollout], batch: ScoringBatch) -> None:
        size = len(rollouts)
        rewards = [r.reward for r in rollouts if r.reward is not None]
        if rewards:
            self.log("train/reward", sum(rewards) / len(rewards), prog_bar=True, batch_size=size)
        graded = [float(r.correct) for r in rollouts if r.correct is not None]
        if graded:
            self.log("train/accuracy", sum(graded) / len(graded), batch_size=size)
        self.log("train/tokens", batch.response_mask.sum().float(), reduce_fx="sum", batch_size=size)
        lag = self.global_step - min(r.policy_version for r in rollouts)
        self.log("train/policy_lag", float(lag), batch_size=size)

    def _log_phase_times(self, batch: ScoringBatch, size: int) -> None:
        """Log this step's phase seconds as ``time/<phase>`` and close the step of the phase timer."""
        self.phase_timer.add_tokens(int(batch.response_mask.sum()))
        for name, seconds in self.phase_timer.finish_step().items():
            self.log(f"time/{name}", seconds, batch_size=size)

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None) -> None:
        """The optimizer step on the step's normalised gradients, then the EMA teacher update; both skipped (and
        counted) when the step's loss or gradients are not finite."""
        finite = {}

        def guarded_closure():
            loss = optimizer_closure()  # the step's last micro-batch: its backward completes the step's gradients
            finite["values"] = self._normalize_step_gradients()
            # fp16 AMP: the GradScaler skips steps with inf/NaN gradients itself and needs the gradients to see them
            scaled = getattr(self.trainer.precision_plugin, "scaler", None) is not None
            ok = self.guard.step_is_finite(loss, self.model, check_grads=not scaled)
            finite["ok"] = self.trainer.strategy.reduce_boolean_decision(ok, all=True)  # all ranks skip together
            finite["loss"] = loss
            if not finite["ok"] and not scaled:
                optimizer.zero_grad(set_to_none=True)  # the optimizer leaves parameters without gradients alone
            return loss

        super().optimizer_step(epoch, batch_idx, optimizer, guarded_closure)
        self._log_step_loss(finite.get("values", {}))
        self.guard.record(finite.get("ok", True), self.global_step + 1, finite.get("loss"))  # 1-based: this step
        self.log("train/skipped_steps", float(self.guard.skipped), batch_size=1)
        if finite.get("ok", True):
            self.teacher.update(self.model)

    def _normalize_step_gradients(self) -> dict[str, float]:
        """Divide the step's gradients by its loss-token count over all micro-batches and ranks; the step's values."""
        trainer = self.trainer
        totals, count = self.step_loss.global_totals(trainer.strategy)
        self.step_loss.scale_gradients(self.model, count, trainer.accumulate_grad_batches, trainer.world_size)
        return self.step_loss.finish(totals, count)

    def _log_step_loss(self, values: dict[str, float]) -> None:
        """Log the optimizer step's loss (and hybrid terms) as normalised over the whole step."""
        for name, value in values.items():
            self.log(f"train/{name}", value, prog_bar=name == "loss", batch_size=1)

    def configure_optimizers(self):
        """The ``optimizer`` (AdamW, 8-bit or paged 8-bit AdamW) over the trainable weights, with linear warm-up."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = build_optimizer(self.hparams.optimizer, params, self.hparams.learning_rate,
                                    self.hparams.weight_decay)
        warmup = max(1, self.hparams.warmup_steps)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ---- evaluation --------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        """Create the held-out metrics for the datamodule's ``evaluation.k`` (none when it has no such setting:
        evaluating then stops with an error that says so)."""
        datamodule = self._datamodule()
        k = getattr(getattr(datamodule, "evaluation", None), "k", None)
        self.eval_k = k
        if k is None:
            self.eval_metrics = None
            return
        self.eval_metrics = nn.ModuleDict(
            {
                f"avg@{k}": AvgAtK(k),
                f"pass@{k}": PassAtK(k),
                f"maj@{k}": MajAtK(k),
                "mean_length": MeanMetric(),
            }
        )

    def validation_step(self, batch, batch_idx: int) -> None:
        """Update Avg@k / Pass@k / Maj@k / mean length with a batch of graded held-out samples."""
        self._eval_step(batch, "val")

    def test_step(self, batch, batch_idx: int) -> None:
        """Same as validation, logged under ``test/``."""
        self._eval_step(batch, "test")

    def _eval_step(self, batch, prefix: str) -> None:
        if self.eval_metrics is None:
            raise ValueError(
                f"held-out evaluation needs k, the samples per problem, from the datamodule's evaluation settings "
                f"(data.evaluation.k of sdlit.data.RolloutDataModule); {type(self._datamodule()).__name__} has none"
            )
        size = len(batch.problems)
        k = self.eval_k
        self.eval_metrics[f"avg@{k}"].update(batch.correct)
        self.eval_metrics[f"pass@{k}"].update(batch.correct)
        self.eval_metrics[f"maj@{k}"].update(batch.correct, batch.answers)
        self.eval_metrics["mean_length"].update(batch.lengths.float())
        for name, metric in self.eval_metrics.items():
            self.log(f"{prefix}/{name}", metric, on_step=False, on_epoch=True, batch_size=size)

    # ---- checkpoints -------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Keep only trainable weights (e.g. the LoRA adapter; every weight in a sharded checkpoint folder), the EMA
        teacher, the step guard's counters and the random state (every rank's) in the checkpoint."""
        if not self._writes_sharded_checkpoints():
            trainable = {f"model.{n}" for n, p in self.model.named_parameters() if p.requires_grad}
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}
        checkpoint["teacher"] = self.teacher.state_dict()
        checkpoint["step_guard"] = self.guard.state_dict()
        checkpoint["rng_states"] = capture_rng_states()
        if self._trainer is not None and self.trainer.world_size > 1:  # each rank samples its own rollouts
            checkpoint["rng_states_by_rank"] = self._rng_states_of_all_ranks(checkpoint["rng_states"])
        if "hyper_parameters" in checkpoint:  # e.g. LoraSettings as a dict: the file loads with weights_only=True
            checkpoint["hyper_parameters"] = plain_values(checkpoint["hyper_parameters"])

    def _writes_sharded_checkpoints(self) -> bool:
        """Whether the strategy writes each rank's shards to a checkpoint folder (``ModelParallelStrategy`` with
        ``save_distributed_checkpoint``). Such a folder keeps every weight, frozen ones too: loading it restores the
        whole model and would stop at a missing one."""
        strategy = self._trainer.strategy if self._trainer is not None else None
        return bool(getattr(strategy, "_save_distributed_checkpoint", False))

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Restore the EMA teacher state and the guard's counters; keep the random state for train start."""
        self.teacher.load_state_dict(checkpoint.get("teacher", {}))
        self.guard.load_state_dict(checkpoint.get("step_guard", {}))
        self._rng_to_restore = self._own_rng_states(checkpoint)

    def _rng_states_of_all_ranks(self, own: dict) -> list[dict]:
        """Every rank's random states, by global rank (a collective: every rank saves the checkpoint)."""
        import torch.distributed as dist

        states = [None] * self.trainer.world_size
        dist.all_gather_object(states, own)
        return states

    def _own_rng_states(self, checkpoint: dict) -> dict | None:
        """This rank's random states of a checkpoint: its own when the checkpoint has one per rank of this world
        size, else the states rank 0 saved."""
        by_rank = checkpoint.get("rng_states_by_rank")
        if by_rank is None or self._trainer is None:
            return checkpoint.get("rng_states")
        if len(by_rank) != self.trainer.world_size:
            log.warning("resuming %d processes from a checkpoint of %d: every rank continues with rank 0's random "
                        "states, so the rollouts are not those of an uninterrupted run", self.trainer.world_size,
                        len(by_rank))
            return checkpoint.get("rng_states")
        return by_rank[self.trainer.global_rank]

    def on_fit_start(self) -> None:
        """Before any rollout: the teacher view must line up with the student's (see :mod:`sdlit.prompts`)."""
        if self.uses_teacher:
            check_teacher_view(self.tokenizer, self.hparams.student_template_kwargs,
                               self.hparams.teacher_template_kwargs)

    def on_train_start(self) -> None:
        """A resumed fit continues with the random state of its checkpoint, so it samples the same rollouts."""
        if self._rng_to_restore is not None:
            restore_rng_states(self._rng_to_restore)
            self._rng_to_restore = None
