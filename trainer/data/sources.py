"""Image sources that :mod:`trainer.make_shards` turns into webdataset shards.

A *source* is one split of a dataset as an ordered list of :class:`Record` (where the image
comes from, its label, the file extension it is stored under) plus a way to get each record's
encoded bytes. Three kinds (README, *Data format*):

- ``imagefolder``: a directory with one subdirectory per class (ImageNet layout). Images may sit
  at any depth below their class directory; extensions ``jpg jpeg png webp bmp`` in any case are
  images, other files are ignored, and so are hidden entries (names starting with ``.``).
  Classes are the sorted names of the non-hidden subdirectories. Images directly in the root
  have no class (label ``-1``). Records are in sorted-path order, compared component by
  component, so ids follow ``class/sub/dir/file`` order and are stable across runs. The bytes
  are the file's own bytes.
- ``cifar10``: a ``cifar-10-batches-py`` directory (the python pickles of CIFAR-10); ``split``
  picks ``data_batch_1..5`` (train) or ``test_batch`` (test). Rows become lossless png;
  ``source`` is ``"<batch file>:<row>"``.
- ``digits``: the built-in default dataset, scikit-learn's ``load_digits`` (1797 8x8 images,
  10 classes, shipped with scikit-learn, no network), as lossless 8-bit grayscale png with the
  values 0..16 scaled to 0..255. Every 5th image (row index divisible by 5) is the test split
  (360 images), the rest the train split (1437). ``source`` is ``"digits:<row>"``.

Sources produce bytes; checking that they decode is the converter's job.
"""

from __future__ import annotations

import io
import os
import pickle
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

IMAGE_EXTENSIONS = frozenset({"jpg", "jpeg", "png", "webp", "bmp"})
BUILTIN_DATASETS = ("digits",)
BUILTIN_PREFIX = "builtin:"  # "builtin:digits" names the built-in even beside a dir "digits"
SPLITS = ("train", "test")
CIFAR_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR_TEST_BATCHES = ("test_batch",)
DIGITS_TEST_EVERY = 5


class SourceError(ValueError):
    """The source is missing, empty, or not of a known kind. The message names it."""


@dataclass(frozen=True)
class Record:
    """One image of a source.

    Attributes:
        source: the file path relative to the source root (``/``-separated), or
            ``"<batch>:<row>"`` for sources without files.
        label: class index into the source's ``classes``; ``-1`` when unknown.
        ext: the extension the bytes are stored under in the shards (lower case, no dot).
    """

    source: str
    label: int
    ext: str


@dataclass
class Source:
    """One split of a dataset: records in id order and a reader for their bytes.

    Attributes:
        kind: ``"imagefolder"``, ``"cifar10"`` or ``"digits"``.
        location: the root directory (absolute) or the built-in dataset's name.
        split: the split that was asked for (ImageFolder roots are one split already).
        classes: class names; ``Record.label`` indexes this list.
        records: the images in id order (before unreadable ones are dropped).
        read: ``read(record) -> bytes``, the encoded image; may raise ``OSError``.
        ignored: ``(path, reason)`` of every file the scan did not take (hidden, not an
            image extension, in a hidden directory); make_shards lists them in skipped.txt.
    """

    kind: str
    location: str
    split: str
    classes: list[str]
    records: list[Record]
    read: Callable[[Record], bytes] = field(repr=False)
    ignored: list[tuple[str, str]] = field(default_factory=list)


def builtin_name(src: str | os.PathLike) -> str | None:
    """The built-in dataset ``src`` names, or None: ``"builtin:<name>"`` always, a bare
    ``"<name>"`` unless a path of that name exists (an existing path wins).

    Raises:
        SourceError: ``"builtin:<name>"`` with an unknown name.
    """
    name = os.fspath(src)
    if name.startswith(BUILTIN_PREFIX):
        if name[len(BUILTIN_PREFIX) :] not in BUILTIN_DATASETS:
            raise SourceError(
                f"unknown built-in dataset {name}; expected one of {', '.join(BUILTIN_DATASETS)}"
            )
        return name[len(BUILTIN_PREFIX) :]
    if name in BUILTIN_DATASETS and not Path(name).exists():
        return name
    return None


