"""Per-token teacher/student divergences in plain PyTorch, chunked over rows.

Two entry points share one piece of math (`divergence_from_log_probs`):

- `per_token_divergence(student_logits, teacher_logits, ...)`: from logits [N, V] or [B, T, V].
- `fused_linear_divergence(student_hidden, teacher_hidden, weight, ...)`: from hidden states and the
  lm_head weight; the full [N, V] logits are never materialised.

Both are `torch.autograd.Function`s that compute the loss *and* its gradient chunk by chunk in forward,
so no full-size fp32 [N, V] temporary exists beyond one chunk (about `_CHUNK_ELEMENTS` elements).
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

KINDS = ("forward_kl", "reverse_kl", "jsd")

# Rows per chunk are chosen so that chunk_rows * V <= _CHUNK_ELEMENTS (16 MiB per fp32 temporary).
_CHUNK_ELEMENTS = 2**22
# The fused path does matmuls per chunk, which need more rows to run fast: 32 MiB per fp32 temporary.
_FUSED_CHUNK_ELEMENTS = 2**23


def _dot_rows(a, b):
    """Row-wise dot product sum_v a[n, v] * b[n, v] without an [n, V] temporary."""
    return torch.einsum("nv,nv->n", a, b)


def divergence_from_log_probs(student_log_probs, teacher_log_probs, kind="forward_kl", beta=0.5, need_grad=True):
    """Per-row divergence and its gradient w.r.t. the (temperature-scaled) student logits.

    Args:
        student_log_probs: [n, V] log_softmax of the student logits (fp32 or fp64); not modified.
        teacher_log_probs: [n, V] log_softmax of the teacher logits, same dtype; not modified.
        kind: one of KINDS.
        beta: JSD mixture weight of the teacher, in [0, 1] (only used by "jsd").
        need_grad: also return the gradient.

    Returns:
        (loss [n], grad [n, V] or None). Columns where a probability is exactly 0 (-inf logits)
        contribute 0 to the loss and get a 0 gradient, never NaN. At most ~3 [n, V] temporaries.
    """
    if kind == "jsd" and beta == 0.0:
        kind = "forward_kl"
    if kind == "jsd" and beta == 1.0:
        kind = "reverse_kl"
    lq, lp = student_log_probs, teacher_log_probs
    if kind == "forward_kl":
        # loss = sum p (log p - log q); grad = q - p
        p = lp.exp()
        d = (lp - lq).masked_fill_(p == 0, 0.0)
        loss = _dot_rows(p, d)
        del d
        grad = lq.exp().sub_(p) if need_grad else None
        return loss, grad
    if kind == "reverse_kl":
        # loss = sum q (log q - log p); grad = q (log q - log p - loss)
        q = lq.exp()
        d = (lq - lp).masked_fill_(q == 0, 0.0)
        loss = _dot_rows(q, d)
        grad = d.sub_(loss[:, None]).mul_(q) if need_grad else None
        return loss, grad
    if kind == "jsd":
        # log M = logaddexp(log p + log beta, log q + log(1 - beta)); grad = (1 - beta) q (log q - log M - KL(q||M))
        log_m = lp + math.log(beta)
        torch.logaddexp(log_m, lq + math.log(1.0 - beta), out=log_m)
        p = lp.exp()
        d = (lp - log_m).masked_fill_(p == 0, 0.0)
        kl_teacher = _dot_rows(p, d)
        del p, d
        q = lq.exp()
        d = torch.sub(lq, log_m, out=log_m).masked_fill_(q == 0, 0.0)
        kl_student = _dot_rows(q, d)
        loss = beta * kl_teacher + (1.0 - beta) * kl_student
        grad = d.sub_(kl_student[:, None]).mul_(q).mul_(1.0 - beta) if need_grad else None
        return loss, grad
    raise ValueError(f"unknown divergence kind {kind!r}; expected one of {KINDS}")


def check_divergence_args(kind, beta, temperature):
    """Raise a clear ValueError for an unknown kind, beta outside [0, 1] or temperature <= 0."""
    if kind not in KINDS:
        raise ValueError(f"unknown divergence kind {kind!r}; expected one of {KINDS}")
    if not 0.0 <= float(beta) <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if not float(temperature) > 0.0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def _compute_dtype(*tensors):
    """fp64 if any input is fp64, else fp32 (bf16/fp16/fp32 inputs are all computed in fp32)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _kept_rows(mask, leading_shape, device):
    """Indices of the kept rows as a 1-D long tensor, or None when every row is kept (mask is None)."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a bool tensor, got {type(mask).__name__}")
    if mask.is_floating_point() or mask.is_complex():
        raise TypeError(f"mask must be a bool (or integer 0/1) tensor, got dtype {mask.dtype}")
    if tuple(mask.shape) != tuple(leading_shape):
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match the leading shape {tuple(leading_shape)}")
    return mask.reshape(-1).to(device).bool().nonzero().squeeze(-1)


def _row_chunks(rows, n_rows, chunk_rows):
    """Chunks of at most chunk_rows kept rows: slices (views, no copy) when rows is None, else index tensors.

    Both index a tensor the same way: x[chunk] is a view for a slice and a copy for an index tensor.
    """
    chunk_rows = max(1, int(chunk_rows))
    if rows is None:
        return [slice(start, start + chunk_rows) for start in range(0, n_rows, chunk_rows)]
    return rows.split(chunk_rows)


def _scaled(x, dtype, temperature):
    """x in the compute dtype, divided by temperature; x itself is never modified."""
    y = x.to(dtype)
    if temperature == 1.0:
        return y
    return y / temperature if y is x else y.div_(temperature)


def _logits_chunk_loss_grad(s_logits, t_logits, kind, beta, temperature, need_grad):
    """Loss and grad w.r.t. the raw student logits for one chunk of logits (any float dtype)."""
    dtype = _compute_dtype(s_logits, t_logits)
    lq = F.log_softmax(_scaled(s_logits, dtype, temperature), dim=-1)
    lp = F.log_softmax(_scaled(t_logits, dtype, temperature), dim=-1)
    loss, grad = divergence_from_log_probs(lq, lp, kind, beta, need_grad)
    if grad is not None and temperature != 1.0:
        grad.div_(temperature)
    return loss, grad


class _PerTokenDivergence(torch.autograd.Function):
    """Chunked divergence from logits. Forward stores the gradient (input dtype); backward scales it.

    Choice: the gradient w.r.t. the student logits is computed in forward and kept in the input dtype
    (one [N, V] tensor, the size of the logits) rather than recomputing the softmaxes in backward:
    backward must return an [N, V] tensor anyway, so peak memory is the same and the work is done once.
    Backward returns it scaled by the upstream gradient as a new tensor (so repeated backward passes,
    e.g. gradcheck, stay correct); during backward two such [N, V] tensors exist.
    """

    @staticmethod
    def forward(ctx, student, teacher, rows, kind, beta, temperature):
        """student, teacher: [N, V]; rows: kept row indices or None (all). Returns the per-row loss [N]."""
        need_grad = ctx.needs_input_grad[0]
        dtype = _compute_dtype(student, teacher)
        loss = torch.zeros(student.shape[0], dtype=dtype, device=student.device)
        grad = torch.zeros_like(student) if need_grad else None
        chunk_rows = _CHUNK_ELEMENTS // max(1, student.shape[1])
        for idx in _row_chunks(rows, student.shape[0], chunk_rows):
            loss_c, grad_c = _logits_chunk_loss_grad(student[idx], teacher[idx], kind, beta, temperature, need_grad)
            loss[idx] = loss_c
            if need_grad:
                grad[idx] = grad_c.to(grad.dtype)
        ctx.save_for_backward(grad)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        """Scale the stored per-row gradients by the upstream gradient of each row (out of place)."""
        (grad,) = ctx.saved_tensors
        if grad is None:
            return None, None, None, None, None, None
        return _scale_rows(grad, grad_loss), None, None, None, None, None


def _scale_rows(grad, row_weights):
    """grad[n, :] * row_weights[n] as a new tensor of grad's dtype, in fp32 chunks for low precision."""
    if grad.dtype in (torch.float32, torch.float64):
        return grad * row_weights.to(grad.dtype)[:, None]
    out = torch.empty_like(grad)
    chunk_rows = max(1, _CHUNK_ELEMENTS // max(1, grad.shape[1]))
    for start in range(0, grad.shape[0], chunk_rows):
        rows = slice(start, start + chunk_rows)
        out[rows] = grad[rows].float().mul_(row_weights[rows, None].float())
    return out


def per_token_divergence(student_logits, teacher_logits, mask=None, *, kind="forward_kl", beta=0.5, temperature=1.0):
    """Per-token divergence between teacher and student next-token distributions.

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
    _check_pair(student_logits, teacher_logits, "logits", "V")
    vocab = student_logits.shape[-1]
    rows = _kept_rows(mask, student_logits.shape[:-1], student_logits.device)
    student = student_logits.reshape(-1, vocab)
    teacher = teacher_logits.detach().reshape(-1, vocab)
    with _no_autocast(student):  # the math is fp32 by design, whatever autocast would pick
        return _PerTokenDivergence.apply(student, teacher, rows, kind, float(beta), float(temperature))


def _linear_chunk(s_hidden, t_hidden, weight, kind, beta, temperature, need_grad):
    """Loss and grad w.r.t. student logits (fp32/fp64) for one chunk of hidden rows."""
    return _logits_chunk_loss_grad(s_hidden @ weight.T, t_hidden @ weight.T, kind, beta, temperature, need_grad)


def _accumulate_linear_grads(g_logits, s_hidden, weight, idx, grad_hidden, grad_weight):
    """grad_hidden[idx] = g @ W; grad_weight += g.T @ h (fp32 accumulator). Either may be None."""
    if grad_hidden is not None:
        grad_hidden[idx] = (g_logits.to(weight.dtype) @ weight).to(grad_hidden.dtype)
    if grad_weight is not None:
        grad_weight.addmm_(g_logits.T, s_hidden.to(grad_weight.dtype))


class _FusedLinearDivergence(torch.autograd.Function):
    """Chunked divergence from hidden states and lm_head weight (Liger-style fused linear loss).

    Forward computes, per chunk of rows, the logits, the loss and the gradients for hidden and weight,
    assuming a uniform upstream gradient. Backward scales them in place when the upstream gradient is
    the same on all kept rows (loss.sum(), loss.mean(), masked mean: the usual case). Otherwise (per-row
    weights) the weight gradient does not factor out, so backward recomputes the chunks with the real
    weights (also on a second backward with retain_graph, since the stored gradients were consumed).
    """

    @staticmethod
    def forward(ctx, s_hidden, t_hidden, weight, rows, kind, beta, temperature, chunk_rows):
        """s_hidden, t_hidden: [N, H]; weight: [V, H]; rows: kept row indices or None (all). Returns loss [N]."""
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
        need_grad = need_h or need_w
        acc = _compute_dtype(s_hidden, weight)
        loss = torch.zeros(s_hidden.shape[0], dtype=acc, device=s_hidden.device)
        grad_h = torch.zeros_like(s_hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        for idx in _row_chunks(rows, s_hidden.shape[0], chunk_rows):
            hs, ht = s_hidden[idx], t_hidden[idx]
            loss_c, g = _linear_chunk(hs, ht, weight, kind, beta, temperature, need_grad)
            loss[idx] = loss_c
            if need_grad:
                _accumulate_linear_grads(g, hs, weight, idx, grad_h, grad_w)
        ctx.save_for_backward(s_hidden, t_hidden, weight, rows)
        ctx.grads = (grad_h, grad_w)  # not saved tensors: backward may scale them in place once
        ctx.settings = (kind, beta, temperature, chunk_rows)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        """Scale the stored gradients, or recompute them chunk by chunk for non-uniform upstream."""
        s_hidden, t_hidden, weight, rows = ctx.saved_tensors
        grad_h, grad_w = ctx.grads
        kept = grad_loss if rows is None else grad_loss[rows]
        uniform = kept.numel() == 0 or bool((kept == kept[0]).all())
        if uniform and not getattr(ctx, "consumed", False):
            ctx.consumed = True  # the stored gradients are scaled in place: a second backward recomputes
            ctx.grads = (None, None)
            scale = kept[0] if kept.numel() else grad_loss.new_zeros(())
            out_h = grad_h.mul_(scale.to(grad_h.dtype)) if grad_h is not None else None
            out_w = grad_w.mul_(scale.to(grad_w.dtype)).to(weight.dtype) if grad_w is not None else None
            return out_h, None, out_w, None, None, None, None, None
        out_h = torch.zeros_like(s_hidden) if ctx.needs_input_grad[0] else None
        out_w = torch.zeros(weight.shape, dtype=_compute_dtype(s_hidden, weight), device=weight.device)
        out_w = out_w if ctx.needs_input_grad[2] else None
        kind, beta, temperature, chunk_rows = ctx.settings
        for idx in _row_chunks(rows, s_hidden.shape[0], chunk_rows):
            hs, ht = s_hidden[idx], t_hidden[idx]
            _, g = _linear_chunk(hs, ht, weight, kind, beta, temperature, True)
            g.mul_(grad_loss[idx].to(g.dtype)[:, None])
            _accumulate_linear_grads(g, hs, weight, idx, out_h, out_w)
        out_w = out_w.to(weight.dtype) if out_w is not None else None
        return out_h, None, out_w, None, None, None, None, None


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
        chunk_size: rows per chunk; default keeps chunk_size * V <= 2**23.

    Returns:
        The per-row loss, shape [N], fp32 (fp64 for fp64 inputs).
    """
    check_divergence_args(kind, beta, temperature)
    _check_pair(student_hidden, teacher_hidden, "hidden", "H")
    if weight.dim() != 2 or weight.shape[1] != student_hidden.shape[-1]:
        raise ValueError(f"weight must be [V, H={student_hidden.shape[-1]}], got shape {tuple(weight.shape)}")
    if chunk_size is not None and int(chunk_size) < 1:
        raise ValueError(f"chunk_size must be a positive number of rows, got {chunk_size}")
    hidden = student_hidden.shape[-1]
    rows = _kept_rows(mask, student_hidden.shape[:-1], student_hidden.device)
    chunk_rows = int(chunk_size) if chunk_size is not None else max(1, _FUSED_CHUNK_ELEMENTS // weight.shape[0])
    s_hidden = student_hidden.reshape(-1, hidden)
    t_hidden = teacher_hidden.detach().reshape(-1, hidden)
    with _no_autocast(s_hidden):
        return _FusedLinearDivergence.apply(
            s_hidden, t_hidden, weight, rows, kind, float(beta), float(temperature), chunk_rows
        )


def _check_pair(student, teacher, what, last):
    """Student and teacher tensors of one shape, [N, last] or [B, T, last]."""
    if student.shape != teacher.shape:
        raise ValueError(
            f"student_{what} {tuple(student.shape)} and teacher_{what} {tuple(teacher.shape)} must have the same shape"
        )
    if student.dim() not in (2, 3):
        raise ValueError(f"{what} must be [N, {last}] or [B, T, {last}], got shape {tuple(student.shape)}")


def _no_autocast(tensor):
    """Autocast off on the tensor's device (inside a bf16-mixed training step, for example)."""
    return torch.autocast(device_type=tensor.device.type, enabled=False)
