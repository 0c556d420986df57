"""Weighted k-nearest-neighbour vote (Wu et al. 2018, §3.4).

Each of the ``k`` neighbours of a query votes for its class with weight ``exp(s / σ)``, where
``s`` is its cosine similarity to the query and ``σ`` the temperature. The class score is the
sum of the weights of the neighbours carrying that label.

This reproduces the reference evaluation (lemniscate.pytorch ``kNN``)::

    yd_transform = yd.clone().div_(sigma).exp_()
    probs = sum(one_hot(labels) * yd_transform[..., None], dim=1)

in the same precision (float32 for float32 input; the weights are computed with the same
``div`` then ``exp``, no max subtraction: with unit vectors ``s <= 1`` and ``σ = 0.07`` the
largest weight is ``exp(14.3) ≈ 1.6e6``, far from float32 overflow). Instead of materialising
the ``[Q, k, C]`` one-hot tensor, the weights are added into ``[Q, C]`` with one
``scatter_add_``. The class scores equal the reference up to float summation order (a few ulp),
so predictions are identical except for classes whose scores tie to within rounding.

Unknown labels (``-1``) and missing neighbours (similarity ``-inf``, as returned by an
approximate index that found fewer than ``k`` candidates) get zero weight: they are ignored.
"""

from __future__ import annotations

import torch

__all__ = ["weighted_knn_vote"]


def weighted_knn_vote(
    similarities: torch.Tensor,
    neighbor_labels: torch.Tensor,
    num_classes: int,
    temperature: float,
) -> torch.Tensor:
    """Weighted class scores of ``Q`` queries from their ``k`` nearest neighbours.

    Args:
        similarities: ``[Q, k]`` cosine similarities of each query to its neighbours (floating;
            half precision is promoted to float32). ``-inf`` marks a missing neighbour.
        neighbor_labels: ``[Q, k]`` integer class of each neighbour in ``[0, num_classes)``,
            or ``-1`` for an unknown label (ignored).
        num_classes: number of classes ``C`` (>= 1).
        temperature: ``σ`` in ``exp(s / σ)`` (> 0).

    Returns:
        ``[Q, C]`` class scores ``Σ_j exp(s_j / σ) · 1[label_j = c]`` on the device of
        ``similarities``, float32 (float64 when ``similarities`` is float64).

    Raises:
        ValueError: on mismatched or non-2-D shapes, non-integer labels, labels outside
            ``[-1, num_classes)``, NaN or ``+inf`` similarities, ``num_classes < 1`` or a
            non-positive temperature.
    """
    min_label = _check_vote_inputs(similarities, neighbor_labels, num_classes, temperature)
    if similarities.dtype not in (torch.float32, torch.float64):
        similarities = similarities.float()
    labels = neighbor_labels.to(device=similarities.device, dtype=torch.int64)

    weights = similarities.div(temperature).exp_()  # [Q, k], as the reference
    if min_label < 0:  # unknown labels: zero weight, adds exactly 0.0 to class 0
        known = labels >= 0
        weights = torch.where(known, weights, weights.new_zeros(()))
        labels = labels.clamp(min=0)

    scores = torch.zeros(
        (similarities.shape[0], num_classes), dtype=weights.dtype, device=weights.device
    )
    return scores.scatter_add_(1, labels, weights)  # [Q, C]


def _check_vote_inputs(
    similarities: torch.Tensor,
    neighbor_labels: torch.Tensor,
    num_classes: int,
    temperature: float,
) -> int:
    """Raise ValueError on bad input; return the smallest label (0 when there are none)."""
    if not isinstance(similarities, torch.Tensor) or similarities.dim() != 2:
        raise ValueError(f"similarities must be a 2-D tensor [Q, k], got {_describe(similarities)}")
    if not similarities.is_floating_point():
        raise ValueError(f"similarities must be floating point, got {similarities.dtype}")
    if not isinstance(neighbor_labels, torch.Tensor) or neighbor_labels.shape != similarities.shape:
        raise ValueError(
            f"neighbor_labels must be a tensor of the same shape as similarities "
            f"{tuple(similarities.shape)}, got {_describe(neighbor_labels)}"
        )
    if neighbor_labels.is_floating_point() or neighbor_labels.is_complex():
        raise ValueError(f"neighbor_labels must be integer, got {neighbor_labels.dtype}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be an int >= 1, got {num_classes!r}")
    if not isinstance(temperature, (int, float)) or not 0.0 < float(temperature) < float("inf"):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if similarities.numel() == 0:
        return 0
    largest = float(similarities.max())  # NaN propagates through max
    if largest != largest or largest == float("inf"):
        raise ValueError("similarities contains NaN or +inf")
    lo, hi = (int(v) for v in torch.aminmax(neighbor_labels))
    if lo < -1 or hi >= num_classes:
        raise ValueError(
            f"neighbor_labels must lie in [-1, num_classes={num_classes}), got range [{lo}, {hi}]"
        )
    return lo


def _describe(x: object) -> str:
    if isinstance(x, torch.Tensor):
        return f"tensor of shape {tuple(x.shape)}"
    return type(x).__name__
