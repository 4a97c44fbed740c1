"""How rollouts and held-out answers are decoded.

- :mod:`sdlit.sampling.sampler`: ``sample_rollouts`` / ``sample_responses``, the entry points;
- :mod:`sdlit.sampling.static_cache`: sdlit's decode loop (prefill once per prompt, a KV cache sized once,
  finished rows dropped);
- :mod:`sdlit.sampling.linears`: decode-time linear layers (LoRA merged, oneDNN-packed on CPU);
- :mod:`sdlit.sampling.llama_step`: the lean decode step of Llama-architecture models.
"""

from sdlit.sampling.sampler import SAMPLERS, Sampler, cut_at_eos, eos_ids, sample_responses, sample_rollouts
from sdlit.sampling.static_cache import sample_with_static_cache, supports_static_cache

__all__ = ["SAMPLERS", "Sampler", "cut_at_eos", "eos_ids", "sample_responses", "sample_rollouts",
           "sample_with_static_cache", "supports_static_cache"]
