"""Generated image folders for tests: small images whose class a convnet can learn."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def colour_class_folder(src: Path, n: int, seed: int, classes: int = 4, side: int = 16) -> Path:
    """Write ``n`` RGB PNGs ``side×side`` as an ImageFolder under ``src``: image ``i`` has
    label ``i % classes`` (folder ``c<label>``), a class colour plus uniform noise."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        label = i % classes
        base = np.zeros((side, side, 3), dtype=np.uint8)
        base[..., label % 3] = 60 * (label + 1)
        pixels = np.clip(base + rng.integers(0, 60, (side, side, 3)), 0, 255).astype(np.uint8)
        (src / f"c{label}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(src / f"c{label}" / f"{i:03d}.png")
    return src


def unlabelled_shards(root: Path, n: int = 12) -> str:
    """Shards under ``root/unlabelled`` of ``n`` generated images that sit at the folder's
    root, outside any class folder, so every one is written with label -1."""
    from trainer.shards.make import make_shards

    src = colour_class_folder(root / "src", n, seed=0)
    for image in list(src.glob("*/*")):
        image.rename(src / f"{image.parent.name}-{image.name}")  # at the root: no class
    make_shards(src, root / "unlabelled", progress=False)
    return str(root / "unlabelled")


def colour_shards(root: Path, train: int, test: int, shard_size: int) -> dict[str, Path]:
    """``{"train": dir, "test": dir}``: shards under ``root`` of ``train`` and ``test``
    generated images (:func:`colour_class_folder`, seeds 0 and 1), ``shard_size`` per tar."""
    from trainer.shards.make import make_shards

    out = {}
    for split, n, seed in (("train", train, 0), ("test", test, 1)):
        src = colour_class_folder(root / f"src-{split}", n, seed)
        make_shards(src, root / split, shard_size=shard_size, progress=False)
        out[split] = root / split
    return out
