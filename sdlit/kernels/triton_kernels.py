"""Triton kernel of the per-token divergences: one program per row, streaming over vocabulary blocks.

Per row (s = student logits / temperature, t = teacher logits / temperature, fp32 math whatever the
input dtype; lq = s - lse(s), lp = t - lse(t)):

- pass 1 reads both rows once and keeps an online (streaming) log-sum-exp of each, rescaled whenever a
  block raises the running max. For the KL kinds it also accumulates the loss on the fly:
  KL(p || q) = sum_v p (t - s) + lse(s) - lse(t), with sum_v p (t - s) = sum_v e^(t - m) (t - s) / z_t
  (and the mirror image for KL(q || p)), so the loss is known after one read.
- jsd needs log M = logaddexp(lp + log beta, lq + log(1 - beta)), which needs both lse first: a second
  pass sums beta KL(p || M) and (1 - beta) KL(q || M).
- with WRITE_GRAD, a last pass writes the gradient w.r.t. the raw student logits in the output dtype:
  forward_kl (q - p) / T, reverse_kl q (lq - lp - loss) / T, jsd (1 - beta) q (lq - lM - KL(q || M)) / T,
  times an optional per-row scale (the upstream gradient). It runs over the blocks in the opposite
  order of the pass before it, so the blocks read last (most likely still in L2) are read again first.

Only O(1) per row is kept between passes; no [N, V] buffer other than the gradient output exists.
-inf logits (masked vocabulary) are handled without NaN: terms with a zero probability contribute 0
(0 log 0 = 0), inf - inf never reaches a sum, and an all -inf block leaves the running sums unchanged.
Masked rows (keep = 0) read nothing, and get loss 0 and a zero gradient row.
"""

import triton
import triton.language as tl

KIND_IDS = {"forward_kl": 0, "reverse_kl": 1, "jsd": 2}


@triton.jit
def _sum(x):
    """tl.sum(x, 0), spelled as the reduction it stands for.

    tl.sum itself is a jit function of Triton's standard library: when Triton was imported before
    TRITON_INTERPRET=1 was set (torch._dynamo imports it), the interpreter cannot call it. tl.reduce is a
    builtin, and the interpreter maps this combine function to numpy's (pairwise) sum.
    """
    return tl.reduce(x, 0, tl.standard._sum_combine)


@triton.jit
def _max(x):
    """tl.max(x, 0) spelled with tl.reduce, see _sum."""
    return tl.reduce(x, 0, tl.standard._elementwise_max)


@triton.jit
def _scaled_block(row_ptr, cols, limit, temperature):
    """One block of a row in fp32, divided by temperature; columns at or past limit read as -inf."""
    x = tl.load(row_ptr + cols, mask=cols < limit, other=float("-inf")).to(tl.float32)
    return x / temperature


@triton.jit
def _safe_max(m):
    """The running max, with -inf (nothing seen yet) replaced by 0 so that x - m never is -inf - -inf."""
    return tl.where(m == float("-inf"), 0.0, m)


@triton.jit
def _online_lse(m, z, x):
    """Fold block x into a streaming log-sum-exp kept as (max m, sum z of e^(x - m))."""
    m_new = tl.maximum(m, _max(x))
    m_safe = _safe_max(m_new)
    z = z * tl.exp(m - m_safe) + _sum(tl.exp(x - m_safe))
    return m_new, z


@triton.jit
def _online_lse_and_cross(m, z, acc, x, y):
    """Streaming log-sum-exp of x plus acc = sum_v e^(x - m) (x - y) over x's support, both rescaled."""
    m_new = tl.maximum(m, _max(x))
    m_safe = _safe_max(m_new)
    alpha = tl.exp(m - m_safe)
    e = tl.exp(x - m_safe)
    z = z * alpha + _sum(e)
    acc = acc * alpha + _sum(tl.where(e > 0, e * (x - y), 0.0))
    return m_new, z, acc


@triton.jit
def _log_mixture(lp, lq, log_beta, log_one_minus_beta):
    """log(beta p + (1 - beta) q) from log p and log q, -inf where both are 0."""
    a = lp + log_beta
    b = lq + log_one_minus_beta
    m_safe = _safe_max(tl.maximum(a, b))
    return m_safe + tl.log(tl.exp(a - m_safe) + tl.exp(b - m_safe))


@triton.jit
def _row_statistics(s_row, t_row, limit, n_blocks, temperature, KIND: tl.constexpr, BLOCK_V: tl.constexpr):
    """Pass 1: lse of both rows and, for forward_kl / reverse_kl, the loss (0 for jsd, done later)."""
    m_s = float("-inf")
    z_s = 0.0
    m_t = float("-inf")
    z_t = 0.0
    acc = 0.0
    for b in range(0, n_blocks):
        cols = b * BLOCK_V + tl.arange(0, BLOCK_V)
        s = _scaled_block(s_row, cols, limit, temperature)
        t = _scaled_block(t_row, cols, limit, temperature)
        if KIND == 0:
            m_t, z_t, acc = _online_lse_and_cross(m_t, z_t, acc, t, s)
            m_s, z_s = _online_lse(m_s, z_s, s)
        elif KIND == 1:
            m_s, z_s, acc = _online_lse_and_cross(m_s, z_s, acc, s, t)
            m_t, z_t = _online_lse(m_t, z_t, t)
        else:
            m_s, z_s = _online_lse(m_s, z_s, s)
            m_t, z_t = _online_lse(m_t, z_t, t)
    lse_s = m_s + tl.log(z_s)
    lse_t = m_t + tl.log(z_t)
    if KIND == 0:
        loss = acc / z_t + lse_s - lse_t
    elif KIND == 1:
        loss = acc / z_s + lse_t - lse_s
    else:
        loss = 0.0 * lse_s
    return lse_s, lse_t, loss


