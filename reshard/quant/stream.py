"""The quantize transform the writer applies chunk by chunk (``TensorInfo.quant``).

The source tensor's stored bytes (its own extents and permutations) are read in bands of
whole units (one row for GGUF blocks, 128 rows for FP8), cast to float32 and quantized
band by band. Memory is a few bands plus their quantized copies, whatever the tensor's
size: a 500 MB embedding goes through in pieces of about a megabyte.

Speed: bands are small (``BAND_ELEMENTS``, ~1 MiB of float32) so the kernel's passes
over a band stay in the CPU cache, every scratch tensor is reused (``Workspace``), and two
worker threads quantize consecutive bands while the caller writes the previous one (torch
releases the GIL inside its kernels; each worker runs torch single-threaded, as
``reshard.transfer.cast`` does, since torch's own pool on top oversubscribes the cores).

``FP8_SCALE_INV`` is a derived tensor: the scales of the FP8 weight it belongs to. The
weight's pass leaves them in a small memo that the scale tensor's pass takes; when it is
not there (``--resume`` kept the weight's shard, or another order), they are recomputed
from the same source bytes.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Iterator
from dataclasses import replace

from reshard.errors import FormatError
from reshard.quant import UNIT_ROWS
from reshard.tensors import TensorInfo
from reshard.transfer.sources import SourceReader
from reshard.units import dtype_itemsize

BAND_ELEMENTS = 256 * 1024  # ~1 MiB of float32 per band: the kernel's passes stay in cache
WORKERS = 2  # threads quantizing bands (the machine the bench runs on has 2 cores)
SLOTS = WORKERS + 1  # bands in flight: one being written while the workers fill the others

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


def iter_quantized_bytes(info: TensorInfo, reader: SourceReader, chunk: int) -> Iterator[memoryview]:
    """Yield the written bytes of a quantized tensor, band by band (each view valid until
    the next is requested)."""
    import torch

    from reshard.quant.fp8 import fp8_scales, quantize_fp8_block
    from reshard.quant.ggml import QUANTIZERS, Workspace
    from reshard.transfer.cast import single_cast_thread

    assert info.quant is not None
    kind = info.quant.kind
    if kind == "FP8_SCALE_INV":
        kept = _FP8_SCALES.pop(_scale_key(info), None)
        if kept is not None and tuple(kept.shape) == tuple(info.shape):
            yield memoryview(kept.contiguous().view(torch.uint8).numpy().data).cast("B")
            return
    if kind not in QUANTIZERS and kind not in ("FP8", "FP8_SCALE_INV"):
        raise ValueError(f"unknown quantization kind {kind!r}")
    rows, cols, band_rows = _grid(info, chunk)
    stored = info.stored_dtype
    scales: list = []

    def work(slot: int, n: int) -> memoryview:
        ws = workspaces[slot]
        band = _as_float(buffers[slot], stored, n, cols, ws)
        if kind in QUANTIZERS:
            out = QUANTIZERS[kind](band, ws)
        elif kind == "FP8":
            q, s = quantize_fp8_block(band, ws=ws)
            out = q.view(torch.uint8)
            scales.append((slot, s))
        else:
            out = fp8_scales(band, ws)
        return memoryview(out.contiguous().view(torch.uint8).numpy().data).cast("B")

    n_bands = -(-rows // band_rows)
    slots = min(SLOTS, n_bands)
    buffers = [bytearray(band_rows * cols * dtype_itemsize(stored)) for _ in range(slots)]
    workspaces = [Workspace() for _ in range(slots)]
    band_scales: list = []  # FP8: each band's scales, in order
    raw = _iter_raw_bands(info, reader, band_rows, buffers)
    with single_cast_thread():
        if slots == 1:
            for _, n, _buf in raw:
                yield work(0, n)
                band_scales.extend(s for _, s in scales)
                scales.clear()
        else:
            from concurrent.futures import ThreadPoolExecutor

            # torch.set_num_threads is per thread for its OpenMP pool: each worker sets its own
            with ThreadPoolExecutor(
                WORKERS,
                thread_name_prefix="reshard-quantize",
                initializer=torch.set_num_threads,
                initargs=(1,),
            ) as pool:
                pending: deque = deque()
                for submitted in range(slots):
                    _, n, _buf = next(raw)
                    pending.append(pool.submit(work, submitted, n))
                submitted, done = slots, 0
                while pending:
                    yield pending.popleft().result()
                    if kind == "FP8":
                        band_scales.append(_take_scale(scales, done % slots))
                    done += 1
                    if submitted < n_bands:  # refill the slot just written out
                        _, n, _buf = next(raw)
                        pending.append(pool.submit(work, submitted % slots, n))
                        submitted += 1
    if kind == "FP8" and band_scales:
        _FP8_SCALES[_scale_key(info)] = torch.cat(band_scales)
        while len(_FP8_SCALES) > _FP8_SCALES_KEPT:
            _FP8_SCALES.popitem(last=False)


def _take_scale(scales: list, slot: int):
    for i, (s_slot, s) in enumerate(scales):
        if s_slot == slot:
            del scales[i]
            return s
    raise RuntimeError("an FP8 band's scales went missing")
