"""Length-grouped scoring: the same logits and gradients as one padded pass, and the cheapest split of rows."""

from __future__ import annotations

import itertools

import pytest
import torch
from transformers import AutoModelForCausalLM

from sdlit.scoring import build_scoring_batch, group_by_length, response_logits


def split_cost(groups, prompts, responses, overhead):
    return sum(len(g) * (max(prompts[i] for i in g) + max(responses[i] for i in g)) + overhead for g in groups)


def contiguous_splits(order):
    """Every split of ``order`` into contiguous runs (the brute-force reference)."""
    for cuts in itertools.product([False, True], repeat=len(order) - 1):
        groups, current = [], [order[0]]
        for row, cut in zip(order[1:], cuts, strict=False):
            if cut:
                groups.append(current)
                current = []
            current.append(row)
        yield groups + [current]


@pytest.mark.parametrize("seed", range(5))
def test_grouping_is_the_cheapest_split_of_the_sorted_rows(seed):
    g = torch.Generator().manual_seed(seed)
    prompts = torch.randint(5, 60, (7,), generator=g).tolist()
    responses = torch.randint(1, 80, (7,), generator=g).tolist()
    groups = group_by_length(prompts, responses, overhead=40)
    assert sorted(i for grp in groups for i in grp) == list(range(7))  # every row exactly once
    order = sorted(range(7), key=lambda i: (prompts[i] + responses[i], i))
    best = min(split_cost(s, prompts, responses, 40) for s in contiguous_splits(order))
    assert split_cost(groups, prompts, responses, 40) == best
    assert best <= 7 * (max(prompts) + max(responses)) + 40  # never worse than one padded pass


def test_equal_lengths_stay_one_group():
    assert group_by_length([10, 10, 10], [5, 5, 5]) == [[0, 1, 2]]


def test_grouped_logits_and_gradients_match_one_padded_pass(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 200, (n,), generator=g).tolist() for n in (4, 90, 6, 85, 5)]
    responses = [torch.randint(3, 200, (n,), generator=g).tolist() for n in (3, 70, 2, 64, 40)]
    batch = build_scoring_batch(prompts, responses, pad_id=0)
    assert len(group_by_length([len(p) for p in prompts], [len(r) for r in responses])) > 1

    results = []
    for grouped in (False, True):
        model.zero_grad()
        logits = response_logits(model, batch, length_groups=grouped)
        masked = logits * batch.response_mask.unsqueeze(-1)
        (masked.float().pow(2).mean()).backward()
        results.append((masked.detach(), [p.grad.clone() for p in model.parameters()]))
    (plain, plain_grads), (grouped, grouped_grads) = results
    assert plain.shape == grouped.shape
    torch.testing.assert_close(grouped, plain, rtol=1e-4, atol=1e-5)
    for a, b in zip(grouped_grads, plain_grads, strict=False):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-6)
