"""Training objectives: self-distillation, GRPO, their hybrid and supervised fine-tuning, on response-aligned logits.

Each objective has a per-token form (``*_token_losses``: a ``[B, R]`` tensor, 0 outside the mask) that the module
sums over a micro-batch and divides by the loss tokens of the whole optimizer step, across gradient-accumulation
micro-batches and ranks (:func:`loss_sum`, :class:`sdlit.normalization.StepLoss`), so that an update does not
depend on how its rollouts are split.

All functions take logits already restricted to the response positions (``[B, R, V]``, see
:mod:`sdlit.scoring`) and a ``[B, R]`` mask of real response tokens; :func:`distillation_token_losses` takes the
final hidden states and the output head weight instead when given the head.
"""

from __future__ import annotations

from typing import Literal

import torch

from sdlit.kernels import fused_linear_divergence_with_logprobs, per_token_divergence

Normalization = Literal["tokens", "sequences"]


def distillation_token_losses(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor,
    kind: str = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
) -> torch.Tensor:
    """[B, R] per-token divergence between teacher and student next-token distributions, 0 where ``mask`` is False.

    From logits; :func:`distillation_token_losses_with_logprobs` takes final hidden states and the output head.
    """
    per_token = per_token_divergence(student_logits, teacher_logits.detach(), mask, kind=kind, beta=beta,
                                     temperature=temperature)
    return per_token.view(mask.shape)


def distillation_token_losses_with_logprobs(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    output_head: torch.Tensor,
    token_ids: torch.Tensor,
    mask: torch.Tensor,
    kind: str = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`distillation_token_losses` from final hidden states and the output head, and the log-probs of
    ``token_ids`` (the response tokens) under the student and the teacher, taken from the same chunks of logits.

    Returns:
        (per-token losses [B, R], student log-probs [B, R], teacher log-probs [B, R]): log-probs at temperature 1,
        without gradient; all three 0 where ``mask`` is False.
    """
    per_token, student_logprobs, teacher_logprobs = fused_linear_divergence_with_logprobs(
        student_hidden, teacher_hidden.detach(), output_head, token_ids, mask, kind=kind, beta=beta,
        temperature=temperature,
    )
    return per_token.view(mask.shape), student_logprobs, teacher_logprobs


def group_advantages(rewards: torch.Tensor, groups: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """GRPO advantages, as TRL computes them: ``A_i = (r_i - mean_g) / (std_g + eps)`` over the rollouts of group g.

    ``std_g`` is the Bessel-corrected standard deviation ``sqrt(sum_i (r_i - mean_g)^2 / (n_g - 1))`` (torch's and
    TRL's default). A group of one rollout, and a group whose rewards are all equal, get zero advantage (no signal).
    """
    rewards = rewards.float()
    advantages = torch.zeros_like(rewards)
    for group in groups.unique():
        members = groups == group
        values = rewards[members]
        if values.numel() < 2:
            continue
        advantages[members] = (values - values.mean()) / (values.std() + eps)
    return advantages


def grpo_token_losses(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float = 0.2,
) -> torch.Tensor:
    """[B, R] clipped policy-gradient loss of GRPO per response token, 0 where ``mask`` is False.

    Args:
        logprobs: [B, R] log-probs of the sampled tokens under the current policy (with gradient), at the
            sampling temperature.
        old_logprobs: [B, R] log-probs under the policy that sampled them (no gradient).
        advantages: [B] one advantage per rollout.
        mask: [B, R] real response tokens.
        clip_eps: The ratio is clipped to [1 - clip_eps, 1 + clip_eps].
    """
    ratio = torch.exp(logprobs - old_logprobs.detach())
    adv = advantages.unsqueeze(1)
    unclipped = ratio * adv
    clipped = ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps) * adv
    return -torch.minimum(unclipped, clipped) * mask


def sft_token_losses(logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B, R] negative log-prob of each target token, 0 where ``mask`` is False."""
    return -logprobs * mask


def loss_sum(
    token_losses: torch.Tensor, mask: torch.Tensor, normalization: Normalization = "tokens"
) -> tuple[torch.Tensor, int]:
    """A micro-batch's share of an optimizer step's loss, before the division by the step's count.

    ``tokens``: (sum of the masked token losses, number of masked tokens); the step's loss is then the mean over
    all its loss tokens (TRL's token-level normalisation). ``sequences``: (sum over rows of each row's mean masked
    token loss, number of rows with a masked token); the step's loss is then the mean over its sequences.
    """
    mask = mask.to(token_losses.dtype)
    if normalization == "tokens":
        return (token_losses * mask).sum(), int(mask.sum())
    if normalization != "sequences":
        raise ValueError(f"loss_normalization must be 'tokens' or 'sequences', got {normalization!r}")
    lengths = mask.sum(dim=1)
    per_row = (token_losses * mask).sum(dim=1) / lengths.clamp(min=1)
    return per_row.sum(), int((lengths > 0).sum())


def token_advantages(teacher_logprobs: torch.Tensor, student_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token advantage A_t = log p_teacher(y_t) - log p_student(y_t) (no gradient)."""
    return (teacher_logprobs - student_logprobs).detach()
