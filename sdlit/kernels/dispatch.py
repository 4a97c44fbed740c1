"""The public divergence functions: pick the Triton kernel or the chunked PyTorch fallback per call.

backend="auto" (the default) uses Triton when the tensors are on a CUDA device, Triton imports and the
dtype is fp32/bf16/fp16, and the PyTorch fallback otherwise (CPU, fp64, no Triton). The environment
variable SDLIT_KERNEL_BACKEND (auto | triton | torch) overrides "auto" for a whole run; an explicit
backend argument wins over it. "triton" on CPU tensors works only in Triton's interpreter
(TRITON_INTERPRET=1 before `sdlit.kernels.triton_divergence` is imported), which the tests use.
"""

import functools
import importlib
import os

import torch

from sdlit.kernels import fused_linear, torch_divergence

BACKENDS = ("auto", "triton", "torch")
BACKEND_ENV = "SDLIT_KERNEL_BACKEND"


@functools.lru_cache(maxsize=1)
def _triton_importable():
    """Whether the triton package imports (checked once)."""
    try:
        importlib.import_module("triton")
    except ImportError:
        return False
    return True


def _triton_module():
    """sdlit.kernels.triton_divergence, imported on first use; a clear error when Triton is missing."""
    if not _triton_importable():
        raise RuntimeError("backend='triton' needs the triton package (pip install triton), which does not import here")
    return importlib.import_module("sdlit.kernels.triton_divergence")


def resolve_backend(backend, tensor):
    """The backend ("triton" or "torch") that a call with this backend setting runs on for this tensor."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = os.environ.get(BACKEND_ENV, "").strip().lower() or "auto"
        if backend not in BACKENDS:
            raise ValueError(f"environment variable {BACKEND_ENV}={backend!r} must be one of {BACKENDS}")
    if backend == "auto":
        usable = tensor.is_cuda and tensor.dtype != torch.float64 and _triton_importable()
        return "triton" if usable else "torch"
    if backend == "triton":
        _check_triton_can_run(tensor)
    return backend


def _check_triton_can_run(tensor):
    """Raise a clear error when the Triton kernel cannot run on this tensor."""
    module = _triton_module()
    if tensor.dtype not in module.SUPPORTED_DTYPES:
        raise ValueError(
            f"backend='triton' takes float32, bfloat16 or float16 tensors, got {tensor.dtype}; use backend='torch'"
        )
    if not tensor.is_cuda and not module.INTERPRETED:
        raise RuntimeError(
            f"backend='triton' on {tensor.device.type} tensors runs only in Triton's interpreter: set "
            "TRITON_INTERPRET=1 before sdlit.kernels.triton_divergence is imported, move the tensors to CUDA, "
            f"or use backend='torch' (or {BACKEND_ENV}=torch)"
        )


def per_token_divergence(
    student_logits, teacher_logits, mask=None, *, kind="forward_kl", beta=0.5, temperature=1.0, backend="auto"
):
    """Per-token divergence between teacher and student next-token distributions.

    Args:
        student_logits: [N, V] or [B, T, V], any float dtype; gets the gradient.
        teacher_logits: same shape; never gets a gradient (treated as detached).
        mask: optional bool tensor of the leading shape ([N] or [B, T]); True = keep. Masked rows give
            exactly 0 loss and 0 gradient and are not computed at all.
        kind: "forward_kl" = KL(teacher || student), "reverse_kl" = KL(student || teacher), or "jsd".
        beta: JSD teacher weight in the mixture, in [0, 1]; 0 -> forward KL, 1 -> reverse KL (TRL).
        temperature: both logits are divided by it first; must be > 0.
        backend: "auto" (Triton on CUDA when available, else PyTorch; SDLIT_KERNEL_BACKEND overrides),
            "triton" or "torch".

    Returns:
        The per-row loss, shape [N] (N = B * T for 3-D input), fp32 (fp64 for fp64 inputs, torch backend).
        Its backward can run once (the gradient is computed in forward and handed over).
    """
    kwargs = dict(kind=kind, beta=beta, temperature=temperature)
    if resolve_backend(backend, student_logits) == "triton":
        return _triton_module().per_token_divergence(student_logits, teacher_logits, mask, **kwargs)
    return torch_divergence.per_token_divergence(student_logits, teacher_logits, mask, **kwargs)


def fused_linear_divergence(
    student_hidden,
    teacher_hidden,
    weight,
    mask=None,
    *,
    kind="forward_kl",
    beta=0.5,
    temperature=1.0,
    chunk_size=None,
    backend="auto",
):
    """Per-token divergence from hidden states and the lm_head weight, without full [N, V] logits.

    Same value and gradients as `per_token_divergence(student_hidden @ weight.T, teacher_hidden @ weight.T,
    mask, ...)`. Gradients flow to student_hidden and weight (when they require grad), never through the
    teacher path (teacher_hidden, nor weight via the teacher logits: the teacher is a stop-gradient).

    Args:
        student_hidden: [N, H] or [B, T, H].
        teacher_hidden: same shape.
        weight: [V, H] lm_head weight (no bias), the same matrix is used for student and teacher.
        mask: optional bool tensor of the leading shape; True = keep.
        kind, beta, temperature: as in `per_token_divergence`.
        chunk_size: rows per chunk; default keeps chunk_size * V <= 2**24 elements.
        backend: as in `per_token_divergence`; "triton" runs the matmuls in torch and the divergence of
            each chunk with the Triton kernel.

    Returns:
        The per-row loss, shape [N], fp32 (fp64 for fp64 inputs).
    """
    loss, _ = fused_linear.fused_linear_divergence(
        student_hidden, teacher_hidden, weight, mask, kind=kind, beta=beta, temperature=temperature,
        chunk_size=chunk_size, chunk_fn=_linear_chunk_fn(backend, student_hidden),
    )
    return loss


def fused_linear_divergence_with_logprobs(
    student_hidden,
    teacher_hidden,
    weight,
    token_ids,
    mask=None,
    *,
    kind="forward_kl",
    beta=0.5,
    temperature=1.0,
    chunk_size=None,
    backend="auto",
):
    """`fused_linear_divergence` plus the log-probs of ``token_ids`` under the student and the teacher, read off
    the same chunks of logits (no second pass over the output head).

    Args:
        token_ids: [N] or [B, T], the leading shape of the hidden states: the tokens whose log-probs are wanted.
        The others: as in `fused_linear_divergence`.

    Returns:
        (per-row loss [N], student log-probs, teacher log-probs): the log-probs are those of
        ``log_softmax(hidden @ weight.T)`` at temperature 1 (whatever ``temperature`` the divergence uses),
        shaped like ``token_ids``, fp32, 0 on masked rows, without gradient.
    """
    loss, (student_logprobs, teacher_logprobs) = fused_linear.fused_linear_divergence(
        student_hidden, teacher_hidden, weight, mask, kind=kind, beta=beta, temperature=temperature,
        chunk_size=chunk_size, token_ids=token_ids, chunk_fn=_linear_chunk_fn(backend, student_hidden),
    )
    return loss, student_logprobs, teacher_logprobs


def _linear_chunk_fn(backend, tensor):
    """The chunk function (`linear_chunk_loss_grad`) of the backend that this call runs on."""
    if resolve_backend(backend, tensor) == "triton":
        return _triton_module().linear_chunk_loss_grad
    return torch_divergence.linear_chunk_loss_grad
