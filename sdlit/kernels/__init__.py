"""Fused per-token teacher/student divergences (plain PyTorch implementation; Triton comes later).

Public API: `per_token_divergence`, `fused_linear_divergence`, `KINDS`. A later `dispatch` module can pick
a Triton kernel per device and fall back to `torch_divergence`; callers only import from here.
"""

from sdlit.kernels.torch_divergence import KINDS, fused_linear_divergence, per_token_divergence

__all__ = ["KINDS", "fused_linear_divergence", "per_token_divergence"]
