"""Per-GPU memory estimates: weights + KV cache + activations (pure arithmetic).

For inference over ``t`` tensor-parallel ranks (``t = 1`` for a pipeline stage), with
``b`` bytes per element of the compute dtype:

- weights: the tensor bytes the GPU holds (from the checkpoint headers, after ``--dtype``).
- KV cache: ``2 x batch x context x n_kv_heads x head_dim x b x layers``, the 2 for keys
  and values. A pipeline stage counts only its own layers; a tensor-parallel rank holds
  ``n_kv_heads / t`` of the heads of every layer.
- activations: ``batch x context x b x (2 x hidden + 3 x intermediate / t)``: the peak
  of one layer's forward pass over the whole context (prefill): the residual stream and
  the normalised input (2 x hidden), plus the MLP's gate and up projections and their
  gated product (3 x intermediate / t). Attention scores are not counted: SDPA and flash
  attention never materialise the context x context matrix. Layers run one after
  another, so this is per GPU, not per layer. It ignores the CUDA context and allocator
  slack (budget about 1-2 GB more per GPU).

>>> from reshard.parallel.modelconfig import ModelShape
>>> m = ModelShape(layers=32, hidden=4096, heads=32, kv_heads=8, head_dim=128,
...                intermediate=14336, vocab=32000)
>>> kv_cache_bytes(m, batch=1, context=4096, itemsize=2, layers=32)  # 0.5 GiB
536870912
>>> activation_bytes(m, batch=1, context=4096, itemsize=2)
419430400
"""

from __future__ import annotations

from dataclasses import dataclass

from reshard.parallel.modelconfig import ModelShape


def kv_cache_bytes(shape: ModelShape, batch: int, context: int, itemsize: int, layers: int,
                   tp: int = 1) -> int:
    """Keys and values for ``layers`` layers, ``kv_heads / tp`` heads each."""
    return 2 * batch * context * (shape.kv_heads // tp) * shape.head_dim * itemsize * layers


def activation_bytes(shape: ModelShape, batch: int, context: int, itemsize: int, tp: int = 1) -> int:
    """Peak activations of one layer over the whole context (formula in the module doc)."""
    return batch * context * itemsize * (2 * shape.hidden + 3 * shape.intermediate // tp)


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
        return {"gpu": self.gpu, "holds": self.holds, "layers": list(self.layers),
                "weights": self.weights, "kv_cache": self.kv_cache,
                "activations": self.activations, "total": self.total}
