"""``python -m trainer.finetune``: the code is :mod:`trainer.experiments.finetune`;
this name keeps working.

Imported, this name is that module (``from trainer.finetune import ...`` gives its names).
"""

import sys

from trainer.experiments import finetune as _impl

if __name__ == "__main__":
    sys.exit(_impl.main())
else:
    sys.modules[__name__] = _impl
