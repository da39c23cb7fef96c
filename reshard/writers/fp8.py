"""FP8 block-128 output (DeepSeek-V3 / Qwen3-FP8 layout) in ordinary safetensors shards.

The layout code is the safetensors format's, unchanged: FP8 output is a rewrite of the
descriptors. Every decoder-layer Linear weight becomes ``F8_E4M3`` (quantized band by
band, ``reshard.quant.stream``) plus a derived float32 ``weight_scale_inv`` of shape
[ceil(out/128), ceil(in/128)] computed from the same source bytes; embeddings, lm_head,
norms, routers and non-float tensors stay as they are. config.json gets the
``quantization_config`` transformers, vLLM and SGLang read.

>>> from pathlib import Path
>>> w = TensorInfo.from_file("model.layers.0.mlp.down_proj.weight", "BF16", (300, 200), Path("m"), 0, 120000)
>>> [(t.name, t.dtype, t.shape, t.nbytes) for t in fp8_tensors(w)]
[('model.layers.0.mlp.down_proj.weight', 'F8_E4M3', (300, 200), 60000), ('model.layers.0.mlp.down_proj.weight_scale_inv', 'F32', (3, 2), 24)]
>>> is_fp8_linear(TensorInfo.from_file("model.layers.0.mlp.gate.weight", "BF16", (8, 64), Path("m"), 0, 1024))
False
"""

from __future__ import annotations

import re
from dataclasses import replace

from reshard.quant import FP8_BLOCK, output_shape, quantized_nbytes
from reshard.tensors import Checkpoint, Quantization, TensorInfo
from reshard.units import FLOAT_DTYPES

QUANTIZATION_CONFIG = {
    "quant_method": "fp8",
    "activation_scheme": "dynamic",
    "fmt": "e4m3",
    "weight_block_size": [FP8_BLOCK, FP8_BLOCK],
}

# Inside decoder layers, Linear weights that stay in the model dtype: MoE routers.
_KEEP = re.compile(r"(\.mlp\.gate\.weight|\.block_sparse_moe\.gate\.weight|\.router\.weight|norm\.weight)$")


def is_fp8_linear(t: TensorInfo) -> bool:
    """A decoder-layer Linear weight that FP8 output quantizes."""
    return (
        len(t.shape) == 2
        and t.name.endswith(".weight")
        and ".layers." in t.name
        and not _KEEP.search(t.name)
        and t.stored_dtype in FLOAT_DTYPES
    )


def fp8_tensors(t: TensorInfo) -> list[TensorInfo]:
    """``t`` as FP8 output writes it: itself, or its FP8 weight and ``weight_scale_inv``."""
    if not is_fp8_linear(t):
        return [t]
    shape = tuple(t.shape)
    weight = replace(
        t,
        dtype="F8_E4M3",
        src_dtype=t.stored_dtype,
        nbytes=quantized_nbytes("FP8", shape),
        quant=Quantization("FP8", shape),
    )
    scale = replace(
        t,
        name=t.name + "_scale_inv",
        dtype="F32",
        src_dtype=t.stored_dtype,
        shape=output_shape("FP8_SCALE_INV", shape),
        nbytes=quantized_nbytes("FP8_SCALE_INV", shape),
        quant=Quantization("FP8_SCALE_INV", shape),
    )
    return [weight, scale]


def fp8_checkpoint(checkpoint: Checkpoint) -> Checkpoint:
    """The checkpoint as FP8 output writes it (natural order kept: each scale right after
    its weight)."""
    tensors = tuple(q for t in checkpoint.tensors for q in fp8_tensors(t))
    return replace(checkpoint, tensors=tensors)
