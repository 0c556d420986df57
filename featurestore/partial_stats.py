"""What one shard returns for one step (:class:`PartialStats`) and how the positives' rows
are put back together from the parts (:func:`positive_rows`). Plain torch; shared by the
objectives (:mod:`featurestore.objectives`) and the merge (:mod:`featurestore.statistics`)."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor


@dataclass
class PartialStats:
    """What one shard returns for one step. All tensors float32 except ``pos_index``.

    Attributes:
        max: ``[B]`` max score over the shard's scored rows (``-inf`` where none); softmax.
        sumexp: ``[B]`` ``Σ exp(s - max)``; softmax family.
        weighted: ``[B, d]`` ``Σ exp(s - max)·v``; softmax family.
        noise_loss: ``[B]`` ``Σ_k -log(1 - h(n_k))`` over this shard's noise; NCE.
        noise_grad: ``[B, d]`` ``Σ_k (∂ℓ_k/∂s_k)·v_k / τ``; NCE.
        noise_expsum: ``[B]`` ``Σ_k exp(s_k)`` over this shard's noise; NCE (for ``Z``).
        pos_index: ``[p]`` int64 batch positions whose id this shard owns.
        pos_rows: ``[p, d]`` the (pre-update) rows of those positives.
    """

    pos_index: Tensor
    pos_rows: Tensor
    max: Tensor | None = None
    sumexp: Tensor | None = None
    weighted: Tensor | None = None
    noise_loss: Tensor | None = None
    noise_grad: Tensor | None = None
    noise_expsum: Tensor | None = None

    def to(self, device: torch.device | str) -> PartialStats:
        """A copy with every tensor on ``device``."""
        moved = {
            f.name: (None if getattr(self, f.name) is None else getattr(self, f.name).to(device))
            for f in fields(self)
        }
        return PartialStats(**moved)

    def nbytes(self) -> int:
        """Bytes of tensor payload (what a shard sends back)."""
        return sum(
            t.numel() * t.element_size()
            for t in (getattr(self, f.name) for f in fields(self))
            if t is not None
        )


def positive_rows(parts: list[PartialStats], batch: int, dim: int) -> Tensor:
    """Assemble the positives' old rows ``[B, d]`` from the parts that own them."""
    device = parts[0].pos_rows.device
    index = torch.cat([p.pos_index.to(device=device, dtype=torch.int64) for p in parts])
    once = torch.ones(batch, dtype=torch.int64, device=device)
    if index.numel() != batch or not torch.equal(torch.bincount(index, minlength=batch), once):
        raise RuntimeError("the shards did not return each positive row exactly once")
    rows = torch.cat([p.pos_rows.to(device=device, dtype=torch.float32) for p in parts])
    return torch.empty((batch, dim), device=device).index_copy_(0, index, rows)


__all__ = ["PartialStats", "positive_rows"]
