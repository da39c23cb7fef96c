"""Per-GPU memory estimates: weights + KV cache + activations (pure arithmetic).

For inference over ``t`` tensor-parallel ranks (``t = 1`` for a pipeline stage), with
``b`` bytes per element of the compute dtype:

- weights: the tensor bytes the GPU holds (from the checkpoint headers, after ``--dtype``).
- KV cache, summed over the GPU's layers: ``batch x tokens(layer) x per_token``, where
  ``tokens`` is the context, or ``min(context, window)`` for a sliding-attention layer,
  and ``per_token`` is ``2 x kv_heads_per_rank x head_dim x b`` (keys and values; a rank
  holds ``kv_heads / t`` KV heads, or one replicated head when ``t > kv_heads``). MLA
  (DeepSeek) caches the compressed latent instead: ``(kv_lora_rank + qk_rope_head_dim)
  x b`` per token, whole on every tensor-parallel rank (vLLM, SGLang).
- activations: ``batch x context x b x (2 x hidden + 3 x mlp_width / t)``: the peak of
  one layer's forward pass over the whole context (prefill): the residual stream and
  the normalised input (2 x hidden), plus the MLP's gate and up projections and their
  gated product (3 x the MLP width: the intermediate size, or for a mixture of experts
  top-k experts plus the shared ones). Attention scores are not counted: SDPA and flash
  attention never materialise the context x context matrix. Layers run one after
  another, so this is per GPU, not per layer.
- not counted: the CUDA context, allocator slack and framework workspaces; the planner
  adds a headroom per GPU for them (``--headroom``, 1 GB by default).

>>> from reshard.parallel.modelconfig import ModelShape
>>> m = ModelShape(layers=32, hidden=4096, heads=32, kv_heads=8, head_dim=128,
...                intermediate=14336, vocab=32000)
>>> kv_cache_bytes(m, batch=1, context=4096, itemsize=2, layers=32)  # 0.5 GiB
536870912
>>> activation_bytes(m, batch=1, context=4096, itemsize=2)
419430400
>>> w = ModelShape(**{**m.__dict__, "layer_types": ("sliding_attention",) * 32, "sliding_window": 4096})
>>> kv_cache_bytes(w, batch=1, context=32768, itemsize=2, layers=range(16))  # Mistral v0.1, 1 of 2 stages
268435456
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from reshard.parallel.modelconfig import ModelShape


def kv_heads_per_rank(shape: ModelShape, tp: int = 1) -> int:
    """KV heads one tensor-parallel rank holds (at least one: replicated beyond kv_heads)."""
    return max(1, shape.kv_heads // tp)


def kv_bytes_per_token(shape: ModelShape, itemsize: int, tp: int = 1) -> int:
    """Cache bytes per token per layer on one rank."""
    if shape.mla:
        return (shape.kv_lora_rank + shape.qk_rope_head_dim) * itemsize
    return 2 * kv_heads_per_rank(shape, tp) * shape.head_dim * itemsize


def kv_cache_bytes(
    shape: ModelShape, batch: int, context: int, itemsize: int, layers: int | Iterable[int], tp: int = 1
) -> int:
    """Keys and values of ``layers`` (a count from layer 0, or the layer numbers) on one
    rank of ``tp``, each layer holding the tokens its attention can still see."""
    numbers = range(layers) if isinstance(layers, int) else layers
    tokens = 0
    for layer in numbers:
        window = shape.window_of(layer)
        tokens += min(context, window) if window else context
    return batch * tokens * kv_bytes_per_token(shape, itemsize, tp)


def activation_bytes(shape: ModelShape, batch: int, context: int, itemsize: int, tp: int = 1) -> int:
    """Peak activations of one layer over the whole context (formula in the module doc)."""
    return batch * context * itemsize * (2 * shape.hidden + 3 * shape.mlp_width // tp)


@dataclass(frozen=True)
class GpuEstimate:
    """What one GPU holds and needs, in bytes."""

    gpu: int
    holds: str
    layers: tuple[int, ...]
    weights: int
    kv_cache: int
    activations: int

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.activations

    def to_json(self) -> dict:
        return {
            "gpu": self.gpu,
            "holds": self.holds,
            "layers": list(self.layers),
            "weights": self.weights,
            "kv_cache": self.kv_cache,
            "activations": self.activations,
            "total": self.total,
        }
