"""Divergence from hidden states and the lm_head weight, chunked over rows (Liger-style fused linear loss).

The full [N, V] logits never exist: each chunk of rows makes its logits, loss and logit gradient with a
"chunk function" of a backend (`torch_divergence.linear_chunk_loss_grad` or
`triton_divergence.linear_chunk_loss_grad`, same signature), then turns the logit gradient into gradients
for the hidden states and the weight before the next chunk.

Given token ids, it also returns their log-probs under the student and the teacher, read off each chunk's logits
on the way: the per-token advantages that training logs then cost no second pass over the output head.
"""

import torch

from sdlit.kernels.inputs import check_divergence_args, check_pair, kept_rows, no_autocast, row_chunks

# The fused path does matmuls per chunk, and every chunk adds into the whole [V, H] weight gradient, so it
# needs more rows per chunk to run fast: 64 MiB per fp32 chunk temporary (341 rows at V = 49152; the CPU GEMMs of
# the output head reach their full rate only at a few hundred rows).
FUSED_CHUNK_ELEMENTS = 2**24


def _accumulate_linear_grads(g_logits, s_hidden, weight, idx, grad_hidden, grad_weight):
    """grad_hidden[idx] = g @ W; grad_weight += g.T @ h (an fp32/fp64 accumulator). Either may be None."""
    if grad_hidden is not None:
        grad_hidden[idx] = (g_logits.to(weight.dtype) @ weight).to(grad_hidden.dtype)
    if grad_weight is None:
        return
    if g_logits.dtype == grad_weight.dtype:
        grad_weight.addmm_(g_logits.T, s_hidden.to(grad_weight.dtype))
    else:  # low-precision logit gradient (Triton): matmul in that precision, accumulate in fp32
        grad_weight.add_(g_logits.T @ s_hidden.to(g_logits.dtype))


