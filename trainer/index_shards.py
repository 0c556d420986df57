"""The ``trainer.index_shards`` module: the code is :mod:`trainer.shards.index`;
this name keeps working.

Imported, this name is that module (``from trainer.index_shards import ...`` gives its names).
"""

import sys

from trainer.shards import index as _impl

sys.modules[__name__] = _impl
