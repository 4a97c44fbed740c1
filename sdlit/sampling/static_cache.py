"""Batched sampling with a KV cache sized once: sdlit's decode loop for rollouts.

Plain ``model.generate`` spends time that rollouts do not need. This loop, for any Hugging Face causal LM that
takes a ``StaticCache``:

- **prefills each prompt once**, then repeats its cache ``n`` times (``generate`` with
  ``num_return_sequences=n`` prefills every prompt n times: for GRPO's n=8 most of the prefill is repeated work),
  and prefills prompts of very different lengths in **length groups**, each on only its own columns, since padding
  costs as much as real tokens (:func:`sdlit.scoring.group_by_length`);
- keeps keys and values in a **static cache** allocated once for prompt + ``max_new_tokens`` (a dynamic cache
  concatenates, i.e. copies, the whole cache at every decoded token);
- **drops finished rows** from the batch (and the cache) as soon as a quarter of the live rows have ended, so
  short answers stop costing compute while long ones finish;
- computes logits for the last position only and samples in fp32 (temperature, nucleus ``top_p``);
- runs every linear layer on a LoRA-merged and, on CPU, oneDNN-packed copy of its weight
  (:mod:`sdlit.sampling.linears`): a decode step is a few rows times every weight, where both pay;
- decodes Llama-architecture models with a lean step of fewer, larger calls (:mod:`sdlit.sampling.llama_step`: q/k/v
  and gate/up as one product each, attention over the written cache columns only); other models decode through
  their own forward.

Models whose forward takes no ``StaticCache`` fall back to ``generate`` (see :func:`supports_static_cache`).
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from sdlit.models import base_model
from sdlit.sampling.linears import decoding_linears
from sdlit.sampling.llama_step import LlamaDecodeStep, supports_llama_step
from sdlit.scoring import group_by_length


def supports_static_cache(model: PreTrainedModel) -> bool:
    """Whether ``model`` can decode with :func:`sample_with_static_cache` (a causal LM taking a static cache)."""
    base = base_model(model)
    if not getattr(base, "_can_compile_fullgraph", getattr(base, "_supports_static_cache", False)):
        return False
    return _cache_argument(model) is not None


@torch.no_grad()
def sample_with_static_cache(
    model: PreTrainedModel,
    prompts: list[list[int]],
    eos_ids: set[int],
    pad_id: int,
    n: int = 1,
    temperature: float = 1.0,
    top_p: float = 1.0,
    max_new_tokens: int = 256,
    compact_fraction: float = 0.25,
    fast_linears: bool = True,
    llama_step: bool = True,
) -> list[list[int]]:
    """Sample ``n`` responses per prompt; returns ``n * len(prompts)`` id lists, all n of prompt 0 first.

    Each response is cut after its first EOS, which is kept. ``temperature == 0`` decodes greedily. Rows that
    have ended are removed from the batch once they make up ``compact_fraction`` of the live rows (0: at once).
    ``fast_linears``: decode on merged, packed linear weights (:func:`sdlit.sampling.linears.decoding_linears`).
    ``llama_step`` (with ``fast_linears``): decode Llama models with
    :class:`sdlit.sampling.llama_step.LlamaDecodeStep` instead of the model's own forward.
    """
    decode = functools.partial(
        _decode, model, prompts, eos_ids, pad_id, n=n, temperature=temperature, top_p=top_p,
        max_new_tokens=max_new_tokens, compact_fraction=compact_fraction,
    )
    if not fast_linears:
        return decode()
    lean = llama_step and supports_llama_step(model)  # decode steps by LlamaDecodeStep, on weights of its own
    with decoding_linears(model, rows=len(prompts) * n, pack=not lean):
        return decode(lean=lean)


def _decode(model, prompts, eos_ids, pad_id, n, temperature, top_p, max_new_tokens, compact_fraction, lean=False):
    from transformers import StaticCache

    device = next(model.parameters()).device
    input_ids, mask = left_pad(prompts, pad_id, device)
    batch, width = input_ids.shape
    total = width + max_new_tokens
    cache = StaticCache(config=model.config, max_cache_len=total)
    arguments = _forward_arguments(model)  # looked up once, not at every decoded token
    attention = torch.zeros((batch, total), dtype=torch.long, device=device)
    attention[:, :width] = mask
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
    logits = _prefill(model, arguments, cache, input_ids, mask, positions)
    step = LlamaDecodeStep(model, rows=batch * n) if lean and _plain_static_layers(cache, model, filled=True) else None

    rows = torch.arange(batch, device=device).repeat_interleave(n)  # prompt of each sampled row
    if n > 1:
        cache.reorder_cache(rows)
        logits, attention = logits[rows], attention[rows]
    next_position = positions[rows, -1] + 1
    alive = torch.arange(batch * n, device=device)  # output row of each live batch row
    out = torch.full((batch * n, max_new_tokens), pad_id, dtype=torch.long, device=device)
    lengths = torch.full((batch * n,), max_new_tokens, dtype=torch.long, device=device)
    eos = torch.tensor(sorted(eos_ids), dtype=torch.long, device=device)
    finished = torch.zeros(batch * n, dtype=torch.bool, device=device)

    for t in range(max_new_tokens):
        tokens = _next_tokens(logits, temperature, top_p)
        out[alive, t] = tokens
        ended = torch.isin(tokens, eos) & ~finished
        lengths[alive[ended]] = t + 1
        finished |= ended
        if t + 1 == max_new_tokens or bool(finished.all()):
            break
        if finished.sum() > compact_fraction * len(alive):
            keep = (~finished).nonzero().squeeze(1)
            cache.reorder_cache(keep)
            alive, tokens, next_position = alive[keep], tokens[keep], next_position[keep]
            attention, finished = attention[keep], finished[keep]
        attention[:, width + t] = 1
        if step is not None:
            logits = step(cache, tokens, next_position, attention, width + t)
        else:
            column = torch.tensor([width + t], device=device)
            logits = _forward(model, arguments, cache, tokens[:, None], attention[:, : width + t + 1],
                              next_position[:, None], column)
        next_position = next_position + 1
    return [out[i, : lengths[i]].tolist() for i in range(batch * n)]


def _prefill(model, arguments, cache, input_ids, mask, positions) -> torch.Tensor:
    """Last-position logits [B, V] of the left-padded prompts, with their keys and values written into ``cache``
    at columns ``0 .. width - 1``.

    Prompts of very different lengths run in length groups, each with a dynamic cache of its own (filled from its
    column 0) and on only the columns it uses; the groups' keys and values are then written into the static cache at
    their columns (the same entries a single padded pass writes on real tokens, padding columns are masked). Caches
    whose layers are not all plain full-attention static layers (sliding windows, ...) get the single padded pass.
    """
    from transformers import DynamicCache

    lengths = mask.sum(dim=1).tolist()
    groups = group_by_length(lengths, [0] * len(lengths))
    batch, width = input_ids.shape
    every_column = torch.arange(width, device=input_ids.device)
    if len(groups) <= 1 or not _plain_static_layers(cache, model):
        return _forward(model, arguments, cache, input_ids, mask, positions, every_column)
    logits, keys, values = None, {}, {}
    for rows in groups:
        index = torch.tensor(rows, device=input_ids.device)
        group_width = max(lengths[i] for i in rows)
        columns = slice(width - group_width, width)
        group_cache = DynamicCache()
        part = _forward(model, arguments, group_cache, input_ids[index, columns], mask[index, columns],
                        positions[index, columns], every_column[:group_width])
        if logits is None:
            logits = part.new_zeros((batch, part.shape[-1]))
        logits[index] = part
        for layer, states in enumerate(group_cache.layers):
            for store, group_states in ((keys, states.keys), (values, states.values)):
                if layer not in store:  # [B, heads, width, head_dim]
                    heads, head_dim = group_states.shape[1], group_states.shape[-1]
                    store[layer] = group_states.new_zeros((batch, heads, width, head_dim))
                store[layer][index, :, columns] = group_states
    for layer in range(len(keys)):  # cache_kwargs: transformers 4.x writes at its cache_position, 5.x appends
        cache.update(keys[layer], values[layer], layer, {"cache_position": every_column})
    return logits


def _plain_static_layers(cache, model, filled: bool = False) -> bool:
    """Whether every layer of ``cache`` is a plain full-attention static layer, one per model layer, not yet filled
    (or, with ``filled``, filled by the prefill)."""
    from transformers.cache_utils import StaticLayer

    layers = getattr(cache, "layers", None)
    expected = getattr(model.config, "num_hidden_layers", None)
    return (
        bool(layers) and len(layers) == expected
        and all(type(layer) is StaticLayer and _is_filled(layer) == filled for layer in layers)
    )


def _is_filled(layer) -> bool:
    """Whether a cache layer holds its tensors (``is_initialized`` from transformers 4.57, ``keys`` before)."""
    filled = getattr(layer, "is_initialized", None)
    return bool(filled) if filled is not None else getattr(layer, "keys", None) is not None


def _forward(model, arguments, cache, input_ids, attention_mask, position_ids, columns) -> torch.Tensor:
    """Logits of the last position, [B, V], with the new keys and values written into ``cache`` at ``columns``.

    ``columns`` [L]: the cache column of each input position, passed as ``cache_position`` where the model's forward
    takes one (transformers 4.x; otherwise it derives them from ``cache.get_seq_length()``, which a static cache
    counts on the non-zero keys of row 0). Forwards without it (transformers 5.x) have their cache count the columns.
    """
    names = {arguments.cache: cache}
    if arguments.cache_position:
        names["cache_position"] = columns
    output = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        use_cache=True,
        logits_to_keep=1,
        **names,
    )
    return output.logits[:, -1]


def _next_tokens(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """One token per row: greedy at temperature 0, else from softmax(logits / temperature) within ``top_p``."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        probs = _nucleus(probs, top_p)
    return sample_categorical(probs)


