"""Read and write safetensors headers, strictly, without touching tensor data.

Layout: an 8-byte little-endian header length ``N``, ``N`` bytes of JSON, then the data
buffer. Every check the reference reader makes is made here first, so a bad file fails
with a message naming it, and nothing is allocated in proportion to a number read from
the file before that number is checked against the file's real size.

>>> header = build_header({"format": "pt"}, [("w", "F32", (2,), 8)], pad_to=8)
>>> len(header) % 8, header[8:9]
(0, b'{')
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from reshard.errors import FormatError
from reshard.tensors import TensorInfo
from reshard.units import DTYPE_SIZES, dtype_itemsize, dtype_nbytes

# The reference reader refuses headers above 100 MB; so do we, before reading them.
MAX_HEADER_BYTES = 100_000_000


@dataclass(frozen=True)
class SafetensorsHeader:
    """A parsed, validated header.

    Attributes:
        path: the file.
        data_start: absolute offset of the data buffer (8 + header length).
        metadata: the ``__metadata__`` map (empty when absent).
        tensors: descriptors in data-offset order.
    """

    path: Path
    data_start: int
    metadata: dict[str, str]
    tensors: tuple[TensorInfo, ...]


def read_header(path: Path) -> SafetensorsHeader:
    """Read and validate the header of a safetensors file.

    Raises:
        FormatError: naming the file and what is wrong (truncated, bad JSON, unknown
            dtype, offsets that overlap or leave gaps, shape/size mismatch, ...).
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            file_size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            if len(head) < 8:
                raise FormatError(
                    f"{path}: truncated: {file_size} bytes is too short for a "
                    "safetensors file; re-download or re-export it"
                )
            (header_len,) = struct.unpack("<Q", head)
            if header_len > MAX_HEADER_BYTES:
                raise FormatError(
                    f"{path}: header length {header_len} is over the 100 MB limit; "
                    "the file is corrupt or not safetensors"
                )
            if 8 + header_len > file_size:
                raise FormatError(
                    f"{path}: header length {header_len} runs past the end of the "
                    f"file ({file_size} bytes): the file is truncated; re-download it"
                )
            raw = f.read(header_len)
    except OSError as e:
        raise FormatError(f"{path}: cannot read: {e.strerror or e}") from e
    return parse_header(path, raw, file_size)


def parse_header(path: Path, raw: bytes, file_size: int | None) -> SafetensorsHeader:
    """Validate header JSON bytes. ``file_size=None`` skips the data-length check
    (remote headers, where only the header was fetched)."""
    try:
        obj = json.loads(raw.decode("utf-8"))
    # ValueError also covers integers over Python's 4300-digit parsing limit.
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise FormatError(
            f"{path}: header is not valid JSON ({e.__class__.__name__}); "
            "the file is corrupt or not safetensors"
        ) from e
    if not isinstance(obj, dict):
        raise FormatError(f"{path}: header must be a JSON object; the file is corrupt")
    metadata = _parse_metadata(path, obj.pop("__metadata__", None))
    data_start = 8 + len(raw)
    entries = []
    for name, entry in obj.items():
        entries.append(_parse_entry(path, name, entry, data_start))
    entries.sort(key=lambda t: (t.offset, t.nbytes))
    _check_coverage(path, entries, data_start, file_size)
    return SafetensorsHeader(path, data_start, metadata, tuple(entries))


def _parse_metadata(path: Path, metadata: object) -> dict[str, str]:
    if metadata is None:
        return {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise FormatError(f"{path}: __metadata__ must map strings to strings")
    return dict(metadata)


def _parse_entry(path: Path, name: str, entry: object, data_start: int) -> TensorInfo:
    where = f"{path}: tensor {name!r}"
    if not isinstance(entry, dict):
        raise FormatError(f"{where}: entry must be an object with dtype, shape, data_offsets")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
        raise FormatError(f"{where}: unknown dtype {_short(dtype)}; known: {', '.join(DTYPE_SIZES)}")
    if not isinstance(shape, list) or not all(_is_uint(d) for d in shape):
        raise FormatError(f"{where}: shape must be a list of non-negative integers, got {_short(shape)}")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(_is_uint(o) for o in offsets)
        or offsets[0] > offsets[1]
    ):
        raise FormatError(
            f"{where}: data_offsets must be [begin, end] with begin <= end, got {_short(offsets)}"
        )
    span = offsets[1] - offsets[0]
    nbytes = _bounded_nbytes(dtype, shape, span)
    if nbytes != span:
        size = f"over {span} bytes" if nbytes is None else f"{nbytes} bytes"
        raise FormatError(
            f"{where}: shape {_short(shape)} x {dtype} is {size} but data_offsets "
            f"span {span}; the header is inconsistent"
        )
    return TensorInfo.from_file(name, dtype, tuple(shape), path, data_start + offsets[0], nbytes)


