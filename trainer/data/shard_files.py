"""Dataset locations, URL opening and the tar reader behind :mod:`trainer.data`.

A dataset *location* is a local directory or any URL holding ``shard-*.tar``,
``index.parquet`` and ``dataset.json``: ``file://``, ``http(s)://``, ``s3://``, ``gs://`` ...
(read with fsspec, falling back to webdataset's ``gopen`` for curl/gsutil), or a
``pipe:`` command template with ``{}`` where the file name goes
(``pipe:aws s3 cp s3://bucket/ds/{} -``).

Shards are read with a small tar reader (ustar, GNU long names, pax paths) that seeks over
samples it does not need; :class:`_ShardCursor` walks one shard sample by sample.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import BinaryIO
from urllib.parse import urlparse
from urllib.request import url2pathname

import fsspec

from featurestore.files import is_url
from trainer.data.retrying import RetryingReader

# --------------------------------------------------------------------------- locations


def _webdataset():
    """webdataset, imported on first use: local files need only fsspec and the stdlib, so the
    local launcher runs where webdataset is not installed (the GPU machine)."""
    import webdataset

    return webdataset


def open_url(url: str) -> BinaryIO:
    """Open a local path, ``file://``, ``pipe:`` or fsspec/webdataset URL for binary reading."""
    if url.startswith("pipe:"):
        return _webdataset().gopen(url, "rb")
    if not is_url(url):
        return open(url, "rb", buffering=1 << 20)
    parsed = urlparse(url)
    if parsed.scheme == "file":
        return open(url2pathname(parsed.path), "rb", buffering=1 << 20)
    try:  # object storage: transient errors are retried with backoff (retrying.POLICY)
        return RetryingReader(url, lambda: fsspec.open(url, "rb").open())  # type: ignore[return-value]
    except ImportError as exc:  # fsspec lacks the protocol's package (s3fs, gcsfs, ...)
        wds = _webdataset()
        if parsed.scheme in wds.gopen_schemes:
            return wds.gopen(url, "rb")
        raise ValueError(f"cannot open {url}: {exc}") from None


@dataclass(frozen=True)
class DatasetLocation:
    """Where a sharded dataset lives; :meth:`url` names a file in it.

    Attributes:
        location: a directory, a URL (names are appended after ``/``) or a ``pipe:`` command
            with ``{}`` standing for the file name.
    """

    location: str

    def __post_init__(self) -> None:
        if self.location.startswith("pipe:") and "{}" not in self.location:
            raise ValueError(f"pipe: dataset location needs a '{{}}' placeholder: {self.location}")

    def url(self, name: str) -> str:
        """The URL (or path) of file ``name`` of the dataset."""
        if self.location.startswith("pipe:"):
            return self.location.replace("{}", name)
        if not is_url(self.location):
            return os.path.join(self.location, name)
        return self.location.rstrip("/") + "/" + name

    def read_bytes(self, name: str) -> bytes:
        """The whole content of file ``name``; errors name the file."""
        url = self.url(name)
        try:
            with open_url(url) as f:
                return f.read()
        except (OSError, ValueError) as exc:
            raise ValueError(f"cannot read {url}: {exc}") from None


# --------------------------------------------------------------------------- tar reading


class _TarError(Exception):
    """A shard is truncated or its tar structure is damaged."""


_BLOCK = 512
_ZERO_BLOCK = bytes(_BLOCK)


def _tar_number(field_bytes: bytes) -> int:
    if field_bytes[0] & 0x80:  # GNU base-256
        return int.from_bytes(field_bytes[1:], "big")
    digits = field_bytes.strip(b" \0")
    try:
        return int(digits, 8) if digits else 0
    except ValueError:
        raise _TarError(f"bad number field {field_bytes!r}") from None


def _pax_path(data: bytes) -> str | None:
    """The ``path`` record of a pax extended header, if any."""
    pos = 0
    path = None
    while pos < len(data):
        space = data.find(b" ", pos)
        if space < 0:
            break
        length = int(data[pos:space])
        key, _, value = data[space + 1 : pos + length - 1].partition(b"=")
        if key == b"path":
            path = value.decode("utf-8", "surrogateescape")
        pos += length
    return path


