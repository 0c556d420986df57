"""Modules that moved into trainer's subpackages still import from their old names."""

import importlib
import sys
import warnings
from pathlib import Path

import pytest

from trainer import _moved

REPO_TRAINER = Path(__file__).resolve().parents[1] / "trainer"

#: the commands that moved: a small file each, since ``python -m`` needs one
COMMANDS = {
    "trainer.make_shards": "trainer.shards.make",
    "trainer.finetune": "trainer.experiments.finetune",
    "trainer.study": "trainer.experiments.study",
    "trainer.index_shards": "trainer.shards.index",
}


@pytest.mark.parametrize("old, new", sorted(_moved.MOVED.items()))
def test_an_old_module_name_is_the_new_module_with_a_warning_naming_it(old, new):
    sys.modules.pop(old, None)
    with pytest.warns(DeprecationWarning, match=f"{old} moved to {new}"):
        module = importlib.import_module(old)
    assert module is importlib.import_module(new)
    assert not (REPO_TRAINER / (old.split(".", 1)[1] + ".py")).exists()  # nothing shadows it


@pytest.mark.parametrize("old, new", sorted(COMMANDS.items()))
def test_a_moved_command_module_is_the_new_module_when_imported(old, new):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # commands keep their names: no warning
        module = importlib.import_module(old)
    assert module is importlib.import_module(new)


def test_names_that_never_existed_still_fail():
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("trainer.no_such_module")
