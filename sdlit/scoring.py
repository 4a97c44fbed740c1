"""Score given response tokens under a prompt: the shared layout of the student and teacher passes.

Rows are laid out as ``[left padding][prompt][response][right padding]``: every response then starts at the
same column, so one forward pass with ``logits_to_keep`` returns logits for the response positions only,
``[B, R, V]``, aligned token by token between a student batch and a teacher batch with other prompts.

Padding costs as much compute as real tokens. :func:`response_logits` therefore scores rows of similar length
together: it splits the batch into length groups (the split that minimises padded tokens plus a fixed cost per
extra forward pass), runs each group on only the columns it uses, and writes the logits back into the
``[B, R, V]`` layout.

:func:`response_hidden` gives the final hidden states at the same positions, ``[B, R, H]``, for losses that apply
the output head themselves in chunks of rows (:mod:`sdlit.kernels`), so that the ``[B, R, V]`` logits never exist;
:func:`output_head_weight` says whether a model's logits are exactly that product.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel

from sdlit.models import base_model


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
    for i, (prompt, response) in enumerate(zip(prompts, responses, strict=False)):
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


# What one more forward pass costs, in padded tokens: a length group must save at least this much padding
GROUP_OVERHEAD_TOKENS = 64


def response_logits(model: PreTrainedModel, batch: ScoringBatch, length_groups: bool = True) -> torch.Tensor:
    """Next-token logits at the response positions, ``[B, R, V]``: entry t predicts ``response_ids[:, t]``.

    With ``length_groups`` rows of similar length are scored together without most of the padding (same
    logits; entries past a row's response are 0). Differentiable either way.
    """
    return _grouped(_response_logits, model, batch, length_groups)


def response_hidden(model: PreTrainedModel, batch: ScoringBatch, length_groups: bool = True) -> torch.Tensor:
    """Final hidden states (the output head's input) at the response positions, ``[B, R, H]``: entry t is the
    state that predicts ``response_ids[:, t]``. Length groups and gradients as in :func:`response_logits`."""
    return _grouped(_response_hidden, model, batch, length_groups)


def output_head_weight(model: PreTrainedModel) -> torch.Tensor | None:
    """The output head's weight ``W`` when the model's logits are exactly ``final hidden @ W.T``, else None.

    Checked once by running the model both ways on a short probe (eval mode): models that scale or soft-cap their
    logits, heads with a bias or an adapter, and models without ``get_decoder`` give None.
    """
    base = base_model(model)
    head = base.get_output_embeddings()
    if type(head) is not nn.Linear or head.bias is not None or not hasattr(base, "get_decoder"):
        return None
    device = head.weight.device
    probe = torch.arange(3, 11, device=device).remainder(head.weight.shape[0])[None]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            logits = model(input_ids=probe, use_cache=False).logits.float()
            product = head(base.get_decoder()(input_ids=probe, use_cache=False).last_hidden_state).float()
    finally:
        model.train(was_training)
    tolerance = 1e-3 * max(1.0, float(logits.abs().max()))
    return head.weight if torch.allclose(product, logits, rtol=0, atol=tolerance) else None


def _grouped(score, model, batch: ScoringBatch, length_groups: bool) -> torch.Tensor:
    """``score(model, batch)`` ([B, R, D]) run per length group and put back in the batch's layout."""
    prompt_lengths = batch.attention_mask[:, : batch.input_ids.shape[1] - batch.response_ids.shape[1]].sum(1)
    response_lengths = batch.response_mask.sum(1)
    groups = group_by_length(prompt_lengths.tolist(), response_lengths.tolist()) if length_groups else []
    if len(groups) <= 1:
        return score(model, batch)
    out = None
    for rows in groups:
        part = score(model, _trimmed(batch, rows, int(prompt_lengths[rows].max()), int(response_lengths[rows].max())))
        if out is None:
            out = part.new_zeros((batch.response_ids.shape[0], batch.response_ids.shape[1], part.shape[-1]))
        out[torch.tensor(rows, device=out.device), : part.shape[1]] = part
    return out


def group_by_length(prompt_lengths: list[int], response_lengths: list[int],
                    overhead: int = GROUP_OVERHEAD_TOKENS) -> list[list[int]]:
    """Rows split into groups scored together: the split of the rows, sorted by length, that minimises the padded
    tokens of all groups (rows x (longest prompt + longest response)) plus ``overhead`` per group."""
    order = sorted(range(len(prompt_lengths)), key=lambda i: (prompt_lengths[i] + response_lengths[i], i))
    best = [0.0] + [float("inf")] * len(order)  # best[j]: cost of the first j sorted rows
    cut = [0] * (len(order) + 1)
    for j in range(1, len(order) + 1):
        longest_prompt = longest_response = 0
        for i in range(j - 1, -1, -1):  # group = sorted rows i .. j-1
            longest_prompt = max(longest_prompt, prompt_lengths[order[i]])
            longest_response = max(longest_response, response_lengths[order[i]])
            cost = best[i] + (j - i) * (longest_prompt + longest_response) + overhead
            if cost < best[j]:
                best[j], cut[j] = cost, i
    groups, j = [], len(order)
    while j > 0:
        groups.append(sorted(order[cut[j] : j]))
        j = cut[j]
    return groups[::-1]


def _trimmed(batch: ScoringBatch, rows: list[int], prompt_width: int, response_width: int) -> ScoringBatch:
    """The given rows on only the columns they use: their longest prompt and longest response."""
    split = batch.input_ids.shape[1] - batch.response_ids.shape[1]
    index = torch.tensor(rows, device=batch.input_ids.device)
    columns = slice(split - prompt_width, split + max(1, response_width))
    return ScoringBatch(
        input_ids=batch.input_ids[index, columns],
        attention_mask=batch.attention_mask[index, columns],
        position_ids=batch.position_ids[index, columns],
        response_ids=batch.response_ids[index, : max(1, response_width)],
        response_mask=batch.response_mask[index, : max(1, response_width)],
    )


def _response_logits(model: PreTrainedModel, batch: ScoringBatch) -> torch.Tensor:
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


def _response_hidden(model: PreTrainedModel, batch: ScoringBatch) -> torch.Tensor:
    r_width = batch.response_ids.shape[1]
    out = base_model(model).get_decoder()(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
        use_cache=False,
    )
    return out.last_hidden_state[:, -(r_width + 1) : -1]


def token_logprobs(logits: torch.Tensor, token_ids: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Log-probability (fp32) of each given token under ``logits / temperature``: ``[B, R]``."""
    scaled = logits.float() / temperature if temperature != 1.0 else logits.float()
    # gather minus logsumexp: the same value as log_softmax(...).gather(...) without a [B, R, V] output
    return scaled.gather(-1, token_ids.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(scaled, dim=-1)


def _accepts_logits_to_keep(model: PreTrainedModel) -> bool:
    base = base_model(model)
    return "logits_to_keep" in inspect.signature(base.forward).parameters
