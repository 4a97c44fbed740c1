"""Tests for sdlit.kernels against a naive full-size reference (log_softmax + explicit sums)."""

import pytest
import torch
import torch.nn.functional as F

from sdlit.kernels import (
    KINDS,
    fused_linear_divergence,
    fused_linear_divergence_with_logprobs,
    per_token_divergence,
    torch_divergence,
)

from conftest import assert_close, fused_grads, logits_then_divergence, random_logits, value_and_grad


def naive_divergence(student_logits, teacher_logits, mask=None, kind="forward_kl", beta=0.5, temperature=1.0):
    """Reference: full-size fp32 math, autograd for the gradient, TRL endpoints for jsd."""
    v = student_logits.shape[-1]
    s = student_logits.reshape(-1, v).float() / temperature
    t = teacher_logits.detach().reshape(-1, v).float() / temperature
    lq, lp = F.log_softmax(s, -1), F.log_softmax(t, -1)
    q, p = lq.exp(), lp.exp()
    if kind == "jsd" and beta in (0.0, 1.0):
        kind = "forward_kl" if beta == 0.0 else "reverse_kl"
    if kind == "forward_kl":
        loss = torch.where(p > 0, p * (lp - lq), 0.0).sum(-1)
    elif kind == "reverse_kl":
        loss = torch.where(q > 0, q * (lq - lp), 0.0).sum(-1)
    else:
        m = beta * p + (1 - beta) * q
        lm = m.log()
        kl_t = torch.where(p > 0, p * (lp - lm), 0.0).sum(-1)
        kl_s = torch.where(q > 0, q * (lq - lm), 0.0).sum(-1)
        loss = beta * kl_t + (1 - beta) * kl_s
    if mask is not None:
        loss = loss * mask.reshape(-1).float()
    return loss


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("temperature,beta", [(1.0, 0.5), (0.7, 0.3), (2.0, 0.9)])
def test_matches_naive_value_and_grad(kind, temperature, beta):
    s, t = random_logits(13, 97, seed=1), random_logits(13, 97, seed=2)
    up = torch.rand(13, generator=torch.Generator().manual_seed(3)) * 2 - 0.5
    kw = dict(kind=kind, beta=beta, temperature=temperature)
    v1, g1 = value_and_grad(per_token_divergence, s, t, up, **kw)
    v2, g2 = value_and_grad(naive_divergence, s, t, up, **kw)
    assert v1.dtype == torch.float32 and v1.shape == (13,)
    assert_close(v1, v2)
    assert_close(g1, g2)


@pytest.mark.parametrize("beta", [0.0, 1.0])
def test_jsd_endpoints_follow_trl(beta):
    s, t = random_logits(5, 31, seed=4), random_logits(5, 31, seed=5)
    expected_kind = "forward_kl" if beta == 0.0 else "reverse_kl"
    v1, g1 = value_and_grad(per_token_divergence, s, t, kind="jsd", beta=beta)
    v2, g2 = value_and_grad(per_token_divergence, s, t, kind=expected_kind)
    assert torch.isfinite(v1).all() and torch.isfinite(g1).all()
    assert_close(v1, v2)
    assert_close(g1, g2)


@pytest.mark.parametrize("kind", KINDS)
def test_3d_input_with_mask(kind):
    s, t = random_logits(2, 7, 1271, seed=6), random_logits(2, 7, 1271, seed=7)
    mask = torch.rand(2, 7, generator=torch.Generator().manual_seed(8)) > 0.4
    v1, g1 = value_and_grad(per_token_divergence, s, t, mask=mask, kind=kind, beta=0.2)
    v2, g2 = value_and_grad(naive_divergence, s, t, mask=mask, kind=kind, beta=0.2)
    assert v1.shape == (14,)
    assert_close(v1, v2)
    assert_close(g1, g2)
    assert (v1[~mask.reshape(-1)] == 0).all()
    assert (g1[~mask] == 0).all()


