"""Stream a shard plan to disk: one shard at a time, one tensor run at a time.

Each shard file is written in a fixed order (header, then data) by a small state machine
that refuses calls out of order and checks that every planned byte arrived. Within a
shard, data are laid out in source order so that neighbouring tensors form runs that
move with one kernel copy; the header lists tensors in natural order.

>>> Progress().advance(10)  # the no-op progress sink the library uses by default
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Callable, Iterable

from reshard.transfer.copy import copy_range, write_all
from reshard.formats.index import index_json
from reshard.formats.safetensors import build_header, is_aligned
from reshard.plan import INDEX_FILE_NAME, PlannedShard, ShardPlan
from reshard.run.journal import pause_point
from reshard.tensors import Checkpoint, TensorInfo, natural_key
from reshard.units import dtype_itemsize

log = logging.getLogger(__name__)


class Progress:
    """Progress sink: the CLI subclasses it to draw bars; the library never prints."""

    def begin(self, total: int, shards: int) -> None:
        """Writing starts: ``total`` tensor bytes in ``shards`` files."""

    def start_shard(self, number: int, count: int, file_name: str, size: int) -> None:
        """A shard of ``size`` tensor bytes begins."""

    def advance(self, nbytes: int) -> None:
        """``nbytes`` more tensor bytes were written."""

    def end_shard(self) -> None:
        """The current shard is complete and flushed."""


def data_order(tensors: Iterable[TensorInfo]) -> list[TensorInfo]:
    """Order a shard's tensors by source position, so plain copies form long runs,
    unless that would misalign a tensor; then by element size first, as the reference
    writer does, which always aligns."""
    by_source = sorted(tensors, key=lambda t: (str(t.file), t.offset, natural_key(t.name)))
    if is_aligned(by_source):
        return by_source
    return sorted(by_source, key=lambda t: -dtype_itemsize(t.dtype))


def copy_runs(order: list[TensorInfo]) -> list[list[TensorInfo]]:
    """Group consecutive plain copies that are adjacent in the same source file."""
    runs: list[list[TensorInfo]] = []
    for t in order:
        last = runs[-1][-1] if runs else None
        if (last is not None and t.is_plain_copy and last.is_plain_copy and t.file == last.file
                and last.offset + last.nbytes == t.offset):
            runs[-1].append(t)
        else:
            runs.append([t])
    return runs


class ShardWriter:
    """Writes one shard file: ``header`` once, then ``copy_run`` for each run in order,
    then ``finish``. Calls out of that order raise ``RuntimeError`` (a bug, not bad input)."""

    def __init__(self, path: Path, order: list[TensorInfo], metadata: dict[str, str],
                 progress: Progress) -> None:
        self.path, self.order, self.metadata, self.progress = path, order, metadata, progress
        self.state = "new"
        self.fd = -1
        self.cursor = 0
        self.expected = 0
        self._sources: dict[Path, int] = {}

    def write_header(self) -> None:
        self._require("new")
        header = shard_header(self.order, self.metadata)
        self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        write_all(self.fd, header, 0)
        self.cursor = len(header)
        self.expected = len(header) + sum(t.nbytes for t in self.order)
        self.state = "data"

    def copy_run(self, run: list[TensorInfo]) -> None:
        self._require("data")
        first = run[0]
        src_fd = self._source_fd(first.file)
        if first.is_plain_copy:
            length = sum(t.nbytes for t in run)
            copy_range(src_fd, self.fd, first.offset, self.cursor, length,
                       self.progress.advance, str(first.file))
            self.cursor += length
            return
        from reshard.transfer.cast import iter_tensor_bytes

        for t in run:
            for chunk in iter_tensor_bytes(t, src_fd):
                write_all(self.fd, chunk, self.cursor)
                self.cursor += len(chunk)
                self.progress.advance(len(chunk))

    def finish(self) -> None:
        self._require("data")
        if self.cursor != self.expected:
            raise RuntimeError(f"{self.path}: wrote {self.cursor} bytes, planned {self.expected}")
        os.ftruncate(self.fd, self.cursor)
        # No fsync here: one pass over all files at the end (``fsync_files``) lets the
        # kernel write shard k back while shard k+1 is being copied, as cp + sync does.
        self.close()
        self.state = "done"

    def close(self) -> None:
        """Release file descriptors; safe to call more than once and after errors."""
        for fd in self._sources.values():
            os.close(fd)
        self._sources.clear()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def _source_fd(self, path: Path | None) -> int:
        if path is None:
            raise RuntimeError("cannot write a tensor planned from remote headers only")
        if path not in self._sources:
            self._sources[path] = os.open(path, os.O_RDONLY)  # the source is never modified
        return self._sources[path]

    def _require(self, state: str) -> None:
        if self.state != state:
            raise RuntimeError(f"ShardWriter for {self.path}: call not allowed in state {self.state!r}")


def shard_header(order: list[TensorInfo], metadata: dict[str, str]) -> bytes:
    """The exact header bytes of a shard whose data are laid out in ``order`` (resume
    rebuilds them to check a leftover shard).

    The header is padded so that the data start at the offset within a 4 KiB page that
    keeps tensors at their source's page offset: the kernel then copies whole pages, and
    XFS and btrfs can share their blocks with the source instead of copying them. The
    offset is the first plain-copy tensor's, taken from the source file that gives the
    shard the most plain-copy bytes. (When tensor sizes are multiples of 4096, as in
    Mistral or Llama, a shard drawing from two files whose data starts differ modulo 4096
    can keep only one file's tensors congruent; this keeps the bigger part.)
    """
    bytes_from: dict[Path, int] = {}
    first_from: dict[Path, int] = {}  # file -> data-start page offset of its first tensor
    cursor = 0
    for t in order:
        if t.is_plain_copy and t.file is not None:
            bytes_from[t.file] = bytes_from.get(t.file, 0) + t.nbytes
            first_from.setdefault(t.file, (t.offset - cursor) % 4096)
        cursor += t.nbytes
    first = order[0]
    page_offset = first.offset % 4096 if first.is_plain_copy else None
    if first.file in bytes_from:  # the rule before, unless another file gives more bytes
        page_offset = first_from[max(bytes_from, key=lambda f: (bytes_from[f], f == first.file))]
    entries = [(t.name, t.dtype, t.shape, t.nbytes) for t in order]
    return build_header(metadata, entries, pad_to=8, first_data_page_offset=page_offset,
                        key_order=sorted((t.name for t in order), key=natural_key))


def write_shard(path: Path, shard: PlannedShard, tensors: dict[str, TensorInfo],
                metadata: dict[str, str], progress: Progress) -> None:
    """Write one planned shard to ``path``."""
    order = data_order(tensors[name] for name in shard.names)
    writer = ShardWriter(path, order, metadata, progress)
    try:
        writer.write_header()
        for i, run in enumerate(copy_runs(order)):
            writer.copy_run(run)
            if i == 0:
                pause_point(f"mid:{shard.file_name}")  # test hook (reshard.run.journal)
        writer.finish()
    finally:
        writer.close()


def write_checkpoint(checkpoint: Checkpoint, plan: ShardPlan, out_dir: Path,
                     metadata: dict[str, str], progress: Progress | None = None,
                     skip: frozenset[str] = frozenset(),
                     on_shard_done: Callable[[str], None] | None = None) -> None:
    """Write every shard of ``plan``, then the index (when sharded), then the extra files.

    Args:
        skip: shard file names already complete in ``out_dir`` (resume).
        on_shard_done: called with each newly written shard's file name (resume journal).
    """
    progress = progress or Progress()
    tensors = {t.name: t for t in checkpoint.tensors}
    count = len(plan.shards)
    progress.begin(plan.total_size, count)
    for number, shard in enumerate(plan.shards, start=1):
        progress.start_shard(number, count, shard.file_name, shard.size)
        if shard.file_name in skip:
            progress.advance(shard.size)
        else:
            write_shard(out_dir / shard.file_name, shard, tensors, metadata, progress)
            if on_shard_done is not None:
                on_shard_done(shard.file_name)
            pause_point(f"after:{shard.file_name}")  # test hook (reshard.run.journal)
        progress.end_shard()
    if plan.is_sharded:
        write_index(out_dir, plan, checkpoint)
    copy_extra_files(checkpoint.extra_files, out_dir)
    fsync_files(sorted(out_dir.iterdir()))


def fsync_files(paths: Iterable[Path]) -> None:
    """Make written files durable before the folder is renamed into place."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_index(out_dir: Path, plan: ShardPlan, checkpoint: Checkpoint) -> Path:
    """Write ``model.safetensors.index.json`` and return its path."""
    params = {t.name: t.numel for t in checkpoint.tensors}
    weight_map = plan.weight_map()
    text = index_json(weight_map, plan.total_size, sum(params[n] for n in weight_map))
    path = out_dir / INDEX_FILE_NAME
    with open(path, "w", encoding="utf-8") as f:
        f.write(text[: len(text) // 2])
        f.flush()
        pause_point("index")  # test hook (reshard.run.journal): a kill lands mid-index
        f.write(text[len(text) // 2:])
    return path


def copy_extra_files(files: Iterable[Path], out_dir: Path) -> None:
    """Copy config, tokenizer and other small files (following Hub cache symlinks)."""
    for path in files:
        shutil.copyfile(path, out_dir / path.name)
