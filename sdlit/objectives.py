"""Training objectives: self-distillation, GRPO, their hybrid and supervised fine-tuning, on response-aligned logits.

All functions take logits already restricted to the response positions (``[B, R, V]``, see
:mod:`sdlit.scoring`) and a ``[B, R]`` mask of real response tokens, and average over those tokens;
:func:`distillation_loss` takes the final hidden states and the output head weight instead when given the head.
"""

from __future__ import annotations

import torch

from sdlit.kernels import fused_linear_divergence, fused_linear_divergence_with_logprobs, per_token_divergence


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor,
    kind: str = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    output_head: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean per-token divergence between teacher and student next-token distributions over masked tokens.

    With ``output_head`` ([V, H]) the first two arguments are final hidden states ([B, R, H]) and the logits are
    ``hidden @ output_head.T``, applied in chunks of rows without the [B, R, V] logits
    (:func:`sdlit.kernels.fused_linear_divergence`).
    """
    settings = dict(kind=kind, beta=beta, temperature=temperature)
    if output_head is None:
        per_token = per_token_divergence(student_logits, teacher_logits.detach(), mask, **settings)
    else:
        per_token = fused_linear_divergence(student_logits, teacher_logits.detach(), output_head, mask, **settings)
    return per_token.sum() / mask.sum().clamp(min=1)


def distillation_loss_with_logprobs(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    output_head: torch.Tensor,
    token_ids: torch.Tensor,
    mask: torch.Tensor,
    kind: str = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`distillation_loss` from final hidden states and the output head, and the log-probs of ``token_ids``
    (the response tokens) under the student and the teacher, taken from the same chunks of logits.

    Returns:
        (loss, student log-probs [B, R], teacher log-probs [B, R]): log-probs at temperature 1, without gradient,
        0 where ``mask`` is False.
    """
    per_token, student_logprobs, teacher_logprobs = fused_linear_divergence_with_logprobs(
        student_hidden, teacher_hidden.detach(), output_head, token_ids, mask, kind=kind, beta=beta,
        temperature=temperature,
    )
    return per_token.sum() / mask.sum().clamp(min=1), student_logprobs, teacher_logprobs


def group_advantages(rewards: torch.Tensor, groups: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """GRPO advantages: each reward minus its group's mean, divided by the group's std (+ eps).

    A group whose rewards are all equal gets zero advantage (no signal), as in GRPO.
    """
    rewards = rewards.float()
    advantages = torch.zeros_like(rewards)
    for group in groups.unique():
        members = groups == group
        values = rewards[members]
        std = values.std(unbiased=False) if values.numel() > 1 else values.new_zeros(())
        advantages[members] = (values - values.mean()) / (std + eps)
    return advantages


def grpo_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float = 0.2,
) -> torch.Tensor:
    """Clipped policy-gradient loss of GRPO, averaged over all response tokens of the batch.

    Args:
        logprobs: [B, R] log-probs of the sampled tokens under the current policy (with gradient).
        old_logprobs: [B, R] log-probs under the policy that sampled them (no gradient).
        advantages: [B] one advantage per rollout.
        mask: [B, R] real response tokens.
        clip_eps: The ratio is clipped to [1 - clip_eps, 1 + clip_eps].
    """
    ratio = torch.exp(logprobs - old_logprobs.detach())
    adv = advantages.unsqueeze(1)
    unclipped = ratio * adv
    clipped = ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps) * adv
    per_token = -torch.minimum(unclipped, clipped)
    return (per_token * mask).sum() / mask.sum().clamp(min=1)


def sft_loss(logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the target tokens: mean negative log-prob over all masked tokens of the batch.

    Args:
        logprobs: [B, R] log-probs of the target tokens under the model (with gradient).
        mask: [B, R] real target tokens.
    """
    return -(logprobs * mask).sum() / mask.sum().clamp(min=1)


def token_advantages(teacher_logprobs: torch.Tensor, student_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token advantage A_t = log p_teacher(y_t) - log p_student(y_t) (no gradient)."""
    return (teacher_logprobs - student_logprobs).detach()
