"""Score given response tokens under a prompt: the shared layout of the student and teacher passes.

Rows are laid out as ``[left padding][prompt][response][right padding]``: every response then starts at the
same column, so one forward pass with ``logits_to_keep`` returns logits for the response positions only,
``[B, R, V]``, aligned token by token between a student batch and a teacher batch with other prompts.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel


@dataclass
class ScoringBatch:
    """Model inputs for scoring responses.

    Attributes:
        input_ids: [B, P + R] token ids.
        attention_mask: [B, P + R], 1 on real tokens.
        position_ids: [B, P + R], counting from 0 at each row's first real token.
        response_ids: [B, R] the response tokens (pad where ``response_mask`` is False).
        response_mask: [B, R] bool, True on real response tokens.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    response_ids: torch.Tensor
    response_mask: torch.Tensor


def build_scoring_batch(
    prompts: list[list[int]], responses: list[list[int]], pad_id: int, device: torch.device | str = "cpu"
) -> ScoringBatch:
    """Lay out prompts (left-padded) and responses (right-padded) so responses share their columns."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    p_width = max(len(p) for p in prompts)
    r_width = max(1, max(len(r) for r in responses))
    batch = len(prompts)
    input_ids = torch.full((batch, p_width + r_width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    response_mask = torch.zeros((batch, r_width), dtype=torch.bool)
    for i, (prompt, response) in enumerate(zip(prompts, responses)):
        start = p_width - len(prompt)
        input_ids[i, start:p_width] = torch.tensor(prompt, dtype=torch.long)
        input_ids[i, p_width : p_width + len(response)] = torch.tensor(response, dtype=torch.long)
        attention_mask[i, start : p_width + len(response)] = 1
        response_mask[i, : len(response)] = True
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
    return ScoringBatch(
        input_ids=input_ids.to(device),
        attention_mask=attention_mask.to(device),
        position_ids=position_ids.to(device),
        response_ids=input_ids[:, p_width:].to(device),
        response_mask=response_mask.to(device),
    )


def response_logits(model: PreTrainedModel, batch: ScoringBatch) -> torch.Tensor:
    """Next-token logits at the response positions, ``[B, R, V]``: entry t predicts ``response_ids[:, t]``."""
    r_width = batch.response_ids.shape[1]
    kwargs = {}
    if _accepts_logits_to_keep(model):
        kwargs["logits_to_keep"] = r_width + 1
    out = model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
        use_cache=False,
        **kwargs,
    )
    return out.logits[:, -(r_width + 1) : -1]


def token_logprobs(logits: torch.Tensor, token_ids: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Log-probability (fp32) of each given token under ``logits / temperature``: ``[B, R]``."""
    scaled = logits.float() / temperature if temperature != 1.0 else logits.float()
    # gather minus logsumexp: the same value as log_softmax(...).gather(...) without a [B, R, V] output
    return scaled.gather(-1, token_ids.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(scaled, dim=-1)


def _accepts_logits_to_keep(model: PreTrainedModel) -> bool:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(base.forward).parameters