def _bounded_nbytes(dtype: str, shape: list[int], span: int) -> int | None:
    """``dtype_nbytes``, or None as soon as the element count exceeds what ``span`` bytes
    could hold: a hostile shape of thousands of huge dimensions must not make us multiply
    ever larger integers (seconds of CPU, then an unprintable number)."""
    if 0 in shape:
        return 0
    count, most = 1, 8 * span + 8  # no dtype packs more than 2 elements per byte
    for d in shape:
        count *= d
        if count > most:
            return None
    return dtype_nbytes(dtype, shape)


def _short(value: object, limit: int = 80) -> str:
    """A repr cut to ``limit`` characters, so a hostile header cannot flood the message."""
    text = (
        repr(value)
        if not isinstance(value, list) or len(value) <= 16
        else repr(value[:8])[:-1] + f", ... ({len(value)} items)]"
    )
    return text if len(text) <= limit else text[:limit] + "..."


def _is_uint(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_coverage(path: Path, entries: list[TensorInfo], data_start: int, file_size: int | None) -> None:
    # Like the reference reader: tensors must tile the data buffer with no gap or overlap.
    cursor = data_start
    for t in entries:
        if t.offset < cursor:
            raise FormatError(
                f"{path}: tensor {t.name!r} overlaps the previous tensor's data; the header is corrupt"
            )
        if t.offset > cursor:
            raise FormatError(
                f"{path}: {t.offset - cursor} bytes before tensor {t.name!r} belong "
                "to no tensor; the header is corrupt"
            )
        cursor = t.offset + t.nbytes
    if file_size is None:
        return
    if cursor > file_size:
        raise FormatError(
            f"{path}: truncated: the header needs {cursor} bytes but the file has "
            f"{file_size}; re-download or re-export it"
        )
    if cursor < file_size:
        raise FormatError(
            f"{path}: {file_size - cursor} trailing bytes after the last tensor; the file is corrupt"
        )


def build_header(
    metadata: dict[str, str],
    tensors: list[tuple[str, str, tuple[int, ...], int]],
    pad_to: int = 8,
    first_data_page_offset: int | None = None,
    key_order: list[str] | None = None,
) -> bytes:
    """Encode the 8-byte length prefix plus padded JSON for tensors laid out in the order given.

    Args:
        metadata: the ``__metadata__`` map (written first).
        tensors: ``(name, dtype, shape, nbytes)`` in data order; offsets are computed here.
        pad_to: the header (prefix included) is padded with spaces to a multiple of this.
        first_data_page_offset: when given, pad further so the data buffer starts at this
            offset modulo 4096. Copies whose source and destination share a page offset
            are markedly cheaper in the kernel, and readers accept any header length.
        key_order: the order of the JSON entries (default: data order). Readers do not
            care; natural order makes headers easy to read.

    Returns:
        The bytes to write at the start of the file.
    """
    entries: dict[str, object] = {}
    cursor = 0
    for name, dtype, shape, nbytes in tensors:
        entries[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [cursor, cursor + nbytes]}
        cursor += nbytes
    header: dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
    header.update((name, entries[name]) for name in (key_order or entries))
    body = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    total = 8 + len(body)
    padded = total + (-total % pad_to)
    if first_data_page_offset is not None and first_data_page_offset % pad_to == 0:
        padded += (first_data_page_offset - padded) % 4096
    body += b" " * (padded - total)
    return struct.pack("<Q", len(body)) + body


def is_aligned(order: list[TensorInfo]) -> bool:
    """True when each tensor, laid out in this order from a buffer start aligned to 8,
    starts at a multiple of its element size (what the reference writer guarantees)."""
    cursor = 0
    for t in order:
        if cursor % dtype_itemsize(t.dtype):
            return False
        cursor += t.nbytes
    return True
