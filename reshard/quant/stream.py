"""The quantize transform the writer applies chunk by chunk (``TensorInfo.quant``).

The source tensor's stored bytes (its own extents and permutations) are read in bands of
whole units (one row for GGUF blocks, 128 rows for FP8), cast to float32 and quantized
band by band. Memory is a few bands plus their quantized copies, whatever the tensor's
size: a 500 MB embedding goes through in pieces of about a megabyte.

Speed: bands are small (``BAND_ELEMENTS``, ~1 MiB of float32) so the kernel's passes
over a band stay in the CPU cache, and every scratch tensor is reused (``Workspace``, one
per thread). The split writes with ``write_quantized``: every band is one task on the
process's compute threads (``reshard.transfer.cast.compute_pool``, ``--workers`` of
them), which reads the band's source bytes itself (``pread``), quantizes it and
``pwrite``s the result at its place in the shard. Torch's kernels and the system calls
release the GIL, so the threads run in parallel; each runs torch single-threaded, since
torch's own pool on top oversubscribes the cores. Measured in docs/quantize.md. Q8_0 from
float32 or bfloat16 also has a numpy kernel (``reshard.quant.ggml_numpy``, the same bytes),
which jobs of ordinary size use so that they never import torch
(``reshard.transfer.cast.kernels_for``).

``FP8_SCALE_INV`` is a derived tensor: the scales of the FP8 weight it belongs to. The
weight's pass leaves them in a small memo that the scale tensor's pass takes; when it is
not there (``--resume`` kept the weight's shard, or another order), they are recomputed
from the same source bytes.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import replace
from typing import Any, cast

from reshard.errors import FormatError
from reshard.quant import UNIT_ROWS
from reshard.tensors import TensorInfo
from reshard.transfer.sources import SourceReader
from reshard.units import dtype_itemsize

BAND_ELEMENTS = 256 * 1024  # ~1 MiB of float32 per band: the kernel's passes stay in cache

# weight scales computed while quantizing an FP8 weight, taken by its weight_scale_inv
_FP8_SCALES: OrderedDict = OrderedDict()
_FP8_SCALES_KEPT = 16


def stored_source(info: TensorInfo) -> TensorInfo:
    """The descriptor of ``info``'s stored tensor as it is stored (no cast, no quantization)."""
    assert info.quant is not None
    shape = info.quant.source_shape
    return replace(
        info,
        dtype=info.stored_dtype,
        shape=shape,
        nbytes=_prod(shape) * dtype_itemsize(info.stored_dtype),
        quant=None,
        src_dtype=None,
    )


def float_source(info: TensorInfo) -> TensorInfo:
    """The descriptor of ``info``'s stored tensor read as float32 (no quantization)."""
    src = stored_source(info)
    stored = src.dtype
    return replace(
        src, dtype="F32", nbytes=4 * _prod(src.shape), src_dtype=None if stored == "F32" else stored
    )


