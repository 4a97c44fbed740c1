"""The compiled Triton kernels on a CUDA GPU against the PyTorch fallback in fp64 (skipped without a GPU).

The CPU interpreter tests (test_kernels_triton.py) check the same math on tiny shapes; these run the real
kernels at vocabulary sizes of actual models (several 4096-column blocks, the last one partial).
"""

import pytest
import torch

pytest.importorskip("triton")
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from sdlit.kernels import KINDS, dispatch, fused_linear_divergence, per_token_divergence  # noqa: E402


def _case(n, v, dtype, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    s = (torch.randn(n, v, generator=g, device="cuda") * 3).to(dtype)
    t = (torch.randn(n, v, generator=g, device="cuda") * 3).to(dtype)
    s[:, [0, 4095, v - 1]] = float("-inf")
    t[:, [0, 4095, v - 1]] = float("-inf")
    mask = torch.rand(n, generator=g, device="cuda") > 0.2
    up = torch.rand(n, generator=g, device="cuda") * 2 - 0.5
    return s, t, mask, up


def _value_and_grad(s, t, mask, up, **kw):
    s = s.detach().clone().requires_grad_(True)
    loss = per_token_divergence(s, t, mask, **kw)
    (loss * up).sum().backward()
    return loss.detach(), s.grad


@pytest.mark.parametrize("dtype,rtol,atol", [(torch.float32, 1e-5, 1e-6), (torch.bfloat16, 5e-2, 1e-3)])
@pytest.mark.parametrize("kind", KINDS)
def test_triton_matches_fallback_on_gpu(kind, dtype, rtol, atol):
    s, t, mask, up = _case(48, 49157, dtype, seed=0)
    assert dispatch.resolve_backend("auto", s) == "triton"
    kw = dict(kind=kind, beta=0.3, temperature=0.8)
    v1, g1 = _value_and_grad(s, t, mask, up, backend="triton", **kw)
    v2, g2 = _value_and_grad(s.double(), t.double(), mask, up.double(), backend="torch", **kw)
    assert v1.dtype == torch.float32 and g1.dtype == dtype
    torch.testing.assert_close(v1.double(), v2, rtol=rtol, atol=atol)
    torch.testing.assert_close(g1.double(), g2.to(dtype).double(), rtol=rtol, atol=atol)
    assert (v1[~mask] == 0).all() and (g1[~mask] == 0).all()


@pytest.mark.parametrize("kind", KINDS)
def test_fused_linear_triton_matches_torch_on_gpu(kind):
    g = torch.Generator(device="cuda").manual_seed(1)
    hs = torch.randn(300, 64, generator=g, device="cuda")
    ht = torch.randn(300, 64, generator=g, device="cuda")
    w = torch.randn(10007, 64, generator=g, device="cuda") * 0.2
    up = torch.rand(300, generator=g, device="cuda")
    grads = {}
    for backend in ("triton", "torch"):
        h, wt = hs.clone().requires_grad_(True), w.clone().requires_grad_(True)
        loss = fused_linear_divergence(h, ht, wt, kind=kind, chunk_size=128, backend=backend)
        (loss * up).sum().backward()
        grads[backend] = (loss.detach(), h.grad, wt.grad)
    for a, b in zip(grads["triton"], grads["torch"], strict=False):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)  # TF32-free fp32 matmuls may still differ
