"""GGUF block quantizers on float32 torch tensors, bit for bit those of ggml.

Each works on a 2-D float32 tensor whose rows are a multiple of 32 elements and returns
the row-major bytes of the blocks as a uint8 tensor. They follow ``gguf.quants``
(llama.cpp's reference in numpy) operation for operation, vectorised in torch, including
ggml's round-half-away-from-zero (``np_roundf``), which ``torch.round`` (half to even)
is not.

>>> import torch
>>> x = torch.linspace(-1, 1, 64).reshape(1, 64)
>>> q = quantize_q8_0(x)
>>> q.shape, float((dequantize_q8_0(q, 64) - x).abs().max()) < 1 / 127
(torch.Size([1, 68]), True)
>>> q4 = quantize_q4_0(x)
>>> q4.shape, float((dequantize_q4_0(q4, 64) - x).abs().max()) <= 1 / 8 + 1e-3
(torch.Size([1, 36]), True)
"""

from __future__ import annotations

import torch

from reshard.quant.ggml_numpy import HALF_BELOW, QK


def round_half_away(v: torch.Tensor) -> torch.Tensor:
    """ggml's rounding, as ``gguf.quants.np_roundf`` writes it (exact in float32)."""
    a = v.abs()
    floored = torch.floor(a)
    return torch.sign(v) * (floored + torch.floor(2 * (a - floored)))


# HALF_BELOW: see reshard.quant.ggml_numpy (the torch-free module holds the constants).


def round_half_away_trunc(v: torch.Tensor, sign: torch.Tensor | None = None) -> torch.Tensor:
    """``round_half_away(v)`` as int32, in three cheap passes (sign, add, truncating cast).
    ``sign`` is ``v``'s sign when the caller has it (any tensor of the same signs).

    >>> round_half_away_trunc(torch.tensor([2.5, -2.5, 0.49999997, 1.5, -0.5, 3.4])).tolist()
    [3, -3, 0, 2, -1, 3]
    """
    sign = torch.sign(v) if sign is None else sign
    return torch.add(v, sign, alpha=HALF_BELOW).to(torch.int32)  # sign * HALF_BELOW is exact


def _blocks(x: torch.Tensor) -> torch.Tensor:
    rows, cols = x.shape
    if cols % QK:
        raise ValueError(f"rows of {cols} elements are not a multiple of the block size {QK}")
    return x.reshape(rows * (cols // QK), QK)


class Workspace:
    """Reused scratch tensors for one band size: fresh multi-MB tensors per operation
    cost a page-faulting allocation each, more than the arithmetic. Grows on demand."""

    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}

    def get(self, name: str, count: int, dtype: torch.dtype) -> torch.Tensor:
        t = self.tensors.get(name)
        if t is None or t.numel() < count or t.dtype != dtype:
            t = self.tensors[name] = torch.empty(count, dtype=dtype)
        return t[:count]


def quantize_q8_0(x: torch.Tensor, ws: Workspace | None = None) -> torch.Tensor:
    """Q8_0: per block of 32, ``d = absmax / 127`` (stored as f16) and 32 int8 ``round(x / d)``
    (``x * (1 / d)`` rounded half away from zero, as ggml).

    ``x`` may be float32, bfloat16 or float16 (cast to float32 exactly, into the scratch,
    so ``x`` is never modified). The rounding is ``round_half_away_trunc`` (exact; three
    passes instead of the float formula's seven), done in place, and the float -> int8
    cast writes straight into the blocks: seven passes over the band in all. ``ws``
    keeps the scratch tensors between calls; the result is a view into it when given
    (valid until the next call)."""
    ws = ws or Workspace()
    rows, cols = x.shape
    if cols % QK:
        raise ValueError(f"rows of {cols} elements are not a multiple of the block size {QK}")
    nb = rows * (cols // QK)
    n = nb * QK
    v = ws.get("f32", n, torch.float32).view(nb, QK)
    v.copy_(x.reshape(nb, QK))  # the band as float32 (exact from bf16/f16)
    scratch = ws.get("abs", n, torch.float32).view(nb, QK)
    amax = ws.get("amax", nb, torch.float32)
    torch.abs(v, out=scratch)
    torch.amax(scratch, dim=1, out=amax)
    d = amax / 127
    inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
    sign = torch.sign(v, out=scratch)  # sign(x * (1/d)) = sign(x) where it matters (1/d >= 0)
    v.mul_(inv.unsqueeze(1))  # v = x * (1/d)
    v.add_(sign, alpha=HALF_BELOW)  # round_half_away_trunc, in place
    out = ws.get("out", nb * 34, torch.uint8).view(nb, 34)
    out[:, 2:].view(torch.int8).copy_(v)  # float -> int truncates toward zero
    out.view(torch.float16)[:, 0].copy_(d)  # a block is 17 halves: d, then the 32 codes
    return out.reshape(rows, -1)


def dequantize_q8_0(q: torch.Tensor, cols: int) -> torch.Tensor:
    """float32 rows of ``cols`` elements from Q8_0 block bytes."""
    blocks = q.reshape(-1, 34)
    d = blocks[:, :2].contiguous().view(torch.float16).float()
    x = blocks[:, 2:].contiguous().view(torch.int8).float()
    return (x * d).reshape(-1, cols)


def quantize_q4_0(x: torch.Tensor, ws: Workspace | None = None) -> torch.Tensor:
    """Q4_0: per block of 32, ``d = max / -8`` (the signed value of largest magnitude, f16)
    and 32 nibbles ``trunc(x / d + 8.5)`` clipped to 0..15, two per byte (element i low,
    element i + 16 high). ``ws`` is accepted for symmetry with ``quantize_q8_0``."""
    rows = x.shape[0]
    blocks = _blocks(x.float())
    imax = blocks.abs().argmax(dim=1, keepdim=True)  # first maximum, as numpy's argmax
    peak = torch.gather(blocks, 1, imax)
    d = peak / -8
    inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
    qs = torch.trunc(blocks * inv + 8.5).clamp(0, 15).to(torch.uint8)
    packed = qs[:, :16] | (qs[:, 16:] << 4)
    dh = d.to(torch.float16).view(torch.uint8)
    return torch.cat([dh, packed], dim=1).reshape(rows, -1)


def dequantize_q4_0(q: torch.Tensor, cols: int) -> torch.Tensor:
    """float32 rows of ``cols`` elements from Q4_0 block bytes."""
    blocks = q.reshape(-1, 18)
    d = blocks[:, :2].contiguous().view(torch.float16).float()
    qs = blocks[:, 2:]
    lo = (qs & 0x0F).to(torch.int16) - 8
    hi = (qs >> 4).to(torch.int16) - 8
    return (torch.cat([lo, hi], dim=1).float() * d).reshape(-1, cols)


QUANTIZERS = {"Q8_0": quantize_q8_0, "Q4_0": quantize_q4_0}
DEQUANTIZERS = {"Q8_0": dequantize_q8_0, "Q4_0": dequantize_q4_0}


def block_scales(q: torch.Tensor, kind: str) -> torch.Tensor:
    """Each block's ``|d|`` (float32), one per block, from block bytes."""
    width = {"Q8_0": 34, "Q4_0": 18}[kind]
    blocks = q.reshape(-1, width)
    return blocks[:, :2].contiguous().view(torch.float16).float().abs().reshape(-1)