def sample_categorical(probs: torch.Tensor) -> torch.Tensor:
    """One index per row of ``probs`` ([B, V], rows need not sum to 1), drawn with probability ``probs / row sum``.

    Inverse-CDF sampling: one uniform number per row against the fp64 running sum. Same distribution as
    ``torch.multinomial(probs, 1)``, which draws an exponential number for every entry of the vocabulary at every
    decode step (many times the cost of one cumulative sum). Zero-probability entries are never drawn.
    """
    cumulative = probs.double().cumsum(dim=-1)
    uniform = torch.rand((probs.shape[0], 1), dtype=torch.float64, device=probs.device) * cumulative[:, -1:]
    index = torch.searchsorted(cumulative, uniform, right=True)  # first entry whose running sum exceeds u
    return index.squeeze(1).clamp_(max=probs.shape[1] - 1)


def _nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Zero the tokens outside the smallest set whose probability reaches ``top_p`` (the top token always stays)."""
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    outside = sorted_probs.cumsum(dim=-1) - sorted_probs > top_p
    sorted_probs = sorted_probs.masked_fill(outside, 0.0)
    return torch.zeros_like(probs).scatter_(-1, order, sorted_probs)


def left_pad(rows: list[list[int]], pad_id: int, device: torch.device | str = "cpu"):
    """Left-pad id lists into ``(input_ids, attention_mask)`` tensors."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            ids[i, width - len(row) :] = torch.tensor(row)
            mask[i, width - len(row) :] = 1
    return ids.to(device), mask.to(device)


@dataclass(frozen=True)
class _ForwardArguments:
    """How the model's forward takes its cache: the cache's argument name, and whether it takes ``cache_position``."""

    cache: str
    cache_position: bool


def _forward_arguments(model) -> _ForwardArguments:
    """The model's :class:`_ForwardArguments`, from its forward's signature."""
    params = inspect.signature(base_model(model).forward).parameters
    return _ForwardArguments(cache=_cache_argument(model), cache_position="cache_position" in params)


def _cache_argument(model) -> str | None:
    """The name under which the model's forward takes its KV cache (``cache`` in newer transformers)."""
    params = inspect.signature(base_model(model).forward).parameters
    for name in ("cache", "past_key_values"):
        if name in params:
            return name
    return None
