"""``python -m trainer.make_shards``: the code is :mod:`trainer.shards.make`;
this name keeps working.

Imported, this name is that module (``from trainer.make_shards import ...`` gives its names).
"""

import sys

from trainer.shards import make as _impl

if __name__ == "__main__":
    sys.exit(_impl.main())
else:
    sys.modules[__name__] = _impl
