"""A ``python -c`` program that runs a CLI with every ``import ray`` failing, so a test
proves that path never loads Ray (``sys.modules['ray'] = None`` makes the import raise)."""

from __future__ import annotations


def no_ray_program(module: str) -> str:
    """The ``-c`` source running ``module``'s ``main(sys.argv[1:])`` without Ray."""
    return (
        "import sys; sys.modules['ray'] = None; "
        f"from {module} import main; sys.exit(main(sys.argv[1:]))"
    )
