"""The token-authenticated test head lives in :mod:`benchmarks.ray_head` (the chaos
benchmark plays a user's cluster with it too); re-exported for the tests."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.ray_head import Head, free_port, kill_instance, submit, token_head

__all__ = ["Head", "free_port", "kill_instance", "submit", "token_head"]
