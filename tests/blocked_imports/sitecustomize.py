"""Make ``import ray``, ``import webdataset`` and ``import faiss`` fail in a subprocess.

Put this folder on ``PYTHONPATH`` to run a command as it runs on the GPU machine, where
none of the three is installed (``NPID_BLOCK_IMPORTS`` overrides the comma-separated list).
"""

import importlib.abc
import os
import sys

BLOCKED = set(os.environ.get("NPID_BLOCK_IMPORTS", "ray,webdataset,faiss").split(","))


class _Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r} (blocked)", name=name)
        return None


sys.meta_path.insert(0, _Blocker())
