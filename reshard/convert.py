"""Produce a tensor's output bytes in bounded chunks when they are not a plain byte copy:
dtype conversion while streaming (and, for ``.bin`` sources, strided views).

torch is imported here only, and only to convert, so plain copies never pay for it.
Each chunk is cast by torch's own cast kernel (``Tensor.copy_``, which ``Tensor.to`` also
runs), so results are bit for bit what ``tensor.to(dtype)`` gives on the whole tensor:
casts are elementwise, and chunks always hold whole elements.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator

from reshard.copy import read_exact
from reshard.errors import FormatError
from reshard.tensors import TensorInfo
from reshard.units import dtype_itemsize

# Source bytes per chunk: peak extra memory is about this plus its converted copy.
CONVERT_CHUNK = 16 * 1024 * 1024

SAFETENSORS_TO_TORCH = {
    "BOOL": "bool", "U8": "uint8", "I8": "int8", "I16": "int16", "U16": "uint16",
    "F16": "float16", "BF16": "bfloat16", "I32": "int32", "U32": "uint32", "F32": "float32",
    "C64": "complex64", "F64": "float64", "I64": "int64", "U64": "uint64",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
    "F8_E4M3FNUZ": "float8_e4m3fnuz", "F8_E5M2FNUZ": "float8_e5m2fnuz", "F8_E8M0": "float8_e8m0fnu",
}


def torch_dtype(name: str):
    """The torch dtype for a safetensors dtype name (``"BF16"`` -> ``torch.bfloat16``)."""
    import torch

    return getattr(torch, SAFETENSORS_TO_TORCH[name])


def iter_tensor_bytes(info: TensorInfo, src_fd: int, chunk: int = CONVERT_CHUNK) -> Iterator[bytes | memoryview]:
    """Yield the output bytes of ``info`` in order, at most about ``chunk`` source bytes
    at a time. Handles plain copies, dtype conversion and (via the ``.bin`` reader)
    strided views.

    A yielded ``memoryview`` is only valid until the next item is requested (the
    conversion buffers are reused so memory stays flat): write or compare it at once.
    """
    if info.strides is None:
        if info.src_dtype is None:
            yield from _iter_contiguous(info, src_fd, chunk)
        else:
            yield from _convert_contiguous(info, src_fd, chunk)
        return
    from reshard.strided import iter_strided_bytes

    source_chunks = iter_strided_bytes(info, src_fd, chunk)
    if info.src_dtype is None:
        yield from source_chunks
        return
    convert = _Converter(info.src_dtype, info.dtype, chunk)
    for raw in source_chunks:
        if raw:
            yield convert(raw)


class _Converter:
    """Casts whole-element chunks with torch's own cast kernel (``Tensor.copy_`` runs the
    same kernel as ``Tensor.to``, so results are bit for bit those of ``tensor.to``) into
    one reused output buffer."""

    def __init__(self, src_dtype: str, dst_dtype: str, chunk: int) -> None:
        import torch

        self.torch = torch
        self.src, self.dst = torch_dtype(src_dtype), torch_dtype(dst_dtype)
        self.src_size = dtype_itemsize(src_dtype)
        self.out = torch.empty(max(1, chunk // self.src_size), dtype=self.dst)

    def __call__(self, raw: bytes | bytearray | memoryview) -> memoryview:
        count = len(raw) // self.src_size
        if count * self.src_size != len(raw):
            raise ValueError(f"a conversion chunk of {len(raw)} bytes splits an element")
        if isinstance(raw, bytes):  # torch.frombuffer wants a writable buffer
            raw = bytearray(raw)
        if count > self.out.numel():
            self.out = self.torch.empty(count, dtype=self.dst)
        src = self.torch.frombuffer(raw, dtype=self.src, count=count) if count else None
        dst = self.out[:count]
        if src is not None:
            dst.copy_(src)
        return memoryview(dst.view(self.torch.uint8).numpy()).cast("B")


def _convert_contiguous(info: TensorInfo, src_fd: int, chunk: int) -> Iterator[memoryview]:
    """Read and cast chunk ``k + 1`` in a helper thread while the caller writes chunk ``k``.

    Two slots (a read buffer and a cast buffer each) are reused in turn: a yielded view
    stays valid until the next one is requested, which is when its slot is refilled.
    ``preadv`` and torch's cast both release the GIL, so reading, casting and the
    caller's ``pwrite`` overlap; memory stays at two slots whatever the tensor size.
    """
    from concurrent.futures import ThreadPoolExecutor

    itemsize = dtype_itemsize(info.stored_dtype)
    step = max(itemsize, chunk - chunk % itemsize)
    size = min(step, info.stored_nbytes)
    slots = [(memoryview(bytearray(size)), _Converter(info.stored_dtype, info.dtype, size))
             for _ in range(2 if info.stored_nbytes > step else 1)]
    end = info.offset + info.stored_nbytes
    starts = range(info.offset, end, step)
    name = str(info.file)

    def load(k: int) -> memoryview:
        view, convert = slots[k % len(slots)]
        n = min(step, end - starts[k])
        read_into(src_fd, view[:n], starts[k], name)
        return convert(view[:n])

    if len(starts) == 1:
        yield load(0)
        return
    with single_cast_thread(), ThreadPoolExecutor(1, thread_name_prefix="reshard-convert") as pool:
        pending = pool.submit(load, 0)
        for k in range(len(starts)):
            ready = pending.result()
            if k + 1 < len(starts):
                pending = pool.submit(load, k + 1)
            yield ready


@contextmanager
def single_cast_thread():
    """Cast on one torch thread while the pipeline runs, then restore the setting.

    The pipeline already keeps two cores busy (cast in the helper, write in the caller);
    torch's own pool on top oversubscribes them, and its spinning workers were measured
    to make the whole run about 1.8x slower on a 2-core machine (18.8 s vs 10.3 s for
    1.9 GB of fp32 -> bf16)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def read_into(fd: int, view: memoryview, offset: int, name: str) -> None:
    """``preadv`` until ``view`` is full (short reads happen on some filesystems)."""
    done = 0
    while done < len(view):
        got = os.preadv(fd, [view[done:]], offset + done)
        if got == 0:
            raise FormatError(f"{name}: ended early while being read; the file is truncated "
                              "or changed during the run")
        done += got


def _iter_contiguous(info: TensorInfo, src_fd: int, chunk: int) -> Iterator[bytes]:
    itemsize = dtype_itemsize(info.stored_dtype)
    step = max(itemsize, chunk - chunk % itemsize)  # never split an element
    end = info.offset + info.stored_nbytes
    name = str(info.file)
    for start in range(info.offset, end, step):
        yield read_exact(src_fd, start, min(step, end - start), name)


def open_source(info: TensorInfo) -> int:
    """Open a tensor's source file read-only (the source is never modified)."""
    return os.open(info.file, os.O_RDONLY)
