"""Golden tests of the pure quantizers against llama.cpp's reference (``gguf.quants``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize, quantize

from reshard.quant.fp8 import dequantize_fp8_block, fp8_error_bound, fp8_scales, quantize_fp8_block
from reshard.quant.ggml import dequantize_q4_0, dequantize_q8_0, quantize_q4_0, quantize_q8_0


def cases() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    halves = (np.arange(-64, 64, dtype=np.float32) + 0.5) / 127 * 2  # exact .5 ties after scaling
    zero_block = np.zeros((3, 64), np.float32)
    zero_block[1, 32:] = rng.standard_normal(32)
    return {
        "normal": rng.standard_normal((37, 256)).astype(np.float32),
        "wide": (rng.standard_normal((5, 4096)) * 1e3).astype(np.float32),
        "tiny": (rng.standard_normal((4, 128)) * 1e-6).astype(np.float32),  # f16 subnormal scales
        "ties": np.tile(halves, (2, 1)),
        "zeros": zero_block,
        "one_hot": np.eye(64, dtype=np.float32)[:8] * -3,
    }


@pytest.mark.parametrize("name", list(cases()))
def test_q8_0_bit_exact_with_gguf(name):
    x = cases()[name]
    want = quantize(x, GGMLQuantizationType.Q8_0)
    got = quantize_q8_0(torch.from_numpy(x)).numpy()
    assert got.shape == want.shape
    assert np.array_equal(got, want)
    back = dequantize_q8_0(torch.from_numpy(want), x.shape[1]).numpy()
    assert np.array_equal(back, dequantize(want, GGMLQuantizationType.Q8_0))


@pytest.mark.parametrize("name", list(cases()))
def test_q4_0_bit_exact_with_gguf(name):
    x = cases()[name]
    want = quantize(x, GGMLQuantizationType.Q4_0)
    got = quantize_q4_0(torch.from_numpy(x)).numpy()
    assert np.array_equal(got, want)
    back = dequantize_q4_0(torch.from_numpy(want), x.shape[1]).numpy()
    assert np.array_equal(back, dequantize(want, GGMLQuantizationType.Q4_0))


def test_q8_0_rounds_half_away_from_zero_not_to_even():
    # 2.5 and -2.5 steps: ggml gives 3 and -3, torch.round would give 2 and -2
    x = np.zeros((1, 32), np.float32)
    x[0, 0], x[0, 1], x[0, 2] = 127.0, 2.5, -2.5
    q = quantize_q8_0(torch.from_numpy(x)).numpy().view(np.int8)[0, 2:5]
    assert list(q) == [127, 3, -3]


def test_integer_rounding_equals_ggml_near_every_tie():
    """reshard rounds as trunc(v + copysign(0.49999997, v)); ggml's np_roundf in float.
    Every tie n + 1/2 for |n| <= 127 and its 8 float32 neighbours each side, the float32
    just below 1/2, and a dense grid agree."""
    from gguf.quants import np_roundf

    from reshard.quant.ggml import round_half_away_trunc

    ties = np.arange(-128, 128, dtype=np.float32) + np.float32(0.5)
    near = [ties]
    for direction in (np.inf, -np.inf):
        cur = ties
        for _ in range(8):
            cur = np.nextafter(cur, np.float32(direction))
            near.append(cur)
    grid = np.linspace(-127.9, 127.9, 2_000_001, dtype=np.float32)
    v = np.concatenate([*near, grid, np.float32([0.0, -0.0, 1e-30, -1e-30, 0.49999997, -0.49999997])])
    got = round_half_away_trunc(torch.from_numpy(v)).numpy()
    assert np.array_equal(got, np_roundf(v).astype(np.int32))


def test_fp8_scales_shapes_and_bounds():
    rng = np.random.default_rng(3)
    x = torch.from_numpy((rng.standard_normal((300, 200)) * 0.05).astype(np.float32))
    x[:128, :128] = 0  # an all-zero block: scale 0, values 0
    q, s = quantize_fp8_block(x)
    assert q.dtype == torch.float8_e4m3fn and tuple(s.shape) == (3, 2)
    assert float(s[0, 0]) == 0.0
    assert torch.equal(s[1, 1], x[128:256, 128:].abs().max() / 448)
    back = dequantize_fp8_block(q, s)
    assert bool(((back - x).abs() <= fp8_error_bound(x, s)).all())
    assert torch.equal(fp8_scales(x), s)
    # the largest element of each block maps to 448 exactly
    assert float(q.float().abs().max()) == 448.0


def test_fp8_bound_is_tight_enough_to_catch_a_wrong_scale():
    x = torch.randn(128, 128)
    q, s = quantize_fp8_block(x)
    back = dequantize_fp8_block(q, s * 1.05)
    assert not bool(((back - x).abs() <= fp8_error_bound(x, s)).all())
