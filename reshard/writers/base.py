"""The shard-format writer interface, and the one writer state machine every format uses.

A ``ShardFormat`` knows a file format's layout and nothing about running a job: file
names, the header bytes and where each tensor's data go (alignment, padding), the index
that names the shards, and how to read a written folder back for verification and
resume. ``ShardWriter`` streams one shard file from a ``ShardLayout``; it knows how to
move bytes (``reshard.transfer``) and nothing about the format.

>>> layout = ShardLayout(b"HDR", (), 3)
>>> layout.data_start, layout.size
(3, 3)
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from reshard.run.events import Progress
from reshard.tensors import Checkpoint, TensorInfo
from reshard.transfer.ranges import copy_range, write_all
from reshard.transfer.sources import SourceReader


@dataclass(frozen=True)
class ShardLayout:
    """The bytes of one shard file: ``header``, then each tensor at its absolute offset
    (``placements`` in data order), ``size`` bytes in all. Bytes between placements
    (a format's padding) are zeros."""

    header: bytes
    placements: tuple[tuple[TensorInfo, int], ...]
    size: int

    @property
    def data_start(self) -> int:
        return len(self.header)


class ShardFormat(Protocol):
    """What the run pipeline, verify, resume and push ask of an output format."""

    name: str
    single_file_name: str  # the file when everything fits in one (no index)
    index_file_name: str  # the index naming the shards

    def shard_file_name(self, number: int, count: int) -> str:
        """The name of shard ``number`` (1-based) of ``count``."""

    def layout(self, tensors: Sequence[TensorInfo], metadata: dict[str, str]) -> ShardLayout:
        """Where everything goes in a shard holding ``tensors``."""

    def index_text(self, weight_map: dict[str, str], checkpoint: Checkpoint, metadata: dict[str, str]) -> str:
        """The index file's text for shards holding ``weight_map``."""

    def read_back(self, folder: Path) -> dict[str, TensorInfo]:
        """Every tensor of a written folder, checked against its index."""


def copy_runs(placements: Sequence[tuple[TensorInfo, int]]) -> list[list[tuple[TensorInfo, int]]]:
    """Group consecutive plain copies that are adjacent both in the same source file and
    in the shard, so each group moves with one kernel copy."""
    runs: list[list[tuple[TensorInfo, int]]] = []
    for t, at in placements:
        if runs:
            last, last_at = runs[-1][-1]
            if (
                t.is_plain_copy
                and last.is_plain_copy
                and t.source == last.source
                and last.offset + last.nbytes == t.offset
                and last_at + last.nbytes == at
            ):
                runs[-1].append((t, at))
                continue
        runs.append([(t, at)])
    return runs


class ShardWriter:
    """Writes one shard file: ``write_header`` once, then ``copy_run`` for each run of
    ``copy_runs(layout.placements)`` in order, then ``finish``. Calls out of that order
    raise ``RuntimeError`` (a bug, not bad input)."""

    def __init__(self, path: Path, layout: ShardLayout, reader: SourceReader, progress: Progress) -> None:
        self.path, self.layout, self.reader, self.progress = path, layout, reader, progress
        self.state = "new"
        self.fd = -1
        self.cursor = 0

    def write_header(self) -> None:
        self._require("new")
        self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        write_all(self.fd, self.layout.header, 0)
        self.cursor = len(self.layout.header)
        self.state = "data"

    def copy_run(self, run: list[tuple[TensorInfo, int]]) -> None:
        self._require("data")
        first, at = run[0]
        if at < self.cursor:
            raise RuntimeError(f"{self.path}: tensor {first.name!r} placed before the cursor")
        self.cursor = at  # the bytes skipped are the format's padding: zeros (a hole)
        if first.is_plain_copy:
            length = sum(t.nbytes for t, _ in run)
            source = first.extents[0].source
            copy_range(
                self.reader.fd(source),
                self.fd,
                first.offset,
                self.cursor,
                length,
                self.progress.advance,
                source.key,
            )
            self.cursor += length
            return
        for t, at in run:
            self.cursor = at
            self._write_tensor(t)

    def _write_tensor(self, t: TensorInfo) -> None:
        if (
            t.src_dtype is None
            and t.strides is None
            and t.quant is None
            and all(e.is_contiguous for e in t.extents)
        ):
            from reshard.transfer.extents import contiguous_pieces

            for e in contiguous_pieces(t):  # pieces of several files: kernel copies
                copy_range(
                    self.reader.fd(e.source),
                    self.fd,
                    e.offset,
                    self.cursor + e.dest,
                    e.length,
                    self.progress.advance,
                    e.source.key,
                )
            self.cursor += t.nbytes
            return
        from reshard.transfer.strided import can_gather, write_gathered

        if can_gather(t):  # column slices of split --tp / merge: gathered from the page cache
            write_gathered(t, self.reader, self.fd, self.cursor, self.progress.advance)
            self.cursor += t.nbytes
            return
        from reshard.transfer.cast import iter_tensor_bytes, write_computed

        if write_computed(t, self.reader, self.fd, self.cursor, self.progress.advance):
            self.cursor += t.nbytes  # cast or quantized by the compute threads, in place
            return
        for chunk in iter_tensor_bytes(t, self.reader):
            write_all(self.fd, chunk, self.cursor)
            self.cursor += len(chunk)
            self.progress.advance(len(chunk))

    def finish(self) -> None:
        self._require("data")
        last = self.layout.placements[-1] if self.layout.placements else None
        end = last[1] + last[0].nbytes if last else self.cursor
        if self.cursor != end:
            raise RuntimeError(f"{self.path}: wrote up to byte {self.cursor}, planned {end}")
        # Trailing padding (if the format has any) becomes zeros; no fsync here: one pass
        # over all files at the end lets the kernel write shard k back while shard k+1 is
        # copied, as cp + sync does.
        os.ftruncate(self.fd, self.layout.size)
        self.close()
        self.state = "done"

    def close(self) -> None:
        """Release the file descriptor; safe to call more than once and after errors."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def _require(self, state: str) -> None:
        if self.state != state:
            raise RuntimeError(f"ShardWriter for {self.path}: call not allowed in state {self.state!r}")


def write_shard(path: Path, layout: ShardLayout, reader: SourceReader, progress: Progress) -> None:
    """Write one shard file laid out as ``layout``."""
    writer = ShardWriter(path, layout, reader, progress)
    try:
        writer.write_header()
        for run in copy_runs(layout.placements):
            writer.copy_run(run)
        writer.finish()
    finally:
        writer.close()
