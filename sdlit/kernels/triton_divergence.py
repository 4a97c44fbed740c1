"""Per-token divergences with the Triton kernel of `triton_kernels`: launcher, autograd Function, chunk function.

Gradient strategy (like Liger-Kernel's losses): the kernel writes the gradient w.r.t. the student logits
during forward, in the logits' dtype, for an upstream gradient of 1 per row. Backward hands it over as is
when the upstream gradient is all ones (loss.sum()), or scales its rows in place first (any other
upstream, e.g. a masked mean). So forward + backward reads each logit tensor from memory twice (jsd:
three times; the second read is partly served from L2) and writes the gradient once; only O(N) values
and the gradient itself are kept. No fp32 [N, V] buffer exists. A second backward (retain_graph=True)
reruns the kernel on the saved logits with the upstream gradient as its row scale.

Import this module only where Triton is wanted (`sdlit.kernels.dispatch` does it lazily). On CPU the
kernel runs only in Triton's interpreter, which is chosen when this module is imported: set
TRITON_INTERPRET=1 before that (the tests do).
"""

import math

import torch
import triton

from sdlit.kernels.inputs import (
    check_divergence_args,
    check_pair,
    effective_kind,
    no_autocast,
    picked_logprobs,
    row_mask,
)
from sdlit.kernels.torch_divergence import scale_rows_, take_stored_grad
from sdlit.kernels.triton_kernels import KIND_IDS, divergence_kernel

# True when the kernel was built for Triton's CPU interpreter (TRITON_INTERPRET=1 at import time).
INTERPRETED = not isinstance(divergence_kernel, triton.runtime.JITFunction)
# Vocabulary columns per block: 4096 fp32 values per row and tensor, 16 per thread with 8 warps.
MAX_BLOCK_V = 4096
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _kernel_beta_args(kind, beta):
    """beta, log beta and log(1 - beta) for the kernel (only jsd uses them; 0 < beta < 1 there)."""
    if kind != "jsd":
        return 0.0, 0.0, 0.0
    return beta, math.log(beta), math.log1p(-beta)


def _rows_ready(x, name):
    """x as a 2-D tensor whose rows are contiguous (a copy only when the last dim is strided)."""
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"Triton divergence: {name} must be float32, bfloat16 or float16, got {x.dtype}")
    return x if x.stride(-1) == 1 else x.contiguous()


def divergence_rows(student, teacher, kind, beta, temperature, *, keep=None, row_scale=None, need_grad=True,
                    grad_out=None, block_v=None):
    """Run the kernel over [N, V] rows.

    Args:
        student, teacher: [N, V] logits, fp32/bf16/fp16 (not necessarily the same dtype).
        kind, beta, temperature: as in `per_token_divergence` (checked by the caller).
        keep: optional bool [N]; False rows read nothing and get loss 0 and a zero gradient.
        row_scale: optional [N] factor per row multiplied into the gradient (an upstream gradient).
        need_grad: also write the gradient w.r.t. the raw student logits.
        grad_out: where to write the gradient ([N, V], rows contiguous); may be `student` itself (in place).
        block_v: vocabulary block size (a power of 2); default min(MAX_BLOCK_V, next power of 2 >= V).

    Returns:
        (loss [N] fp32, gradient [N, V] in grad_out's (default: student's) dtype, or None).
    """
    kind = effective_kind(kind, beta)
    student, teacher = _rows_ready(student, "student logits"), _rows_ready(teacher, "teacher logits")
    n, vocab = student.shape
    loss = torch.empty(n, dtype=torch.float32, device=student.device)
    grad = None
    if need_grad:
        grad = torch.empty_like(student, memory_format=torch.contiguous_format) if grad_out is None else grad_out
        if grad.shape != student.shape or grad.stride(-1) != 1:
            raise ValueError(f"grad_out must be [N, V] = {tuple(student.shape)} with contiguous rows")
    if n == 0:
        return loss, grad
    block = int(block_v) if block_v else min(MAX_BLOCK_V, triton.next_power_of_2(vocab))
    beta, log_beta, log_one_minus_beta = _kernel_beta_args(kind, beta)
    keep_arg = keep.to(device=student.device, dtype=torch.int8) if keep is not None else loss
    scale_arg = row_scale.to(device=student.device, dtype=torch.float32).contiguous() if row_scale is not None else loss
    divergence_kernel[(n,)](
        student, teacher, grad if grad is not None else loss, loss, keep_arg, scale_arg,
        student.stride(0), teacher.stride(0), grad.stride(0) if grad is not None else 0, vocab,
        float(temperature), float(beta), log_beta, log_one_minus_beta,
        KIND=KIND_IDS[kind], HAS_KEEP=keep is not None, HAS_SCALE=row_scale is not None,
        WRITE_GRAD=grad is not None, BLOCK_V=block, num_warps=8 if block >= 2048 else 4,
    )
    return loss, grad


