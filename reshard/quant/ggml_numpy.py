"""GGUF Q8_0 in numpy, bit for bit ``reshard.quant.ggml.quantize_q8_0`` (torch) and ggml.

The torch kernel is faster per element (about 410 M elements/s a thread against 300 here,
docs/quantize.md), but importing torch costs about 2 s of one core, which is more than
the whole difference up to a few G elements a thread. ``reshard.transfer.cast`` picks
this kernel below that size. Same arithmetic as the torch kernel: ``d = absmax / 127``
in float32, ``x * (1 / d)`` rounded half away from zero by adding
``copysign(HALF_BELOW, v)`` and truncating, ``d`` stored as float16.

>>> import numpy as np
>>> x = np.linspace(-1, 1, 64, dtype=np.float32).reshape(1, 64)
>>> q = quantize_q8_0(x, NumpyWorkspace())
>>> q.shape, q.dtype
((1, 68), dtype('uint8'))
>>> codes = q.reshape(2, 34)[:, 2:].view(np.int8).astype(np.float32)
>>> d = q.reshape(2, 34)[:, :2].copy().view(np.float16).astype(np.float32)
>>> float(np.abs(codes * d - x.reshape(2, 32)).max()) < 1 / 127
True
"""

from __future__ import annotations

import numpy as np

from reshard.quant import GGML_BLOCKS

QK = GGML_BLOCKS["Q8_0"][0]  # elements per block, Q8_0 and Q4_0

# The largest float32 below 1/2. trunc(v + copysign(HALF_BELOW, v)) is ggml's round half
# away from zero for every float32 |v| < 2^22: with 1/2 itself, v = 0.5 - 2^-25 would
# round up (its sum 1 - 2^-25 is a tie that float32 rounds to 1.0); with HALF_BELOW every
# tie n + 1/2 still lands on n + 1 (n + 1 - 2^-25 rounds up, to even at n = 0). Checked
# against gguf's np_roundf for all float32 |v| < 128 (the Q8_0 range) once, and near every
# tie in tests/test_quant_golden.py.
HALF_BELOW = 0.49999997

_HALF_BELOW = np.float32(HALF_BELOW)
_127 = np.float32(127)


class NumpyWorkspace:
    """Reused scratch arrays for one band size (fresh ones cost a page-faulting
    allocation per band, more than the arithmetic). Grows on demand."""

    def __init__(self) -> None:
        self.arrays: dict[str, np.ndarray] = {}

    def get(self, name: str, count: int, dtype) -> np.ndarray:
        a = self.arrays.get(name)
        if a is None or a.shape[0] < count or a.dtype != dtype:
            a = self.arrays[name] = np.empty(count, dtype=dtype)
        return a[:count]


def quantize_q8_0(x: np.ndarray, ws: NumpyWorkspace) -> np.ndarray:
    """Q8_0 blocks of a float32 ``(rows, cols)`` array, ``cols`` a multiple of 32: a
    ``(rows, cols // 32 * 34)`` uint8 view into ``ws`` (valid until the next call), each
    block the float16 ``d`` then 32 int8 codes. ``x`` is not modified."""
    rows, cols = x.shape
    if cols % QK:
        raise ValueError(f"rows of {cols} elements are not a multiple of the block size {QK}")
    # infinities and huge scales overflow as they do in the torch kernel and in ggml
    with np.errstate(all="ignore"):
        return _quantize_q8_0(x, rows, cols, ws)


def _quantize_q8_0(x: np.ndarray, rows: int, cols: int, ws: NumpyWorkspace) -> np.ndarray:
    nb = rows * (cols // QK)
    n = nb * QK
    blocks = x.reshape(nb, QK)
    scratch = ws.get("abs", n, np.float32).reshape(nb, QK)
    amax = ws.get("amax", nb, np.float32)
    np.abs(blocks, out=scratch)
    np.maximum.reduce(scratch, axis=1, out=amax)
    d = ws.get("d", nb, np.float32)
    np.divide(amax, _127, out=d)
    inv = ws.get("inv", nb, np.float32)
    np.divide(np.float32(1), d, out=inv)
    inv[d == 0] = 0  # an all-zero block: codes 0 (as torch.where(d == 0, 0, 1 / d))
    v = ws.get("v", n, np.float32).reshape(nb, QK)
    np.multiply(blocks, inv[:, None], out=v)
    np.copysign(_HALF_BELOW, v, out=scratch)  # where v is 0 either sign truncates to 0
    np.add(v, scratch, out=v)
    out = ws.get("out", nb * 34, np.uint8).reshape(nb, 34)
    np.copyto(out[:, 2:].view(np.int8), v, casting="unsafe")  # float -> int truncates
    np.copyto(out[:, :2].view(np.float16)[:, 0], d, casting="unsafe")
    return out.reshape(rows, -1)
