"""``sdlit analyze``: per-token advantages of a rollout under several teacher contexts, drawn and tabulated.

Two ways in:

- ``--records runs/.../token_advantages.jsonl``: records saved during training by ``TokenAdvantageLogger``.
- ``--model X`` with problems (``--task GSM8K --indices [0,1,2]`` or ``--problems file.jsonl``): one rollout
  per problem is sampled (or taken from the file's ``response`` field), the critic locates its first wrong
  step, and the rollout is scored once by the student and once per teacher context (``--contexts``: any
  feedback callbacks; default reference solution and step critique), all in one batched pass.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Iterable, Literal

import torch
from jsonargparse import lazy_instance
from lightning.pytorch import seed_everything

from sdlit.analysis.records import TokenRecord, read_records, token_texts, write_records
from sdlit.analysis.report import AnalysisOutputs, write_outputs
from sdlit.callbacks.feedback import ReferenceSolution, StepCritique
from sdlit.critics import ArithmeticStepCritic, Critic
from sdlit.feedback import Feedback
from sdlit.rollout import Rollout, tag_step_spans
from sdlit.sampling import sample_rollouts
from sdlit.scoring import build_scoring_batch, response_logits, token_logprobs
from sdlit.settings import SamplingSettings
from sdlit.tasks.answers import is_correct
from sdlit.tasks.base import DataError, Problem, Task
from sdlit.tasks.gsm8k import parse_row
from sdlit.tasks.rows import file_rows

__all__ = ["analyze", "load_scorer", "score_contexts", "score_rollouts"]

log = logging.getLogger(__name__)


def analyze(
    records: str | None = None,
    model: str | None = None,
    task: Task | None = None,
    split: Literal["train", "eval"] = "eval",
    indices: list[int] | None = None,
    problems: str | None = None,
    count: int = 1,
    only_first_error: bool = False,
    only_wrong: bool = False,
    contexts: list[Feedback] | None = None,
    critic: Critic = lazy_instance(ArithmeticStepCritic),
    temperature: float = 0.0,
    max_new_tokens: int = 256,
    batch_size: int = 8,
    seed: int = 0,
    dtype: str | None = None,
    device: str | None = None,
    max_rollouts: int = 20,
    output_dir: str = "analysis",
) -> AnalysisOutputs:
    """Per-token advantages A_t of rollouts under several teacher contexts, drawn and tabulated.

    Writes under ``output_dir``: a PNG per rollout (one panel per context), ``tokens.html`` (tokens coloured
    by A_t) and ``regions.csv`` (region statistics, also printed).

    Args:
        records: JSONL of token-advantage records (from ``TokenAdvantageLogger`` or an earlier analysis).
            Give this, or ``model`` with problems.
        model: Model to score with: packaged alias, local directory or Hugging Face id.
        task: Problem source for ``indices`` (e.g. ``GSM8K``, ``Arith``); its answer check grades rollouts.
        split: Which split of ``task`` the indices refer to.
        indices: 0-based indices of problems in the split (default: from the first on, as many as needed).
        problems: JSONL/Parquet of problems instead of ``task``: fields ``question`` and ``answer`` (GSM8K
            format, last line ``#### <number>``), optional ``response`` (a given rollout; else one is sampled).
        count: Number of rollouts to analyse (problems are tried in order).
        only_first_error: Keep only rollouts in which the critic finds a wrong step (skip the others).
        only_wrong: Keep only rollouts whose final answer is wrong (skip the others).
        contexts: Feedback callbacks whose teacher contexts are compared on the same rollout (default:
            ``ReferenceSolution`` and ``StepCritique``).
        critic: Locates the first wrong step of each rollout (the dashed line and the regions).
        temperature: Sampling temperature of the rollout; 0 decodes greedily.
        max_new_tokens: Longest sampled rollout in tokens.
        batch_size: Problems sampled per generation batch.
        seed: Random seed of sampling.
        dtype: Weight dtype of the model (default fp32).
        device: Device to run on (default: CUDA when available, else CPU).
        max_rollouts: Most rollouts drawn from ``records`` (the first ones in the file).
        output_dir: Directory for the PNGs, ``tokens.html``, ``regions.csv`` and (model mode) ``records.jsonl``.
    """
    if (records is None) == (model is None):
        raise ValueError("sdlit analyze: give either --records FILE or --model NAME (with --task or --problems)")
    if records is not None:
        return write_outputs(read_records(records), output_dir, max_rollouts)
    contexts = contexts if contexts is not None else [ReferenceSolution(), StepCritique()]
    if not contexts:
        raise ValueError("sdlit analyze: --contexts is empty; give at least one feedback callback")
    pairs = _problems(task, split, indices, problems)
    seed_everything(seed, verbose=False)
    module = load_scorer(model, dtype, device)

    def keep(rollout: Rollout) -> bool:
        wrong_step = rollout.feedback["first_error"] is not None
        return (wrong_step or not only_first_error) and (not rollout.correct or not only_wrong)

    grade = task.is_correct if task is not None else is_correct
    batches = (pairs[i : i + batch_size] for i in range(0, len(pairs), batch_size))
    rollouts = (r for batch in batches for r in _rollouts(module, batch, temperature, max_new_tokens))
    scored = score_rollouts(module, rollouts, grade, critic, contexts, keep, count)
    write_records(scored, Path(output_dir) / "records.jsonl")
    return write_outputs(scored, output_dir)


def _problems(task, split, indices, path) -> list[tuple[Problem, str | None]]:
    """(problem, given response or None) pairs from ``task`` + ``indices`` or from the file ``path``."""
    if (task is None) == (path is None):
        raise ValueError("sdlit analyze --model needs exactly one of --task (with --indices) or --problems FILE")
    if path is not None:
        pairs = []
        for number, row in file_rows(Path(path)):
            if isinstance(row, DataError):
                raise row
            problem = parse_row(row, path, number, f"{Path(path).stem}/{number - 1}")
            response = row.get("response")
            if response is not None and (not isinstance(response, str) or not response.strip()):
                raise DataError(f"{path}: row {number}: field 'response' is empty or not a string")
            pairs.append((problem, response))
        return pairs
    pool = task.eval_problems() if split == "eval" else task.train_problems()
    if indices is None:
        return [(p, None) for p in pool]
    for index in indices:
        if not 0 <= index < len(pool):
            raise ValueError(f"sdlit analyze: index {index} is outside the {len(pool)} {split} problems of the task")
    return [(pool[i], None) for i in indices]


def load_scorer(model: str, dtype: str | None = None, device: str | None = None):
    """The model as a :class:`SelfDistillationModule` (no adapter: teacher and student share the weights), in
    eval mode on ``device`` (default CUDA when available): its ``teacher_batch`` builds training's teacher prompts."""
    from sdlit.module import SelfDistillationModule

    module = SelfDistillationModule(model=model, lora=None, teacher="current", dtype=dtype)
    module.configure_model()
    return module.to(device or ("cuda" if torch.cuda.is_available() else "cpu")).eval()


def score_rollouts(module, rollouts: Iterable[Rollout], grade, critic: Critic, contexts: list[Feedback], keep,
                   count: int) -> list[TokenRecord]:
    """Grade (``grade(response, gold)``) and critique rollouts in order; score the first ``count`` for which
    ``keep(rollout)`` holds under every context; return their records."""
    records: list[TokenRecord] = []
    kept = 0
    for rollout in rollouts:
        rollout.correct = grade(rollout.response, rollout.problem.answer)
        critique = critic.critique(rollout.problem.question, rollout.problem.solution, rollout.response)
        rollout.feedback.update(case=critique.case, first_error=critique.first_error)
        if not keep(rollout):
            log.info("skipping %s (answer right: %s, critic: %s)", rollout.problem.id, rollout.correct, critique.case)
            continue
        records += score_contexts(module, rollout, contexts)
        kept += 1
        if kept == count:
            return records
    if kept < count:
        log.warning("sdlit analyze: only %d of the %d rollouts asked for were kept", kept, count)
    if not records:
        raise ValueError("sdlit analyze: no rollout to analyse (all skipped: try more problems, or "
                         "only_first_error / only_wrong false)")
    return records


def _rollouts(module, pairs, temperature, max_new_tokens) -> list[Rollout]:
    """Sampled rollouts for pairs without a response, given ones (tokenized once, EOS added) for the rest."""
    tokenizer, kwargs = module.tokenizer, module.hparams.student_template_kwargs or {}
    to_sample = [p for p, response in pairs if response is None]
    sampled = iter(sample_rollouts(module.model, tokenizer, to_sample, n=1, template_kwargs=kwargs,
                                   settings=SamplingSettings(temperature=temperature, max_new_tokens=max_new_tokens))
                   if to_sample else [])
    rollouts = []
    for problem, response in pairs:
        if response is None:
            rollouts.append(next(sampled))
            continue
        rollout = Rollout.from_text(problem, response, tokenizer, template_kwargs=kwargs)
        # what the tokens say: steps and critic use it
        rollout.response = tokenizer.decode(rollout.response_ids, skip_special_tokens=True)
        rollouts.append(rollout)
    for rollout in rollouts:
        tag_step_spans(rollout, tokenizer)
    return rollouts


@torch.no_grad()
def score_contexts(module, rollout: Rollout, contexts: list[Feedback]) -> list[TokenRecord]:
    """One record per context: A_t of the rollout's tokens, teacher (question + that context) minus student.

    The student row and every teacher row are scored in one batched forward pass each, on the very same
    response ids. A context callback that gives this rollout no context is skipped with a warning.
    """
    annotated = []
    for feedback in contexts:
        copy_ = copy.deepcopy(rollout)
        feedback.annotate([copy_])
        if copy_.context is None:
            log.warning("%s gave rollout %s no teacher context; its panel is left out",
                        type(feedback).__name__, rollout.problem.id)
            continue
        annotated.append((type(feedback).__name__, copy_))
    if not annotated:
        return []
    ids = [rollout.response_ids]
    student = build_scoring_batch([rollout.prompt_ids], ids, module.tokenizer.pad_token_id, module.device)
    student_lp = token_logprobs(response_logits(module.model, student), student.response_ids)[0]
    teacher, _, _ = module.teacher_batch([r for _, r in annotated])
    teacher_lp = token_logprobs(response_logits(module.model, teacher), teacher.response_ids)
    length = len(rollout.response_ids)
    tokens = token_texts(module.tokenizer, rollout.response_ids, rollout.response)
    first_error = rollout.feedback.get("first_error")
    if first_error is not None and first_error >= len(rollout.step_spans):
        log.warning("rollout %s: the critic's first error (step %d) is not one of its %d steps; drawn without it",
                    rollout.problem.id, first_error, len(rollout.step_spans))
        first_error = None
    return [
        TokenRecord(
            tokens=tokens,
            advantages=(teacher_lp[row, :length] - student_lp[:length]).tolist(),
            step_spans=list(rollout.step_spans),
            first_error=first_error,
            condition=condition,
            problem_id=rollout.problem.id,
            correct=rollout.correct,
            case=rollout.feedback.get("case"),
            context_header=annotated_rollout.context_header,
        )
        for row, (condition, annotated_rollout) in enumerate(annotated)
    ]


def analyze_cli(args: list[str] | None = None) -> AnalysisOutputs:
    """``sdlit analyze [--help]``: parse ``args`` with jsonargparse and run :func:`analyze`."""
    from jsonargparse import CLI

    import sdlit.callbacks  # noqa: F401  (short class names for --contexts)
    import sdlit.critics  # noqa: F401
    import sdlit.tasks  # noqa: F401

    return CLI(analyze, args=args, prog="sdlit analyze")
