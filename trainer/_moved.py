"""Modules that moved into :mod:`trainer`'s subpackages keep importing from their old names.

``import trainer.models`` (or ``from trainer.models import build_encoder``) still works: the
old name is an alias of the module at its new place (the same module object, so patching one
patches the other), with a :class:`DeprecationWarning` that names the new place. The four
commands that moved (``python -m trainer.make_shards``, ``trainer.finetune``,
``trainer.study`` and the ``trainer.index_shards`` module) are small files of their own
instead, since ``python -m`` needs a file.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import warnings
from collections.abc import Sequence
from types import ModuleType

#: old module name -> new module name
MOVED: dict[str, str] = {
    "trainer.driver": "trainer.launch.driver",
    "trainer.local": "trainer.launch.local",
    "trainer.ray_runtime": "trainer.launch.ray_runtime",
    "trainer.rendezvous": "trainer.launch.rendezvous",
    "trainer.runtime": "trainer.launch.runtime",
    "trainer.progress": "trainer.launch.progress",
    "trainer.models": "trainer.model.encoders",
    "trainer.encoder_export": "trainer.model.export",
    "trainer.augment": "trainer.data.augment",
    "trainer.transforms": "trainer.data.transforms",
    "trainer.mixing": "trainer.data.mixing",
    "trainer.finetune_loop": "trainer.experiments.finetune_loop",
    "trainer.study_report": "trainer.experiments.study_report",
    "trainer.parametric": "trainer.experiments.parametric",
    "trainer.tar_writer": "trainer.shards.tar_writer",
}


class _AliasLoader(importlib.abc.Loader):
    """Loads an old name as the module at its new place."""

    def __init__(self, new: str) -> None:
        self.new = new

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        warnings.warn(
            f"{spec.name} moved to {self.new}; import it from there",
            DeprecationWarning,
            stacklevel=2,
        )
        return importlib.import_module(self.new)

    def exec_module(self, module: ModuleType) -> None:
        """Nothing to run: the new module ran when it was imported."""


class _MovedFinder(importlib.abc.MetaPathFinder):
    """Finds the old names of :data:`MOVED` and nothing else."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None = None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        """The alias spec of an old name of :data:`MOVED`; None for every other name."""
        new = MOVED.get(fullname)
        if new is None:
            return None
        return importlib.machinery.ModuleSpec(fullname, _AliasLoader(new))


def install() -> None:
    """Put the finder first on ``sys.meta_path`` (once): an old file left on disk (an older
    checkout an editable install still points at) must not shadow the new module."""
    if not any(isinstance(f, _MovedFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _MovedFinder())
