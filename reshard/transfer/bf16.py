"""float32 -> bfloat16 in numpy, bit for bit torch's CPU cast, without importing torch.

Importing torch takes about 2 s of one core on the development machine (``python -X
importtime``: 2.36 s), more than casting a 4.5 GB fp32 checkpoint to bf16 takes on two
(numpy does about 1 G elements/s a thread here). So casts of ordinary size run here, and
only very large jobs pay torch's import for its faster kernel (``reshard.transfer.cast``
chooses). numpy has no bfloat16 type, so the cast is integer arithmetic on the float32
bits: round to nearest, ties to even, on the 16 bits kept; every NaN becomes ``0xFFFF``,
as torch's vectorised CPU kernels (AVX2 and AVX-512) write it.

>>> import numpy as np
>>> x = np.array([1.0, -2.5, 1 + 2**-8, 1 + 3 * 2**-8, float("inf"), float("nan")], np.float32)
>>> [hex(v) for v in f32_to_bf16(x.view(np.uint32), np.empty(6, np.uint16), np.empty(6, np.uint32))]
['0x3f80', '0xc020', '0x3f80', '0x3f82', '0x7f80', '0xffff']
"""

from __future__ import annotations

import numpy as np

NAN_BF16 = 0xFFFF  # torch's vectorised cvtfp32_bf16 writes every NaN so


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
