"""Produce a tensor's output bytes in bounded chunks when they are not a plain byte copy:
dtype conversion while streaming (and, for ``.bin`` sources, strided views), and
quantization (``TensorInfo.quant``, done by ``reshard.quant.stream`` on whole rows).

torch is imported here only, and only to convert, so plain copies never pay for it.
Each chunk is cast by torch's own cast kernel (``Tensor.copy_``, which ``Tensor.to`` also
runs), so results are bit for bit what ``tensor.to(dtype)`` gives on the whole tensor:
casts are elementwise, and chunks always hold whole elements. Two kernels also exist in
numpy, bit for bit the same (``reshard.transfer.bf16``: float32 -> bfloat16;
``reshard.quant.ggml_numpy``: Q8_0): a job of ordinary size runs them and never imports
torch, whose import costs more than the whole cast (``kernels_for`` chooses).

The CPU work (casts, and quantization in ``reshard.quant.stream``) runs on one pool of
compute threads per process (``compute_pool``), as many as ``--workers`` (default: the
CPUs this process may use, ``default_workers``). Each thread reads its own chunk of the
source, converts it and ``pwrite``s the result at its place in the shard
(``write_computed``): torch's kernels and the system calls release the GIL, so the
threads run in parallel, and the calling thread only keeps the order of the progress.
"""

from __future__ import annotations

import os
import sys
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

from reshard.errors import FormatError
from reshard.tensors import TensorInfo
from reshard.transfer.ranges import read_exact, write_all
from reshard.transfer.sources import SourceReader
from reshard.units import dtype_itemsize

# Source bytes per chunk: peak extra memory is about this plus its converted copy.
# Small on purpose: a converted chunk that is still in the CPU cache when pwrite copies
# it out was measured to cut pwrite time ~4x (2.7 GB fp32 -> bf16: 0.43 s at 4 MiB,
# 1.76 s at 16 MiB) on the 2-core bench machine.
CONVERT_CHUNK = 4 * 1024 * 1024

SAFETENSORS_TO_TORCH = {
    "BOOL": "bool",
    "U8": "uint8",
    "I8": "int8",
    "I16": "int16",
    "U16": "uint16",
    "F16": "float16",
    "BF16": "bfloat16",
    "I32": "int32",
    "U32": "uint32",
    "F32": "float32",
    "C64": "complex64",
    "F64": "float64",
    "I64": "int64",
    "U64": "uint64",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "F8_E4M3FNUZ": "float8_e4m3fnuz",
    "F8_E5M2FNUZ": "float8_e5m2fnuz",
    "F8_E8M0": "float8_e8m0fnu",
}


def _import_torch():
    """``import torch`` without its scan of installed packages for out-of-tree device
    backends (``TORCH_DEVICE_BACKEND_AUTOLOAD``; an explicit setting wins): reshard casts
    on the CPU only, and the scan was measured at 0.1-0.2 s of torch's 2.3-2.9 s import."""
    os.environ.setdefault("TORCH_DEVICE_BACKEND_AUTOLOAD", "0")
    import torch

    return torch


def torch_dtype(name: str):
    """The torch dtype for a safetensors dtype name (``"BF16"`` -> ``torch.bfloat16``)."""
    torch = _import_torch()

    return getattr(torch, SAFETENSORS_TO_TORCH[name])


def iter_tensor_bytes(
    info: TensorInfo, reader: SourceReader, chunk: int | None = None
) -> Iterator[bytes | memoryview]:
    """Yield the output bytes of ``info`` in order, at most about ``chunk`` source bytes
    at a time: its stored bytes (one range, a strided view, or assembled from several
    extents), cast to ``info.dtype`` when it differs.

    A yielded ``memoryview`` is only valid until the next item is requested (the
    conversion buffers are reused so memory stays flat): write or compare it at once.
    """
    chunk = chunk or CONVERT_CHUNK
    if info.quant is not None:  # quantize transform (issue 12): whole rows, chunk by chunk
        from reshard.quant.stream import iter_quantized_bytes

        yield from iter_quantized_bytes(info, reader, chunk)
        return
    if info.is_single_range:
        src_fd = reader.fd(info.extents[0].source)
        if info.src_dtype is None:
            yield from _iter_contiguous(info, src_fd, chunk)
        else:
            yield from _convert_contiguous(info, src_fd, chunk)
        return
    if info.strides is not None:
        from reshard.transfer.strided import iter_strided_bytes

        source_chunks = iter_strided_bytes(info, reader.fd(info.extents[0].source), chunk)
    else:
        from reshard.transfer.extents import iter_assembled

        source_chunks = iter_assembled(info, reader, chunk)
    if info.src_dtype is None:
        yield from source_chunks
        return
    convert = _Converter(info.src_dtype, info.dtype, chunk)
    carry = b""
    itemsize = dtype_itemsize(info.src_dtype)
    for raw in source_chunks:
        if carry:
            raw, carry = carry + bytes(raw), b""
        whole = len(raw) - len(raw) % itemsize
        if whole != len(raw):  # an extent boundary split an element: keep the rest
            raw, carry = raw[:whole], bytes(raw[whole:])
        if raw:
            yield convert(raw)
    if carry:
        raise FormatError(f"tensor {info.name!r}: its pieces end inside an element")