def test_masked_rows_with_garbage_stay_zero():
    s, t = random_logits(4, 11), random_logits(4, 11, seed=1)
    s[1] = float("nan")
    t[1] = float("-inf")
    mask = torch.tensor([True, False, True, True])
    v, g = value_and_grad(per_token_divergence, s, t, mask=mask)
    assert v[1] == 0 and (g[1] == 0).all() and torch.isfinite(v).all() and torch.isfinite(g).all()


@pytest.mark.parametrize("kind", KINDS)
def test_minus_inf_columns(kind):
    s, t = random_logits(6, 40, seed=9), random_logits(6, 40, seed=10)
    s[:, [3, 17, 39]] = float("-inf")
    t[:, [3, 17, 39]] = float("-inf")
    v1, g1 = value_and_grad(per_token_divergence, s, t, kind=kind, temperature=1.3)
    assert torch.isfinite(v1).all() and torch.isfinite(g1).all()
    assert (g1[:, [3, 17, 39]] == 0).all()
    keep = [i for i in range(40) if i not in (3, 17, 39)]
    v2, g2 = value_and_grad(per_token_divergence, s[:, keep], t[:, keep], kind=kind, temperature=1.3)
    assert_close(v1, v2)
    assert_close(g1[:, keep], g2)


@pytest.mark.parametrize("kind", KINDS)
def test_zero_on_identical_and_nonnegative(kind):
    s = random_logits(8, 50, seed=11)
    v, g = value_and_grad(per_token_divergence, s, s.clone(), kind=kind)
    assert v.abs().max() < 1e-5 and g.abs().max() < 1e-6
    v2 = per_token_divergence(random_logits(64, 50, seed=12), random_logits(64, 50, seed=13), kind=kind, beta=0.7)
    assert (v2 >= -1e-6).all() and (v2 > 0).any()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", KINDS)
def test_low_precision_inputs(dtype, kind):
    s, t = random_logits(9, 300, dtype=dtype, seed=14), random_logits(9, 300, dtype=dtype, seed=15)
    v1, g1 = value_and_grad(per_token_divergence, s, t, kind=kind)
    v2, g2 = value_and_grad(naive_divergence, s, t, kind=kind)
    assert v1.dtype == torch.float32 and g1.dtype == dtype
    assert_close(v1, v2, rtol=5e-2, atol=1e-3)
    assert_close(g1, g2.to(dtype), rtol=5e-2, atol=1e-3)


def test_teacher_gets_no_grad():
    s = random_logits(3, 20).requires_grad_(True)
    t = random_logits(3, 20, seed=1).requires_grad_(True)
    per_token_divergence(s, t).sum().backward()
    assert s.grad is not None and t.grad is None


def test_small_chunks_match(monkeypatch):
    s, t = random_logits(37, 129, seed=16), random_logits(37, 129, seed=17)
    v1, g1 = value_and_grad(per_token_divergence, s, t, kind="jsd")
    monkeypatch.setattr(torch_divergence, "_CHUNK_ELEMENTS", 129 * 5)
    v2, g2 = value_and_grad(per_token_divergence, s, t, kind="jsd")
    assert_close(v1, v2)
    assert_close(g1, g2)


def test_gradcheck_float64():
    s = random_logits(3, 7, dtype=torch.float64, seed=18).requires_grad_(True)
    t = random_logits(3, 7, dtype=torch.float64, seed=19)
    for kind in KINDS:

        def fn(x, kind=kind):
            return per_token_divergence(x, t, kind=kind, beta=0.3, temperature=0.8)

        assert torch.autograd.gradcheck(fn, (s,))


