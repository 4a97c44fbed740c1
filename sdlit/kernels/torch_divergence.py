"""Per-token teacher/student divergences in plain PyTorch, chunked over rows (the fallback backend).

Used on CPU and wherever Triton is absent (see `sdlit.kernels.dispatch`). Two pieces:

- `per_token_divergence(student_logits, teacher_logits, ...)`: from logits [N, V] or [B, T, V], a
  `torch.autograd.Function` that computes the loss *and* its gradient chunk by chunk in forward, so no
  full-size fp32 [N, V] temporary exists beyond one chunk (about `_CHUNK_ELEMENTS` elements).
- `linear_chunk_loss_grad`: loss and gradient for one chunk of hidden rows, the torch "chunk function"
  of `sdlit.kernels.fused_linear`.

The math is always done in fp32 (fp64 when an input is fp64, so `gradcheck` works).

Conventions (p = teacher, q = student, after dividing both logits by `temperature`):
- "forward_kl": KL(p || q) = sum_v p (log p - log q)
- "reverse_kl": KL(q || p) = sum_v q (log q - log p)
- "jsd": generalized JSD of TRL's GKD, M = beta p + (1 - beta) q,
  value beta KL(p || M) + (1 - beta) KL(q || M). Like TRL's `generalized_jsd_loss`, the endpoints are
  special-cased: beta == 0 gives forward KL(p || q) and beta == 1 gives reverse KL(q || p) (the formula
  itself would tend to 0 there).
"""

import math

import torch
import torch.nn.functional as F

from sdlit.kernels.inputs import (
    KINDS,
    check_divergence_args,
    check_pair,
    effective_kind,
    kept_rows,
    no_autocast,
    picked_logprobs,
    row_chunks,
)

# Rows per chunk are chosen so that chunk_rows * V <= _CHUNK_ELEMENTS (8 MiB per fp32 temporary): small
# enough that the few chunk temporaries are a small fraction of one [N, V] tensor, large enough that the
# per-chunk overhead (thread pool start-up per op) stays small.
_CHUNK_ELEMENTS = 2**21


def _dot_rows(a, b):
    """Row-wise dot product sum_v a[n, v] * b[n, v] without an [n, V] temporary."""
    return torch.einsum("nv,nv->n", a, b)


def divergence_from_log_probs(student_log_probs, teacher_log_probs, kind="forward_kl", beta=0.5, need_grad=True):
    """Per-row divergence and its gradient w.r.t. the (temperature-scaled) student logits.

    Args:
        student_log_probs: [n, V] log_softmax of the student logits (fp32 or fp64); overwritten (reused as
            scratch space, to keep the number of chunk temporaries low).
        teacher_log_probs: [n, V] log_softmax of the teacher logits, same dtype; overwritten too.
        kind: one of KINDS.
        beta: JSD mixture weight of the teacher, in [0, 1] (only used by "jsd").
        need_grad: also return the gradient.

    Returns:
        (loss [n], grad [n, V] or None). Columns where a probability is exactly 0 (-inf logits)
        contribute 0 to the loss and get a 0 gradient, never NaN. At most ~3 [n, V] temporaries.
    """
    kind = effective_kind(kind, beta)
    lq, lp = student_log_probs, teacher_log_probs
    if kind == "forward_kl":
        # loss = sum p (log p - log q); grad = q - p
        p = lp.exp()
        d = lp.sub_(lq).masked_fill_(p == 0, 0.0)
        loss = _dot_rows(p, d)
        del d
        grad = lq.exp_().sub_(p) if need_grad else None
        return loss, grad
    if kind == "reverse_kl":
        # loss = sum q (log q - log p); grad = q (log q - log p - loss)
        q = lq.exp()
        d = lq.sub_(lp).masked_fill_(q == 0, 0.0)
        loss = _dot_rows(q, d)
        grad = d.sub_(loss[:, None]).mul_(q) if need_grad else None
        return loss, grad
    if kind == "jsd":
        # log M = logaddexp(log p + log beta, log q + log(1 - beta)); grad = (1 - beta) q (log q - log M - KL(q||M))
        log_m = lp + math.log(beta)
        torch.logaddexp(log_m, lq + math.log(1.0 - beta), out=log_m)
        p = lp.exp()
        d = lp.sub_(log_m).masked_fill_(p == 0, 0.0)
        kl_teacher = _dot_rows(p, d)
        del p, d
        q = lq.exp()
        d = lq.sub_(log_m).masked_fill_(q == 0, 0.0)
        del log_m
        kl_student = _dot_rows(q, d)
        loss = beta * kl_teacher + (1.0 - beta) * kl_student
        grad = d.sub_(kl_student[:, None]).mul_(q).mul_(1.0 - beta) if need_grad else None
        return loss, grad
    raise ValueError(f"unknown divergence kind {kind!r}; expected one of {KINDS}")


