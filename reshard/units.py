"""Sizes and dtypes. Sizes are ``int`` bytes everywhere inside; strings are parsed only here.

>>> parse_size("2GB"), parse_size("2GiB"), parse_size("1500")
(2000000000, 2147483648, 1500)
>>> format_size(2_000_000_000)
'2.00 GB'
"""

from __future__ import annotations

import math
import re

from reshard.errors import UsageError

# Decimal units as huggingface_hub parses them ("2GB" == 2 * 10**9), plus the binary units
# users also write and expect to mean powers of two.
_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?|\.\d+)\s*([A-Za-z]*)\s*$")
ACCEPTED_SIZES = "a byte count (1500), decimal units (500MB, 2GB, 1.5TB) or binary units (512MiB, 2GiB)"

# Bytes per element for every safetensors dtype. F4/F6 are sub-byte and handled by
# ``dtype_nbytes``; their entry here is None.
DTYPE_SIZES: dict[str, int | None] = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "F8_E4M3FNUZ": 1,
    "F8_E5M2FNUZ": 1,
    "F8_E8M0": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "C64": 8,
    "F64": 8,
    "I64": 8,
    "U64": 8,
    "F4": None,
    "F6_E2M3": None,
    "F6_E3M2": None,
}
_SUB_BYTE_BITS = {"F4": 4, "F6_E2M3": 6, "F6_E3M2": 6}
FLOAT_DTYPES = frozenset({"F16", "BF16", "F32", "F64"})

# What ``--dtype`` accepts, lower-cased: the short names, torch's spellings, and the
# safetensors names ``inspect`` prints (F16, BF16, F32).
DTYPE_ALIASES = {
    "bf16": "BF16",
    "bfloat16": "BF16",
    "fp16": "F16",
    "float16": "F16",
    "half": "F16",
    "f16": "F16",
    "fp32": "F32",
    "float32": "F32",
    "float": "F32",
    "f32": "F32",
}


def parse_size(text: str | int) -> int:
    """Parse a shard size such as ``2GB``, ``2GiB`` or ``1500`` into bytes.

    Raises:
        UsageError: for anything else, listing the accepted forms.
    """
    if isinstance(text, int):
        value = text
    else:
        match = _SIZE_RE.match(str(text))
        unit = match.group(2).upper() if match else None
        if not match or unit not in _UNITS:
            raise UsageError(f"cannot read size {text!r}: use {ACCEPTED_SIZES}")
        value = int(float(match.group(1)) * _UNITS[unit])
    if value <= 0:
        raise UsageError(f"size {text!r} must be positive: use {ACCEPTED_SIZES}")
    return value


def format_size(nbytes: int) -> str:
    """Human-readable decimal size: ``format_size(1536) == '1.54 KB'``."""
    for unit, scale in (("TB", 10**12), ("GB", 10**9), ("MB", 10**6), ("KB", 10**3)):
        if abs(nbytes) >= scale:
            return f"{nbytes / scale:.2f} {unit}"
    return f"{nbytes} B"


def dtype_itemsize(dtype: str) -> int:
    """Alignment unit of a dtype in bytes (1 for sub-byte types)."""
    size = DTYPE_SIZES[dtype]
    return 1 if size is None else size


def numel(shape: tuple[int, ...] | list[int]) -> int:
    """Number of elements; ``numel(()) == 1`` for a 0-dim tensor."""
    return math.prod(shape)


def dtype_nbytes(dtype: str, shape: tuple[int, ...] | list[int]) -> int:
    """Byte length of a tensor, the way safetensors computes it (sub-byte types packed).

    >>> dtype_nbytes("BF16", (4096, 4096))
    33554432
    """
    size = DTYPE_SIZES[dtype]
    count = numel(shape)
    if size is None:
        bits = count * _SUB_BYTE_BITS[dtype]
        return (bits + 7) // 8
    return count * size


def parse_dtype(text: str) -> str:
    """Map a ``--dtype`` value to its safetensors dtype name, in any letter case.

    >>> [parse_dtype(t) for t in ("bf16", "BF16", "half", "F16", "float32", "F32")]
    ['BF16', 'BF16', 'F16', 'F16', 'F32', 'F32']
    >>> parse_dtype("int4")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    reshard.errors.UsageError: unknown --dtype 'int4': use bf16, fp16 or fp32 ...

    Raises:
        UsageError: a name not in DTYPE_ALIASES.
    """
    dtype = DTYPE_ALIASES.get(text.strip().lower())
    if dtype is None:
        raise UsageError(
            f"unknown --dtype {text!r}: use bf16, fp16 or fp32 (or BF16, F16, F32, the names inspect prints)"
        )
    return dtype
