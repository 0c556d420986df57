"""Training an encoder by non-parametric instance discrimination (see ARCHITECTURE.md).

The rooms: :mod:`trainer.launch` (who runs the loop: Ray Train or this process),
:mod:`trainer.data` (reading and augmenting the shards), :mod:`trainer.model` (the
encoders and their export), :mod:`trainer.shards` (writing and indexing shards),
:mod:`trainer.experiments` (the paper's other experiments). The loop, the worker, the
configuration and the run record sit here at the top.
"""

from trainer import _moved

_moved.install()