class _Converter:
    """Casts whole-element chunks with torch's own cast kernel (``Tensor.copy_`` runs the
    same kernel as ``Tensor.to``, so results are bit for bit those of ``tensor.to``) into
    one reused output buffer."""

    def __init__(self, src_dtype: str, dst_dtype: str, chunk: int) -> None:
        torch = _import_torch()

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


# -- kernel choice -----------------------------------------------------------------------

# Importing torch costs about 2 s of one core on the development machine (2.36 s by
# ``python -X importtime``); its kernels are faster per element than numpy's. Where the
# import pays for itself, per compute thread: Q8_0 of 1.13 G elements (4.5 GB of fp32)
# on one thread took the same time either way (7.4 s, torch's import included; numpy's
# kernel costs about 1.6 ns more an element), so about 1.2 G elements. A float32 ->
# bfloat16 cast is mostly memory traffic: numpy's was 2 s faster on the same 1.13 G, the
# whole import; from the kernels' rates on memory not in the cache (0.85 G elements/s
# against torch's 1.5 G) the import would pay past about 4 G. docs/distributed.md.
TORCH_FROM_QUANTIZED = 1_200_000_000
TORCH_FROM_CASTS = 4_000_000_000
# The casts numpy does (stored dtype, written dtype); the rest always use torch.
NUMPY_CASTS = frozenset({("F32", "BF16"), ("BF16", "F32")})
# RESHARD_KERNELS=numpy or torch overrides the choice (benchmarks, and a check that both
# give the same bytes); "auto", the default, chooses by size.
KERNELS_ENV = "RESHARD_KERNELS"
_kernel_setting = ["numpy"]  # set by kernels_for(); numpy where there is one


@contextmanager
def kernels_for(casts: int = 0, quantized: int = 0):
    """Within the block, cast and quantize with torch's kernels when the job casts more
    than ``TORCH_FROM_CASTS`` or quantizes more than ``TORCH_FROM_QUANTIZED`` elements per
    compute thread, else with numpy's where one exists (``NUMPY_CASTS``, Q8_0 from
    float32 or bfloat16). Process-wide, like ``compute_threads``; ``RESHARD_KERNELS``
    overrides.

    >>> with kernels_for(casts=10**6):
    ...     kernels()
    'numpy'
    >>> with kernels_for(quantized=10**12):
    ...     kernels()
    'torch'
    """
    choice = os.environ.get(KERNELS_ENV, "auto").strip().lower() or "auto"
    if choice not in ("auto", "numpy", "torch"):
        from reshard.errors import UsageError

        raise UsageError(f"{KERNELS_ENV}={choice!r}: use auto, numpy or torch")
    if choice == "auto":
        threads = max(1, _compute_setting[0] or default_workers())
        big = casts > TORCH_FROM_CASTS * threads or quantized > TORCH_FROM_QUANTIZED * threads
        choice = "torch" if big else "numpy"
    with _compute_lock:
        before = _kernel_setting[0]
        _kernel_setting[0] = choice
    try:
        yield
    finally:
        with _compute_lock:
            _kernel_setting[0] = before


def kernels() -> str:
    """``"numpy"`` or ``"torch"``: the kernels the current job prefers."""
    return _kernel_setting[0]


def numpy_casts(src_dtype: str, dst_dtype: str) -> bool:
    """Whether this job casts ``src_dtype`` to ``dst_dtype`` with numpy."""
    return kernels() == "numpy" and (src_dtype, dst_dtype) in NUMPY_CASTS


_torch_threads = threading.local()


