"""Byte sources: where a tensor's bytes can be read from.

A ``ByteSource`` is anything with a stable ``key`` (for ordering, fingerprints and
messages) that a ``SourceReader`` can read byte ranges from. Today that is a local file
(``FileSource``); a Hub file seen through its headers only (``HubFileSource``) describes
tensors for planning; a Hub file at a pinned commit with its size and LFS sha256
(``HubRangeSource``) is read by HTTP range requests, as ``split --no-cache`` does
(``reshard.hub.stream`` routes its bytes into the shards). Readers of new formats describe their
tensors as extents over these sources (``reshard.tensors.Extent``), so the writer, the
verifier and resume never open a file themselves.

>>> src = FileSource(Path("/tmp/m.safetensors"))
>>> src.key, src.is_local
('/tmp/m.safetensors', True)
>>> HubFileSource("org/m", "abc", "model.safetensors").key
'hf://org/m@abc/model.safetensors'
>>> HubRangeSource("org/m", "abc", "model.safetensors", 100, "0" * 64).key
'hf://org/m@abc/model.safetensors'
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Union

from reshard.errors import SourceError


@dataclass(frozen=True)
class FileSource:
    """A local file, opened read-only (a source is never modified)."""

    path: Path

    @property
    def key(self) -> str:
        return str(self.path)

    @property
    def is_local(self) -> bool:
        return True


@dataclass(frozen=True)
class HubFileSource:
    """A file of a Hub repo known from its safetensors header only (``--dry-run``,
    ``plan``). Offsets into it count from the start of its data section, after the
    header: huggingface_hub's header metadata does not give the header's length."""

    repo_id: str
    revision: str | None
    filename: str

    @property
    def key(self) -> str:
        return f"hf://{self.repo_id}@{self.revision or 'main'}/{self.filename}"

    @property
    def is_local(self) -> bool:
        return False


@dataclass(frozen=True)
class HubRangeSource:
    """A file of a Hub repo at a resolved commit, read by HTTP range requests
    (``split --no-cache``). Offsets are absolute, as in the file. ``size`` and ``sha256``
    are what the Hub publishes for it (the LFS oid): every byte read is checked against
    it (``reshard.hub.stream``). The key names the commit, so it pins the bytes."""

    repo_id: str
    revision: str
    filename: str
    size: int
    sha256: str

    @property
    def key(self) -> str:
        return f"hf://{self.repo_id}@{self.revision}/{self.filename}"

    @property
    def is_local(self) -> bool:
        return False


ByteSource = Union[FileSource, HubFileSource, HubRangeSource]


class SourceReader:
    """Opens each local source once and reads byte ranges from it; close it (or use it
    as a context manager) to release the descriptors.

    >>> import tempfile
    >>> fd, name = tempfile.mkstemp(); _ = os.write(fd, b"abcdef"); os.close(fd)
    >>> with SourceReader() as reader:
    ...     reader.read(FileSource(Path(name)), 2, 3)
    b'cde'
    """

    def __init__(self) -> None:
        self._fds: dict[str, int] = {}

    def fd(self, source: ByteSource) -> int:
        """The open descriptor of a local source (for kernel copies)."""
        if isinstance(source, HubRangeSource):
            raise SourceError(
                f"{source.key}: a Hub file streamed by range requests (--no-cache) has "
                "no local copy to read; drop --no-cache to download it into the cache"
            )
        if not isinstance(source, FileSource):
            raise SourceError(
                f"{source.key}: only its header was read (planning from remote "
                "headers); run without --dry-run to download it first"
            )
        fd = self._fds.get(source.key)
        if fd is None:
            try:
                fd = os.open(source.path, os.O_RDONLY)
            except OSError as e:
                raise SourceError(
                    f"{source.path}: cannot open it ({e.strerror}); check the source folder is complete"
                ) from e
            self._fds[source.key] = fd
        return fd

    def read(self, source: ByteSource, offset: int, length: int) -> bytes:
        """Exactly ``length`` bytes at ``offset`` (callers keep ``length`` bounded)."""
        from reshard.transfer.ranges import read_exact

        return read_exact(self.fd(source), offset, length, source.key)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> SourceReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