def _prod(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _grid(info: TensorInfo, chunk: int) -> tuple[int, int, int]:
    """(rows, cols, rows per band) of ``info``'s source as a matrix."""
    shape = info.quant.source_shape
    rows, cols = (1, shape[0]) if len(shape) == 1 else (shape[0], _prod(shape[1:]))
    unit = UNIT_ROWS[info.quant.kind]
    elements = min(BAND_ELEMENTS, max(1, chunk // dtype_itemsize(info.stored_dtype)))
    return rows, cols, max(unit, elements // max(1, cols) // unit * unit)


def _iter_raw_bands(info: TensorInfo, reader: SourceReader, band_rows: int, buffers: list[bytearray]):
    """Yield ``(first_row, rows, buffer)``: each band's stored bytes read into the next of
    ``buffers`` in turn (a buffer is refilled ``len(buffers)`` bands later)."""
    from reshard.transfer.cast import iter_tensor_bytes, read_into

    raw = stored_source(info)
    rows = _grid(info, 1)[0]
    row_bytes = raw.nbytes // rows
    band_bytes = band_rows * row_bytes
    if raw.is_single_range and raw.strides is None:
        fd, name = reader.fd(raw.extents[0].source), str(raw.file)
        for k, first in enumerate(range(0, rows, band_rows)):
            n = min(band_rows, rows - first)
            buf = buffers[k % len(buffers)]
            read_into(fd, memoryview(buf)[: n * row_bytes], raw.offset + first * row_bytes, name)
            yield first, n, buf
        return
    k, first, fill = 0, 0, 0
    buf = buffers[0]
    for piece in iter_tensor_bytes(raw, reader, band_bytes):
        view = memoryview(piece).cast("B")
        while len(view):
            take = min(len(view), band_bytes - fill)
            buf[fill : fill + take] = view[:take]
            fill, view = fill + take, view[take:]
            if fill == band_bytes:
                yield first, band_rows, buf
                k, first, fill = k + 1, first + band_rows, 0
                buf = buffers[k % len(buffers)]
    if fill:
        if fill % row_bytes:
            raise FormatError(f"tensor {info.name!r}: its bytes end inside a row")
        yield first, fill // row_bytes, buf
        first += fill // row_bytes
    if first != rows:
        raise FormatError(f"tensor {info.name!r}: read {first} rows, expected {rows}")


def _as_float(buf: bytearray, stored: str, rows: int, cols: int, ws):
    """The band in ``buf`` as a float32 [rows, cols] tensor (cast into ``ws``)."""
    import torch

    from reshard.transfer.cast import torch_dtype

    n = rows * cols
    src = torch.frombuffer(buf, dtype=torch_dtype(stored), count=n)
    if stored == "F32":
        return src.view(rows, cols)
    out = ws.get("src", n, torch.float32)
    out.copy_(src)
    return out.view(rows, cols)


def iter_float_bands(info: TensorInfo, reader: SourceReader, chunk: int):
    """Yield ``(first_row, float32 tensor [rows, cols])`` bands of ``info``'s stored
    tensor, each a whole number of ``UNIT_ROWS[kind]`` rows (the last may be short). A
    band is only valid until the next one is requested."""
    from reshard.quant.ggml import Workspace

    rows, cols, band_rows = _grid(info, chunk)
    buffers = [bytearray(band_rows * cols * dtype_itemsize(info.stored_dtype))]
    ws = Workspace()
    for first, n, buf in _iter_raw_bands(info, reader, band_rows, buffers):
        yield first, _as_float(buf, info.stored_dtype, n, cols, ws)


def _scale_key(info: TensorInfo) -> tuple:
    """Which weight's scales: its name and where its bytes are, with the file's size and
    modification time for a local file (so a file rewritten in place between two runs
    in one process never hands over stale scales)."""
    import os

    e = info.extents[0]
    name = info.name[: -len("_scale_inv")] if info.quant.kind == "FP8_SCALE_INV" else info.name
    path = getattr(e.source, "path", None)
    stamp = None
    if path is not None:
        st = os.stat(path)
        stamp = (st.st_size, st.st_mtime_ns, st.st_ino)
    return (name, getattr(e.source, "key", None), e.offset, stamp)


class _Bands:
    """How a quantized tensor is cut into bands, and how a compute thread reads, quantizes
    and writes one (``band(first, rows)`` returns its output bytes; ``offset_of(first)``
    is where they go)."""

    def __init__(self, info: TensorInfo, chunk: int) -> None:
        self.info, self.kind = info, info.quant.kind
        self.rows, self.cols, self.band_rows = _grid(info, chunk)
        self.stored = info.stored_dtype
        self.row_bytes = self.cols * dtype_itemsize(self.stored)

    def starts(self) -> range:
        return range(0, self.rows, self.band_rows)

    def count(self, first: int) -> int:
        return min(self.band_rows, self.rows - first)

    def offset_of(self, first: int) -> int:
        """Output bytes before row ``first`` (a band boundary)."""
        from reshard.quant import quantized_nbytes

        return quantized_nbytes(self.kind, (first, self.cols))

    @property
    def uses_numpy(self) -> bool:
        """Whether the bands go through numpy's Q8_0 kernel (no torch)."""
        from reshard.transfer.cast import kernels

        return self.kind == "Q8_0" and self.stored in ("F32", "BF16") and kernels() == "numpy"

    def quantize(self, buf, n: int, scratch: _Scratch):
        """``(output uint8 array or tensor, FP8 scales or None)`` of the band in ``buf``."""
        if self.uses_numpy:
            return self._quantize_numpy(buf, n, scratch.numpy), None
        from reshard.transfer.cast import compute_torch

        torch = compute_torch()
        ws = scratch.torch

        from reshard.quant.fp8 import fp8_scales, quantize_fp8_block
        from reshard.quant.ggml import QUANTIZERS

        if self.kind in QUANTIZERS:  # they cast to float32 into their own scratch
            from reshard.transfer.cast import torch_dtype

            band = torch.frombuffer(buf, dtype=torch_dtype(self.stored), count=n * self.cols)
            return QUANTIZERS[self.kind](band.view(n, self.cols), ws), None
        band = _as_float(buf, self.stored, n, self.cols, ws)
        if self.kind == "FP8":
            q, s = quantize_fp8_block(band, ws=ws)
            return q.view(torch.uint8), s
        return fp8_scales(band, ws), None

    def _quantize_numpy(self, buf, n: int, ws):
        import numpy as np

        from reshard.quant.ggml_numpy import quantize_q8_0
        from reshard.transfer.bf16 import bf16_to_f32

        count = n * self.cols
        if self.stored == "F32":
            x = np.frombuffer(buf, dtype=np.float32, count=count)
        else:
            x = bf16_to_f32(
                np.frombuffer(buf, dtype=np.uint16, count=count), ws.get("src", count, np.float32)
            )
        return quantize_q8_0(x.reshape(n, self.cols), ws)


class _Scratch:
    """One thread's reused scratch: numpy's workspace, and torch's, made on first use
    (making it imports torch)."""

    def __init__(self) -> None:
        from reshard.quant.ggml_numpy import NumpyWorkspace

        self.numpy = NumpyWorkspace()
        self._torch: Any = None  # reshard.quant.ggml.Workspace, made on first use

    @property
    def torch(self):
        if self._torch is None:
            from reshard.quant.ggml import Workspace

            self._torch = Workspace()
        return self._torch


def _check_kind(kind: str) -> None:
    from reshard.quant import GGML_BLOCKS

    if kind not in GGML_BLOCKS and kind not in ("FP8", "FP8_SCALE_INV"):
        raise ValueError(f"unknown quantization kind {kind!r}")


def _kept_scales(info: TensorInfo):
    """The scales an FP8 weight's pass left for this ``weight_scale_inv``, or None."""
    kept = _FP8_SCALES.pop(_scale_key(info), None)
    if kept is not None and tuple(kept.shape) == tuple(info.shape):
        return kept
    return None


def _keep_scales(info: TensorInfo, band_scales: list) -> None:
    if info.quant.kind == "FP8" and band_scales:
        import torch

        _FP8_SCALES[_scale_key(info)] = torch.cat(band_scales)
        while len(_FP8_SCALES) > _FP8_SCALES_KEPT:
            _FP8_SCALES.popitem(last=False)


def _as_bytes(t) -> memoryview:
    """The bytes of a numpy array or a torch tensor, as a flat byte view."""
    import numpy as np

    if isinstance(t, np.ndarray):
        return memoryview(np.ascontiguousarray(t)).cast("B")  # type: ignore[arg-type]
    import torch

    return memoryview(t.contiguous().view(torch.uint8).numpy().data).cast("B")


# Per compute thread: its scratch tensors and its band buffer, reused from band to band
# (a thread finishes a band, written out, before it starts the next).
_THREAD_STATE = threading.local()


def _thread_state(nbytes: int) -> tuple[_Scratch, bytearray]:
    if not hasattr(_THREAD_STATE, "ws"):
        _THREAD_STATE.ws, _THREAD_STATE.buf = _Scratch(), bytearray()
    if len(_THREAD_STATE.buf) < nbytes:
        _THREAD_STATE.buf = bytearray(nbytes)
    return _THREAD_STATE.ws, _THREAD_STATE.buf


def _source_pieces(info: TensorInfo, reader: SourceReader):
    """The stored bytes as ``(dest, fd, source offset, length, name)`` pieces sorted by
    ``dest``, tiling them exactly (a strided extent, such as a permuted q/k row group, is
    cut into its rows), or None when a compute thread cannot read them by ``pread``
    (a strided view of a ``.bin`` tensor: read in order instead). The descriptors are
    resolved to file descriptors here, in the calling thread."""
    raw = stored_source(info)
    if raw.strides is not None:
        return None
    pieces = []
    for e in raw.extents:
        fd, name = reader.fd(e.source), e.source.key
        if e.is_contiguous:
            pieces.append((e.dest, fd, e.offset, e.nbytes, name))
        else:
            pieces.extend((d, fd, o, n, name) for o, d, n in e.row_ranges())
    pieces.sort()
    at = 0
    for dest, _, _, length, _ in pieces:
        if dest != at:
            return None  # a gap or an overlap: the ordered reader reports it
        at += length
    return pieces if at == raw.nbytes else None


def _read_band(pieces, dests: list[int], view: memoryview, start: int) -> None:
    """Fill ``view`` with stored bytes ``start:start + len(view)`` by ``pread``."""
    from bisect import bisect_right

    from reshard.transfer.cast import read_into

    end = start + len(view)
    k = bisect_right(dests, start) - 1
    while start < end:
        dest, fd, offset, length, name = pieces[k]
        take = min(end, dest + length) - start
        at = start - (end - len(view))
        read_into(fd, view[at : at + take], offset + start - dest, name)
        start += take
        k += 1


def write_quantized(info: TensorInfo, reader: SourceReader, fd: int, offset: int, advance) -> bool:
    """Quantize ``info`` band by band on the compute threads (``reshard.transfer.cast``),
    each thread reading its band from the source and ``pwrite``-ing its output at
    ``offset`` + its place in ``fd``; ``advance(n)`` is called in order. False (nothing
    written) for a source only readable in order (the caller then writes
    ``iter_quantized_bytes``)."""
    from reshard.transfer.cast import CONVERT_CHUNK, run_ordered, write_all

    _check_kind(info.quant.kind)
    if info.quant.kind == "FP8_SCALE_INV":
        kept = _kept_scales(info)
        if kept is not None:
            write_all(fd, _as_bytes(kept), offset)
            advance(info.nbytes)
            return True
    pieces = _source_pieces(info, reader)
    if pieces is None:
        return False
    bands = _Bands(info, CONVERT_CHUNK)  # the chunk iter_tensor_bytes would use
    dests = [p[0] for p in pieces]

    def task(first: int) -> tuple[int, object]:
        n = bands.count(first)
        ws, buf = _thread_state(bands.band_rows * bands.row_bytes)
        start, nbytes = first * bands.row_bytes, n * bands.row_bytes
        # pread, not a mapping: mapping each band (as reshard.transfer.cast does for casts)
        # was measured no faster here (1.4 GB, 2 threads, shared machine)
        _read_band(pieces, dests, memoryview(buf)[:nbytes], start)
        out, scales = bands.quantize(buf, n, ws)
        data = _as_bytes(out)
        write_all(fd, data, offset + bands.offset_of(first))
        return len(data), scales

    band_scales = []
    for done in run_ordered(lambda f=f: task(f) for f in bands.starts()):  # type: ignore[misc]
        written, band_scale = cast(tuple, done)
        advance(written)
        if band_scale is not None:
            band_scales.append(band_scale)
    _keep_scales(info, band_scales)
    return True


def iter_quantized_bytes(info: TensorInfo, reader: SourceReader, chunk: int) -> Iterator[memoryview]:
    """Yield the written bytes of a quantized tensor, band by band, computed in the
    calling thread (each view valid until the next is requested). The split writes with
    ``write_quantized``; this serves the rest (``--resume`` checks, strided sources)."""
    from reshard.transfer.cast import compute_torch, single_cast_thread

    _check_kind(info.quant.kind)
    if info.quant.kind == "FP8_SCALE_INV":
        kept = _kept_scales(info)
        if kept is not None:
            yield _as_bytes(kept)
            return
    bands = _Bands(info, chunk)
    scratch = _Scratch()
    buffers = [bytearray(bands.band_rows * bands.row_bytes)]
    band_scales = []
    if not bands.uses_numpy:
        compute_torch()  # imported before single_cast_thread() looks for it
    with single_cast_thread():
        for _, n, buf in _iter_raw_bands(info, reader, bands.band_rows, buffers):
            out, scales = bands.quantize(buf, n, scratch)
            if scales is not None:
                band_scales.append(scales)
            yield _as_bytes(out)
    _keep_scales(info, band_scales)
