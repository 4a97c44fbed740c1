"""Tests for sdlit.metrics: hand-computed cases, brute-force pass@k, and a 2-process gloo run."""

import itertools

import pytest
import torch
import torch.multiprocessing as mp

from sdlit.metrics import AvgAtK, MajAtK, PassAtK, majority_answer

from conftest import free_port, gloo_group


def _bool(rows):
    return torch.tensor(rows, dtype=torch.bool)


def test_avg_at_k_hand_computed():
    m = AvgAtK(4)
    m.update(_bool([[1, 0, 0, 0], [1, 1, 1, 1]]))
    m.update(_bool([[0, 0, 0, 0]]))
    assert float(m.compute()) == pytest.approx((0.25 + 1.0 + 0.0) / 3)


def test_pass_at_k_equal_n():
    m = PassAtK(3)
    m.update(_bool([[0, 0, 1], [0, 0, 0], [1, 1, 1]]))
    assert float(m.compute()) == pytest.approx(2 / 3)


def _brute_force_pass(row, k):
    subsets = list(itertools.combinations(range(len(row)), k))
    return sum(any(row[j] for j in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_pass_at_k_unbiased_matches_enumeration(k):
    g = torch.Generator().manual_seed(k)
    correct = torch.rand(12, 8, generator=g) < torch.linspace(0, 1, 12)[:, None]
    m = PassAtK(k)
    m.update(correct)
    expected = sum(_brute_force_pass(row.tolist(), k) for row in correct) / len(correct)
    assert float(m.compute()) == pytest.approx(expected, abs=1e-6)


def test_maj_at_k_correct_based_with_ties_and_unparseable():
    correct = _bool(
        [
            [0, 1, 1, 0],  # "3" x2 vs "4" x2 tie -> "4" occurs first -> correct[0] = False
            [1, 0, 1, 0],  # "7" x2 -> first at j=0 -> True
            [0, 0, 0, 1],  # all None except the last one -> "9" -> correct[3] = True
            [1, 1, 1, 1],  # all None -> wrong
        ]
    )
    answers = [
        ["4", "3", "3", "4"],
        ["7", None, "7", None],
        [None, None, None, "9"],
        [None, None, None, None],
    ]
    m = MajAtK(4)
    m.update(correct, answers)
    assert float(m.compute()) == pytest.approx(2 / 4)


def test_maj_at_k_none_never_wins():
    assert majority_answer([None, None, "5", None]) == ("5", 2)
    assert majority_answer([None, None]) == (None, None)
    assert majority_answer(["a", "b", "b", "a"]) == ("a", 0)


def test_maj_at_k_with_golds_numeric_compare():
    correct = _bool([[0, 0, 0], [0, 0, 0], [0, 0, 0]])  # ignored when golds are given
    answers = [["1,000", "1000.0", "3"], ["x+1", "x+1", "y"], ["2", "3", "3"]]
    golds = ["1000", "x+1", "2"]
    m = MajAtK(3)
    m.update(correct, answers, golds)
    # "1,000" and "1000.0" are one number (2 votes) == 1000; "x+1" exact; "3" (2 votes) != "2"
    assert float(m.compute()) == pytest.approx(2 / 3)


def test_maj_at_k_counts_one_number_written_two_ways_as_one_answer():
    answers = [["7", "3.0", "3", "7.5"]]  # "3.0" and "3" are one answer with two votes
    m = MajAtK(4)
    m.update(_bool([[0, 1, 1, 0]]), answers)
    assert float(m.compute()) == 1.0
    with_gold = MajAtK(4)
    with_gold.update(_bool([[0, 0, 0, 0]]), answers, ["#### 3"])
    assert float(with_gold.compute()) == 1.0


def test_maj_at_k_uses_first_k_samples():
    correct = _bool([[1, 0, 0, 0, 0]])
    answers = [["1", "1", "2", "2", "2"]]
    m = MajAtK(2)
    m.update(correct, answers)
    assert float(m.compute()) == 1.0
    m5 = MajAtK(5)
    m5.update(correct, answers)
    assert float(m5.compute()) == 0.0


def test_validation_errors():
    with pytest.raises(ValueError, match="fewer than k"):
        AvgAtK(4).update(_bool([[1, 0]]))
    with pytest.raises(ValueError, match="shape"):
        PassAtK(1).update(_bool([1, 0]))
    with pytest.raises(ValueError, match="answers"):
        MajAtK(2).update(_bool([[1, 0]]))
    with pytest.raises(ValueError, match="answers\\[0\\]"):
        MajAtK(2).update(_bool([[1, 0]]), [["1"]])
    with pytest.raises(ValueError, match="golds"):
        MajAtK(2).update(_bool([[1, 0]]), [["1", "2"]], golds=["1", "2"])
    with pytest.raises(ValueError, match="k must"):
        AvgAtK(0)



def _dist_data():
    g = torch.Generator().manual_seed(0)
    correct = torch.rand(10, 6, generator=g) < 0.4
    answers = [[str(int(x)) for x in torch.randint(0, 3, (6,), generator=g)] for _ in range(10)]
    answers[2] = [None] * 6
    return correct, answers


def _make_metrics():
    return [AvgAtK(4), PassAtK(4), MajAtK(4)]


def _dist_worker(rank, world_size, port, expected):
    with gloo_group(rank, world_size, port):
        correct, answers = _dist_data()
        bounds = [(0, 3), (3, 10)][rank]  # uneven split on purpose
        for metric, want in zip(_make_metrics(), expected, strict=True):
            metric.update(correct[slice(*bounds)], answers[slice(*bounds)])
            got = float(metric.compute())
            assert abs(got - want) < 1e-6, (type(metric).__name__, rank, got, want)


def test_distributed_two_processes_match_single_process():
    correct, answers = _dist_data()
    expected = []
    for metric in _make_metrics():
        metric.update(correct, answers)
        expected.append(float(metric.compute()))
    mp.spawn(_dist_worker, args=(2, free_port(), expected), nprocs=2, join=True)
