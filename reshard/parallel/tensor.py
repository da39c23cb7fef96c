"""Tensor and expert parallelism: how every tensor is cut over N ranks, each rank's
pieces as ``TensorInfo`` descriptors, and a JSON record of each cut that ``merge`` can
invert without the family table (pure: nothing is read).

A cut splits one dim of a tensor into *segments* laid end to end (one for a plain
weight; ``[Q | K | V]`` for Phi-3's fused ``qkv_proj``; ``[gate | up]`` for its
``gate_up_proj``). Segment ``s`` is cut into ``parts`` equal pieces and rank ``r`` holds
piece ``r * parts // N`` of every segment, concatenated in segment order. ``parts < N``
replicates pieces: KV heads on more ranks than there are KV heads (rank ``r`` holds KV
head ``r // (N / kv)``, as vLLM and SGLang do). A tensor that is not cut (replicated, or
an expert placed whole under ``--expert-parallel``) lists the ranks that hold it.

Phi-3's ``qkv_proj`` with 4 query heads, 2 KV heads, head_dim 2 (rows 8 + 4 + 4), on 4
ranks: rank 3 holds query head 3 and KV head 1, three row ranges of the fused tensor.

>>> from reshard.parallel.families import PHI3
>>> from reshard.parallel.modelconfig import ModelShape
>>> shape = ModelShape(layers=1, hidden=8, heads=4, kv_heads=2, head_dim=2, intermediate=8, vocab=8)
>>> t = TensorInfo("model.layers.0.self_attn.qkv_proj.weight", "F32", (16, 8), (), 512)
>>> cut = cut_tensor(t, PHI3, shape, degree=4)
>>> cut.rank_shape, [(s.size, s.parts, s.replicas) for s in cut.segments]
((6, 8), [(8, 4, 1), (4, 2, 2), (4, 2, 2)])
>>> cut.rank_ranges(3)  # (first row in the full tensor, first row in rank 3's tensor, rows)
[(6, 0, 2), (10, 2, 2), (14, 4, 2)]
>>> [(b.src, b.length, b.dest) for b in cut.rank_blocks(3)]  # bytes: 8 columns x 4 bytes a row
[(192, 64, 0), (320, 64, 64), (448, 64, 128)]
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from reshard.errors import UsageError
from reshard.parallel.arch import (
    EXPERT_BIAS,
    EXPERT_COLUMN,
    EXPERT_INDEX,
    EXPERT_ROW,
    GATE_UP,
    KV_HEADS,
    Q_HEADS,
    QKV,
    REFUSED,
    REPLICATED,
    Family,
    Rule,
    _numbers_as_stars,
)
from reshard.parallel.modelconfig import ModelShape
from reshard.tensors import Extent, TensorInfo
from reshard.transfer.sources import ByteSource
from reshard.units import DTYPE_SIZES, dtype_nbytes, numel

EXPERT = "expert"  # the recorded kind of a routed-expert tensor placed whole on one rank
EXPERT_KINDS = (EXPERT_COLUMN, EXPERT_ROW, EXPERT_BIAS)
# FP8 block-quantized checkpoints (DeepSeek-V3): `X.weight_scale_inv` holds one scale per
# block of `X.weight` and is cut like it, in whole blocks.
SCALE_SUFFIX = "_scale_inv"


def degrees_that_work(shape: ModelShape, mla: bool = False, limit: int | None = None) -> list[int]:
    """Tensor-parallel degrees the attention heads allow: the query heads divide by N,
    and the KV heads either divide by N or N by them (replication); MLA has no KV heads."""
    top = limit or shape.heads
    return [
        d
        for d in range(1, top + 1)
        if shape.heads % d == 0 and (mla or shape.kv_heads % d == 0 or d % shape.kv_heads == 0)
    ]


def check_heads(shape: ModelShape, degree: int, mla: bool = False) -> None:
    """Each rank must own whole query heads, and whole or replicated KV heads.

    Raises:
        UsageError: naming the head counts and the degrees that work.
    """
    if shape.heads % degree:
        raise UsageError(
            f"config.json: {shape.heads} attention heads do not divide by {degree} "
            f"GPUs; tensor parallelism needs a degree in "
            f"{degrees_that_work(shape, mla)}"
        )
    kv = shape.kv_heads
    if not mla and kv % degree and degree % kv:
        raise UsageError(
            f"config.json: {shape.heads} attention heads and {kv} KV heads: {degree} "
            f"GPUs can neither split the {kv} KV heads nor replicate them evenly; "
            f"tensor parallelism needs a degree in {degrees_that_work(shape, mla)}"
        )


def check_experts(shape: ModelShape, degree: int) -> None:
    """``--expert-parallel`` places whole experts: their count must divide by the degree.

    Raises:
        UsageError: a dense model, or an expert count that does not divide.
    """
    if not shape.experts:
        raise UsageError(
            "--expert-parallel needs a mixture-of-experts model; config.json lists no routed experts"
        )
    if shape.experts % degree:
        fits = [d for d in range(1, shape.experts + 1) if shape.experts % d == 0]
        raise UsageError(
            f"config.json: {shape.experts} experts do not divide by {degree} GPUs; "
            f"--expert-parallel needs a degree in {fits}"
        )


@dataclass(frozen=True)
class Segment:
    """``size`` consecutive indices along the cut dim, cut into ``parts`` equal pieces of
    whole ``unit``s; each piece is held by ``replicas = degree / parts`` ranks."""

    size: int
    parts: int
    replicas: int
    unit: int = 1

    @property
    def piece(self) -> int:
        return self.size // self.parts

    def to_json(self) -> dict:
        return {"size": self.size, "parts": self.parts, "replicas": self.replicas}


@dataclass(frozen=True)
class ByteBlock:
    """``rows`` runs of ``length`` bytes: run ``k`` of the source tensor's stored bytes at
    ``src + k * src_stride`` lands at ``dest + k * dest_stride`` of the target's."""

    src: int
    length: int
    dest: int
    rows: int = 1
    src_stride: int = 0
    dest_stride: int = 0

    @property
    def nbytes(self) -> int:
        return self.length * self.rows


