"""``python -m trainer.study``: the code is :mod:`trainer.experiments.study`;
this name keeps working.

Imported, this name is that module (``from trainer.study import ...`` gives its names).
"""

import sys

from trainer.experiments import study as _impl

if __name__ == "__main__":
    sys.exit(_impl.main())
else:
    sys.modules[__name__] = _impl