def _compute_dtype(*tensors):
    """fp64 if any input is fp64, else fp32 (bf16/fp16/fp32 inputs are all computed in fp32)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _scaled_log_softmax(x, dtype, temperature):
    """log_softmax(x / temperature) in the compute dtype; x itself is never modified."""
    y = x.to(dtype)
    if temperature != 1.0:
        y = y / temperature if y is x else y.div_(temperature)
    return F.log_softmax(y, dim=-1)


def logits_chunk_loss_grad(s_logits, t_logits, kind, beta, temperature, need_grad):
    """Loss and grad w.r.t. the raw student logits (compute dtype) for one chunk of logits (any float dtype)."""
    dtype = _compute_dtype(s_logits, t_logits)
    lq = _scaled_log_softmax(s_logits, dtype, temperature)
    lp = _scaled_log_softmax(t_logits, dtype, temperature)
    loss, grad = divergence_from_log_probs(lq, lp, kind, beta, need_grad)
    if grad is not None and temperature != 1.0:
        grad.div_(temperature)
    return loss, grad


def linear_chunk_loss_grad(s_hidden, t_hidden, weight, kind, beta, temperature, need_grad, row_scale=None,
                           token_ids=None):
    """Loss and grad w.r.t. the student logits (compute dtype) for one chunk of hidden rows.

    The logits are made here and dropped as soon as their log-softmax exists, so at most one chunk of
    logits per side is alive. row_scale: optional [n] upstream gradient per row, multiplied into grad.
    token_ids: optional [n] tokens whose log-probs (temperature 1) under the student and the teacher are also
    returned, [n, 2]; at temperature 1 they are read off the log-softmaxes the loss needs anyway.

    Returns:
        (loss [n], grad [n, V] or None, token log-probs [n, 2] or None).
    """
    dtype = _compute_dtype(s_hidden, weight)
    s_logits, t_logits = s_hidden @ weight.T, t_hidden @ weight.T
    picked = None
    if token_ids is not None and temperature != 1.0:
        picked = torch.stack(
            [picked_logprobs(s_logits, token_ids, dtype), picked_logprobs(t_logits, token_ids, dtype)], 1
        )
    lq = _scaled_log_softmax(s_logits, dtype, temperature)
    del s_logits
    lp = _scaled_log_softmax(t_logits, dtype, temperature)
    del t_logits
    if token_ids is not None and temperature == 1.0:
        picked = torch.stack([lq.gather(1, token_ids[:, None]), lp.gather(1, token_ids[:, None])], 1).squeeze(2)
    loss, grad = divergence_from_log_probs(lq, lp, kind, beta, need_grad)
    if grad is not None:
        factor = 1.0 / temperature
        if row_scale is not None:
            grad.mul_(row_scale.to(grad.dtype)[:, None])
        if factor != 1.0:
            grad.mul_(factor)
    return loss, grad, picked


def _chunked_loss_grad(student, teacher, rows, kind, beta, temperature, need_grad, row_weights=None):
    """Loss [N] and gradient [N, V] (student's dtype, zero on masked rows), chunk by chunk over the kept rows.

    row_weights: optional [N] upstream gradient per row, multiplied into the gradient.
    """
    dtype = _compute_dtype(student, teacher)
    loss = torch.zeros(student.shape[0], dtype=dtype, device=student.device)
    grad = torch.zeros_like(student) if need_grad else None
    chunk_rows = _CHUNK_ELEMENTS // max(1, student.shape[1])
    for idx in row_chunks(rows, student.shape[0], chunk_rows):
        loss_c, grad_c = logits_chunk_loss_grad(student[idx], teacher[idx], kind, beta, temperature, need_grad)
        loss[idx] = loss_c
        if need_grad:
            if row_weights is not None:
                grad_c.mul_(row_weights[idx].to(grad_c.dtype)[:, None])
            grad[idx] = grad_c.to(grad.dtype)  # index_put needs equal dtypes; a no-op for fp32
        del grad_c
    return loss, grad


class _PerTokenDivergence(torch.autograd.Function):
    """Chunked divergence from logits. Forward stores the gradient (input dtype); backward scales it in place.

    Choice: the gradient w.r.t. the student logits is computed in forward and kept in the input dtype
    (one [N, V] tensor, the size of the logits) rather than recomputing the softmaxes in backward:
    backward must return an [N, V] tensor anyway, so peak memory is the same and the work is done once.
    The first backward scales it in place by the upstream gradient of each row and hands it over, so no
    second [N, V] tensor exists; a second backward through the same loss (retain_graph=True, gradcheck)
    recomputes it from the saved logits.
    """

    @staticmethod
    def forward(ctx, student, teacher, rows, kind, beta, temperature):
        """student, teacher: [N, V]; rows: kept row indices or None (all). Returns the per-row loss [N]."""
        need_grad = ctx.needs_input_grad[0]
        loss, ctx.grad = _chunked_loss_grad(student, teacher, rows, kind, beta, temperature, need_grad)
        ctx.save_for_backward(student, teacher, rows)
        ctx.settings = (kind, beta, temperature)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        """The stored gradient times each row's upstream gradient (in place, first time), else recomputed."""
        grad = take_stored_grad(ctx)
        if grad is not None:
            return scale_rows_(grad, grad_loss), None, None, None, None, None
        student, teacher, rows = ctx.saved_tensors
        _, grad = _chunked_loss_grad(student, teacher, rows, *ctx.settings, True, row_weights=grad_loss)
        return grad, None, None, None, None, None


def take_stored_grad(ctx):
    """The gradient stored by forward, handed over once (then None: a later backward must recompute)."""
    grad = getattr(ctx, "grad", None)
    ctx.grad = None
    return grad


def scale_rows_(grad, row_weights):
    """grad[n, :] *= row_weights[n] in place (computed in fp32 for low precision); skipped when all are 1."""
    if bool((row_weights == 1).all()):
        return grad
    weights = row_weights.to(torch.float64 if grad.dtype == torch.float64 else torch.float32)
    return grad.mul_(weights[:, None])


def per_token_divergence(student_logits, teacher_logits, mask=None, *, kind="forward_kl", beta=0.5, temperature=1.0):
    """Per-token divergence between teacher and student next-token distributions (PyTorch fallback).

    Args:
        student_logits: [N, V] or [B, T, V], any float dtype; gets the gradient.
        teacher_logits: same shape; never gets a gradient (treated as detached).
        mask: optional bool tensor of the leading shape ([N] or [B, T]); True = keep. Masked rows give
            exactly 0 loss and 0 gradient and are not computed at all.
        kind: "forward_kl" = KL(teacher || student), "reverse_kl" = KL(student || teacher), or "jsd".
        beta: JSD teacher weight in the mixture, in [0, 1]; 0 -> forward KL, 1 -> reverse KL (TRL).
        temperature: both logits are divided by it first; must be > 0.

    Returns:
        The per-row loss, shape [N] (N = B * T for 3-D input), fp32 (fp64 for fp64 inputs).
    """
    check_divergence_args(kind, beta, temperature)
    check_pair(student_logits, teacher_logits, "logits", "V")
    vocab = student_logits.shape[-1]
    rows = kept_rows(mask, student_logits.shape[:-1], student_logits.device)
    student = student_logits.reshape(-1, vocab)
    teacher = teacher_logits.detach().reshape(-1, vocab)
    with no_autocast(student):  # the math is fp32 by design, whatever autocast would pick
        return _PerTokenDivergence.apply(student, teacher, rows, kind, float(beta), float(temperature))