def test_input_validation():
    s, t = random_logits(3, 10), random_logits(3, 10, seed=1)
    with pytest.raises(ValueError, match="same shape"):
        per_token_divergence(s, t[:, :9])
    with pytest.raises(ValueError, match="unknown divergence kind"):
        per_token_divergence(s, t, kind="kl")
    with pytest.raises(ValueError, match="temperature"):
        per_token_divergence(s, t, temperature=0.0)
    with pytest.raises(ValueError, match="beta"):
        per_token_divergence(s, t, kind="jsd", beta=1.5)
    with pytest.raises(ValueError, match="mask shape"):
        per_token_divergence(s, t, mask=torch.ones(4, dtype=torch.bool))
    with pytest.raises(ValueError, match="weight"):
        fused_linear_divergence(s, t, torch.randn(5, 9))
    with pytest.raises(ValueError, match="chunk_size"):
        fused_linear_divergence(s, t, torch.randn(5, 10), chunk_size=0)


def _fused_case(dtype=torch.float32, seed=20):
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(2, 9, 16, generator=g).to(dtype)
    ht = torch.randn(2, 9, 16, generator=g).to(dtype)
    w = (torch.randn(1271, 16, generator=g) * 0.5).to(dtype)
    mask = torch.rand(2, 9, generator=g) > 0.3
    return hs, ht, w, mask


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("upstream_kind", ["uniform", "random"])
def test_fused_linear_matches_logits_path(kind, upstream_kind):
    hs, ht, w, mask = _fused_case()
    up = torch.full((18,), 1 / 7) if upstream_kind == "uniform" else torch.rand(18) - 0.3
    kw = dict(mask=mask, kind=kind, beta=0.3, temperature=1.5)
    v1, gh1, gw1 = fused_grads(fused_linear_divergence, hs, ht, w, up, chunk_size=4, **kw)
    v2, gh2, gw2 = fused_grads(logits_then_divergence, hs, ht, w, up, **kw)
    assert_close(v1, v2)
    assert_close(gh1, gh2)
    assert_close(gw1, gw2)
    assert (gh1[~mask] == 0).all()


def _naive_logprobs(hidden, weight, ids):
    """log_softmax(hidden @ weight.T)[ids] in fp64: the independent reference for the log-probs."""
    return torch.log_softmax(hidden.double() @ weight.double().T, dim=-1).gather(-1, ids[..., None]).squeeze(-1)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("temperature", [1.0, 1.5])
def test_fused_linear_with_logprobs(kind, temperature):
    hs, ht, w, mask = _fused_case()
    ids = torch.randint(0, w.shape[0], mask.shape, generator=torch.Generator().manual_seed(3))
    up = torch.rand(18) - 0.3
    kw = dict(mask=mask, kind=kind, beta=0.3, temperature=temperature, chunk_size=4)
    got = {}

    def with_logprobs(h, t, weight, **kw):
        loss, got["student"], got["teacher"] = fused_linear_divergence_with_logprobs(h, t, weight, ids, **kw)
        return loss

    v1, gh1, gw1 = fused_grads(with_logprobs, hs, ht, w, up, **kw)
    v2, gh2, gw2 = fused_grads(fused_linear_divergence, hs, ht, w, up, **kw)
    assert_close(v1, v2)  # the loss and its gradients are those of fused_linear_divergence
    assert_close(gh1, gh2)
    assert_close(gw1, gw2)
    for side, hidden in (("student", hs), ("teacher", ht)):
        assert got[side].shape == ids.shape and not got[side].requires_grad
        assert_close(got[side][mask].double(), _naive_logprobs(hidden, w, ids)[mask])  # temperature 1 always
        assert (got[side][~mask] == 0).all()


def test_fused_linear_with_logprobs_checks_token_shape():
    hs, ht, w, _ = _fused_case()
    with pytest.raises(ValueError, match="token_ids shape"):
        fused_linear_divergence_with_logprobs(hs, ht, w, torch.zeros(2, 8, dtype=torch.long))


def test_fused_linear_bf16_and_default_chunk():
    hs, ht, w, mask = _fused_case(torch.bfloat16)
    up = torch.ones(18) / 18
    v1, gh1, gw1 = fused_grads(fused_linear_divergence, hs, ht, w, up, mask=mask, kind="jsd")
    v2, gh2, gw2 = fused_grads(logits_then_divergence, hs, ht, w, up, mask=mask, kind="jsd")
    assert gh1.dtype == torch.bfloat16 and gw1.dtype == torch.bfloat16
    assert_close(v1, v2, rtol=5e-2, atol=1e-3)
    assert_close(gh1, gh2, rtol=5e-2, atol=1e-3)
    assert_close(gw1, gw2, rtol=5e-2, atol=1e-3)