class _TritonPerTokenDivergence(torch.autograd.Function):
    """Divergence from logits with the Triton kernel: the gradient is written in forward, scaled in backward.

    Like the PyTorch fallback, the first backward scales the stored gradient in place and hands it over;
    a second backward through the same loss (retain_graph=True) reruns the kernel with the upstream
    gradient as its row scale.
    """

    @staticmethod
    def forward(ctx, student, teacher, keep, kind, beta, temperature):
        """student, teacher: [N, V]; keep: bool [N] or None. Returns the per-row loss [N] (fp32)."""
        need_grad = ctx.needs_input_grad[0]
        loss, ctx.grad = divergence_rows(
            student, teacher, kind, beta, temperature, keep=keep, need_grad=need_grad
        )
        ctx.save_for_backward(student, teacher, keep)
        ctx.settings = (kind, beta, temperature)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        """The stored gradient times each row's upstream gradient (in place, first time), else recomputed."""
        grad = take_stored_grad(ctx)
        if grad is None:
            student, teacher, keep = ctx.saved_tensors
            kind, beta, temperature = ctx.settings
            _, grad = divergence_rows(student, teacher, kind, beta, temperature, keep=keep, row_scale=grad_loss)
        else:
            grad = scale_rows_(grad, grad_loss)
        return grad, None, None, None, None, None


def per_token_divergence(student_logits, teacher_logits, mask=None, *, kind="forward_kl", beta=0.5, temperature=1.0):
    """Triton version of `sdlit.kernels.per_token_divergence` (same arguments and result)."""
    check_divergence_args(kind, beta, temperature)
    check_pair(student_logits, teacher_logits, "logits", "V")
    vocab = student_logits.shape[-1]
    keep = row_mask(mask, student_logits.shape[:-1], student_logits.device)
    student = student_logits.reshape(-1, vocab)
    teacher = teacher_logits.detach().reshape(-1, vocab)
    with no_autocast(student):
        return _TritonPerTokenDivergence.apply(student, teacher, keep, kind, float(beta), float(temperature))


def linear_chunk_loss_grad(s_hidden, t_hidden, weight, kind, beta, temperature, need_grad, row_scale=None,
                           token_ids=None):
    """Loss and grad w.r.t. the student logits (weight's dtype) for one chunk of hidden rows, and with
    ``token_ids`` the tokens' log-probs (temperature 1, fp32) under student and teacher, [n, 2].

    The chunk's logits come from torch matmuls in the weight's dtype; the kernel overwrites the student
    logits with their gradient (in place), so one chunk costs two [rows, V] tensors of that dtype.
    """
    s_logits = s_hidden @ weight.T
    t_logits = t_hidden @ weight.T
    picked = None
    if token_ids is not None:  # before the kernel turns the student logits into their gradient
        picked = torch.stack([picked_logprobs(s_logits, token_ids, torch.float32),
                              picked_logprobs(t_logits, token_ids, torch.float32)], 1)
    loss, grad = divergence_rows(
        s_logits, t_logits, kind, beta, temperature, row_scale=row_scale, need_grad=need_grad, grad_out=s_logits
    )
    return loss, grad, picked