class _TarReader:
    """Minimal sequential tar reader (ustar, GNU long names, pax paths) that can skip a
    member's data without reading it (a seek on seekable streams)."""

    def __init__(self, fileobj: BinaryIO, offset: int = 0):
        self._f = fileobj
        try:
            self._seekable = bool(fileobj.seekable())
        except (AttributeError, OSError):
            self._seekable = False
        self.pos = 0  # bytes of the archive consumed so far
        if offset:
            self._skip(offset)

    @property
    def seekable(self) -> bool:
        """Whether skipping is a seek (local files, fsspec range reads) or a read."""
        return self._seekable

    def next_member(self) -> tuple[str, int] | None:
        """The next regular file's ``(name, size)``; ``None`` at the end of the archive."""
        long_name: str | None = None
        while True:
            block = self._f.read(_BLOCK)
            self.pos += len(block)
            if not block or block == _ZERO_BLOCK:
                return None
            if len(block) < _BLOCK:
                raise _TarError("truncated tar header")
            stored = _tar_number(block[148:156])
            if stored != sum(block) - sum(block[148:156]) + 8 * 32:
                raise _TarError("tar header checksum mismatch")
            size = _tar_number(block[124:136])
            kind = block[156:157]
            if kind in (b"0", b"\0", b"7"):
                if long_name is not None:
                    return long_name, size
                name = block[:100].split(b"\0", 1)[0]
                if block[257:262] == b"ustar":
                    prefix = block[345:500].split(b"\0", 1)[0]
                    if prefix:
                        name = prefix + b"/" + name
                return name.decode("utf-8", "surrogateescape"), size
            if kind == b"L":
                long_name = (
                    self.read_data(size).split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
                )
            elif kind == b"x":
                long_name = _pax_path(self.read_data(size)) or long_name
            else:  # directories, links, global pax headers, ...
                self.skip_data(size)

    def read_data(self, size: int) -> bytes:
        """The current member's data (then skips its padding)."""
        data = self._f.read(size)
        self.pos += len(data)
        if len(data) < size:
            raise _TarError("truncated tar member")
        self._skip(-size % _BLOCK)
        return data

    def skip_data(self, size: int) -> None:
        """Skip the current member's data and padding."""
        self._skip(size + (-size % _BLOCK))

    def _skip(self, n: int) -> None:
        if n == 0:
            return
        self.pos += n
        if self._seekable:
            self._f.seek(n, os.SEEK_CUR)
            return
        while n > 0:
            chunk = self._f.read(min(n, 1 << 20))
            if not chunk:
                raise _TarError("truncated tar member")
            n -= len(chunk)


class _ShardCursor:
    """Reads one shard sample by sample; members of a sample are consecutive, named
    ``<key>.<ext>`` (webdataset convention: the key ends at the first dot of the base name).

    ``offset``/``pos``: start at the sample whose first header is at byte ``offset`` and which
    is the shard's sample number ``pos`` (from the index), a seek where the file allows it.
    :attr:`key_offset` is the byte offset of the sample :meth:`peek_key` returned.
    """

    def __init__(self, url: str, offset: int = 0, pos: int = 0):
        self.url = url
        self.next_pos = pos  # no sample before this position is still unread
        try:
            self._file = open_url(url)
        except FileNotFoundError:
            raise FileNotFoundError(f"shard not found: {url}") from None
        self._tar = _TarReader(self._file, offset)
        self._head: tuple[str, str, int] | None = None  # read header, unread data
        self._eof = False
        self.key_offset = offset
        self._key: str | None = None

    @property
    def seekable(self) -> bool:
        """Whether the shard can be entered at an offset without reading what lies before."""
        return self._tar.seekable

    def peek_key(self) -> str | None:
        """Key of the next sample, without consuming it; ``None`` at the end."""
        if self._head is None and not self._eof:
            start = self._tar.pos
            member = self._tar.next_member()
            if member is None:
                self._eof = True
            else:
                name, size = member
                slash = name.rfind("/") + 1
                dot = name.find(".", slash)
                dot = len(name) if dot < 0 else dot
                self._head = (name[:dot], name[dot + 1 :].lower(), size)
                if self._head[0] != self._key:
                    self.key_offset, self._key = start, self._head[0]
        return None if self._head is None else self._head[0]

    def take(self, read: bool) -> dict[str, bytes]:
        """Consume the next sample; its fields (extension -> bytes) when ``read``."""
        key = self.peek_key()
        fields: dict[str, bytes] = {}
        while self._head is not None and self._head[0] == key:
            _, ext, size = self._head
            if read:
                fields[ext] = self._tar.read_data(size)
            else:
                self._tar.skip_data(size)
            self._head = None
            self.peek_key()
        return fields

    def close(self) -> None:
        self._file.close()
