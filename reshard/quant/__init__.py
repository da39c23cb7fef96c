"""Quantization: pure functions on arrays (``ggml``: GGUF Q8_0/Q4_0, ``fp8``: FP8 block-128),
the streaming transform the writer applies chunk by chunk (``stream``), and the per-block
error bounds ``verify --against`` checks (``check``).

Every kind names what a ``reshard.tensors.Quantization`` computes, how many source rows
one unit of work needs (blocks never straddle a chunk), and the written size.

>>> quantized_nbytes("Q8_0", (2, 64)), quantized_nbytes("Q4_0", (2, 64))
(136, 72)
>>> quantized_nbytes("FP8", (300, 200)), quantized_nbytes("FP8_SCALE_INV", (300, 200))
(60000, 24)
>>> parse_quant("Q8_0"), parse_quant("fp8")
('q8_0', 'fp8')
"""

from __future__ import annotations

from reshard.errors import UsageError

# GGUF block formats: (elements per block, bytes per block), as ggml lays them out.
GGML_BLOCKS = {"Q8_0": (32, 34), "Q4_0": (32, 18)}
FP8_BLOCK = 128  # DeepSeek-V3 / Qwen3-FP8 weight_block_size [128, 128]
FP8_MAX = 448.0  # largest finite float8_e4m3fn

# What --quantize accepts: GGUF types (q8_0, q4_0; f16/bf16/f32 are plain GGUF casts) and fp8.
QUANT_NAMES = ("q8_0", "q4_0", "f16", "bf16", "f32", "fp8")
GGUF_TYPES = {"q8_0": "Q8_0", "q4_0": "Q4_0", "f16": "F16", "bf16": "BF16", "f32": "F32"}

# Rows of the source tensor one unit of work spans.
UNIT_ROWS = {"Q8_0": 1, "Q4_0": 1, "FP8": FP8_BLOCK, "FP8_SCALE_INV": FP8_BLOCK}
KINDS = tuple(UNIT_ROWS)


def parse_quant(text: str) -> str:
    """The canonical --quantize name, or a UsageError listing the accepted ones."""
    name = text.strip().lower()
    if name not in QUANT_NAMES:
        raise UsageError(f"unknown --quantize {text!r}: use one of {', '.join(QUANT_NAMES)}")
    return name


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


def output_shape(kind: str, source_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The written tensor's shape (the scale grid for ``FP8_SCALE_INV``)."""
    if kind == "FP8_SCALE_INV":
        rows, cols = source_shape
        return (_ceil(rows, FP8_BLOCK), _ceil(cols, FP8_BLOCK))
    return tuple(source_shape)


def quantized_nbytes(kind: str, source_shape: tuple[int, ...]) -> int:
    """Bytes written for a tensor of ``source_shape`` quantized as ``kind``."""
    n = 1
    for d in source_shape:
        n *= d
    if kind in GGML_BLOCKS:
        size, block_bytes = GGML_BLOCKS[kind]
        return n // size * block_bytes
    if kind == "FP8":
        return n
    if kind == "FP8_SCALE_INV":
        r, c = output_shape(kind, source_shape)
        return 4 * r * c
    raise ValueError(f"unknown quantization kind {kind!r}")
