"""The house rules of ARCHITECTURE.md, checked: one dependency direction between the
packages (import-linter's contract in ``pyproject.toml``), the serving layer reaching the
trainer through ``trainer.api`` only, the local training path free of Ray, and modules of
at most 400 lines."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import grimp
import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("knn_service", "trainer", "featurestore")
MAX_LINES = 400


@pytest.fixture(scope="module")
def graph() -> grimp.ImportGraph:
    return grimp.build_graph(
        *PACKAGES, include_external_packages=True, exclude_type_checking_imports=True
    )


def test_import_linter_contract_is_kept():
    lint = Path(sys.executable).parent / "lint-imports"
    result = subprocess.run([str(lint)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-3000:]
    assert "1 kept, 0 broken" in result.stdout


def test_no_package_imports_a_package_above_it(graph):
    order = {name: rank for rank, name in enumerate(PACKAGES)}  # 0 = top
    for module in graph.modules:
        top = module.split(".")[0]
        if top not in order:
            continue
        for imported in graph.find_modules_directly_imported_by(module):
            other = imported.split(".")[0]
            assert order.get(other, len(PACKAGES)) >= order[top], f"{module} imports {imported}"


def test_the_serving_layer_reaches_the_trainer_only_through_trainer_api(graph):
    for module in graph.find_descendants("knn_service") | {"knn_service"}:
        trainer = {
            m for m in graph.find_modules_directly_imported_by(module) if m.startswith("trainer")
        }
        assert trainer <= {"trainer.api"}, f"{module} imports {sorted(trainer)}"


def test_serving_does_not_import_the_shard_writer_or_the_training_loop(graph):
    graph = copy.deepcopy(graph)
    # the one door: trainer.api.dataset_location converts the built-in dataset on first use
    assert graph.direct_import_exists(importer="trainer.api", imported="trainer.shards.make")
    graph.remove_import(importer="trainer.api", imported="trainer.shards.make")
    for target in ("trainer.shards.make", "trainer.loop", "trainer.launch.driver"):
        chain = graph.find_shortest_chain(importer="knn_service.serve", imported=target)
        assert chain is None, " -> ".join(chain)


#: The places the training path touches Ray: imports inside the functions that run only
#: with the Ray launcher or the store (ARCHITECTURE.md, "Where Ray is touched").
RAY_DOORS = (
    ("trainer.loop", "trainer.launch.ray_runtime"),  # run_worker under Ray Train
    ("trainer.worker", "featurestore.store"),  # open_bank with --bank store
    ("trainer.metrics", "ray"),  # TrainMetrics, created in Ray Train workers only
    ("trainer.metrics", "featurestore.metrics"),  # the same constructor
)


def test_the_local_launcher_path_imports_ray_only_behind_the_marked_doors(graph):
    graph = copy.deepcopy(graph)
    for importer, imported in RAY_DOORS:
        assert graph.direct_import_exists(importer=importer, imported=imported)
        graph.remove_import(importer=importer, imported=imported)
    for start in ("trainer.launch.local", "trainer.loop", "featurestore.bank", "featurestore.knn"):
        chain = graph.find_shortest_chain(importer=start, imported="ray")
        assert chain is None, " -> ".join(chain)


def test_modules_stay_short():
    """Every module of the three packages, no exemptions (benchmarks and tests aside)."""
    long = {
        f"{p.relative_to(REPO)} ({n} lines)"
        for pkg in PACKAGES
        for p in (REPO / pkg).rglob("*.py")
        if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert not long, f"modules above {MAX_LINES} lines: {sorted(long)}"


def test_the_models_module_is_pure_torch(graph):
    """``trainer.model.encoders`` imports torch and torchvision only; files, images and the export
    format live in ``trainer.model.export``, whose names still import from the old place."""
    imported = graph.find_modules_directly_imported_by("trainer.model.encoders")
    ours = {m for m in imported if m.split(".")[0] in PACKAGES}
    assert ours == {"trainer.model.export"}  # the lazy re-export, inside __getattr__
    others = {m.split(".")[0] for m in imported - ours}
    assert others <= {"__future__", "dataclasses", "collections", "typing", "torch", "torchvision"}
    from trainer.model import encoders as models
    from trainer.model import export as encoder_export

    for name in sorted(models._MOVED_TO_EXPORT):
        assert getattr(models, name) is getattr(encoder_export, name)
    with pytest.raises(AttributeError, match="no attribute 'nonsense'"):
        models.nonsense  # noqa: B018


def test_every_module_the_architecture_guide_names_exists():
    """ARCHITECTURE.md names modules by path (``featurestore/store.py``) or, inside a
    package's paragraph, by file name (``store_steps.py``): each must be a file here."""
    import re

    text = (REPO / "ARCHITECTURE.md").read_text()
    files = [p.relative_to(REPO).as_posix() for d in (*PACKAGES, "tests", "benchmarks")
             for p in (REPO / d).rglob("*.py")]  # fmt: skip
    named = set(re.findall(r"`([A-Za-z_/]+\.py)`", text))
    missing = sorted(n for n in named if not any(f == n or f.endswith("/" + n) for f in files))
    assert named and not missing, f"ARCHITECTURE.md names modules that do not exist: {missing}"