def test_fused_linear_frozen_weight_and_no_grad():
    hs, ht, w, _ = _fused_case()
    hs = hs.requires_grad_(True)
    fused_linear_divergence(hs, ht, w).mean().backward()
    assert hs.grad is not None and w.grad is None
    with torch.no_grad():
        v = fused_linear_divergence(hs, ht, w)
    assert_close(v, logits_then_divergence(hs.detach(), ht, w))


def test_second_backward_with_retain_graph():
    s = random_logits(4, 30).requires_grad_(True)
    loss = per_token_divergence(s, random_logits(4, 30, seed=1))
    loss.sum().backward(retain_graph=True)
    first = s.grad.clone()
    loss.sum().backward()
    assert_close(s.grad, 2 * first)
    hs, ht, w, _ = _fused_case()
    w = w.requires_grad_(True)
    loss = fused_linear_divergence(hs, ht, w)
    loss.sum().backward(retain_graph=True)
    first = w.grad.clone()
    loss.sum().backward()
    assert_close(w.grad, 2 * first)


def test_fused_linear_gradcheck_float64():
    g = torch.Generator().manual_seed(21)
    hs = torch.randn(5, 4, generator=g, dtype=torch.float64).requires_grad_(True)
    ht = torch.randn(5, 4, generator=g, dtype=torch.float64)
    w = torch.randn(9, 4, generator=g, dtype=torch.float64).requires_grad_(True)
    mask = torch.tensor([True, True, False, True, True])
    for kind in KINDS:  # w.r.t. hidden only: the weight also feeds the stop-gradient teacher logits

        def fn(h, kind=kind):
            return fused_linear_divergence(h, ht, w, mask, kind=kind, temperature=1.2, chunk_size=2)

        assert torch.autograd.gradcheck(fn, (hs,), fast_mode=True)


def test_inputs_are_not_modified():
    s, t = random_logits(6, 33, seed=22), random_logits(6, 33, seed=23)
    s0, t0 = s.clone(), t.clone()
    for kind in KINDS:
        per_token_divergence(s, t, kind=kind, temperature=0.5)
        per_token_divergence(s, t, torch.tensor([1, 0, 1, 1, 0, 1]).bool(), kind=kind, temperature=0.5)
    assert torch.equal(s, s0) and torch.equal(t, t0)


def test_backend_setting_without_triton(monkeypatch):
    from sdlit.kernels import dispatch

    s, t = random_logits(3, 10), random_logits(3, 10, seed=1)
    monkeypatch.delenv(dispatch.BACKEND_ENV, raising=False)
    assert dispatch.resolve_backend("auto", s) == "torch"  # CPU tensors: the fallback
    assert_close(per_token_divergence(s, t, backend="torch"), per_token_divergence(s, t))
    monkeypatch.setenv(dispatch.BACKEND_ENV, "torch")
    assert dispatch.resolve_backend("auto", s) == "torch"
    monkeypatch.setenv(dispatch.BACKEND_ENV, "fast")
    with pytest.raises(ValueError, match="SDLIT_KERNEL_BACKEND='fast'"):
        per_token_divergence(s, t)
    monkeypatch.delenv(dispatch.BACKEND_ENV)
    with pytest.raises(ValueError, match="backend must be one of"):
        fused_linear_divergence(s, t, torch.randn(5, 10), backend="cuda")
    monkeypatch.setattr(dispatch, "_triton_importable", lambda: False)
    assert dispatch.resolve_backend("auto", s) == "torch"
    with pytest.raises(RuntimeError, match="pip install triton"):
        per_token_divergence(s, t, backend="triton")

