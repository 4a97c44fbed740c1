"""fused_linear_logprobs against log_softmax(h @ W.T / T).gather(...) on full logits."""

from __future__ import annotations

import pytest
import torch

from sdlit.kernels import fused_linear_logprobs


def reference(hidden, weight, ids, temperature=1.0, mask=None):
    out = torch.log_softmax(hidden @ weight.T / temperature, dim=-1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    return out if mask is None else out * mask


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("chunk_size", [None, 3])
def test_values_and_gradients_match_full_logits(temperature, chunk_size):
    torch.manual_seed(0)
    hidden = torch.randn(4, 5, 16, requires_grad=True)
    weight = torch.randn(50, 16, requires_grad=True)
    ids = torch.randint(0, 50, (4, 5))
    mask = torch.rand(4, 5) > 0.3
    upstream = torch.randn(4, 5)  # per-token weights, as GRPO's advantages and ratios give

    got = fused_linear_logprobs(hidden, weight, ids, mask, temperature=temperature, chunk_size=chunk_size)
    (got * upstream).sum().backward()
    grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    expected = reference(hidden, weight, ids, temperature, mask)
    (expected * upstream).sum().backward()

    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grads[0], hidden.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(grads[1], weight.grad, atol=1e-5, rtol=1e-4)
    assert (got[~mask] == 0).all()


def test_gradcheck_in_fp64():
    torch.manual_seed(1)
    hidden = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(9, 4, dtype=torch.float64, requires_grad=True)
    ids = torch.randint(0, 9, (6,))
    mask = torch.tensor([True, False, True, True, False, True])
    assert torch.autograd.gradcheck(
        lambda h, w: fused_linear_logprobs(h, w, ids, mask, temperature=0.8, chunk_size=4), (hidden, weight)
    )


def test_a_frozen_weight_gets_no_gradient_and_hidden_still_does():
    torch.manual_seed(2)
    hidden = torch.randn(7, 8, requires_grad=True)
    weight = torch.randn(30, 8)
    ids = torch.randint(0, 30, (7,))
    fused_linear_logprobs(hidden, weight, ids).sum().backward()
    expected = torch.autograd.grad(reference(hidden, weight, ids).sum(), hidden)[0]
    torch.testing.assert_close(hidden.grad, expected, atol=1e-5, rtol=1e-4)


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match="weight must be"):
        fused_linear_logprobs(torch.randn(3, 4), torch.randn(10, 5), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="token_ids shape"):
        fused_linear_logprobs(torch.randn(3, 4), torch.randn(10, 4), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="temperature"):
        fused_linear_logprobs(torch.randn(3, 4), torch.randn(10, 4), torch.zeros(3, dtype=torch.long), temperature=0)
