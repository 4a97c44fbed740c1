"""Triton divergence kernels on this CPU through Triton's interpreter, against a naive reference and the fallback.

The kernels are loaded in interpreter mode (TRITON_INTERPRET=1 while `sdlit.kernels.triton_kernels` is
imported; Triton itself may have been imported before, by torch._dynamo) by a module fixture that
restores the environment and reloads the compiled kernels afterwards. The interpreter is slow: shapes
are tiny, and the vocabulary block is made small (512) so that rows span several blocks that do not
divide V.
A last test compiles the real (non-interpreted) kernels for an H100 target, which needs no GPU.
"""

import importlib
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO_ROOT, assert_close, fused_grads, logits_then_divergence, random_logits, value_and_grad

pytest.importorskip("triton")

from sdlit.kernels import (  # noqa: E402
    KINDS,
    dispatch,
    fused_linear_divergence,
    fused_linear_divergence_with_logprobs,  # noqa: E402
    per_token_divergence,
)

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy warns on the -inf arithmetic

KERNEL_MODULES = ("sdlit.kernels.triton_kernels", "sdlit.kernels.triton_divergence")


def _load_kernel_modules():
    """(Re)import the kernel modules; the current TRITON_INTERPRET decides interpreted or compiled."""
    for name in KERNEL_MODULES:
        if name in sys.modules:
            importlib.reload(sys.modules[name])
        else:
            importlib.import_module(name)
    return sys.modules[KERNEL_MODULES[1]]


@pytest.fixture(scope="module", autouse=True)
def interpreted():
    """The Triton kernel modules in interpreter mode for this module; compiled mode again afterwards."""
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        module = _load_kernel_modules()
    finally:
        if previous is None:
            os.environ.pop("TRITON_INTERPRET")
        else:
            os.environ["TRITON_INTERPRET"] = previous
    assert module.INTERPRETED
    yield module
    if previous != "1":
        _load_kernel_modules()  # so that later tests on a GPU get the compiled kernels


@pytest.fixture(autouse=True)
def small_blocks(interpreted, monkeypatch):
    """Blocks of 512 columns: V = 1271 spans 3 blocks, the last one partial."""
    monkeypatch.setattr(interpreted, "MAX_BLOCK_V", 512)
    monkeypatch.delenv(dispatch.BACKEND_ENV, raising=False)


def naive_reference(student, teacher, upstream=None, mask=None, kind="forward_kl", beta=0.5, temperature=1.0):
    """(loss, grad) in fp64 by plain autograd, row by row over the columns that are not -inf on both sides.

    Dropping the columns where both logits are -inf changes nothing mathematically (p = q = 0 there) and
    keeps autograd's inf - inf out of the gradient. jsd with beta 0 / 1 is forward / reverse KL (TRL).
    """
    vocab = student.shape[-1]
    s_rows, t_rows = student.reshape(-1, vocab).double(), teacher.reshape(-1, vocab).double()
    keep = torch.ones(len(s_rows), dtype=torch.bool) if mask is None else mask.reshape(-1)
    up = torch.ones(len(s_rows), dtype=torch.float64) if upstream is None else upstream.double()
    kind = {0.0: "forward_kl", 1.0: "reverse_kl"}.get(beta, kind) if kind == "jsd" else kind
    loss, grad = torch.zeros(len(s_rows), dtype=torch.float64), torch.zeros_like(s_rows)
    for row in torch.nonzero(keep).flatten().tolist():
        cols = ~(torch.isneginf(s_rows[row]) & torch.isneginf(t_rows[row]))
        s = (s_rows[row, cols] / temperature).requires_grad_(True)
        lq, lp = torch.log_softmax(s, -1), torch.log_softmax(t_rows[row, cols] / temperature, -1)
        q, p = lq.exp(), lp.exp()
        if kind == "forward_kl":
            value = torch.where(p > 0, p * (lp - lq), 0.0).sum()
        elif kind == "reverse_kl":
            value = torch.where(q > 0, q * (lq - lp), 0.0).sum()
        else:
            lm = (beta * p + (1 - beta) * q).log()
            value = beta * torch.where(p > 0, p * (lp - lm), 0.0).sum()
            value = value + (1 - beta) * torch.where(q > 0, q * (lq - lm), 0.0).sum()
        (g,) = torch.autograd.grad(value * up[row], s)
        loss[row], grad[row, cols] = value.detach(), g / temperature
    return loss, grad.reshape(student.shape)


