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