@triton.jit
def _jsd_terms(s_row, t_row, limit, n_blocks, temperature, lse_s, lse_t, log_beta, log_one_minus_beta,
               BLOCK_V: tl.constexpr):
    """Pass 2 of jsd: KL(p || M) and KL(q || M), over the blocks in reverse order."""
    kl_t = 0.0
    kl_s = 0.0
    for i in range(0, n_blocks):
        cols = (n_blocks - 1 - i) * BLOCK_V + tl.arange(0, BLOCK_V)
        lq = _scaled_block(s_row, cols, limit, temperature) - lse_s
        lp = _scaled_block(t_row, cols, limit, temperature) - lse_t
        lm = _log_mixture(lp, lq, log_beta, log_one_minus_beta)
        p = tl.exp(lp)
        q = tl.exp(lq)
        kl_t += _sum(tl.where(p > 0, p * (lp - lm), 0.0))
        kl_s += _sum(tl.where(q > 0, q * (lq - lm), 0.0))
    return kl_t, kl_s


@triton.jit
def _write_grad(s_row, t_row, g_row, V, limit, n_blocks, temperature, lse_s, lse_t, stat, factor,
                log_beta, log_one_minus_beta, KIND: tl.constexpr, BLOCK_V: tl.constexpr):
    """Last pass: gradient w.r.t. the raw student logits; stat = the loss (reverse_kl) or KL(q || M) (jsd)."""
    for i in range(0, n_blocks):
        if KIND == 2:  # jsd's pass 2 ran backwards: run forwards
            b = i
        else:
            b = n_blocks - 1 - i
        cols = b * BLOCK_V + tl.arange(0, BLOCK_V)
        s = _scaled_block(s_row, cols, limit, temperature)
        t = _scaled_block(t_row, cols, limit, temperature)
        lq = s - lse_s
        q = tl.exp(lq)
        if KIND == 0:
            g = q - tl.exp(t - lse_t)
        elif KIND == 1:
            g = tl.where(q > 0, q * (lq - (t - lse_t) - stat), 0.0)
        else:
            lm = _log_mixture(t - lse_t, lq, log_beta, log_one_minus_beta)
            g = tl.where(q > 0, q * (lq - lm - stat), 0.0)
        g = tl.where(cols < limit, g * factor, 0.0)  # masked rows (limit 0) get zeros
        tl.store(g_row + cols, g.to(g_row.dtype.element_ty), mask=cols < V)


@triton.jit
def divergence_kernel(
    s_ptr, t_ptr, g_ptr, loss_ptr, keep_ptr, scale_ptr,
    s_stride, t_stride, g_stride, V,
    temperature, beta, log_beta, log_one_minus_beta,
    KIND: tl.constexpr, HAS_KEEP: tl.constexpr, HAS_SCALE: tl.constexpr, WRITE_GRAD: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """Loss of one row into loss_ptr[row] (fp32) and, with WRITE_GRAD, its gradient row into g_ptr."""
    row = tl.program_id(0).to(tl.int64)
    if HAS_KEEP:
        keep = tl.load(keep_ptr + row) != 0
    else:
        keep = row >= 0
    limit = tl.where(keep, V, 0)
    n_blocks = (V + BLOCK_V - 1) // BLOCK_V
    n_kept = tl.where(keep, n_blocks, 0)
    s_row = s_ptr + row * s_stride
    t_row = t_ptr + row * t_stride
    lse_s, lse_t, loss = _row_statistics(s_row, t_row, limit, n_kept, temperature, KIND, BLOCK_V)
    stat = loss
    factor = 1.0 / temperature
    if KIND == 2:
        kl_t, kl_s = _jsd_terms(s_row, t_row, limit, n_kept, temperature, lse_s, lse_t, log_beta,
                                log_one_minus_beta, BLOCK_V)
        loss = beta * kl_t + (1.0 - beta) * kl_s
        stat = kl_s
        factor = factor * (1.0 - beta)
    tl.store(loss_ptr + row, tl.where(keep, loss, 0.0))
    if WRITE_GRAD:
        if HAS_SCALE:
            factor = factor * tl.load(scale_ptr + row)
        _write_grad(s_row, t_row, g_ptr + row * g_stride, V, limit, n_blocks, temperature, lse_s, lse_t, stat,
                    factor, log_beta, log_one_minus_beta, KIND, BLOCK_V)