def _check_both_backends(s, t, upstream=None, rtol=1e-5, atol=1e-6, **kw):
    """Triton and the torch fallback against the fp64 reference; returns Triton's (loss, grad)."""
    v_ref, g_ref = naive_reference(s, t, upstream, **kw)
    results = {}
    for backend in ("triton", "torch"):
        v, g = value_and_grad(per_token_divergence, s, t, upstream, backend=backend, **kw)
        assert v.dtype == torch.float32 and v.shape == v_ref.shape and g.dtype == s.dtype, backend
        assert_close(v, v_ref, rtol, atol)
        assert_close(g, g_ref.to(s.dtype), rtol, atol)
        results[backend] = (v, g)
    return results["triton"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("temperature,beta", [(1.0, 0.5), (0.7, 0.3)])
def test_matches_fallback_and_naive(kind, temperature, beta):
    s, t = random_logits(2, 2, 1271, seed=1), random_logits(2, 2, 1271, seed=2)
    mask = torch.tensor([[True, False], [True, True]])
    up = torch.rand(4, generator=torch.Generator().manual_seed(3)) * 2 - 0.5  # upstream not 1, per row
    v, g = _check_both_backends(s, t, up, mask=mask, kind=kind, beta=beta, temperature=temperature)
    assert v[1] == 0 and (g[0, 1] == 0).all()


@pytest.mark.parametrize("kind", KINDS)
def test_uniform_upstream_and_single_block(kind, interpreted, monkeypatch):
    monkeypatch.setattr(interpreted, "MAX_BLOCK_V", 4096)  # the default: one block covers V = 300
    s, t = random_logits(3, 300, seed=4), random_logits(3, 300, seed=5)
    _check_both_backends(s, t, kind=kind, beta=0.8, temperature=1.7)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", KINDS)
def test_low_precision_inputs(dtype, kind):
    s, t = random_logits(3, 1271, dtype=dtype, seed=6), random_logits(3, 1271, dtype=dtype, seed=7)
    up = torch.rand(3, generator=torch.Generator().manual_seed(8))
    _check_both_backends(s, t, up, rtol=5e-2, atol=1e-3, kind=kind, temperature=1.3)


def test_masked_rows_with_garbage_stay_zero():
    s, t = random_logits(4, 700, seed=9), random_logits(4, 700, seed=10)
    s[1] = float("nan")
    t[1] = float("-inf")
    mask = torch.tensor([True, False, True, True])
    for kind in KINDS:
        v, g = value_and_grad(per_token_divergence, s, t, torch.full((4,), 0.5), mask=mask, kind=kind,
                               backend="triton")
        assert v[1] == 0 and (g[1] == 0).all() and torch.isfinite(v).all() and torch.isfinite(g).all()


@pytest.mark.parametrize("kind", KINDS)
def test_minus_inf_columns(kind):
    s, t = random_logits(3, 1271, seed=11), random_logits(3, 1271, seed=12)
    cols = [3, 600, 1100, 1270]  # one in each block, the last column of the last (partial) block
    s[:, cols] = float("-inf")
    t[:, cols] = float("-inf")
    t[:, 7] = float("-inf")  # teacher-only -inf: p = 0 there
    if kind == "reverse_kl":
        s[:, 7] = float("-inf")  # KL(q || p) is infinite where q > 0 = p
    s[2, :512] = float("-inf")  # a whole block of -inf in one row
    t[2, :512] = float("-inf")
    v, g = _check_both_backends(s, t, kind=kind, temperature=1.3)
    assert torch.isfinite(v).all() and torch.isfinite(g).all()
    assert (g[:, cols] == 0).all() and (g[2, :512] == 0).all()


@pytest.mark.parametrize("kind", KINDS)
def test_zero_on_identical_and_nonnegative(kind):
    s = random_logits(4, 1271, seed=13)
    v, g = value_and_grad(per_token_divergence, s, s.clone(), kind=kind, backend="triton")
    assert v.abs().max() < 1e-5 and g.abs().max() < 1e-6
    v2 = per_token_divergence(random_logits(8, 200, seed=14), random_logits(8, 200, seed=15), kind=kind, beta=0.7,
                              backend="triton")
    assert (v2 >= -1e-6).all() and (v2 > 0).all()


def test_teacher_gets_no_grad_and_no_grad_mode():
    s = random_logits(3, 100).requires_grad_(True)
    t = random_logits(3, 100, seed=1).requires_grad_(True)
    per_token_divergence(s, t, kind="jsd", backend="triton").sum().backward()
    assert s.grad is not None and t.grad is None
    with torch.no_grad():
        v = per_token_divergence(s, t, kind="jsd", backend="triton")
    assert_close(v, naive_reference(s.detach(), t.detach(), kind="jsd")[0])


def test_second_backward_with_retain_graph():
    s = random_logits(3, 90).requires_grad_(True)
    loss = per_token_divergence(s, random_logits(3, 90, seed=1), kind="reverse_kl", backend="triton")
    loss.sum().backward(retain_graph=True)
    first = s.grad.clone()
    (loss * torch.tensor([1.0, 2.0, 0.0])).sum().backward()
    assert_close(s.grad, first * torch.tensor([2.0, 3.0, 1.0])[:, None])


def _fused_case(dtype=torch.float32, seed=20):
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(2, 3, 16, generator=g).to(dtype)
    ht = torch.randn(2, 3, 16, generator=g).to(dtype)
    w = (torch.randn(1271, 16, generator=g) * 0.5).to(dtype)
    mask = torch.tensor([[True, False, True], [True, True, False]])
    return hs, ht, w, mask


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("upstream_kind", ["uniform", "random"])
def test_fused_linear_matches_logits_path(kind, upstream_kind):
    hs, ht, w, mask = _fused_case()
    up = torch.full((6,), 1 / 4) if upstream_kind == "uniform" else torch.rand(6) - 0.3
    kw = dict(mask=mask, kind=kind, beta=0.3, temperature=1.5)
    for backend in ("triton", "torch"):
        v1, gh1, gw1 = fused_grads(fused_linear_divergence, hs, ht, w, up, chunk_size=3, backend=backend, **kw)
        v2, gh2, gw2 = fused_grads(logits_then_divergence, hs, ht, w, up, backend=backend, **kw)
        assert_close(v1, v2)
        assert_close(gh1, gh2)
        assert_close(gw1, gw2)
        assert (gh1[~mask] == 0).all()


@pytest.mark.parametrize("temperature", [1.0, 1.5])
def test_fused_linear_with_logprobs_matches_fallback(temperature):
    hs, ht, w, mask = _fused_case()
    ids = torch.randint(0, w.shape[0], mask.shape, generator=torch.Generator().manual_seed(3))
    kw = dict(kind="forward_kl", temperature=temperature, chunk_size=3)
    triton_out = fused_linear_divergence_with_logprobs(hs, ht, w, ids, mask, backend="triton", **kw)
    torch_out = fused_linear_divergence_with_logprobs(hs, ht, w, ids, mask, backend="torch", **kw)
    naive = torch.log_softmax(hs @ w.T, dim=-1).gather(-1, ids[..., None]).squeeze(-1)
    for got, expected in zip(triton_out, torch_out, strict=False):
        assert_close(got, expected)
    assert_close(triton_out[1][mask], naive[mask])
    assert (triton_out[2][~mask] == 0).all()


def test_fused_linear_bf16():
    hs, ht, w, mask = _fused_case(torch.bfloat16)
    up = torch.ones(6) / 4
    v1, gh1, gw1 = fused_grads(fused_linear_divergence, hs, ht, w, up, mask=mask, kind="jsd", backend="triton")
    v2, gh2, gw2 = fused_grads(logits_then_divergence, hs.float(), ht.float(), w.float(), up, mask=mask,
                                kind="jsd", backend="torch")
    assert gh1.dtype == torch.bfloat16 and gw1.dtype == torch.bfloat16
    assert_close(v1, v2, rtol=5e-2, atol=1e-3)
    assert_close(gh1, gh2, rtol=5e-2, atol=1e-3)
    assert_close(gw1, gw2, rtol=5e-2, atol=2e-3)


def test_backend_choice(interpreted, monkeypatch):
    cpu = torch.zeros(2, 3)
    assert dispatch.resolve_backend("auto", cpu) == "torch"
    assert dispatch.resolve_backend("torch", cpu) == "torch"
    assert dispatch.resolve_backend("triton", cpu) == "triton"  # interpreter loaded
    monkeypatch.setenv(dispatch.BACKEND_ENV, "triton")
    assert dispatch.resolve_backend("auto", cpu) == "triton"
    assert dispatch.resolve_backend("torch", cpu) == "torch"  # an explicit argument wins over the variable
    monkeypatch.setenv(dispatch.BACKEND_ENV, "cuda")
    with pytest.raises(ValueError, match="SDLIT_KERNEL_BACKEND"):
        dispatch.resolve_backend("auto", cpu)
    with pytest.raises(ValueError, match="backend must be one of"):
        dispatch.resolve_backend("liger", cpu)
    with pytest.raises(ValueError, match="float64"):
        dispatch.resolve_backend("triton", cpu.double())
    monkeypatch.setattr(interpreted, "INTERPRETED", False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        per_token_divergence(cpu, cpu, backend="triton")


COMPILE_FOR_H100 = """
import itertools, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from sdlit.kernels.triton_kernels import divergence_kernel
assert isinstance(divergence_kernel, triton.runtime.JITFunction)
signature = dict(s_ptr="*bf16", t_ptr="*bf16", g_ptr="*bf16", loss_ptr="*fp32", keep_ptr="*i8", scale_ptr="*fp32",
                 s_stride="i64", t_stride="i64", g_stride="i64", V="i32", temperature="fp32", beta="fp32",
                 log_beta="fp32", log_one_minus_beta="fp32")
for kind, keep, grad in itertools.product(range(3), (False, True), (False, True)):
    constexprs = dict(KIND=kind, HAS_KEEP=keep, HAS_SCALE=grad, WRITE_GRAD=grad, BLOCK_V=4096)
    source = ASTSource(divergence_kernel, {**signature, **{k: "constexpr" for k in constexprs}}, constexprs)
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=8))
    assert "ptx" in compiled.asm, (kind, keep, grad)
print("compiled", 12)
"""


def test_kernels_compile_for_h100():
    """The compiled (non-interpreted) kernel lowers to PTX for sm_90 in every variant; no GPU needed."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    result = subprocess.run([sys.executable, "-c", COMPILE_FOR_H100], capture_output=True, text=True, env=env,
                            cwd=REPO_ROOT, timeout=300)
    if result.returncode != 0 and "ptxas" in result.stderr and "not found" in result.stderr.lower():
        pytest.skip("this Triton install has no ptxas to compile for CUDA")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "compiled 12" in result.stdout