def open_source(
    src: str | os.PathLike, split: str = "train", exclude: Sequence[Path] = ()
) -> Source:
    """Open ``src`` as an ImageFolder root, a ``cifar-10-batches-py`` dir or a built-in name.

    An existing path wins over a built-in name of the same spelling; ``"builtin:<name>"``
    always means the built-in.

    Args:
        src: a directory or the name of a built-in dataset (``"digits"``,
            ``"builtin:digits"``).
        split: ``"train"`` or ``"test"``; used by CIFAR batches and built-ins.
        exclude: directories never scanned (e.g. the output directory inside ``src``).

    Returns:
        The :class:`Source`, with at least one record.

    Raises:
        SourceError: ``src`` does not exist, holds no images, or is of an unknown kind.
        ValueError: unknown ``split``.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    if builtin_name(src) is not None:
        return _digits_source(split)
    path = Path(src)
    if not path.exists():
        raise SourceError(
            f"source not found: {src} (expected a directory or a built-in dataset name: "
            f"{', '.join(BUILTIN_DATASETS)})"
        )
    if not path.is_dir():
        raise SourceError(
            f"unknown source type: {src} is not a directory (expected an ImageFolder root, a "
            f"cifar-10-batches-py directory or one of {', '.join(BUILTIN_DATASETS)})"
        )
    path = path.resolve()
    if _looks_like_cifar(path):
        return _cifar_source(path, split)
    return _imagefolder_source(path, split, [Path(p).resolve() for p in exclude])


# --------------------------------------------------------------------------- ImageFolder


def _imagefolder_source(root: Path, split: str, exclude: list[Path]) -> Source:
    """Scan an ImageFolder root; see the module docstring for the rules."""
    try:
        entries = sorted(os.scandir(root), key=lambda e: e.name)
    except OSError as exc:
        raise SourceError(f"cannot read source directory {root}: {exc.strerror}") from None
    classes = [
        e.name
        for e in entries
        if not e.name.startswith(".") and e.is_dir() and Path(e.path).resolve() not in exclude
    ]
    if not entries:
        raise SourceError(f"source directory is empty: {root}")
    class_index = {name: i for i, name in enumerate(classes)}
    found: list[tuple[tuple[str, ...], Record]] = []
    ignored: list[tuple[str, str]] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        here = Path(dirpath)
        rel_dir = here.relative_to(root).parts
        for d in sorted(dirnames):
            if d.startswith("."):
                ignored.append(("/".join((*rel_dir, d)) + "/", "hidden directory: not scanned"))
        dirnames[:] = [
            d for d in dirnames if not d.startswith(".") and (here / d).resolve() not in exclude
        ]
        if rel_dir and rel_dir[0] not in class_index:
            continue
        label = class_index[rel_dir[0]] if rel_dir else -1
        for name in filenames:
            ext = name.rsplit(".", 1)[-1].lower() if "." in name else ""
            path = "/".join((*rel_dir, name))
            if name.startswith("."):
                ignored.append((path, "hidden file (its name starts with '.')"))
                continue
            if ext not in IMAGE_EXTENSIONS:
                ignored.append((path, f"not an image file name (.{ext or '<none>'})"))
                continue
            parts = (*rel_dir, name)
            found.append((parts, Record("/".join(parts), label, ext)))
    if not found:
        raise SourceError(
            f"source is empty: no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}) under {root}"
        )
    found.sort(key=lambda item: item[0])

    def read(record: Record) -> bytes:
        return (root / record.source).read_bytes()

    records = [r for _, r in found]
    return Source("imagefolder", str(root), split, classes, records, read, sorted(ignored))


# --------------------------------------------------------------------------- CIFAR-10


def _looks_like_cifar(path: Path) -> bool:
    """A directory is CIFAR-10 batches when it holds ``batches.meta`` or a batch file."""
    names = ("batches.meta", *CIFAR_TRAIN_BATCHES, *CIFAR_TEST_BATCHES)
    return any((path / n).is_file() for n in names)


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickle plain containers and numpy arrays only: batch files are not trusted code."""

    _ALLOWED = frozenset(
        {
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "_reconstruct"),
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
        }
    )

    def find_class(self, module: str, name: str):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"disallowed global {module}.{name}")


def _load_pickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            obj = _NumpyOnlyUnpickler(f, encoding="bytes").load()
    except (OSError, pickle.UnpicklingError, EOFError, ValueError, TypeError) as exc:
        raise SourceError(f"not a CIFAR-10 batch file: {path} ({exc})") from None
    if not isinstance(obj, dict):
        raise SourceError(f"not a CIFAR-10 batch file: {path} (not a dict)")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _cifar_source(root: Path, split: str) -> Source:
    """Read the batches of one split of a ``cifar-10-batches-py`` directory."""
    wanted = CIFAR_TRAIN_BATCHES if split == "train" else CIFAR_TEST_BATCHES
    batches = [name for name in wanted if (root / name).is_file()]
    if not batches:
        raise SourceError(f"source is empty: no {split} batch ({', '.join(wanted)}) in {root}")
    classes = [f"class_{i}" for i in range(10)]
    if (root / "batches.meta").is_file():
        meta = _load_pickle(root / "batches.meta")
        names = meta.get("label_names")
        if names is not None:
            classes = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
    arrays: dict[str, np.ndarray] = {}
    records: list[Record] = []
    for name in batches:
        batch = _load_pickle(root / name)
        data, labels = batch.get("data"), batch.get("labels")
        if (
            not isinstance(data, np.ndarray)
            or data.ndim != 2
            or data.shape[1] != 3 * 32 * 32
            or labels is None
            or len(labels) != data.shape[0]
        ):
            raise SourceError(f"not a CIFAR-10 batch file: {root / name} (bad data/labels)")
        arrays[name] = np.ascontiguousarray(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        arrays[name] = arrays[name].astype(np.uint8, copy=False)
        records.extend(Record(f"{name}:{row}", int(y), "png") for row, y in enumerate(labels))
    if not records:
        raise SourceError(f"source is empty: the {split} batches in {root} hold no rows")

    def read(record: Record) -> bytes:
        name, row = record.source.rsplit(":", 1)
        return encode_png(arrays[name][int(row)])

    return Source("cifar10", str(root), split, classes, records, read)


# --------------------------------------------------------------------------- built-in


def _digits_source(split: str) -> Source:
    """scikit-learn's 8x8 digits as 8-bit grayscale png (0..16 scaled to 0..255)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)  # [1797, 8, 8]
    rows = [i for i in range(len(pixels)) if (i % DIGITS_TEST_EVERY == 0) == (split == "test")]
    records = [Record(f"digits:{i}", int(digits.target[i]), "png") for i in rows]

    def read(record: Record) -> bytes:
        return encode_png(pixels[int(record.source.rsplit(":", 1)[1])])

    classes = [str(int(c)) for c in digits.target_names]
    return Source("digits", "digits", split, classes, records, read)


def encode_png(pixels: np.ndarray) -> bytes:
    """Lossless png bytes of a uint8 image ``[H, W]`` (grayscale) or ``[H, W, 3]`` (RGB)."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels)).save(buf, format="PNG")
    return buf.getvalue()