def _accumulator_dtype(*tensors):
    """fp64 if any input is fp64, else fp32: gradients of the weight are summed over chunks in it."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


class _FusedLinearDivergence(torch.autograd.Function):
    """Chunked divergence from hidden states and lm_head weight.

    Forward computes, per chunk of rows, the logits, the loss and the gradients for hidden and weight,
    assuming a uniform upstream gradient. Backward scales them in place when the upstream gradient is
    the same on all kept rows (loss.sum(), loss.mean(), masked mean: the usual case). Otherwise (per-row
    weights) the weight gradient does not factor out, so backward recomputes the chunks with the real
    weights (also on a second backward with retain_graph, since the stored gradients were consumed).
    """

    @staticmethod
    def forward(ctx, s_hidden, t_hidden, weight, rows, token_ids, kind, beta, temperature, chunk_rows, chunk_fn):
        """s_hidden, t_hidden: [N, H]; weight: [V, H]; rows: kept row indices or None (all); token_ids: [N] or None.

        Returns the loss [N] and the token log-probs [N, 2] (student, teacher; 0 on rows not kept; [0, 2] without
        token_ids), which get no gradient.
        """
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
        need_grad = need_h or need_w
        acc = _accumulator_dtype(s_hidden, weight)
        loss = torch.zeros(s_hidden.shape[0], dtype=acc, device=s_hidden.device)
        picked = torch.zeros((s_hidden.shape[0] if token_ids is not None else 0, 2), dtype=acc, device=s_hidden.device)
        grad_h = torch.zeros_like(s_hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        for idx in row_chunks(rows, s_hidden.shape[0], chunk_rows):
            hs, ht = s_hidden[idx], t_hidden[idx]
            ids = token_ids[idx] if token_ids is not None else None
            loss_c, g, picked_c = chunk_fn(hs, ht, weight, kind, beta, temperature, need_grad, token_ids=ids)
            loss[idx] = loss_c
            if picked_c is not None:
                picked[idx] = picked_c.to(acc)
            if need_grad:
                _accumulate_linear_grads(g, hs, weight, idx, grad_h, grad_w)
            del g
        ctx.save_for_backward(s_hidden, t_hidden, weight, rows)
        ctx.grads = (grad_h, grad_w)  # not saved tensors: backward may scale them in place once
        ctx.settings = (kind, beta, temperature, chunk_rows, chunk_fn)
        ctx.mark_non_differentiable(picked)
        return loss, picked

    @staticmethod
    def backward(ctx, grad_loss, grad_picked):
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
            return out_h, None, out_w, None, None, None, None, None, None, None
        out_h = torch.zeros_like(s_hidden) if ctx.needs_input_grad[0] else None
        out_w = torch.zeros(weight.shape, dtype=_accumulator_dtype(s_hidden, weight), device=weight.device)
        out_w = out_w if ctx.needs_input_grad[2] else None
        kind, beta, temperature, chunk_rows, chunk_fn = ctx.settings
        for idx in row_chunks(rows, s_hidden.shape[0], chunk_rows):
            hs, ht = s_hidden[idx], t_hidden[idx]
            _, g, _ = chunk_fn(hs, ht, weight, kind, beta, temperature, True, row_scale=grad_loss[idx])
            _accumulate_linear_grads(g, hs, weight, idx, out_h, out_w)
            del g
        out_w = out_w.to(weight.dtype) if out_w is not None else None
        return out_h, None, out_w, None, None, None, None, None, None, None


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
    token_ids=None,
    chunk_fn,
):
    """Per-token divergence from hidden states and the lm_head weight, with one backend's chunk function.

    Same value and gradients as `per_token_divergence(student_hidden @ weight.T, teacher_hidden @ weight.T,
    mask, ...)`. Gradients flow to student_hidden and weight (when they require grad), never through the
    teacher path (teacher_hidden, nor weight via the teacher logits: the teacher is a stop-gradient).

    Args:
        student_hidden: [N, H] or [B, T, H].
        teacher_hidden: same shape.
        weight: [V, H] lm_head weight (no bias), the same matrix is used for student and teacher.
        mask: optional bool tensor of the leading shape; True = keep.
        kind, beta, temperature: as in `per_token_divergence`.
        chunk_size: rows per chunk; default keeps chunk_size * V <= FUSED_CHUNK_ELEMENTS (2**24).
        token_ids: optional tokens of the leading shape whose log-probs under ``log_softmax(hidden @ weight.T)``
            (temperature 1, whatever ``temperature`` the divergence uses) are read off the same chunks of logits.
        chunk_fn: the backend's `linear_chunk_loss_grad`.

    Returns:
        (the per-row loss [N], fp32 (fp64 for fp64 inputs); with ``token_ids`` the student's and the teacher's
        log-probs, each shaped like ``token_ids``, without gradient, 0 on masked rows; else None).
    """
    check_divergence_args(kind, beta, temperature)
    check_pair(student_hidden, teacher_hidden, "hidden", "H")
    if weight.dim() != 2 or weight.shape[1] != student_hidden.shape[-1]:
        raise ValueError(f"weight must be [V, H={student_hidden.shape[-1]}], got shape {tuple(weight.shape)}")
    if chunk_size is not None and int(chunk_size) < 1:
        raise ValueError(f"chunk_size must be a positive number of rows, got {chunk_size}")
    leading = tuple(student_hidden.shape[:-1])
    if token_ids is not None and tuple(token_ids.shape) != leading:
        raise ValueError(f"token_ids shape {tuple(token_ids.shape)} does not match the hidden states' {leading}")
    ids = token_ids.reshape(-1).to(student_hidden.device) if token_ids is not None else None
    rows = kept_rows(mask, leading, student_hidden.device)
    chunk_rows = int(chunk_size) if chunk_size is not None else max(1, FUSED_CHUNK_ELEMENTS // weight.shape[0])
    s_hidden = student_hidden.reshape(-1, student_hidden.shape[-1])
    t_hidden = teacher_hidden.detach().reshape(-1, student_hidden.shape[-1])
    with no_autocast(s_hidden):
        loss, picked = _FusedLinearDivergence.apply(
            s_hidden, t_hidden, weight, rows, ids, kind, float(beta), float(temperature), chunk_rows, chunk_fn
        )
    if token_ids is None:
        return loss, None
    return loss, (picked[:, 0].reshape(token_ids.shape), picked[:, 1].reshape(token_ids.shape))
