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


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_q8_0_of_half_inputs_equals_gguf_on_their_float32_values(dtype):
    x = torch.from_numpy(cases()["normal"]).to(dtype)
    kept = x.clone()
    got = quantize_q8_0(x).numpy()
    assert np.array_equal(got, quantize(x.float().numpy(), GGMLQuantizationType.Q8_0))
    assert torch.equal(x, kept)  # the input is never written to


def _fp8_reference(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """The documented formula, whole-tensor: clamp(x / scale, -448, 448) cast to e4m3."""
    safe = torch.where(s == 0, torch.ones_like(s), s)
    full = safe.repeat_interleave(128, 0).repeat_interleave(128, 1)[: x.shape[0], : x.shape[1]]
    return (x / full).clamp(-448, 448).to(torch.float8_e4m3fn)


@pytest.mark.parametrize("scale", [1.0, 1e3, 1e-30, 1e-37, 1e-42])
def test_fp8_values_equal_the_clamped_formula(scale):
    # 1e-37 and below: block absmax / 448 is a float32 subnormal, where the clip matters
    rng = np.random.default_rng(11)
    x = torch.from_numpy((rng.standard_normal((260, 300)) * scale).astype(np.float32))
    x[:128, :128] = 0
    x[128:, 128:256] *= 1e-3  # blocks of another magnitude beside
    q, s = quantize_fp8_block(x)
    want = _fp8_reference(x, s)
    assert torch.equal(q.view(torch.uint8), want.view(torch.uint8))
    assert not bool(q.float().isnan().any())


def test_fp8_clips_where_a_subnormal_scale_would_overflow_e4m3():
    # absmax / 448 = 1.4 * 2^-149 rounds to 2^-149: x / scale = 627, past e4m3's 448 (torch
    # 2.13's cast saturates to 448 as the clip does; casts that turn >= 480 into NaN exist)
    x = torch.full((128, 128), 448 * 1.4 * 2.0**-149)
    q, s = quantize_fp8_block(x)
    assert float(s[0, 0]) == 2.0**-149
    assert torch.equal(q.view(torch.uint8), _fp8_reference(x, s).view(torch.uint8))
    assert float(q.float().max()) == 448.0
