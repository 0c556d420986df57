"""weighted_knn_vote against a plain loop and the reference one-hot formulation."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from featurestore.knn import weighted_knn_vote


def loop_vote(sims: torch.Tensor, labels: torch.Tensor, num_classes: int, t: float) -> torch.Tensor:
    """Plain double loop in float64: score[q, c] = Σ_j exp(s_qj / t) · 1[label_qj = c]."""
    out = torch.zeros(sims.shape[0], num_classes, dtype=torch.float64)
    for q in range(sims.shape[0]):
        for j in range(sims.shape[1]):
            if labels[q, j] >= 0:
                out[q, labels[q, j]] += math.exp(float(sims[q, j]) / t)
    return out


def one_hot_vote(sims: torch.Tensor, labels: torch.Tensor, num_classes: int, t: float):
    """The reference formulation: one-hot [Q, k, C] times exp weights, summed over k."""
    q, k = labels.shape
    one_hot = torch.zeros(q * k, num_classes).scatter_(1, labels.reshape(-1, 1), 1)
    weights = sims.clone().div_(t).exp_()
    return torch.sum(one_hot.view(q, k, num_classes) * weights.view(q, k, 1), 1)


def random_case(q: int, k: int, c: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sims = torch.rand(q, k, generator=g) * 2 - 1  # cosine similarities in [-1, 1)
    labels = torch.randint(0, c, (q, k), generator=g)
    return sims, labels


def assert_close_rel(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-5) -> None:
    # float32 rounds s/t with relative error ~6e-8, i.e. exp(s/t) up to (s/t)·6e-8 ≈ 1e-6
    # for s/t ≈ 20: 1e-6 is too tight, 1e-5 still catches any real error.
    a, b = a.double(), b.double()
    assert torch.all((a - b).abs() <= rel * b.abs().clamp(min=1e-30)), (a - b).abs().max()


@pytest.mark.parametrize(
    ("q", "k", "c", "t"), [(1, 1, 1, 0.07), (7, 200, 10, 0.07), (5, 13, 3, 1.0)]
)
def test_matches_loop_and_reference(q: int, k: int, c: int, t: float) -> None:
    sims, labels = random_case(q, k, c, seed=q + k)
    scores = weighted_knn_vote(sims, labels, c, t)
    assert scores.shape == (q, c) and scores.dtype == torch.float32
    assert_close_rel(scores, loop_vote(sims, labels, c, t))
    reference = one_hot_vote(sims, labels, c, t)
    assert_close_rel(scores, reference)
    assert torch.equal(scores.argmax(1), reference.argmax(1))


def test_unknown_labels_and_missing_neighbours_are_ignored() -> None:
    sims, labels = random_case(4, 30, 5, seed=1)
    labels[:, ::3] = -1
    sims[:, 1] = float("-inf")
    expected = loop_vote(sims, labels, 5, 0.07)  # skips -1; exp(-inf) = 0
    assert_close_rel(weighted_knn_vote(sims, labels, 5, 0.07), expected)
    all_unknown = torch.full_like(labels, -1)
    assert torch.all(weighted_knn_vote(sims, all_unknown, 5, 0.07) == 0)


def test_dtypes() -> None:
    sims, labels = random_case(3, 20, 4, seed=2)
    half = weighted_knn_vote(sims.half(), labels.int(), 4, 0.07)
    assert half.dtype == torch.float32
    assert_close_rel(half, loop_vote(sims.half().float(), labels, 4, 0.07))
    double = weighted_knn_vote(sims.double(), labels, 4, 0.07)
    assert double.dtype == torch.float64
    assert_close_rel(double, loop_vote(sims.double(), labels, 4, 0.07), rel=1e-12)
    empty = weighted_knn_vote(torch.empty(0, 5), torch.empty(0, 5, dtype=torch.long), 3, 0.1)
    assert empty.shape == (0, 3)


@settings(max_examples=40, deadline=None)
@given(
    q=st.integers(1, 6),
    k=st.integers(1, 40),
    c=st.integers(1, 12),
    seed=st.integers(0, 2**16),
    t=st.floats(0.05, 2.0),
)
def test_property_permutation_and_chunking(q: int, k: int, c: int, seed: int, t: float) -> None:
    sims, labels = random_case(q, k, c, seed)
    scores = weighted_knn_vote(sims, labels, c, t)
    assert_close_rel(scores, loop_vote(sims, labels, c, t))
    perm = torch.randperm(k, generator=torch.Generator().manual_seed(seed))
    assert_close_rel(weighted_knn_vote(sims[:, perm], labels[:, perm], c, t), scores)
    split = 1 + seed % q
    chunks = [
        weighted_knn_vote(sims[:split], labels[:split], c, t),
        weighted_knn_vote(sims[split:], labels[split:], c, t),
    ]
    assert torch.equal(torch.cat(chunks), scores)  # rows are independent: bit-identical


@pytest.mark.parametrize(
    ("sims", "labels", "num_classes", "t", "match"),
    [
        (torch.rand(2, 3), torch.zeros(2, 4, dtype=torch.long), 3, 0.1, "neighbor_labels"),
        (torch.rand(6), torch.zeros(6, dtype=torch.long), 3, 0.1, "similarities"),
        (
            torch.zeros(2, 3, dtype=torch.long),
            torch.zeros(2, 3, dtype=torch.long),
            3,
            0.1,
            "floating",
        ),
        (torch.rand(2, 3), torch.zeros(2, 3), 3, 0.1, "integer"),
        (torch.rand(2, 3), torch.full((2, 3), 3), 3, 0.1, "neighbor_labels"),
        (torch.rand(2, 3), torch.full((2, 3), -2), 3, 0.1, "neighbor_labels"),
        (torch.full((2, 3), float("nan")), torch.zeros(2, 3, dtype=torch.long), 3, 0.1, "NaN"),
        (torch.full((2, 3), float("inf")), torch.zeros(2, 3, dtype=torch.long), 3, 0.1, "inf"),
        (torch.rand(2, 3), torch.zeros(2, 3, dtype=torch.long), 0, 0.1, "num_classes"),
        (torch.rand(2, 3), torch.zeros(2, 3, dtype=torch.long), 3, 0.0, "temperature"),
        (torch.rand(2, 3), torch.zeros(2, 3, dtype=torch.long), 3, float("nan"), "temperature"),
    ],
)
def test_bad_input(sims, labels, num_classes, t, match) -> None:
    with pytest.raises(ValueError, match=match):
        weighted_knn_vote(sims, labels, num_classes, t)
