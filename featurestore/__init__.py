"""npid feature store: the memory bank, in process or as sharded Ray actors.

``MemoryBank`` and the objectives are plain torch. Every name is imported on first use, so
``featurestore.files`` (and a command's ``--help``) loads neither torch nor Ray.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from featurestore.bank import MemoryBank, PendingStep, StepOutput
    from featurestore.objectives import NCE, Objective, SampledSoftmax, Softmax
    from featurestore.store import ShardedStore

_HOMES = {
    "MemoryBank": "featurestore.bank",
    "PendingStep": "featurestore.bank",
    "StepOutput": "featurestore.bank",
    "NCE": "featurestore.objectives",
    "Objective": "featurestore.objectives",
    "SampledSoftmax": "featurestore.objectives",
    "Softmax": "featurestore.objectives",
    "ShardedStore": "featurestore.store",
}

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
    if name in _HOMES:
        return getattr(importlib.import_module(_HOMES[name]), name)
    raise AttributeError(f"module 'featurestore' has no attribute {name!r}")
