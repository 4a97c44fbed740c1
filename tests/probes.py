"""Callbacks that look inside a real ``sdlit fit`` run in another process: :class:`StepRecorder` and
:class:`KillAtStep` (resume tests), :class:`ShardingProbe` (sharded runs), :class:`EngineProbe` (``data.sampler:
vllm``).

:class:`ShardingProbe` checks a sharded (FSDP2) run from inside, against an unsharded copy of the solver. Each rank
writes ``probe-rank{R}.json``:

- ``student`` / ``teacher``: per training step, the largest difference between the log-probs the sharded run
  trained on (``module.last_token_logprobs``) and those of an unsharded model loaded with the live weights (student)
  or the teacher's weights (teacher: the initial weights for ``base``, the EMA shadow for ``ema``), on the same
  rollouts;
- ``greedy``: whether greedy samples of the sharded solver (both samplers) equal the unsharded model's;

and at the end ``shards-rank{R}.pt``: this rank's own shards of the trainable weights.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import torch
from lightning.pytorch import Callback
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from sdlit.models import add_lora, load_model
from sdlit.sampling import sample_responses
from sdlit.scoring import response_logits, token_logprobs
from sdlit.settings import SamplingSettings
from sdlit.sharding import is_sharded, local_tensor


class StepRecorder(Callback):
    """Appends each finished step's loss, problem ids and responses to a JSONL file."""

    def __init__(self, path: str):
        self.path = path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        record = {
            "rank": trainer.global_rank,
            "step": trainer.global_step,
            "epoch": trainer.current_epoch,
            "loss": float(outputs["loss"]),
            "problems": [r.problem.id for r in batch],
            "responses": [r.response for r in batch],
        }
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


class KillAtStep(Callback):
    """SIGKILLs the process when step ``step + 1`` starts, i.e. right after step ``step``'s checkpoint."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class ShardingProbe(Callback):
    """Compares the sharded run's teacher and student log-probs with an unsharded reference (see module doc)."""

    def __init__(self, out_dir: str):
        self.out_dir = Path(out_dir)
        self.record = {"student": [], "teacher": [], "greedy": {}}
        self.initial: dict[str, torch.Tensor] | None = None

    def on_train_start(self, trainer, pl_module):
        assert is_sharded(pl_module.model)
        self.initial = self._full_state(pl_module)
        reference = self._reference(pl_module, self.initial)
        prompts = [[5, 6, 7, 8], [9, 10, 11, 12, 13, 14]]
        greedy = SamplingSettings(temperature=0.0, max_new_tokens=10)
        for sampler in ("static_cache", "generate"):
            sharded = sample_responses(pl_module.model, pl_module.tokenizer, prompts, settings=greedy, sampler=sampler)
            plain = sample_responses(reference, pl_module.tokenizer, prompts, settings=greedy, sampler=sampler)
            self.record["greedy"][sampler] = sharded == plain and all(len(r) > 0 for r in sharded)
        assert is_sharded(pl_module.model)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.rollouts = batch
        self.live = self._full_state(pl_module)  # before the step: the weights this step's passes use
        shadow = pl_module.teacher.state_dict()  # the EMA/base snapshot (whole tensors; empty before its first use)
        self.teacher_state = {**self.live, **shadow}
        if pl_module.teacher.mode == "base" and not shadow:
            self.teacher_state = self.initial  # base: the initial weights (with LoRA: the adapter disabled below)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        trained = pl_module.last_token_logprobs
        mask = trained["mask"]
        student = self._reference(pl_module, self.live)
        batch = pl_module._student_batch(self.rollouts)
        self.record["student"].append(_gap(student, batch, trained["student"], mask))
        teacher = self._reference(pl_module, self.teacher_state)
        batch = pl_module.teacher_batch(self.rollouts)[0]
        if pl_module.teacher.mode == "base" and hasattr(teacher, "disable_adapter"):
            with teacher.disable_adapter():
                self.record["teacher"].append(_gap(teacher, batch, trained["teacher"], mask))
        else:
            self.record["teacher"].append(_gap(teacher, batch, trained["teacher"], mask))

    def on_train_end(self, trainer, pl_module):
        rank = trainer.global_rank
        shards = {n: local_tensor(p.data).detach().clone() for n, p in pl_module.model.named_parameters()
                  if p.requires_grad}
        torch.save(shards, self.out_dir / f"shards-rank{rank}.pt")
        (self.out_dir / f"probe-rank{rank}.json").write_text(json.dumps(self.record))

    @staticmethod
    def _full_state(pl_module) -> dict[str, torch.Tensor]:
        """The solver's whole weights (a collective: every rank gathers them)."""
        state = get_model_state_dict(pl_module.model, options=StateDictOptions(full_state_dict=True))
        return {k: v.detach().clone() for k, v in state.items()}

    @staticmethod
    def _reference(pl_module, state: dict[str, torch.Tensor]):
        """An unsharded solver of the same kind with ``state`` loaded (strictly)."""
        hp = pl_module.hparams
        model = load_model(hp.model)
        if pl_module.lora is not None:
            model = add_lora(model, pl_module.lora)
        model.load_state_dict(state, strict=True)
        return model.eval()


@torch.no_grad()
def _gap(model, batch, trained: torch.Tensor, mask: torch.Tensor) -> float:
    """The largest |reference - trained| log-prob over the masked response tokens."""
    logprobs = token_logprobs(response_logits(model, batch, False), batch.response_ids)
    return float(((logprobs - trained).abs() * mask).max())


class EngineProbe(Callback):
    """At the end of fit, each rank writes ``engine-rank{R}.json``: whether its vLLM engine, synced with the trained
    weights, samples the greedy tokens sdlit's own sampler draws from the (possibly sharded) solver."""

    def __init__(self, out_dir: str):
        self.out_dir = Path(out_dir)

    def on_train_end(self, trainer, pl_module):
        engine = trainer.datamodule.engine(pl_module)
        engine.sync(pl_module.model, pl_module.global_step)
        greedy = SamplingSettings(temperature=0.0, max_new_tokens=10)
        prompts = [[5, 6, 7, 8], [9, 10, 11, 12, 13, 14]]
        ours = sample_responses(pl_module.model, pl_module.tokenizer, prompts, settings=greedy)
        theirs = sample_responses(pl_module.model, pl_module.tokenizer, prompts, settings=greedy, sampler="vllm",
                                  engine=engine)
        record = {"equal": ours == theirs, "version": engine.synced_version}
        (self.out_dir / f"engine-rank{trainer.global_rank}.json").write_text(json.dumps(record))
