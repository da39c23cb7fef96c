"""Move tensors that are not one contiguous byte run, in bounded pieces.

Two cases. A strided *view* (a non-contiguous view in a ``.bin`` storage) is read with
``iter_strided_bytes``: the innermost dimensions that are contiguous form a "block";
blocks are gathered with ``pread`` into chunks of about ``chunk`` bytes, so memory stays
bounded by the chunk, never by the tensor.

A tensor made of strided *extents* (a rank's column slice in ``split --tp``, the
interleaved rank slices of a ``merge``, 2-D DCP chunks) is written straight into its
shard by ``write_gathered``: a band of output bytes at a time, the source pages that
band needs are mapped read-only and one ``pwritev`` gathers its runs (one per row and
extent) from the page cache into the shard. Each byte is copied once, as
``copy_file_range`` would, where reading into a buffer, placing and writing it out costs
three copies; and the band stays small enough to stay in the CPU cache.

>>> import os, tempfile
>>> from pathlib import Path
>>> from reshard.tensors import Extent, TensorInfo
>>> fd, name = tempfile.mkstemp(); _ = os.write(fd, bytes(range(12)))
>>> cols = TensorInfo.from_file("w", "U8", (3, 2), Path(name), 1, 6, strides=(4, 1))  # [:, 1:3] of 3x4
>>> b"".join(iter_strided_bytes(cols, fd))
b'\\x01\\x02\\x05\\x06\\t\\n'
"""

from __future__ import annotations

import errno
import heapq
import itertools
import mmap
from collections.abc import Callable, Iterator

from reshard.errors import FormatError
from reshard.tensors import Extent, TensorInfo
from reshard.transfer.ranges import IOV_MAX, read_exact, write_views
from reshard.transfer.sources import ByteSource, SourceReader
from reshard.units import dtype_itemsize, numel

DEFAULT_CHUNK = 16 * 1024 * 1024
# Blocks at least this long are read one pread each; shorter ones are gathered by spans.
LARGE_BLOCK = 64 * 1024
# A tile whose file span is this short is read whole even if it uses little of it:
# one short read costs less than the Python work of splitting further.
SHORT_SPAN = 64 * 1024
_NUMPY_BY_SIZE = {1: "u1", 2: "u2", 4: "u4", 8: "u8"}

# Output bytes one pwritev gathers. Measured in `reshard merge` of the 4 GB Mistral-shaped
# tp2 folder (write-phase CPU seconds, 3 alternating runs): 2.28-2.43 s with 1 MiB bands,
# 2.51-2.91 s with 0.5 MiB, 2.53-2.60 s with 2 MiB, 3.20-3.49 s with 4 MiB (the source
# pages a band maps stay in the CPU cache up to its pwritev). A microbenchmark (470 MB of
# 14 KiB rows in the page cache) moved 0.6-1.2 GB per CPU second by the pread + numpy +
# pwrite path of 4 MiB bands this replaces, 1.7-2.5 GB by this one.
GATHER_BAND = 1024 * 1024
# The most bytes of one source mapped for one band (what peak RSS can grow by): a band of
# column slices maps the rows around them too.
GATHER_SPAN = 8 * 1024 * 1024
# Runs shorter than this go the buffered way (``iter_assembled``): per-run overhead would
# cost more than the copies saved (a transposed layout has runs of one element).
GATHER_MIN_RUN = 512


def contiguous_block(shape: tuple[int, ...], strides: tuple[int, ...]) -> tuple[int, int]:
    """Split dims into (number of outer dims, elements per contiguous inner block)."""
    block, k = 1, len(shape)
    while k > 0 and (shape[k - 1] == 1 or strides[k - 1] == block):
        block *= shape[k - 1]
        k -= 1
    return k, block


