"""FP8 block-128 quantization (DeepSeek-V3 / Qwen3-FP8 layout) on float32 torch tensors.

A weight [out, in] becomes float8_e4m3fn values and a float32 ``weight_scale_inv`` of
shape [ceil(out/128), ceil(in/128)]: per 128 x 128 block, ``scale_inv = absmax / 448``
and ``q = x / scale_inv`` (so ``W ~= q * scale_inv``, as transformers and vLLM
dequantize). An all-zero block gets scale 0 and zeros.

>>> import torch
>>> x = torch.randn(130, 200)
>>> q, s = quantize_fp8_block(x)
>>> q.dtype, tuple(s.shape)
(torch.float8_e4m3fn, (2, 2))
>>> err = (dequantize_fp8_block(q, s) - x).abs()
>>> bool((err <= fp8_error_bound(x, s)).all())
True
"""

from __future__ import annotations

import torch

from reshard.quant import FP8_BLOCK, FP8_MAX


def block_absmax(x: torch.Tensor, ws=None) -> torch.Tensor:
    """[ceil(rows/128), ceil(cols/128)] absmax of each 128 x 128 block (edge blocks partial):
    per 128-row group the column maxima (a contiguous reduction), then per 128 columns."""
    rows, cols = x.shape
    br, bc = -(-rows // FP8_BLOCK), -(-cols // FP8_BLOCK)
    a = torch.abs(x, out=ws.get("abs", rows * cols, torch.float32).view(rows, cols)) if ws else x.abs()
    colmax = torch.zeros(br, bc * FP8_BLOCK, dtype=torch.float32)
    for g in range(br):
        torch.amax(a[g * FP8_BLOCK : (g + 1) * FP8_BLOCK], dim=0, out=colmax[g, :cols])
    return colmax.view(br, bc, FP8_BLOCK).amax(dim=2)


def fp8_scales(x: torch.Tensor, ws=None) -> torch.Tensor:
    """``weight_scale_inv`` of ``x`` (float32): block absmax / 448."""
    return block_absmax(x.float(), ws) / FP8_MAX


def _expand(scales: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    return scales.repeat_interleave(FP8_BLOCK, 0).repeat_interleave(FP8_BLOCK, 1)[:rows, :cols]


# Scales below the smallest normal float32 (a block of absmax < 448 * 2^-126) carry too few
# bits for x / scale to stay under e4m3's range: only then is the clip to +-448 needed.
_SMALLEST_NORMAL = 2.0**-126


def quantize_fp8_block(x: torch.Tensor, scales: torch.Tensor | None = None, ws=None):
    """``(float8_e4m3fn values, float32 scale_inv)`` of a 2-D tensor. Rows may be any
    subset of whole 128-row blocks (the scales then cover only those rows). Each block is
    divided by its scale through a broadcast view (no expanded scale tensor); ``ws``
    (a ``reshard.quant.ggml.Workspace``) keeps the scratch tensors between calls, and the
    values are then a view into it (valid until the next call).

    The values are ``clamp(x / scale, -448, 448)`` cast to e4m3. With a normal scale
    ``s = fl(a / 448)``, ``|x / s| <= 448 (1 + 2^-22)``, which the cast rounds to 448 as the
    clip would (a cast may turn values >= 464 into NaN; torch 2.13's saturates): the
    division then writes e4m3 directly, one pass instead of three (divide, clip, cast)."""
    x = x.float()
    rows, cols = x.shape
    if scales is None:
        scales = fp8_scales(x, ws)
    safe = torch.where(scales == 0, torch.ones_like(scales), scales)
    n = rows * cols
    q = (
        ws.get("fp8", n, torch.float8_e4m3fn).view(rows, cols)
        if ws
        else torch.empty(rows, cols, dtype=torch.float8_e4m3fn)
    )
    if bool(((scales > 0) & (scales < _SMALLEST_NORMAL)).any()):
        scaled = ws.get("scaled", n, torch.float32).view(rows, cols) if ws else torch.empty(rows, cols)
        _divide(x, safe, scaled)
        scaled.clamp_(-FP8_MAX, FP8_MAX)
        q.copy_(scaled)
    else:
        _divide(x, safe, q)
    return q, scales


def _divide(x: torch.Tensor, safe: torch.Tensor, out: torch.Tensor) -> None:
    """``out = x / safe`` per 128 x 128 block (computed in float32, cast to ``out``'s type)."""
    rows, cols = x.shape
    main = cols - cols % FP8_BLOCK
    for g in range(safe.shape[0]):
        r = slice(g * FP8_BLOCK, min(rows, (g + 1) * FP8_BLOCK))
        if main:
            torch.div(
                x[r, :main].unflatten(1, (-1, FP8_BLOCK)),
                safe[g, : main // FP8_BLOCK].view(1, -1, 1),
                out=out[r, :main].unflatten(1, (-1, FP8_BLOCK)),
            )
        if main < cols:
            torch.div(x[r, main:], safe[g, -1], out=out[r, main:])


def dequantize_fp8_block(q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """float32 ``q * scale_inv`` per block."""
    return q.float() * _expand(scales.float(), *q.shape)


def fp8_error_bound(x: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Per element bound on ``|x - dequantized|``: half an e4m3 ulp, that is 2^-4 of the
    value for normals (3 mantissa bits) and 2^-10 of the block scale in the subnormal
    range, plus float32 rounding of the division and product."""
    s = _expand(scales.float(), *x.shape)
    return torch.maximum(x.abs().float() * 2.0**-4, s * 2.0**-10) * (1 + 2.0**-20) + 1e-30
