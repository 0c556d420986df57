"""The parametric baseline (paper Table 1, first row): a learned N-way classifier over ids.

Every training image is its own class, as in the non-parametric method, but the class
vectors are learned weights instead of a memory bank: ``P(i|v) = exp(w_iᵀv) / Σ_j exp(w_jᵀv)``
with one ``w_j`` per instance, i.e. an ``N×d`` linear layer without bias on the encoder's
unit-length embedding ``v``, trained by the same SGD as the encoder with cross-entropy over
instance ids. ``--objective parametric`` selects it; it keeps no bank, so every kNN
evaluation recomputes the train features.

:class:`InstanceClassifier` wraps the encoder and the head into one module so that DDP
(``runtime.prepare_model``) averages the head's gradients with the encoder's. Checkpoints
keep the head apart (``TrainState.head``); the exported encoder never includes it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

KIND = "parametric"


@dataclass(frozen=True)
class Parametric:
    """The objective's plain-data form in the run plan (not a bank objective: the bank's
    objectives are :mod:`featurestore.objectives`).

    Attributes:
        temperature: logits are ``w_jᵀv / temperature``; 1.0 is the paper's plain linear
            classifier.
    """

    temperature: float = 1.0

    kind: ClassVar[str] = KIND

    def to_dict(self) -> dict[str, Any]:
        """``{"kind": "parametric", "temperature": …}``."""
        return {"kind": self.kind, "temperature": self.temperature}


class ParametricHead(nn.Module):
    """The N-way instance classifier: ``weight`` ``[N, d]``, no bias.

    Args:
        num_instances: ``N``, the number of training instances (ids ``0..N-1``).
        dim: ``d``, the embedding size.
        temperature: logits are divided by it (1.0: plain linear logits).
    """

    def __init__(self, num_instances: int, dim: int, temperature: float = 1.0) -> None:
        super().__init__()
        if num_instances < 1 or dim < 1:
            raise ValueError(f"need num_instances, dim >= 1, got {num_instances}, {dim}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)
        self.weight = nn.Parameter(torch.empty(num_instances, dim))
        nn.init.kaiming_uniform_(self.weight, a=5**0.5)  # nn.Linear's initialisation

    def logits(self, feats: torch.Tensor) -> torch.Tensor:
        """``[B, d]`` embeddings → ``[B, N]`` float32 logits ``feats @ weight.T / τ``
        (outside autocast: the loss's math stays float32, like the bank's)."""
        with torch.autocast(feats.device.type, enabled=False):
            return F.linear(feats.float(), self.weight) / self.temperature

    def forward(self, feats: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy of ``[B, d]`` embeddings against their ``[B]`` instance ids."""
        if feats.dim() != 2 or feats.shape[1] != self.weight.shape[1]:
            raise ValueError(f"feats must be [B, {self.weight.shape[1]}], got {list(feats.shape)}")
        return F.cross_entropy(self.logits(feats), ids.to(feats.device, torch.long))


class InstanceClassifier(nn.Module):
    """The encoder and its :class:`ParametricHead` as one module (one DDP wrapper).

    ``forward(x [B, 3, H, W], ids [B]) -> (feats [B, d], loss [])``.
    """

    def __init__(self, encoder: nn.Module, head: ParametricHead) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = head

    def forward(self, x: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Embeddings ``[B, d]`` and the batch-mean loss (a scalar)."""
        feats = self.encoder(x)
        return feats, self.head(feats, ids)


def with_head(
    encoder: nn.Module, objective: dict[str, Any], num_instances: int, dim: int
) -> nn.Module:
    """``encoder`` and its :class:`ParametricHead` as an :class:`InstanceClassifier` when the
    plan's ``objective`` is parametric, else ``encoder`` itself (a bank objective)."""
    if objective["kind"] != KIND:
        return encoder
    head = ParametricHead(num_instances, dim, objective.get("temperature", 1.0))
    return InstanceClassifier(encoder, head)


def head_state(model: nn.Module) -> dict[str, torch.Tensor] | None:
    """The head's state dict when ``model`` (unwrapped) is an :class:`InstanceClassifier`."""
    return model.head.state_dict() if isinstance(model, InstanceClassifier) else None


def load_head_state(model: nn.Module, state: dict[str, torch.Tensor] | None, source: str) -> None:
    """Restore the head of an :class:`InstanceClassifier` ``model`` from a checkpoint's
    ``state`` (nothing to do for a bare encoder); raises ``ValueError`` when it lacks one."""
    if not isinstance(model, InstanceClassifier):
        return
    if state is None:
        raise ValueError(f"checkpoint {source} holds no parametric classifier to restore")
    model.head.load_state_dict(state)


__all__ = [
    "KIND",
    "InstanceClassifier",
    "Parametric",
    "ParametricHead",
    "head_state",
    "load_head_state",
    "with_head",
]
