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

QK = 32  # elements per block, Q8_0 and Q4_0


def round_half_away(v: torch.Tensor) -> torch.Tensor:
    """ggml's rounding, as ``gguf.quants.np_roundf`` writes it (exact in float32)."""
    a = v.abs()
    floored = torch.floor(a)
    return torch.sign(v) * (floored + torch.floor(2 * (a - floored)))


def _blocks(x: torch.Tensor) -> torch.Tensor:
    rows, cols = x.shape
    if cols % QK:
        raise ValueError(f"rows of {cols} elements are not a multiple of the block size {QK}")
    return x.reshape(rows * (cols // QK), QK)


def quantize_q8_0(x: torch.Tensor) -> torch.Tensor:
    """Q8_0: per block of 32, ``d = absmax / 127`` (stored as f16) and 32 int8 ``round(x / d)``."""
    rows = x.shape[0]
    blocks = _blocks(x.float())
    d = blocks.abs().amax(dim=1, keepdim=True) / 127
    inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
    qs = round_half_away(blocks * inv).to(torch.int8).view(torch.uint8)
    dh = d.to(torch.float16).view(torch.uint8)
    return torch.cat([dh, qs], dim=1).reshape(rows, -1)


def dequantize_q8_0(q: torch.Tensor, cols: int) -> torch.Tensor:
    """float32 rows of ``cols`` elements from Q8_0 block bytes."""
    blocks = q.reshape(-1, 34)
    d = blocks[:, :2].contiguous().view(torch.float16).float()
    x = blocks[:, 2:].contiguous().view(torch.int8).float()
    return (x * d).reshape(-1, cols)


def quantize_q4_0(x: torch.Tensor) -> torch.Tensor:
    """Q4_0: per block of 32, ``d = max / -8`` (the signed value of largest magnitude, f16)
    and 32 nibbles ``trunc(x / d + 8.5)`` clipped to 0..15, two per byte (element i low,
    element i + 16 high)."""
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