def iter_strided_bytes(info: TensorInfo, src_fd: int, chunk: int = DEFAULT_CHUNK) -> Iterator[bytes]:
    """Yield the bytes of ``info`` in C order. ``info.offset`` is the byte offset of
    element 0 in ``info.file`` and ``info.strides`` are in elements of ``stored_dtype``.
    Every chunk holds whole elements (dtype conversion relies on it).

    Views whose contiguous blocks are large (row or column slices) are read block by
    block with ``pread``. Views with tiny blocks (a transposed matrix has 1-element
    blocks) are gathered band by band with numpy from short spans of the file, so a
    transpose costs a few thousand reads, not one per element; memory stays about two
    bands of ``chunk`` bytes.
    """
    itemsize = dtype_itemsize(info.stored_dtype)
    shape, strides = info.shape, info.strides or ()
    if len(strides) != len(shape):
        raise ValueError(f"tensor {info.name!r}: {len(strides)} strides for {len(shape)} dims")
    if 0 in shape:
        return
    outer, block = contiguous_block(shape, strides)
    if block * itemsize >= LARGE_BLOCK or outer == 0:
        yield from _iter_blocks(info, src_fd, chunk, itemsize, outer, block)
        return
    for offset, band_shape in _bands(info.offset, shape, strides, itemsize, chunk):
        yield _gather(
            src_fd, str(info.file), offset, band_shape, strides[len(strides) - len(band_shape) :], itemsize
        ).tobytes()


def _iter_blocks(
    info: TensorInfo, src_fd: int, chunk: int, itemsize: int, outer: int, block: int
) -> Iterator[bytes]:
    shape, strides = info.shape, info.strides or ()
    block_bytes = block * itemsize
    piece = max(itemsize, chunk - chunk % itemsize)
    buffer = bytearray()
    name = str(info.file)
    for index in itertools.product(*(range(n) for n in shape[:outer])):
        start = info.offset + sum(i * s for i, s in zip(index, strides)) * itemsize
        for off in range(0, block_bytes, piece):
            buffer += read_exact(src_fd, start + off, min(piece, block_bytes - off), name)
            if len(buffer) >= chunk:
                yield bytes(buffer)
                buffer.clear()
    if buffer:
        yield bytes(buffer)


