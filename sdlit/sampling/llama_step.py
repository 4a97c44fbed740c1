"""A lean decode step for Llama-architecture models: one new token per row, straight from the weights.

At a few rows a decode step of a small model is matrix products (the weights read once, near memory bandwidth) and
about as much again of everything else: dozens of small PyTorch calls per layer in the Hugging Face modules
(projections one by one, the rotary embedding, the static cache's update, attention over the whole preallocated
cache width, module and hook dispatch). :class:`LlamaDecodeStep` does the same arithmetic in fewer,
larger calls:

- the query, key and value projections run as one matrix product, and so do the MLP's gate and up projections
  (their merged weights concatenated once per sampling call, packed for oneDNN on CPU as in
  :mod:`sdlit.sampling.linears`);
- the new key and value go straight into the static cache's tensors at the step's column, and attention reads only
  the columns written so far (left-padded prompts: every row writes the same column);
- the rotary embedding and the norms are the model's own modules (any RoPE type the model was configured with).

It only replaces the decode steps of :mod:`sdlit.sampling.static_cache` (the prefill stays the model's own forward) and
only for models it computes exactly: ``LlamaForCausalLM`` with SiLU MLPs, every projection a plain linear or a vanilla
LoRA linear (:func:`supports_llama_step`). Its logits match the model's forward to float rounding
(``tests/test_llama_decoding.py``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.llama.modeling_llama import rotate_half

from sdlit.models import base_model
from sdlit.sampling.linears import fast_linear, is_mergeable_linear, merged_weight

_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")


def supports_llama_step(model: nn.Module) -> bool:
    """Whether :class:`LlamaDecodeStep` computes exactly what ``model``'s forward computes."""
    base = base_model(model)
    config = getattr(base, "config", None)
    if type(base).__name__ != "LlamaForCausalLM" or getattr(config, "hidden_act", None) != "silu":
        return False
    decoder = base.model
    for layer in decoder.layers:
        linears = [getattr(layer.self_attn, n) for n in _ATTENTION] + [getattr(layer.mlp, n) for n in _MLP]
        if not all(is_mergeable_linear(m) for m in linears):
            return False
    return is_mergeable_linear(base.lm_head)


class LlamaDecodeStep:
    """Next-token logits of a Llama model for one new token per row, reading and writing a prefilled static cache.

    Built once per sampling call (it merges and packs the weights: build it after the prefill, use it, drop it).
    ``rows``: the batch size the packed layout is tuned for.
    """

    def __init__(self, model: nn.Module, rows: int, pack: bool = True):
        base = base_model(model)
        decoder = base.model
        config = base.config
        self.embed = decoder.embed_tokens
        self.rotary = decoder.rotary_emb
        self.norm = decoder.norm
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.query_heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.layers = [_LayerWeights(layer, rows, pack) for layer in decoder.layers]
        self.lm_head = fast_linear(*merged_weight(base.lm_head), rows, pack)

    @torch.no_grad()
    def __call__(self, cache, tokens: torch.Tensor, positions: torch.Tensor, attention: torch.Tensor, column: int):
        """Logits [B, V] for ``tokens`` [B] at ``positions`` [B], written into ``cache`` at ``column``.

        ``attention`` [B, >= column + 1]: 1 where a cache column holds a real token (this one included).
        """
        batch = tokens.shape[0]
        x = self.embed(tokens[:, None])  # [B, 1, H]
        cos, sin = self.rotary(x, positions[:, None])  # [B, 1, D]: broadcast over heads
        keep = attention[:, None, None, : column + 1].bool()
        heads = self.query_heads + self.kv_heads  # rotated: queries, then keys
        for weights, layer_cache in zip(self.layers, cache.layers, strict=False):
            h = weights.input_norm(x)
            qkv = weights.qkv(h).view(batch, heads + self.kv_heads, self.head_dim)
            qk = _rotate(qkv[:, :heads], cos, sin)  # queries and keys: [B, Hq + Hkv, D]
            q, k, v = qk[:, : self.query_heads, None], qk[:, self.query_heads :], qkv[:, heads:]
            layer_cache.keys[:, :, column] = k
            layer_cache.values[:, :, column] = v
            out = F.scaled_dot_product_attention(
                q, layer_cache.keys[:, :, : column + 1], layer_cache.values[:, :, : column + 1], attn_mask=keep,
                scale=self.head_dim**-0.5, enable_gqa=self.kv_heads != self.query_heads,
            )
            x = x + weights.o_proj(out.reshape(batch, 1, self.query_heads * self.head_dim))
            h = weights.post_norm(x)
            gate, up = weights.gate_up(h).chunk(2, dim=-1)
            x = x + weights.down_proj(F.silu(gate) * up)
        return self.lm_head(self.norm(x))[:, 0]


class _LayerWeights:
    """One decoder layer's merged (and packed) projections, q/k/v and gate/up each as one matrix."""

    def __init__(self, layer: nn.Module, rows: int, pack: bool):
        attention, mlp = layer.self_attn, layer.mlp
        self.input_norm = layer.input_layernorm
        self.post_norm = layer.post_attention_layernorm
        self.qkv = fast_linear(*_stacked(attention.q_proj, attention.k_proj, attention.v_proj), rows, pack)
        self.o_proj = fast_linear(*merged_weight(attention.o_proj), rows, pack)
        self.gate_up = fast_linear(*_stacked(mlp.gate_proj, mlp.up_proj), rows, pack)
        self.down_proj = fast_linear(*merged_weight(mlp.down_proj), rows, pack)


def _stacked(*linears: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One weight (and bias) whose output is the linears' outputs side by side."""
    parts = [merged_weight(m) for m in linears]
    weight = torch.cat([w for w, _ in parts])
    if all(b is None for _, b in parts):
        return weight, None
    biases = [b if b is not None else w.new_zeros(w.shape[0]) for w, b in parts]
    return weight, torch.cat(biases)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding, as the model applies it (its own ``rotate_half``)."""
    return x * cos + rotate_half(x) * sin