def _block(src: int, length: int, dest: int, rows: int, src_stride: int, dest_stride: int) -> ByteBlock:
    if rows == 1 or (src_stride == length and dest_stride == length):
        return ByteBlock(src, length * rows, dest, 1, length * rows, length * rows)
    return ByteBlock(src, length, dest, rows, src_stride, dest_stride)


@dataclass(frozen=True)
class Cut:
    """How one tensor is cut over ``degree`` ranks (see the module doc).

    Attributes:
        kind: the family rule's kind, or ``expert`` for an expert placed whole.
        dtype: the dtype the pieces are written as (after any ``--dtype`` cast; byte
            geometry in the source uses the stored dtype's item size).
        dim: the dim cut, or ``None`` when every holder has the whole tensor.
        segments: the segments along ``dim`` (empty when ``dim`` is ``None``).
        ranks: the ranks holding (a piece of) the tensor.
    """

    name: str
    kind: str
    dtype: str
    shape: tuple[int, ...]
    degree: int
    dim: int | None
    segments: tuple[Segment, ...] = ()
    ranks: tuple[int, ...] = ()

    @property
    def rank_shape(self) -> tuple[int, ...]:
        if self.dim is None:
            return self.shape
        size = sum(s.piece for s in self.segments)
        return self.shape[: self.dim] + (size,) + self.shape[self.dim + 1 :]

    def holds(self, rank: int) -> bool:
        return rank in self.ranks

    def rank_nbytes(self, rank: int, dtype: str | None = None) -> int:
        """Bytes rank ``rank`` holds of this tensor, written as ``dtype``."""
        return dtype_nbytes(dtype or self.dtype, self.rank_shape) if self.holds(rank) else 0

    def rank_ranges(self, rank: int) -> list[tuple[int, int, int]]:
        """``(start in the full tensor, start in the rank's tensor, count)`` along ``dim``
        for each segment's piece that rank ``rank`` holds."""
        out, full_start, rank_start = [], 0, 0
        for s in self.segments:
            piece = rank * s.parts // self.degree
            out.append((full_start + piece * s.piece, rank_start, s.piece))
            full_start += s.size
            rank_start += s.piece
        return out

    def merge_ranges(self) -> list[tuple[int, int, int, int]]:
        """``(rank, start in that rank's tensor, start in the full tensor, count)`` along
        ``dim``: every piece once, from the first rank holding it. This is what ``merge``
        needs, and it follows from the record alone."""
        out, full_start, rank_start = [], 0, 0
        for s in self.segments:
            for piece in range(s.parts):
                out.append((piece * s.replicas, rank_start, full_start + piece * s.piece, s.piece))
            full_start += s.size
            rank_start += s.piece
        return out

    def _bytes(self, ranges, itemsize: int, to_rank: bool) -> list[ByteBlock]:
        dim = self.dim
        outer = numel(self.shape[:dim])
        inner = numel(self.shape[dim + 1 :]) * itemsize
        full_row, rank_row = self.shape[dim] * inner, self.rank_shape[dim] * inner
        blocks = []
        for full_start, rank_start, count in ranges:
            if to_rank:
                blocks.append(
                    _block(full_start * inner, count * inner, rank_start * inner, outer, full_row, rank_row)
                )
            else:
                blocks.append(
                    _block(rank_start * inner, count * inner, full_start * inner, outer, rank_row, full_row)
                )
        return blocks

    def rank_blocks(self, rank: int, itemsize: int | None = None) -> list[ByteBlock]:
        """Where rank ``rank``'s stored bytes come from in the full tensor's stored bytes.

        Raises:
            ValueError: the rank does not hold this tensor.
        """
        if not self.holds(rank):
            raise ValueError(f"rank {rank} holds no piece of {self.name}")
        size = itemsize or DTYPE_SIZES[self.dtype]
        if self.dim is None:
            total = dtype_nbytes(self.dtype, self.shape) if itemsize is None else numel(self.shape) * size
            return [ByteBlock(0, total, 0, 1, total, total)]
        return self._bytes(self.rank_ranges(rank), size, to_rank=True)

    def merge_blocks(self, itemsize: int | None = None) -> list[tuple[int, ByteBlock]]:
        """``(rank, block)`` pairs that rebuild the full tensor's stored bytes from the
        ranks' (``block.src`` in the rank's tensor, ``block.dest`` in the full one)."""
        size = itemsize or DTYPE_SIZES[self.dtype]
        if self.dim is None:
            total = numel(self.shape) * size
            return [(self.ranks[0], ByteBlock(0, total, 0, 1, total, total))]
        out = []
        for rank, rank_start, full_start, count in self.merge_ranges():
            out += [(rank, b) for b in self._bytes([(full_start, rank_start, count)], size, to_rank=False)]
        return out

    def to_json(self) -> dict:
        """The record ``tp_plan.json`` keeps for this tensor."""
        return {
            "split": self.kind,
            "dim": self.dim,
            "dtype": self.dtype,
            "shape": list(self.shape),
            "rank_shape": list(self.rank_shape),
            "segments": [s.to_json() for s in self.segments],
            "ranks": list(self.ranks),
        }

    @classmethod
    def from_json(cls, name: str, record: dict, degree: int) -> Cut:
        """Rebuild a cut from its ``tp_plan.json`` record (no family table needed; a
        version 1 record, without ``segments``/``ranks``, is one equal slice per rank).

        >>> c = Cut.from_json("w", {"split": "row", "dim": 1, "dtype": "F32", "shape": [4, 6]}, 2)
        >>> c.rank_shape, c.merge_ranges()
        ((4, 3), [(0, 0, 0, 3), (1, 0, 3, 3)])

        Raises:
            ValueError: the record is inconsistent (segments that do not tile the dim,
                replicas that do not match the degree, ranks out of range).
        """
        shape = tuple(int(n) for n in record["shape"])
        dim = record.get("dim")
        if "segments" in record:
            segments = tuple(
                Segment(int(s["size"]), int(s["parts"]), int(s["replicas"])) for s in record["segments"]
            )
        else:  # plan file version 1: an equal slice along ``dim`` per rank, in rank order
            segments = (Segment(shape[dim], degree, 1),) if dim is not None else ()
        ranks = tuple(int(r) for r in record.get("ranks", range(degree)))
        if any(not 0 <= r < degree for r in ranks) or not ranks:
            raise ValueError(f"{name}: ranks {list(ranks)} are not within 0..{degree - 1}")
        if dim is not None:
            if not 0 <= dim < len(shape) or sum(s.size for s in segments) != shape[dim]:
                raise ValueError(f"{name}: segments do not tile dim {dim} of {list(shape)}")
            if any(s.parts * s.replicas != degree or s.size % s.parts for s in segments):
                raise ValueError(f"{name}: segments {record['segments']} do not match {degree} ranks")
        return cls(name, str(record.get("split")), str(record["dtype"]), shape, degree, dim, segments, ranks)


