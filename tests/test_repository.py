"""The repository holds source, not artefacts: no tracked file above 1 MB, no wheels,
archives, caches or build outputs (they belong in ignored folders such as ``.cache/``)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
MAX_BYTES = 1 << 20
ARTEFACT_SUFFIXES = (
    ".whl",
    ".tar.gz",
    ".tgz",
    ".zip",
    ".egg",
    ".so",
    ".pyc",
    ".pt",
    ".pth",
    ".npy",
    ".npz",
    ".parquet",
    ".tar",
)
ARTEFACT_DIRS = ("__pycache__", ".pytest_cache", ".ruff_cache", ".venv", "build", "dist")


def _tracked_files() -> list[str]:
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    out = subprocess.run(
        ["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True
    ).stdout
    return [name for name in out.decode().split("\0") if name]


def test_no_tracked_file_is_large():
    large = [
        f"{name} ({(REPO / name).stat().st_size / 2**20:.1f} MiB)"
        for name in _tracked_files()
        if (REPO / name).is_file() and (REPO / name).stat().st_size > MAX_BYTES
    ]
    assert not large, f"tracked files above 1 MiB: {large}"


def test_no_tracked_build_artefacts():
    artefacts = [
        name
        for name in _tracked_files()
        if name.endswith(ARTEFACT_SUFFIXES) or set(Path(name).parts) & set(ARTEFACT_DIRS)
    ]
    assert not artefacts, f"build artefacts or data are tracked: {artefacts}"
