"""Token log-probabilities from hidden states and the lm_head weight, chunked over rows (no [N, V] logits).

GRPO and supervised fine-tuning need only ``log softmax(h @ W.T / T)[y]`` per response token. Through the model's
own logits that costs, for GRPO's 64 rollouts x 128 tokens x 49152 vocabulary, 1.6 GB per fp32 [N, V] tensor, and
autograd keeps several (the logits, the log-sum-exp input, their gradients). Here each chunk of rows makes its
logits, log-sum-exp and picked logit, and is dropped; the gradient for the hidden states is formed in the same pass
per unit of upstream gradient (``(onehot(y) - softmax) @ W / T``, an [N, H] tensor) and scaled row by row in
backward, which is exact for any upstream gradient. A trainable weight gets its gradient in backward, from the
chunks recomputed with the real upstream gradient (its rows do not factor out).
"""

import torch

from sdlit.kernels.inputs import kept_rows, no_autocast, row_chunks

# rows per chunk: chunk_rows * V <= this many elements (64 MiB per fp32 chunk temporary; 341 rows at V = 49152)
LOGPROB_CHUNK_ELEMENTS = 2**24


def _chunk_logits(hidden, weight, temperature, dtype):
    logits = (hidden @ weight.T).to(dtype)
    return logits / temperature if temperature != 1.0 else logits


def _compute_dtype(*tensors):
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _unit_logit_grad(logits, log_normalizer, ids, temperature):
    """d logprob(y) / d raw logits for one chunk: (onehot(y) - softmax) / T; reuses ``logits`` as scratch."""
    grad = logits.sub_(log_normalizer[:, None]).exp_().neg_()
    grad[torch.arange(len(ids), device=ids.device), ids] += 1.0
    return grad.div_(temperature) if temperature != 1.0 else grad


class _FusedLinearLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, ids, rows, temperature, chunk_rows):
        """hidden [N, H], weight [V, H], ids [N]; returns log-probs [N] (0 on rows not in ``rows``)."""
        dtype = _compute_dtype(hidden, weight)
        out = torch.zeros(hidden.shape[0], dtype=dtype, device=hidden.device)
        unit_grad_h = torch.zeros_like(hidden) if ctx.needs_input_grad[0] else None
        log_normalizer = torch.zeros(hidden.shape[0], dtype=dtype, device=hidden.device)
        for idx in row_chunks(rows, hidden.shape[0], chunk_rows):
            h, y = hidden[idx], ids[idx]
            logits = _chunk_logits(h, weight, temperature, dtype)
            lse = torch.logsumexp(logits, dim=-1)
            out[idx] = logits.gather(1, y[:, None]).squeeze(1) - lse
            log_normalizer[idx] = lse
            if unit_grad_h is not None:
                g = _unit_logit_grad(logits, lse, y, temperature)
                unit_grad_h[idx] = (g.to(weight.dtype) @ weight).to(hidden.dtype)
            del logits
        ctx.save_for_backward(hidden, weight, ids, rows, log_normalizer, unit_grad_h)
        ctx.settings = (temperature, chunk_rows)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, ids, rows, log_normalizer, unit_grad_h = ctx.saved_tensors
        temperature, chunk_rows = ctx.settings
        grad_h = unit_grad_h * grad_out[:, None].to(unit_grad_h.dtype) if ctx.needs_input_grad[0] else None
        grad_w = None
        if ctx.needs_input_grad[1]:
            grad_w = torch.zeros(weight.shape, dtype=_compute_dtype(hidden, weight), device=weight.device)
            for idx in row_chunks(rows, hidden.shape[0], chunk_rows):
                h, y = hidden[idx], ids[idx]
                logits = _chunk_logits(h, weight, temperature, grad_w.dtype)
                g = _unit_logit_grad(logits, log_normalizer[idx], y, temperature)
                g.mul_(grad_out[idx].to(g.dtype)[:, None])
                grad_w.addmm_(g.T, h.to(grad_w.dtype))
                del logits, g
            grad_w = grad_w.to(weight.dtype)
        return grad_h, grad_w, None, None, None, None


def fused_linear_logprobs(hidden, weight, token_ids, mask=None, *, temperature=1.0, chunk_size=None):
    """Log-probability of each given token under ``softmax(hidden @ weight.T / temperature)``, never making the
    full logits.

    Same value and gradients as ``log_softmax(hidden @ weight.T / temperature).gather(-1, token_ids)``; gradients
    flow to ``hidden`` and ``weight`` when they require grad.

    Args:
        hidden: [N, H] or [B, T, H] final hidden states (the lm_head input).
        weight: [V, H] lm_head weight (no bias).
        token_ids: [N] or [B, T] the tokens whose log-probs are wanted.
        mask: optional bool tensor of the leading shape; rows that are False get 0 and no gradient, and are not
            computed.
        temperature: divides the logits.
        chunk_size: rows per chunk; default keeps chunk_size * V <= LOGPROB_CHUNK_ELEMENTS (2**24).

    Returns:
        Log-probs with the leading shape of ``hidden``, fp32 (fp64 for fp64 inputs).
    """
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight must be [V, H={hidden.shape[-1]}], got shape {tuple(weight.shape)}")
    if tuple(token_ids.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"token_ids shape {tuple(token_ids.shape)} does not match hidden {tuple(hidden.shape[:-1])}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if chunk_size is not None and int(chunk_size) < 1:
        raise ValueError(f"chunk_size must be a positive number of rows, got {chunk_size}")
    leading = hidden.shape[:-1]
    rows = kept_rows(mask, leading, hidden.device)
    chunk_rows = int(chunk_size) if chunk_size is not None else max(1, LOGPROB_CHUNK_ELEMENTS // weight.shape[0])
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    flat_ids = token_ids.reshape(-1).to(hidden.device)
    with no_autocast(flat_hidden):
        out = _FusedLinearLogprobs.apply(flat_hidden, weight, flat_ids, rows, float(temperature), chunk_rows)
    return out.reshape(leading)