def _replicated(t: TensorInfo, kind: str, degree: int, ranks: Iterable[int] | None = None) -> Cut:
    return Cut(
        t.name,
        kind,
        t.dtype,
        t.shape,
        degree,
        None,
        (),
        tuple(range(degree)) if ranks is None else tuple(ranks),
    )


def _segments_for(
    t: TensorInfo, rule: Rule, shape: ModelShape, degree: int, dim: int, size: int
) -> list[tuple[int, int, int]]:
    """``(size, parts, unit)`` of each segment along ``dim`` (of length ``size``)."""
    kind = rule.kind
    if kind == Q_HEADS:
        if size % shape.heads:
            raise UsageError(
                f"tensor {t.name!r}: dim {dim} of shape {list(t.shape)} is not a "
                f"whole number of the {shape.heads} attention heads; fix its rule "
                "in reshard/parallel/families.py"
            )
        return [(size, degree, size // shape.heads)]
    if kind == KV_HEADS:
        if size % shape.kv_heads:
            raise UsageError(
                f"tensor {t.name!r}: dim {dim} of shape {list(t.shape)} is not a "
                f"whole number of the {shape.kv_heads} KV heads; fix its rule in "
                "reshard/parallel/families.py"
            )
        return [(size, min(degree, shape.kv_heads), size // shape.kv_heads)]
    if kind == QKV:
        q, kv = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
        if size != q + 2 * kv:
            raise UsageError(
                f"tensor {t.name!r}: {size} rows, but {shape.heads} heads and "
                f"{shape.kv_heads} KV heads of {shape.head_dim} make {q + 2 * kv}; "
                "the fused qkv_proj does not match config.json"
            )
        kv_parts = min(degree, shape.kv_heads)
        return [(q, degree, shape.head_dim), (kv, kv_parts, shape.head_dim), (kv, kv_parts, shape.head_dim)]
    if kind == GATE_UP:
        if size % 2:
            raise UsageError(
                f"tensor {t.name!r}: {size} rows cannot be the two halves [gate | up] of a fused gate_up_proj"
            )
        return [(size // 2, degree, rule.unit), (size // 2, degree, rule.unit)]
    return [(size, degree, rule.unit)]


def _scale_block(scale: TensorInfo, weight: TensorInfo | None, dim: int) -> int:
    """Elements of the weight's ``dim`` per scale entry (FP8 block quantization)."""
    if weight is None or len(weight.shape) != len(scale.shape):
        raise UsageError(
            f"tensor {scale.name!r}: block scales without their weight "
            f"{scale.name[: -len(SCALE_SUFFIX)]!r} of the same rank; cannot cut them"
        )
    rows, blocks = weight.shape[dim], scale.shape[dim]
    if rows % blocks:
        raise UsageError(
            f"tensor {scale.name!r}: {blocks} scale blocks do not tile the "
            f"{rows} entries of dim {dim} of {weight.name!r}; cannot cut it there"
        )
    return rows // blocks


def cut_tensor(
    t: TensorInfo,
    family: Family,
    shape: ModelShape,
    degree: int,
    expert_parallel: bool = False,
    weight_of_scale: TensorInfo | None = None,
) -> Cut:
    """How tensor ``t`` is cut over ``degree`` ranks by the family's rule.

    Raises:
        UsageError: no rule, a refused tensor, packed sub-byte elements, or a dimension
            that does not divide (one line naming the tensor).
    """
    name = t.name
    is_scale = name.endswith(SCALE_SUFFIX)
    rule = family.rule_for(name[: -len(SCALE_SUFFIX)] if is_scale else name)
    if degree == 1:
        return _replicated(t, rule.kind, 1)
    if rule.kind == REFUSED:
        raise UsageError(f"tensor {name!r}: {rule.reason}")
    if rule.kind in EXPERT_KINDS and expert_parallel:
        per_rank = shape.experts // degree
        numbered = EXPERT_INDEX.search(name)
        if numbered:
            return _replicated(t, EXPERT, degree, (int(numbered.group(1)) // per_rank,))
        if not t.shape or t.shape[0] != shape.experts:
            raise UsageError(
                f"tensor {name!r}: shape {list(t.shape)} does not start with the "
                f"{shape.experts} experts of config.json; cannot place its experts"
            )
        return Cut(
            name,
            EXPERT,
            t.dtype,
            t.shape,
            degree,
            0,
            (Segment(shape.experts, degree, 1),),
            tuple(range(degree)),
        )
    if rule.kind in (REPLICATED, EXPERT_BIAS):
        return _replicated(t, rule.kind, degree)
    dim = rule.split_dim
    if dim >= len(t.shape):
        raise UsageError(
            f"tensor {name!r} has shape {list(t.shape)}: no dim {dim} to split; "
            "fix its rule in reshard/parallel/families.py"
        )
    if DTYPE_SIZES.get(t.stored_dtype) is None:
        raise UsageError(
            f"tensor {name!r} is {t.stored_dtype} (packed sub-byte elements); "
            "tensor-parallel slicing needs whole bytes per element"
        )
    block = _scale_block(t, weight_of_scale, dim) if is_scale else 1
    full = weight_of_scale.shape[dim] if is_scale else t.shape[dim]
    segments = []
    hint = " or use --expert-parallel" if rule.kind in EXPERT_KINDS else ""
    for size, parts, unit in _segments_for(
        weight_of_scale if is_scale else t, rule, shape, degree, dim, full
    ):
        if size % (parts * unit):
            what = f"{size // unit} groups of {unit}" if unit > 1 else f"{size}"
            raise UsageError(
                f"tensor {name!r}: dim {dim} of shape {list(t.shape)} ({what}) does "
                f"not divide into {parts} pieces; choose another degree{hint}"
            )
        if (size // parts) % block:
            raise UsageError(
                f"tensor {name!r}: a 1/{parts} slice of dim {dim} of its weight "
                f"{list(weight_of_scale.shape)} is {size // parts}, not a whole number "
                f"of its {block}-wide scale blocks; choose another degree{hint}"
            )
        segments.append(Segment(size // block, parts, degree // parts, unit))
    return Cut(name, rule.kind, t.dtype, t.shape, degree, dim, tuple(segments), tuple(range(degree)))


@dataclass(frozen=True)
class TensorSplit:
    """One tensor's cut with its full descriptor (kept for ``split_parallel``'s plan file)."""

    name: str
    kind: str
    dim: int | None
    full: TensorInfo
    ranks: tuple[TensorInfo, ...]

    def to_json(self) -> dict:
        return {
            "split": self.kind,
            "dim": self.dim,
            "dtype": self.full.dtype,
            "shape": list(self.full.shape),
            "rank_shape": list(self.ranks[0].shape),
        }


_BYTES_KEY = "\0bytes per rank"  # a cache slot in TensorParallelPlan.full (not a tensor name)
_LEGACY_KIND = {
    Q_HEADS: "column",
    KV_HEADS: "column",
    EXPERT_COLUMN: "column",
    EXPERT_ROW: "row",
    EXPERT_BIAS: "replicated",
}


@dataclass(frozen=True)
class TensorParallelPlan:
    """Every tensor's cut over ``degree`` ranks, in the order given.

    ``rank_tensors(r)`` are rank ``r``'s descriptors (original names, rank shapes);
    ``to_json()`` is the body of ``tp_plan.json``; ``merged_tensor`` inverts one record.
    """

    family: str
    degree: int
    expert_parallel: bool
    cuts: tuple[Cut, ...]
    full: dict = field(repr=False, compare=False, default_factory=dict)

    def rank_bytes(self, rank: int) -> int:
        """Bytes rank ``rank`` holds, as written."""
        return self.bytes_per_rank()[rank]

    def bytes_per_rank(self) -> list[int]:
        """Bytes each rank holds, as written (one pass over the cuts, cached)."""
        cached = self.full.get(_BYTES_KEY)
        if cached is None:
            everywhere, own = 0, [0] * self.degree
            for c in self.cuts:
                nbytes = dtype_nbytes(self.full[c.name].dtype, c.rank_shape)
                if len(c.ranks) == self.degree:
                    everywhere += nbytes
                else:
                    for r in c.ranks:
                        own[r] += nbytes
            cached = [everywhere + b for b in own]
            self.full[_BYTES_KEY] = cached
        return cached

    def rank_tensors(self, rank: int) -> tuple[TensorInfo, ...]:
        """Descriptors of what rank ``rank`` holds (tensors it holds no piece of are absent).

        Raises:
            UsageError: a piece the descriptors cannot express (see ``rank_tensor``).
        """
        return tuple(rank_tensor(self.full[c.name], c, rank) for c in self.cuts if c.holds(rank))

    @property
    def splits(self) -> tuple[TensorSplit, ...]:
        """The plan in ``split_parallel``'s older form (plan file version 1: every rank
        holds an equal slice along one dim, which its merge stitches back in rank order).

        Raises:
            UsageError: a cut version 1 cannot record: merge would stitch it wrongly
                (fused segments, replicated KV heads) or miss it (placed experts).
        """
        out = []
        for c in self.cuts:
            if len(c.ranks) != self.degree:
                raise UsageError(
                    f"tensor {c.name!r} sits on rank {c.ranks[0]} only "
                    "(--expert-parallel); this writer needs every rank to hold it"
                )
            if len(c.segments) > 1 or any(s.replicas > 1 for s in c.segments):
                what = (
                    f"{len(c.segments)} segments per rank ({c.kind})"
                    if len(c.segments) > 1
                    else f"pieces shared by {c.segments[0].replicas} ranks (replicated KV heads)"
                )
                raise UsageError(
                    f"tensor {c.name!r} is cut into {what}; tp_plan.json version 1 "
                    "cannot record that cut, so merge could not invert it; "
                    "`reshard plan --strategy tensor` previews it"
                )
            full = self.full[c.name]
            out.append(
                TensorSplit(
                    c.name,
                    _LEGACY_KIND.get(c.kind, c.kind),
                    c.dim,
                    full,
                    tuple(rank_tensor(full, c, r) for r in range(self.degree)),
                )
            )
        return tuple(out)

    def records(self) -> dict[str, dict]:
        """Tensor name -> its cut record (``Cut.to_json``)."""
        return {c.name: c.to_json() for c in self.cuts}

    def to_json(self, version: int = 2) -> dict:
        """The body of ``tp_plan.json``: everything ``merge`` needs, no family table."""
        return {
            "format": "reshard-tensor-parallel",
            "version": version,
            "family": self.family,
            "tp": self.degree,
            "expert_parallel": self.expert_parallel,
            "ranks": [f"rank-{r}" for r in range(self.degree)],
            "tensors": self.records(),
        }


def plan_tensor_parallel(
    tensors: Sequence[TensorInfo],
    family: Family,
    shape: ModelShape,
    degree: int,
    expert_parallel: bool = False,
) -> TensorParallelPlan:
    """Cut every tensor over ``degree`` ranks by the family's rules.

    With ``expert_parallel``, routed experts are placed whole (rank ``r`` holds experts
    ``[r E/N, (r+1) E/N)``); attention, dense and shared-expert MLPs stay tensor-parallel.

    Raises:
        UsageError: a degree below 1, heads or experts that do not divide, a tensor with
            no rule, or a dimension that does not divide.
    """
    if degree < 1:
        raise UsageError(f"--tp/--gpus must be at least 1, got {degree}")
    check_heads(shape, degree, family.mla)
    if expert_parallel:
        check_experts(shape, degree)
    by_name = {t.name: t for t in tensors}
    cuts = []
    # Layers repeat: one cut per distinct (tensor kind, shape, dtype), renamed for the rest
    # (a 256-expert model has ~90,000 tensors but a few dozen distinct cuts).
    same: dict[tuple, Cut] = {}
    for t in tensors:
        weight = by_name.get(t.name[: -len(SCALE_SUFFIX)]) if t.name.endswith(SCALE_SUFFIX) else None
        numbered = expert_parallel and EXPERT_INDEX.search(t.name)
        key = (_numbers_as_stars(t.name), t.shape, t.dtype, t.stored_dtype, weight and weight.shape)
        cut = None if numbered else same.get(key)
        if cut is None:
            cut = cut_tensor(t, family, shape, degree, expert_parallel, weight)
            if not numbered:
                same[key] = cut
        elif cut.name != t.name:  # (the constructor: dataclasses.replace is 10x slower)
            cut = Cut(t.name, cut.kind, cut.dtype, cut.shape, degree, cut.dim, cut.segments, cut.ranks)
        cuts.append(cut)
    return TensorParallelPlan(family.name, degree, expert_parallel, tuple(cuts), by_name)


# ---- descriptors -------------------------------------------------------------------------


def rank_tensor(full: TensorInfo, cut: Cut, rank: int) -> TensorInfo:
    """Rank ``rank``'s piece of ``full`` as a descriptor: same name, the rank shape, its
    extents located in the full tensor's sources (nothing is read).

    A whole tensor is ``full`` itself. A cut along dim 0 of a contiguous tensor is one
    contiguous extent per segment (Phi-3's ``qkv_proj``: three row ranges); a cut along a
    later dim is one strided extent per segment (``rows`` = the product of the dims
    before it), so every piece of a rank shares one row width, as the writer needs.

    >>> from pathlib import Path
    >>> from reshard.parallel.families import LLAMA
    >>> from reshard.parallel.modelconfig import ModelShape
    >>> shape = ModelShape(layers=1, hidden=8, heads=4, kv_heads=2, head_dim=2, intermediate=8, vocab=8)
    >>> w = TensorInfo.from_file("model.layers.0.mlp.down_proj.weight", "F32", (4, 6), Path("m"), 100, 96)
    >>> e, = rank_tensor(w, cut_tensor(w, LLAMA, shape, 2), 1).extents  # columns 3-5
    >>> e.offset, e.length, e.rows, e.step_src, e.step_dest
    (112, 12, 4, 24, 12)

    Raises:
        UsageError: a piece of a non-contiguous ``.bin`` view that is more than one
            slice, or of a tensor whose own bytes are strided blocks.
    """
    if cut.dim is None:
        return full
    shape = cut.rank_shape
    nbytes = dtype_nbytes(full.dtype, shape)
    if full.strides is not None:
        return _view_of_view(full, cut, rank, shape, nbytes)
    blocks = cut.rank_blocks(rank, DTYPE_SIZES[full.stored_dtype])
    extents = compose(blocks, source_runs(full), full.name)
    return TensorInfo(full.name, full.dtype, shape, tuple(extents), nbytes, full.src_dtype)


def _view_of_view(full: TensorInfo, cut: Cut, rank: int, shape, nbytes) -> TensorInfo:
    """A slice of a non-contiguous ``.bin`` view is a view with the same strides."""
    ranges = cut.rank_ranges(rank)
    if len(ranges) != 1:
        raise UsageError(
            f"tensor {full.name!r} is a non-contiguous view in a .bin and its rank "
            "pieces are several slices; convert the source with `reshard split` first"
        )
    itemsize = DTYPE_SIZES[full.stored_dtype]
    (base,) = full.extents
    offset = base.offset + ranges[0][0] * full.strides[cut.dim] * itemsize
    span = sum((n - 1) * st for n, st in zip(shape, full.strides)) + 1 if numel(shape) else 0
    return TensorInfo(
        full.name,
        full.dtype,
        shape,
        (Extent(base.source, offset, span * itemsize),),
        nbytes,
        full.src_dtype,
        full.strides,
    )


def source_runs(t: TensorInfo) -> list[tuple[int, int, ByteSource, int]]:
    """``(first stored byte, length, source, source offset)`` of each contiguous run of a
    tensor's stored bytes, in order.

    Raises:
        UsageError: the tensor's bytes are strided blocks in its sources.
    """
    runs = []
    for e in t.extents:
        if not e.is_contiguous:
            raise UsageError(
                f"tensor {t.name!r}: its source bytes are strided blocks; cutting "
                "it again needs a contiguous copy (run `reshard split` first)"
            )
        runs.append((e.dest, e.nbytes, e.source, e.offset))
    return sorted(runs, key=lambda r: r[0])


def compose(
    blocks: Sequence[ByteBlock], runs: Sequence[tuple[int, int, ByteSource, int]], name: str = "tensor"
) -> list[Extent]:
    """Map blocks of a tensor's stored bytes onto the runs that hold them in their sources:
    rows inside one run stay one strided extent; a row that crosses runs (a ZeRO or DCP
    chunk boundary) is split, one piece per run.

    >>> [(e.source, e.offset, e.rows, e.step_src) for e in compose([ByteBlock(4, 2, 0, 3, 8, 2)], [(0, 24, "f", 100)])]
    [('f', 104, 3, 8)]
    >>> [(e.source, e.offset, e.length, e.dest) for e in compose([ByteBlock(2, 4, 0)], [(0, 4, "a", 0), (4, 4, "b", 50)])]
    [('a', 2, 2, 0), ('b', 50, 2, 2)]
    """
    out = []
    for b in blocks:
        stride = b.src_stride or b.length
        dest_stride = b.dest_stride or b.length
        covered = [False] * b.rows
        for start, length, source, offset in runs:
            first = max(0, -(-(start - b.src) // stride))
            last = min(b.rows - 1, (start + length - b.src - b.length) // stride)
            if last >= first:
                rows = last - first + 1
                out.append(
                    Extent(
                        source,
                        offset + b.src + first * stride - start,
                        b.length,
                        b.dest + first * dest_stride,
                        rows,
                        stride if rows > 1 else None,
                        dest_stride if rows > 1 else None,
                    )
                )
                covered[first : last + 1] = [True] * rows
        for k in (k for k in range(b.rows) if not covered[k]):
            lo, hi = b.src + k * stride, b.src + k * stride + b.length
            found = 0
            for start, length, source, offset in runs:
                a, z = max(lo, start), min(hi, start + length)
                if a < z:
                    out.append(Extent(source, offset + a - start, z - a, b.dest + k * dest_stride + (a - lo)))
                    found += z - a
            if found != b.length:
                raise UsageError(f"tensor {name!r}: its source pieces do not cover bytes {lo}-{hi}")
    return out


def merged_tensor(name: str, record: dict, degree: int, pieces: dict[int, TensorInfo]) -> TensorInfo:
    """The full tensor rebuilt from rank pieces by its ``tp_plan.json`` record alone: a
    descriptor whose extents point into the rank files (``pieces[r]`` is rank ``r``'s
    descriptor of ``name``; only the ranks the record needs must be present: the first
    holder of each piece).

    Raises:
        UsageError: a needed rank piece is missing or has the wrong shape or dtype.
        ValueError: an inconsistent record (see ``Cut.from_json``).
    """
    cut = Cut.from_json(name, record, degree)
    needed = sorted({rank for rank, _ in cut.merge_blocks(1)})
    for rank in needed:
        piece = pieces.get(rank)
        if piece is None:
            raise UsageError(f"rank-{rank}: lacks tensor {name!r} that tp_plan.json lists")
        if tuple(piece.shape) != cut.rank_shape or piece.dtype != record["dtype"]:
            raise UsageError(
                f"rank-{rank}: tensor {name!r} is {piece.dtype}{list(piece.shape)}, "
                f"but tp_plan.json expects {record['dtype']}{list(cut.rank_shape)}"
            )
    first = pieces[needed[0]]
    if cut.dim is None:
        return first
    itemsize = DTYPE_SIZES[first.stored_dtype]
    extents = []
    for rank, block in cut.merge_blocks(itemsize):
        extents += compose([block], source_runs(pieces[rank]), name)
    return TensorInfo(
        name,
        first.dtype,
        cut.shape,
        tuple(sorted(extents, key=lambda e: e.dest)),
        dtype_nbytes(first.dtype, cut.shape),
        first.src_dtype,
    )


def parameter_count(t: TensorInfo) -> int:
    """Model parameters a tensor holds: its elements, except that quantization scales
    (FP8 ``*_scale_inv``, MXFP4 ``*_scales``) are not parameters and an MXFP4 ``*_blocks``
    byte packs two 4-bit parameters (gpt-oss)."""
    if t.name.endswith((SCALE_SUFFIX, "_scales")):
        return 0
    if t.name.endswith("_blocks") and t.stored_dtype == "U8":
        return 2 * numel(t.shape)
    return numel(t.shape)


def parameters(tensors: Iterable[TensorInfo], family: Family, shape: ModelShape) -> tuple[int, int]:
    """``(total, active)`` parameters: every expert counts in the total; a token uses
    ``experts_per_token / experts`` of the routed-expert parameters."""
    total = routed = 0
    for t in tensors:
        n = parameter_count(t)
        total += n
        base = t.name[: -len(SCALE_SUFFIX)] if t.name.endswith(SCALE_SUFFIX) else t.name
        if shape.experts and family.rule_for(base).kind in EXPERT_KINDS:
            routed += n
    if not shape.experts or not routed:
        return total, total
    return total, total - routed + routed * shape.experts_per_token // shape.experts