def compute_torch():
    """torch, for a kernel about to run in the calling thread: a compute thread runs
    torch single-threaded (set once per thread, when it first uses torch), since torch's
    own pool on top of several compute threads oversubscribes the cores (see
    ``single_cast_thread``)."""
    torch = _import_torch()
    if not getattr(_torch_threads, "set", False) and threading.current_thread().name.startswith(
        "reshard-compute"
    ):
        torch.set_num_threads(1)
        _torch_threads.set = True
    return torch


# -- compute threads ---------------------------------------------------------------------

MAX_DEFAULT_WORKERS = 8  # past this, one stream's page-cache copies and writes dominate


def default_workers() -> int:
    """Compute threads when ``--workers`` is not given: the CPUs this process may run on,
    shared among the ranks torchrun started on this node (``LOCAL_WORLD_SIZE``), at most
    ``MAX_DEFAULT_WORKERS``.

    >>> 1 <= default_workers() <= MAX_DEFAULT_WORKERS
    True
    """
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        local = 1
    return max(1, min(MAX_DEFAULT_WORKERS, cpus // local))


_compute_lock = threading.Lock()
_compute_setting: list[int | None] = [None]  # set by compute_threads(); None: default_workers()
_compute_pools: dict = {}  # threads -> ThreadPoolExecutor, kept for the process


@contextmanager
def compute_threads(workers: int | None):
    """Run the casts and quantization of the block on ``workers`` threads (None: the
    default). Process-wide: ``split`` sets it around a run.

    >>> with compute_threads(3):
    ...     compute_pool()._max_workers
    3
    """
    with _compute_lock:
        before = _compute_setting[0]
        _compute_setting[0] = workers
    try:
        yield
    finally:
        with _compute_lock:
            _compute_setting[0] = before


def compute_pool():
    """The process's pool of compute threads for the current setting (created once)."""
    from concurrent.futures import ThreadPoolExecutor

    with _compute_lock:
        n = max(1, _compute_setting[0] or default_workers())
        pool = _compute_pools.get(n)
        if pool is None:
            # each thread limits torch to one thread of its own when it first uses it
            # (compute_torch): a pool that only runs numpy's kernels never imports torch
            pool = _compute_pools[n] = ThreadPoolExecutor(n, thread_name_prefix="reshard-compute")
        return pool


def run_ordered(tasks: Iterable[Callable[[], object]]) -> Iterator[object]:
    """Run ``tasks`` on the compute threads, a few per thread in flight, and yield their
    results in order. On an error, or when the caller stops early, the tasks not started
    are cancelled and the running ones are waited for (none outlives the call: they write
    into files the caller may close or remove).

    >>> list(run_ordered(lambda k=k: k * k for k in range(5)))
    [0, 1, 4, 9, 16]
    """
    from concurrent.futures import wait

    pool = compute_pool()
    depth = 2 * pool._max_workers
    pending: deque = deque()
    try:
        for task in tasks:
            pending.append(pool.submit(task))
            if len(pending) >= depth:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        for f in pending:
            f.cancel()
        wait(pending)


def write_computed(
    info: TensorInfo, reader: SourceReader, fd: int, offset: int, advance: Callable[[int], None]
) -> bool:
    """Write ``info``'s output bytes at ``offset`` of ``fd`` from the compute threads, when
    they are computed (a cast or a quantization) from source bytes the threads can read
    themselves; ``advance(n)`` is called in order as they land. False, writing nothing,
    for the other layouts (the caller then writes ``iter_tensor_bytes``).
    """
    if info.quant is not None:
        from reshard.quant.stream import write_quantized

        return write_quantized(info, reader, fd, offset, advance)
    if info.src_dtype is None or not info.is_single_range:
        return False
    for n in run_ordered(_cast_tasks(info, reader, fd, offset)):
        advance(n)  # type: ignore[arg-type]
    return True


def _cast_tasks(info: TensorInfo, reader: SourceReader, fd: int, offset: int):
    """One task per ``CONVERT_CHUNK`` of source: map, cast into the thread's buffer, pwrite
    (torch's kernel); or numpy's kernel on cache-sized pieces, each read, cast, written."""
    itemsize = dtype_itemsize(info.stored_dtype)
    out_size = dtype_itemsize(info.dtype)
    step = max(itemsize, CONVERT_CHUNK - CONVERT_CHUNK % itemsize)
    start, end = info.offset, info.offset + info.stored_nbytes
    src_fd = reader.fd(info.extents[0].source)
    cast = _MappedCast(src_fd, info.stored_dtype, info.dtype, str(info.file), end)
    count = min(step, info.stored_nbytes) // itemsize

    def task(at: int, nbytes: int, dest: int) -> int:
        if cast.numpy:  # measured 10-25% faster than mapping the chunk (docs/distributed.md)
            return _numpy_cast_by_pieces(cast, at, nbytes, fd, dest)
        out = _output_buffers(info.dtype, count, 1)[0]
        data = cast(at, nbytes, out)
        write_all(fd, data, dest)
        return len(data)

    for at in range(start, end, step):
        nbytes = min(step, end - at)
        yield lambda at=at, nbytes=nbytes: task(at, nbytes, offset + (at - start) // itemsize * out_size)


def _convert_contiguous(info: TensorInfo, src_fd: int, chunk: int) -> Iterator[memoryview]:
    """Cast chunk ``k + 1`` in a helper thread while the caller writes chunk ``k``.

    Each source chunk is mapped (``mmap``, populated up front) rather than read, so the
    page-cache bytes are cast in place with no ``pread`` copy, and unmapped as soon as it
    is cast, so memory stays bounded whatever the tensor size. The casts land in two
    output buffers reused in turn (and across tensors): a yielded view stays valid until
    the next one is requested, which is when its buffer is refilled. Torch's cast
    releases the GIL, so casting and the caller's ``pwrite`` overlap.
    """
    from concurrent.futures import ThreadPoolExecutor

    itemsize = dtype_itemsize(info.stored_dtype)
    step = max(itemsize, chunk - chunk % itemsize)
    end = info.offset + info.stored_nbytes
    starts = range(info.offset, end, step)
    outs = _output_buffers(info.dtype, min(step, info.stored_nbytes) // itemsize, 2 if len(starts) > 1 else 1)
    cast = _MappedCast(src_fd, info.stored_dtype, info.dtype, str(info.file), end)

    def load(k: int) -> memoryview:
        return cast(starts[k], min(step, end - starts[k]), outs[k % len(outs)])

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


# Reused across tensors: fresh buffers per tensor cost a zero-fill and page faults each.
# One set per thread: ``--workers N`` writes shards from several threads at once.
_THREAD_BUFFERS = threading.local()


def _output_buffers(dtype: str, count: int, slots: int) -> list:
    """``slots`` reusable byte buffers (numpy ``uint8``) for ``count`` elements of ``dtype``
    each, kept per thread (the torch kernel views them as torch tensors, no copy)."""
    import numpy as np

    if not hasattr(_THREAD_BUFFERS, "by_dtype"):
        _THREAD_BUFFERS.by_dtype = {}
    _OUTPUT_BUFFERS = _THREAD_BUFFERS.by_dtype
    size = count * dtype_itemsize(dtype)
    kept = _OUTPUT_BUFFERS.get(dtype, [])
    if len(kept) < slots or kept[0].shape[0] < size:
        size = max([size] + [b.shape[0] for b in kept])
        kept = [np.empty(size, np.uint8) for _ in range(max(slots, len(kept)))]
        _OUTPUT_BUFFERS.clear()  # one dtype at a time: memory stays at two buffers
        _OUTPUT_BUFFERS[dtype] = kept
    return kept[:slots]


# numpy's passes run over this many elements at a time, so each stays in the CPU cache
# (a 4 MiB chunk and its scratch would not).
NUMPY_PIECE = 256 * 1024


class _MappedCast:
    """Map a source byte range read-only, cast it into ``out`` (a byte buffer from
    ``_output_buffers``) with numpy where ``numpy_casts`` says so, else torch, unmap it."""

    def __init__(self, fd: int, src_dtype: str, dst_dtype: str, name: str, end: int) -> None:
        self.fd, self.name, self.end = fd, name, end
        self.src_dtype, self.dst_dtype = src_dtype, dst_dtype
        self.numpy = numpy_casts(src_dtype, dst_dtype)
        if not self.numpy:
            compute_torch()  # imported now, so that single_cast_thread() sees it
        self.src_size, self.dst_size = dtype_itemsize(src_dtype), dtype_itemsize(dst_dtype)
        self.file_size = os.fstat(fd).st_size

    def __call__(self, start: int, nbytes: int, out) -> memoryview:
        import mmap

        if start + nbytes > self.file_size:
            raise FormatError(
                f"{self.name}: ended early while being read; the file is truncated or changed during the run"
            )
        count = nbytes // self.src_size
        base = start - start % mmap.ALLOCATIONGRANULARITY
        m = mmap.mmap(
            self.fd,
            nbytes + start - base,
            flags=mmap.MAP_SHARED | _MAP_POPULATE,
            prot=mmap.PROT_READ,
            offset=base,
        )
        try:
            if self.numpy:
                self._numpy_cast(m, start - base, count, out)
            else:
                self._torch_cast(m, start - base, count, out)
        finally:
            m.close()  # the casts hold no view of the mapping past this point
        return memoryview(out[: count * self.dst_size]).cast("B")

    def _numpy_cast(self, m, at: int, count: int, out) -> None:
        import numpy as np

        from reshard.transfer.bf16 import cast

        scratch = _numpy_scratch(min(count, NUMPY_PIECE))
        for first in range(0, count, NUMPY_PIECE):
            n = min(NUMPY_PIECE, count - first)
            src = np.frombuffer(m, dtype=np.uint8, count=n * self.src_size, offset=at + self.src_size * first)
            dst = out[first * self.dst_size : (first + n) * self.dst_size]
            cast(self.src_dtype, self.dst_dtype, src, dst, scratch)
            del src

    def _torch_cast(self, m, at: int, count: int, out) -> None:
        import warnings

        torch = compute_torch()
        with warnings.catch_warnings():
            # read-only buffer: torch warns it may not write to it; we never do
            warnings.simplefilter("ignore", UserWarning)
            src = torch.frombuffer(m, dtype=torch_dtype(self.src_dtype), count=count, offset=at)
        dst = torch.from_numpy(out[: count * self.dst_size]).view(torch_dtype(self.dst_dtype))
        dst.copy_(src)
        del src, dst


def _numpy_cast_by_pieces(cast: _MappedCast, at: int, nbytes: int, fd: int, dest: int) -> int:
    """``cast``'s numpy cast of source bytes ``at:at + nbytes`` into ``fd`` at ``dest``, one
    ``NUMPY_PIECE`` at a time: ``pread`` into this thread's buffer, cast, ``pwrite``, so
    every pass and both copies stay in the CPU cache. Returns the bytes written."""
    import numpy as np

    from reshard.transfer.bf16 import cast as numpy_cast

    count = nbytes // cast.src_size
    piece = max(1, min(NUMPY_PIECE, count))
    scratch = _numpy_scratch(3 * piece)  # source bytes, scratch, output: one array
    src_buf, work, out_buf = scratch[:piece], scratch[piece : 2 * piece], scratch[2 * piece : 3 * piece]
    written = 0
    for first in range(0, count, piece):
        n = min(piece, count - first)
        src = src_buf.view(np.uint8)[: n * cast.src_size]
        out = out_buf.view(np.uint8)[: n * cast.dst_size]
        read_into(cast.fd, memoryview(src), at + cast.src_size * first, cast.name)
        numpy_cast(cast.src_dtype, cast.dst_dtype, src, out, work)
        write_all(fd, memoryview(out), dest + written)
        written += out.shape[0]
    return written


def _numpy_scratch(count: int):
    """This thread's ``uint32`` scratch for ``reshard.transfer.bf16``, at least ``count`` long."""
    import numpy as np

    scratch = getattr(_THREAD_BUFFERS, "scratch", None)
    if scratch is None or scratch.shape[0] < count:
        scratch = _THREAD_BUFFERS.scratch = np.empty(count, np.uint32)
    return scratch


_MAP_POPULATE = getattr(__import__("mmap"), "MAP_POPULATE", 0)


@contextmanager
def single_cast_thread():
    """Cast on one torch thread while the pipeline runs, then restore the setting.

    The pipeline already keeps two cores busy (cast in the helper, write in the caller);
    torch's own pool on top oversubscribes them, and its spinning workers were measured
    to make the whole run about 1.8x slower on a 2-core machine (18.8 s vs 10.3 s for
    1.9 GB of fp32 -> bf16). Nothing to do where torch is not imported (numpy's kernels
    are single-threaded)."""
    torch = sys.modules.get("torch")
    if torch is None:
        yield
        return
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
            raise FormatError(
                f"{name}: ended early while being read; the file is truncated or changed during the run"
            )
        done += got


def _iter_contiguous(info: TensorInfo, src_fd: int, chunk: int) -> Iterator[bytes]:
    itemsize = dtype_itemsize(info.stored_dtype)
    step = max(itemsize, chunk - chunk % itemsize)  # never split an element
    end = info.offset + info.stored_nbytes
    name = str(info.file)
    for start in range(info.offset, end, step):
        yield read_exact(src_fd, start, min(step, end - start), name)
