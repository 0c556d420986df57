"""How well training batches mix classes: batch label entropy against a shuffled reference.

Contrastive objectives suffer when batches are runs of a few classes (shards written in class
order, a small shuffle buffer). Where labels exist, every epoch's record carries
``label_mixing``: the mean plug-in label entropy of its batches divided by the expected
plug-in entropy of a batch of the same size drawn uniformly at random from the training
labels (:func:`shuffled_entropy`). Dividing by ``ln C`` instead would mark a perfect shuffle
as poor whenever batches are not much larger than the number of classes (ImageNet: 1000
classes, batches of 256 cannot reach ``ln 1000``) or the classes are unbalanced; the
reference makes 1.0 mean "as mixed as a full shuffle". Below :data:`WARN_BELOW` the run warns
once.

The per-batch sums stay on the batch's device (no host sync per step); the epoch reads them
once.
"""

from __future__ import annotations

import math

import numpy as np
import torch

WARN_BELOW = 0.9
_REFERENCE_DRAWS = 256


def batch_entropy(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Plug-in entropy (nats) of the labels of one batch, ignoring unknown labels (``< 0``).

    Args:
        labels: int64 ``[B]``.
        num_classes: ``C``; labels must be ``< C``.

    Returns:
        A 0-d float32 tensor on ``labels``' device (0 for a batch without known labels).
    """
    known = (labels >= 0).to(torch.float32)
    counts = torch.zeros(num_classes, dtype=torch.float32, device=labels.device)
    counts.index_add_(0, labels.clamp(min=0), known)
    p = counts / counts.sum().clamp(min=1.0)
    return -(p * torch.log(p.clamp(min=1e-30))).sum()


def shuffled_entropy(labels: np.ndarray, batch_size: int, seed: int = 0) -> float:
    """Expected :func:`batch_entropy` of a batch of ``batch_size`` drawn without replacement
    from ``labels`` (Monte Carlo over 256 draws, deterministic in ``seed``).

    Args:
        labels: int ``[N]``, the training labels (``-1`` unknown).
        batch_size: ``B``.

    Returns:
        Nats; 0.0 when fewer than two classes are known.
    """
    labels = np.asarray(labels)
    known = labels[labels >= 0]
    if len(known) == 0 or len(np.unique(known)) < 2:
        return 0.0
    rng = np.random.default_rng(seed)
    b = min(batch_size, len(labels))
    total = 0.0
    for _ in range(_REFERENCE_DRAWS):
        draw = labels[rng.choice(len(labels), b, replace=False)]
        draw = draw[draw >= 0]
        if len(draw):
            p = np.bincount(draw) / len(draw)
            p = p[p > 0]
            total += float(-(p * np.log(p)).sum())
    return total / _REFERENCE_DRAWS


class LabelMixing:
    """Accumulates batch entropies of an epoch on the batches' device.

    Args:
        labels: the training labels ``[N]`` (``-1`` unknown).
        batch_size: batch size per rank (the reference's batch size).
    """

    def __init__(self, labels: np.ndarray, batch_size: int):
        labels = np.asarray(labels)
        self.num_classes = int(labels.max()) + 1 if len(labels) else 0
        self.reference = shuffled_entropy(labels, batch_size)
        self.enabled = self.reference > 0
        self.last: float | None = None  # the last epoch's fraction (set by the loop)
        self.reset()

    def reset(self) -> None:
        """Start a new epoch."""
        self._sum: torch.Tensor | None = None
        self.batches = 0

    def add(self, labels: torch.Tensor) -> None:
        """Count one batch's labels (int64 ``[B]``)."""
        if not self.enabled:
            return
        h = batch_entropy(labels, self.num_classes)
        self._sum = h if self._sum is None else self._sum + h
        self.batches += 1

    def entropy_sum(self) -> float:
        """Sum of the epoch's batch entropies (one host read)."""
        return 0.0 if self._sum is None else float(self._sum.item())

    def fraction(self, entropy_sum: float, batches: int) -> float | None:
        """Mean batch entropy over the shuffled reference; ``None`` without labels."""
        if not self.enabled or batches == 0:
            return None
        value = entropy_sum / batches / self.reference
        return round(value, 4) if math.isfinite(value) else None


def mixing_warning(fraction: float | None) -> str | None:
    """The one-time warning for batches that look like class runs, or ``None``."""
    if fraction is None or fraction >= WARN_BELOW:
        return None
    return (
        f"training batches mix classes poorly: label entropy {fraction:.2f} of a shuffled "
        f"batch's (below {WARN_BELOW}); the shards are probably written in class order: raise "
        f"--shuffle-buffer / --open-shards, or rewrite them with make_shards --order random"
    )
