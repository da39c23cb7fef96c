"""float32 <-> bfloat16 in numpy, bit for bit torch's CPU casts, without importing torch.

Importing torch takes about 2 s of one core on the development machine (``python -X
importtime``: 2.36 s), more than casting a 4.5 GB fp32 checkpoint to bf16 takes on two
(numpy does about 1 G elements/s a thread here). So casts of ordinary size run here, and
only very large jobs pay torch's import for its faster kernel (``reshard.transfer.cast``
chooses). numpy has no bfloat16 type, so the cast is integer arithmetic on the float32
bits: round to nearest, ties to even, on the 16 bits kept; every NaN becomes ``0xFFFF``,
as torch's vectorised CPU kernels (AVX2 and AVX-512) write it. The other way is exact: the
16 bits move up. (float16 -> float32 is left to torch: numpy quiets signalling NaNs
differently, 1022 of the 65536 float16 values.)

>>> import numpy as np
>>> x = np.array([1.0, -2.5, 1 + 2**-8, 1 + 3 * 2**-8, float("inf"), float("nan")], np.float32)
>>> [hex(v) for v in f32_to_bf16(x.view(np.uint32), np.empty(6, np.uint16), np.empty(6, np.uint32))]
['0x3f80', '0xc020', '0x3f80', '0x3f82', '0x7f80', '0xffff']
"""

from __future__ import annotations

import numpy as np

NAN_BF16 = 0xFFFF  # torch's vectorised cvtfp32_bf16 writes every NaN so

# (stored dtype, written dtype) -> (bytes per element in, out): the casts done here
CASTS = {("F32", "BF16"): (4, 2), ("BF16", "F32"): (2, 4)}


def f32_to_bf16(bits: np.ndarray, out: np.ndarray, scratch: np.ndarray) -> np.ndarray:
    """Cast float32 values, given as their ``uint32`` bits, to bfloat16 bits in ``out``
    (``uint16``, as long as ``bits``). ``scratch`` is a ``uint32`` array at least as long,
    reused between calls so no pass allocates. Returns ``out``.

    Round to nearest even: add ``0x7FFF`` plus the lowest kept bit, keep the top 16 bits
    (torch's ``round_to_nearest_even``). Six passes over the chunk, each in the CPU cache
    for the chunk sizes the writer uses.
    """
    n = bits.shape[0]
    t = scratch[:n]
    np.right_shift(bits, 16, out=t)
    np.bitwise_and(t, 1, out=t)
    np.add(t, 0x7FFF, out=t)
    np.add(t, bits, out=t)  # wraps only for NaN bit patterns, which are replaced below
    np.right_shift(t, 16, out=t)
    np.copyto(out, t, casting="unsafe")
    nan = np.isnan(bits.view(np.float32))
    if nan.any():
        out[nan] = NAN_BF16
    return out


def bf16_to_f32(bits: np.ndarray, out: np.ndarray) -> np.ndarray:
    """bfloat16 values, given as ``uint16`` bits, as float32 in ``out`` (exact: the bits
    move up 16 places). Returns ``out``.

    >>> bf16_to_f32(np.array([0x3F80, 0xC020], np.uint16), np.empty(2, np.float32)).tolist()
    [1.0, -2.5]
    """
    wide = out.view(np.uint32)
    np.copyto(wide, bits, casting="unsafe")
    np.left_shift(wide, 16, out=wide)
    return out


def cast(src_dtype: str, dst_dtype: str, src: np.ndarray, out: np.ndarray, scratch: np.ndarray) -> None:
    """Cast the elements held in the bytes ``src`` (``uint8``) into the bytes ``out``, for a
    pair in ``CASTS``; ``scratch`` is a ``uint32`` array of at least as many elements."""
    if (src_dtype, dst_dtype) == ("F32", "BF16"):
        f32_to_bf16(src.view(np.uint32), out.view(np.uint16), scratch)
    elif (src_dtype, dst_dtype) == ("BF16", "F32"):
        bf16_to_f32(src.view(np.uint16), out.view(np.float32))
    else:
        raise ValueError(f"no numpy cast from {src_dtype} to {dst_dtype}")
