"""The datamodule's settings groups: how training rollouts are sampled, how held-out answers are, and the vLLM
engine's.

Each group is one typed, documented dataclass, a nested key of ``data`` in YAML and on the command line
(``--data.sampling.temperature 1.1``, ``--data.evaluation.k 12``), passed whole to the sampler.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class SamplingSettings:
    """How answers are sampled from the live solver.

    Args:
        temperature: Sampling temperature (paper: 1.1); 0 decodes greedily.
        top_p: Nucleus sampling threshold (1: the whole distribution).
        max_new_tokens: Longest answer in tokens.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 256

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"sampling temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"sampling top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise ValueError(f"sampling max_new_tokens must be at least 1, got {self.max_new_tokens}")


@dataclass
class EvalSettings:
    """What the held-out evaluation samples (Avg@k, Pass@k, Maj@k); *when* it runs is ``AvgAtKEvaluation``'s.

    Args:
        k: Samples per held-out problem (Avg@k, Pass@k, Maj@k; a ``ModelCheckpoint`` on ``val/avg@k`` uses it).
        temperature: Sampling temperature of held-out samples; 0 decodes greedily.
        max_new_tokens: Longest held-out sample in tokens.
        batch_size: Held-out problems per generation call; each call decodes ``batch_size * k`` sequences.
        num_problems: Evaluate only the first ``num_problems`` held-out problems (default: all the task has).
    """

    k: int = 12
    temperature: float = 1.0
    max_new_tokens: int = 256
    batch_size: int = 8
    num_problems: int | None = None

    def __post_init__(self) -> None:
        for name in ("k", "max_new_tokens", "batch_size", "num_problems"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"evaluation {name} must be at least 1, got {value}")
        if self.temperature < 0:
            raise ValueError(f"evaluation temperature must be >= 0, got {self.temperature}")

    @property
    def sampling(self) -> SamplingSettings:
        """The sampling settings of held-out answers."""
        return SamplingSettings(temperature=self.temperature, max_new_tokens=self.max_new_tokens)


@dataclass
class VLLMSettings:
    """The vLLM engine of ``data.sampler: vllm``: one engine per process, colocated with training (``pip install
    sdlit[vllm]``; docs/performance.md#vllm).

    Args:
        gpu_memory_utilization: GPU: the share of the device's memory vLLM may take for its copy of the weights and
            its KV cache; the rest stays with training.
        cpu_kv_cache_gib: CPU: the KV cache size in whole GiB.
        max_model_len: Longest prompt + answer the engine serves (default: the model's window).
        max_num_seqs: Most sequences decoded together.
        tensor_parallel_size: Devices one engine spans (1 under DDP: each rank runs its own engine).
        enforce_eager: Run without CUDA graphs (faster start, slower decode); default: on CPU, off on GPU.
        dtype: Weight dtype of the engine, e.g. ``bfloat16``; default: the solver's (``model.dtype``), else float32.
    """

    gpu_memory_utilization: float = 0.3
    cpu_kv_cache_gib: int = 1
    max_model_len: int | None = None
    max_num_seqs: int = 256
    tensor_parallel_size: int = 1
    enforce_eager: bool | None = None
    dtype: str | None = None

    def __post_init__(self) -> None:
        if not 0 < self.gpu_memory_utilization < 1:
            raise ValueError(f"vllm gpu_memory_utilization must lie in (0, 1), got {self.gpu_memory_utilization}")
        if self.cpu_kv_cache_gib < 1:
            raise ValueError(f"vllm cpu_kv_cache_gib must be at least 1, got {self.cpu_kv_cache_gib}")
        for name in ("max_model_len", "max_num_seqs", "tensor_parallel_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"vllm {name} must be at least 1, got {value}")
