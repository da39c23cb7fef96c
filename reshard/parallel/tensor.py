"""Tensor parallelism: every tensor's per-rank slice as a ``TensorInfo`` descriptor (pure).

A slice along dim 0 of a row-major tensor is one contiguous byte range (a plain
descriptor: offset + nbytes, so the writer copies it in the kernel). A slice along dim 1
is a strided view: ``strides=(full_cols, 1)`` with ``offset`` at its first element, read
in bounded chunks by ``reshard.transfer.strided``. Nothing is loaded either way.

>>> from pathlib import Path
>>> w = TensorInfo.from_file("w", "F32", (4, 6), Path("m.safetensors"), 100, 96)
>>> r1 = slice_tensor(w, dim=1, parts=2, rank=1)
>>> r1.shape, r1.offset, r1.strides, r1.nbytes
((4, 3), 112, (6, 1), 48)
>>> slice_tensor(w, dim=0, parts=2, rank=1).offset, slice_tensor(w, dim=0, parts=2, rank=1).strides
(148, None)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from reshard.errors import UsageError
from reshard.parallel.arch import REPLICATED, SPLIT_DIM, Family
from reshard.parallel.modelconfig import ModelShape
from reshard.tensors import TensorInfo
from reshard.units import DTYPE_SIZES, dtype_nbytes


def contiguous_strides(shape: Sequence[int]) -> tuple[int, ...]:
    """Row-major element strides: ``contiguous_strides((2, 3, 4)) == (12, 4, 1)``."""
    strides, step = [], 1
    for n in reversed(shape):
        strides.append(step)
        step *= n
    return tuple(reversed(strides))


def slice_tensor(t: TensorInfo, dim: int, parts: int, rank: int) -> TensorInfo:
    """The ``rank``-th of ``parts`` equal slices of ``t`` along ``dim``, as a descriptor.

    Raises:
        UsageError: the dimension does not divide by ``parts``, or a packed sub-byte dtype.
    """
    if DTYPE_SIZES[t.stored_dtype] is None:
        raise UsageError(f"tensor {t.name!r} is {t.stored_dtype} (packed sub-byte elements); "
                         "tensor-parallel slicing needs whole bytes per element")
    if dim >= len(t.shape):
        raise UsageError(f"tensor {t.name!r} has shape {list(t.shape)}: no dim {dim} to split; "
                         "fix its rule in reshard/parallel/arch.py")
    if t.shape[dim] % parts:
        raise UsageError(f"tensor {t.name!r}: dim {dim} of shape {list(t.shape)} does not divide "
                         f"by {parts}; choose a degree that divides {t.shape[dim]}")
    size = t.shape[dim] // parts
    shape = t.shape[:dim] + (size,) + t.shape[dim + 1:]
    strides = t.strides or contiguous_strides(t.shape)
    offset = t.offset + rank * size * strides[dim] * DTYPE_SIZES[t.stored_dtype]
    # A dim-0 slice of a contiguous tensor is itself contiguous: keep it a plain copy.
    keep = None if t.strides is None and all(n == 1 for n in t.shape[:dim]) else strides
    return TensorInfo.from_file(t.name, t.dtype, shape, t.file, offset, dtype_nbytes(t.dtype, shape),
                                t.src_dtype, keep)


@dataclass(frozen=True)
class TensorSplit:
    """How one tensor is split: kind (``column``/``row``/``vocab``/``replicated``), dim
    (``None`` when replicated), the full descriptor, and one slice per rank."""

    name: str
    kind: str
    dim: int | None
    full: TensorInfo
    ranks: tuple[TensorInfo, ...]

    def to_json(self) -> dict:
        return {"split": self.kind, "dim": self.dim, "dtype": self.full.dtype,
                "shape": list(self.full.shape),
                "rank_shape": list(self.ranks[0].shape)}


@dataclass(frozen=True)
class TensorParallelPlan:
    """Every tensor's split over ``degree`` ranks, in the order given."""

    family: str
    degree: int
    splits: tuple[TensorSplit, ...]

    def rank_tensors(self, rank: int) -> tuple[TensorInfo, ...]:
        """Descriptors of what rank ``rank`` holds."""
        return tuple(s.ranks[rank] for s in self.splits)

    def rank_bytes(self, rank: int) -> int:
        return sum(t.nbytes for t in self.rank_tensors(rank))


def check_heads(shape: ModelShape, degree: int) -> None:
    """Attention and KV heads must divide by the degree (each rank owns whole heads).

    Raises:
        UsageError: naming the count that does not divide and the degrees that would.
    """
    for what, count in (("attention heads", shape.heads), ("KV heads", shape.kv_heads)):
        if count % degree:
            fits = [d for d in range(1, count + 1) if shape.heads % d == 0 and shape.kv_heads % d == 0]
            raise UsageError(f"config.json: {count} {what} do not divide by {degree} GPUs; "
                             f"tensor parallelism needs a degree in {fits}")


def plan_tensor_parallel(tensors: Sequence[TensorInfo], family: Family, shape: ModelShape,
                         degree: int) -> TensorParallelPlan:
    """Split every tensor over ``degree`` ranks by the family's rules.

    Raises:
        UsageError: a degree below 1, heads that do not divide, a tensor with no rule, or a
            split dimension that does not divide.
    """
    if degree < 1:
        raise UsageError(f"--tp/--gpus must be at least 1, got {degree}")
    check_heads(shape, degree)
    splits = []
    for t in tensors:
        kind = family.split_of(t.name)
        dim = SPLIT_DIM[kind]
        if kind == REPLICATED or degree == 1:
            ranks = tuple(t for _ in range(degree))
        else:
            ranks = tuple(slice_tensor(t, dim, degree, r) for r in range(degree))
        splits.append(TensorSplit(t.name, kind, dim, t, ranks))
    return TensorParallelPlan(family.name, degree, tuple(splits))