def _bands(
    offset: int, shape: tuple[int, ...], strides: tuple[int, ...], itemsize: int, chunk: int
) -> Iterator[tuple[int, tuple[int, ...]]]:
    """Split the view along its leading dims into pieces of at most ``chunk`` output bytes
    (or one row of the innermost dim), in C order: ``(byte offset, shape)``."""
    row = numel(shape[1:]) * itemsize
    if row > chunk and len(shape) > 1:
        for i in range(shape[0]):
            yield from _bands(offset + i * strides[0] * itemsize, shape[1:], strides[1:], itemsize, chunk)
        return
    rows = max(1, chunk // max(row, 1))
    for i in range(0, shape[0], rows):
        yield offset + i * strides[0] * itemsize, (min(rows, shape[0] - i),) + shape[1:]


def _gather(fd: int, name: str, offset: int, shape: tuple[int, ...], strides: tuple[int, ...], itemsize: int):
    """Read one band into a new C-ordered array: split it (along the dim that widens its
    file span most) until each tile's span is short or mostly used, then read each tile's
    span once and let numpy pick the elements."""
    import numpy as np
    from numpy.lib.stride_tricks import as_strided

    dtype = np.dtype(_NUMPY_BY_SIZE.get(itemsize, f"V{itemsize}"))
    out = np.empty(shape, dtype=dtype)
    tiles = [(offset, shape, out)]
    while tiles:
        off, shp, dst = tiles.pop()
        span = (sum((n - 1) * s for n, s in zip(shp, strides)) + 1) * itemsize
        used = numel(shp) * itemsize
        if span <= max(2 * used, SHORT_SPAN) or used == itemsize:
            raw = np.frombuffer(read_exact(fd, off, span, name), dtype=dtype)  # span: whole elements
            dst[...] = as_strided(
                raw, shape=shp, strides=tuple(s * itemsize for s in strides), writeable=False
            )
            continue
        d = max((k for k in range(len(shp)) if shp[k] > 1), key=lambda k: (shp[k] - 1) * strides[k])
        half = shp[d] // 2
        head = tuple(slice(None) for _ in range(d))
        tiles.append(
            (
                off + half * strides[d] * itemsize,
                shp[:d] + (shp[d] - half,) + shp[d + 1 :],
                dst[head + (slice(half, None),)],
            )
        )
        tiles.append((off, shp[:d] + (half,) + shp[d + 1 :], dst[head + (slice(0, half),)]))
    return out


def can_gather(info: TensorInfo) -> bool:
    """True when ``write_gathered`` can write ``info``: strided extents of local files,
    no dtype cast or quantization, runs of at least ``GATHER_MIN_RUN`` bytes."""
    extents = [e for e in info.extents if e.nbytes]
    return (
        info.src_dtype is None
        and info.quant is None
        and info.strides is None
        and any(not e.is_contiguous for e in extents)
        and all(e.source is not None and e.source.is_local for e in extents)
        and min(e.length for e in extents) >= GATHER_MIN_RUN
    )


def write_gathered(
    info: TensorInfo,
    reader: SourceReader,
    fd: int,
    offset: int,
    on_bytes: Callable[[int], None] | None = None,
) -> None:
    """Write the stored bytes of ``info`` into ``fd`` at ``offset``, band by band, each
    band's runs gathered by one ``pwritev`` from read-only maps of their sources.

    >>> import os, tempfile
    >>> from pathlib import Path
    >>> from reshard.tensors import Extent
    >>> from reshard.transfer.sources import FileSource
    >>> d = Path(tempfile.mkdtemp()); _ = (d / "a").write_bytes(bytes(range(256)) * 8)
    >>> a = FileSource(d / "a")  # a 2 x 1024 matrix from the two halves of each 1024-byte row
    >>> t = TensorInfo("w", "U8", (2, 1024), (Extent(a, 0, 512, 0, 2, 1024, 1024),
    ...                                       Extent(a, 512, 512, 512, 2, 1024, 1024)), 2048)
    >>> fd = os.open(d / "out", os.O_WRONLY | os.O_CREAT)
    >>> with SourceReader() as reader:
    ...     write_gathered(t, reader, fd, 0)
    >>> os.close(fd); (d / "out").read_bytes() == (d / "a").read_bytes()
    True

    Raises:
        FormatError: the extents leave a gap or overlap, or a source is shorter than
            its extents (truncated, or changed during the run).
        OSError: from the destination (ENOSPC, EDQUOT, EFBIG).
    """
    info.check_extents()
    extents = sorted((e for e in info.extents if e.nbytes), key=lambda e: e.dest)
    index: dict[ByteSource, int] = {}
    for e in extents:
        index.setdefault(e.source, len(index))
    sources = list(index)
    grid = [(index[e.source], e) for e in extents] if _is_row_grid(extents) else None
    bands = _grid_bands(grid) if grid else _run_bands(info, extents, index)
    for spans, runs in bands:
        offset += _write_band(fd, offset, spans, runs, sources, reader, on_bytes)


Band = tuple[dict[int, tuple[int, int]], list[tuple[int, int, int]]]
"""A band: each source's bytes ``[lo, hi)`` it needs, and its runs ``(source, offset,
length)`` in output order (sources by index)."""


def _is_row_grid(extents: list[Extent]) -> bool:
    """Every extent is strided with the same rows and row width and, sorted by column,
    they tile one output row exactly (a rank's column slice; a merge's rank slices)."""
    first = extents[0]
    width, rows, cursor = first.step_dest, first.rows, 0
    for e in extents:
        if e.is_contiguous or e.rows != rows or e.step_dest != width or e.dest != cursor:
            return False
        cursor += e.length
    return cursor == width and first.length <= GATHER_BAND


def _grid_bands(grid: list[tuple[int, Extent]]) -> Iterator[Band]:
    """Whole output rows per band: row ``k`` is every extent's row ``k`` in column order."""
    width, rows = grid[0][1].step_dest, grid[0][1].rows
    most_step = max(e.step_src for _, e in grid)
    per_band = max(1, min(GATHER_BAND // width, IOV_MAX // len(grid), GATHER_SPAN // most_step))
    for k0 in range(0, rows, per_band):
        k1 = min(rows, k0 + per_band)
        runs: list[tuple[int, int, int]] = [(0, 0, 0)] * ((k1 - k0) * len(grid))
        spans: dict[int, tuple[int, int]] = {}
        for column, (source, e) in enumerate(grid):
            start, step, length = e.offset + k0 * e.step_src, e.step_src, e.length
            runs[column :: len(grid)] = [(source, start + j * step, length) for j in range(k1 - k0)]
            lo, hi = start, start + (k1 - k0 - 1) * step + length
            if source in spans:
                lo, hi = min(lo, spans[source][0]), max(hi, spans[source][1])
            spans[source] = (lo, hi)
        yield spans, runs


def _run_bands(info: TensorInfo, extents: list[Extent], index: dict[ByteSource, int]) -> Iterator[Band]:
    """Any tiling: every extent's rows merged by destination, checked for gaps and
    overlaps, long runs cut, bands closed when full or when a source span grows too wide."""
    rows = [_rows(e, index[e.source]) for e in extents]
    runs: list[tuple[int, int, int]] = []
    spans: dict[int, tuple[int, int]] = {}
    band_bytes = cursor = 0
    for dest, src_offset, length, source in heapq.merge(*rows):
        if dest != cursor:
            what = "a gap" if dest > cursor else "an overlap"
            raise FormatError(
                f"tensor {info.name!r}: its pieces leave {what} at byte {min(dest, cursor)} "
                "of its stored bytes; the checkpoint metadata is inconsistent"
            )
        cursor += length
        for start in range(src_offset, src_offset + length, GATHER_BAND):
            n = min(GATHER_BAND, src_offset + length - start)
            lo, hi = spans.get(source, (start, start + n))
            lo, hi = min(lo, start), max(hi, start + n)
            if runs and (band_bytes + n > GATHER_BAND or len(runs) >= IOV_MAX or hi - lo > GATHER_SPAN):
                yield spans, runs
                runs, spans, band_bytes = [], {}, 0
                lo, hi = start, start + n
            runs.append((source, start, n))
            spans[source] = (lo, hi)
            band_bytes += n
    if runs:
        yield spans, runs
    if cursor != info.stored_nbytes:  # (check_extents makes this a bug, not bad input)
        raise FormatError(f"tensor {info.name!r}: its pieces hold {cursor} of {info.stored_nbytes} bytes")


def _rows(e: Extent, source: int) -> Iterator[tuple[int, int, int, int]]:
    for k in range(e.rows):
        yield e.dest + k * e.step_dest, e.offset + k * e.step_src, e.length, source


def _write_band(
    fd: int,
    offset: int,
    spans: dict[int, tuple[int, int]],
    runs: list[tuple[int, int, int]],
    sources: list[ByteSource],
    reader: SourceReader,
    on_bytes: Callable[[int], None] | None,
) -> int:
    """Map each source's span, ``pwritev`` the band's runs at ``offset``, unmap."""
    maps: dict[int, tuple[mmap.mmap, memoryview, int]] = {}
    views: list[memoryview] = []
    try:
        for source, (lo, hi) in spans.items():
            base = lo - lo % mmap.ALLOCATIONGRANULARITY
            try:  # mmap refuses a range past the end of the file
                m = mmap.mmap(
                    reader.fd(sources[source]),
                    hi - base,
                    flags=mmap.MAP_SHARED | _MAP_POPULATE,
                    prot=mmap.PROT_READ,
                    offset=base,
                )
            except ValueError as e:
                raise _ended_early(sources[source]) from e
            maps[source] = (m, memoryview(m), base)
        for source, start, n in runs:
            _, view, base = maps[source]
            views.append(view[start - base : start - base + n])
        try:
            written = write_views(fd, views, offset)
        except OSError as e:  # the kernel hit a mapped page past a source's new end
            if e.errno == errno.EFAULT:
                raise _ended_early(sources[next(iter(spans))]) from e
            raise
    finally:
        views.clear()  # release every slice before the maps close
        for m, view, _ in maps.values():
            view.release()
            m.close()
    if on_bytes is not None:
        on_bytes(written)
    return written


def _ended_early(source: ByteSource) -> FormatError:
    return FormatError(
        f"{source.key}: ended early while being read; the file is truncated or changed during the run"
    )


_MAP_POPULATE = getattr(mmap, "MAP_POPULATE", 0)
