"""Fused per-token teacher/student divergences: Triton kernels, a chunked PyTorch fallback, and dispatch.

Public API: `per_token_divergence`, `fused_linear_divergence`, `fused_linear_divergence_with_logprobs` (all with
backend="auto" | "triton" | "torch", see `dispatch`), `fused_linear_logprobs` (token log-probs from hidden
states), `KINDS`. Callers only import from here; `triton_divergence` is imported lazily, only when the Triton
backend is used.
"""

from sdlit.kernels import torch_divergence
from sdlit.kernels.dispatch import (
    BACKENDS,
    fused_linear_divergence,
    fused_linear_divergence_with_logprobs,
    per_token_divergence,
)
from sdlit.kernels.fused_linear_logprobs import fused_linear_logprobs
from sdlit.kernels.inputs import KINDS

__all__ = [
    "BACKENDS", "KINDS", "fused_linear_divergence", "fused_linear_divergence_with_logprobs", "fused_linear_logprobs",
    "per_token_divergence", "torch_divergence",
]
