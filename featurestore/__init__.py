"""npid feature store: the memory bank, in process or as sharded Ray actors.

``MemoryBank`` and the objectives are plain torch. ``ShardedStore`` (the Ray service) is
imported lazily so that importing this package does not import Ray.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from featurestore.bank import MemoryBank, PendingStep, StepOutput
from featurestore.objectives import NCE, Objective, SampledSoftmax, Softmax

if TYPE_CHECKING:
    from featurestore.store import ShardedStore

__all__ = [
    "NCE",
    "MemoryBank",
    "Objective",
    "PendingStep",
    "SampledSoftmax",
    "ShardedStore",
    "Softmax",
    "StepOutput",
]


def __getattr__(name: str) -> Any:
    if name == "ShardedStore":
        from featurestore.store import ShardedStore

        return ShardedStore
    raise AttributeError(f"module 'featurestore' has no attribute {name!r}")
