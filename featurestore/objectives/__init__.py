"""Training objectives over a memory bank (Wu et al. §3.1-3.2; README, *Which objective*),
one module each: :mod:`.softmax` (exact, all rows), :mod:`.sampled_softmax` (``K`` noise
rows), :mod:`.nce` (noise-contrastive estimation and its ``Z``). Each computes its partial
statistics where the rows live and merges them exactly (:class:`.base.Objective`); the
parametric baseline is a classifier in the trainer
(:mod:`trainer.experiments.parametric`), not a bank objective.
``featurestore.objectives.NCE`` etc. import from here as before.
"""

from __future__ import annotations

from featurestore.objectives.base import REGISTRY, Objective
from featurestore.objectives.nce import NCE
from featurestore.objectives.sampled_softmax import SampledSoftmax
from featurestore.objectives.softmax import Softmax

__all__ = ["NCE", "REGISTRY", "Objective", "SampledSoftmax", "Softmax"]
