"""Lazy tensor descriptors: what every reader yields and everything downstream consumes.

A ``TensorInfo`` says where a tensor's bytes live and what they become; it never holds
them. Its *stored bytes* (the tensor in its stored dtype, contiguous, row-major) are
tiled by ``extents``: byte ranges of byte sources (``reshard.transfer.sources``), each
placed at an offset of the stored bytes. A safetensors or ``.bin`` tensor is one extent;
a ZeRO parameter spans several ranks' partitions, a DCP tensor is chunks in several
files, a tensor-parallel slice of a fused matrix is several row ranges. On top of the
stored bytes a tensor carries a transform: a dtype cast (``src_dtype``) or a strided
gather of a non-contiguous view (``strides``, with one extent).

Readers build them, the planner sizes shards from them, writers and the verifier read
the bytes they point at through ``reshard.transfer``.

>>> t = TensorInfo.from_file("model.norm.weight", "BF16", (4096,), Path("m.safetensors"), 80, 8192)
>>> t.numel, t.is_plain_copy, t.offset
(4096, True, 80)
>>> two = TensorInfo("w", "F32", (4, 2), (Extent(FileSource(Path("r0")), 0, 16),
...                  Extent(FileSource(Path("r1")), 64, 16, dest=16)), 32)
>>> two.is_plain_copy, [e.source.key for e in two.extents]
(False, ['r0', 'r1'])
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from pathlib import Path

from reshard.errors import FormatError
from reshard.transfer.sources import ByteSource, FileSource
from reshard.units import dtype_nbytes, numel

_DIGITS = re.compile(r"(\d+)")


def natural_key(name: str) -> tuple:
    """Sort key that puts ``layers.2`` before ``layers.10``.

    >>> sorted(["l.10.w", "l.2.w", "emb"], key=natural_key)
    ['emb', 'l.2.w', 'l.10.w']
    """
    return tuple(int(part) if part.isdigit() else part for part in _DIGITS.split(name))


@dataclass(frozen=True)
class Extent:
    """Bytes of ``source`` placed into a tensor's stored bytes.

    ``rows`` rows of ``length`` bytes: row ``k`` is read at ``offset + k * src_stride``
    and lands at ``dest + k * dest_stride`` (both strides default to ``length``, so the
    default is one contiguous range). A column block of a matrix is one strided extent.

    >>> e = Extent(FileSource(Path("f")), 100, 8, dest=4, rows=3, src_stride=32, dest_stride=16)
    >>> e.nbytes, e.step_src, e.step_dest, list(e.row_ranges())
    (24, 32, 16, [(100, 4, 8), (132, 20, 8), (164, 36, 8)])
    """

    source: ByteSource
    offset: int
    length: int
    dest: int = 0
    rows: int = 1
    src_stride: int | None = None
    dest_stride: int | None = None

    @property
    def nbytes(self) -> int:
        return self.rows * self.length

    @property
    def step_src(self) -> int:
        return self.length if self.src_stride is None else self.src_stride

    @property
    def step_dest(self) -> int:
        return self.length if self.dest_stride is None else self.dest_stride

    @property
    def is_contiguous(self) -> bool:
        """One unbroken range in the source and in the tensor."""
        return self.rows == 1 or (self.step_src == self.length and self.step_dest == self.length)

    def row_ranges(self):
        """``(source offset, dest offset, length)`` of every row, in order."""
        for k in range(self.rows):
            yield self.offset + k * self.step_src, self.dest + k * self.step_dest, self.length


@dataclass(frozen=True)
class Quantization:
    """A quantize transform on top of a tensor's stored bytes (``reshard.quant``): the
    written bytes are computed from the stored tensor of ``source_shape`` (rows in bounded
    chunks), e.g. GGUF Q8_0 blocks, FP8 block-128 values, or a derived tensor such as an
    FP8 weight's ``weight_scale_inv``. ``kind`` is a name in ``reshard.quant.KINDS``.

    >>> Quantization("Q8_0", (4096, 4096)).kind
    'Q8_0'
    """

    kind: str
    source_shape: tuple[int, ...]


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a source checkpoint, described but not loaded.

    Attributes:
        name: the state-dict key.
        dtype: the safetensors dtype name the tensor will be written as (``"BF16"``).
        shape: the tensor's shape; ``()`` for a scalar.
        extents: where the stored bytes come from; they tile them exactly.
        nbytes: byte length as written (after any dtype conversion).
        src_dtype: the stored dtype when it differs from ``dtype`` (cast while
            streaming), else ``None``.
        strides: element strides of a non-contiguous view into one extent's storage
            (``.bin`` sources), else ``None``.
        quant: a quantize transform (``reshard.quant``), else ``None``. Then ``dtype`` is
            the written type (``"Q8_0"``, ``"F8_E4M3"``), ``src_dtype`` the stored one, and
            the stored tensor has ``quant.source_shape``.
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    extents: tuple[Extent, ...]
    nbytes: int
    src_dtype: str | None = None
    strides: tuple[int, ...] | None = None
    # Added for quantized output (issue 12); None everywhere else.
    quant: Quantization | None = None

    @classmethod
    def from_file(
        cls,
        name: str,
        dtype: str,
        shape: tuple[int, ...],
        path: Path | None,
        offset: int,
        nbytes: int,
        src_dtype: str | None = None,
        strides: tuple[int, ...] | None = None,
    ) -> TensorInfo:
        """A tensor whose stored bytes are one range of one local file (for a strided
        view: the range from its first element on)."""
        if strides is None:
            length = dtype_nbytes(src_dtype or dtype, shape)
        else:  # the view's span in its storage, first to last element
            span = sum((n - 1) * s for n, s in zip(shape, strides)) + 1 if numel(shape) else 0
            length = dtype_nbytes(src_dtype or dtype, (span,))
        extents = (Extent(FileSource(Path(path)), offset, length),) if path is not None else ()
        return cls(name, dtype, tuple(shape), extents, nbytes, src_dtype, strides)

    @property
    def numel(self) -> int:
        return numel(self.shape)

    @property
    def source(self) -> ByteSource | None:
        """The source of the first stored byte (for ordering and messages)."""
        return self.extents[0].source if self.extents else None

    @property
    def file(self) -> Path | None:
        """The local file the first stored byte comes from (None when remote or empty)."""
        source = self.source
        return source.path if isinstance(source, FileSource) else None

    @property
    def offset(self) -> int:
        """Offset of the first stored byte in ``source``."""
        return self.extents[0].offset if self.extents else 0

    @property
    def stored_dtype(self) -> str:
        """The dtype of the bytes in the source file."""
        return self.src_dtype or self.dtype

    @property
    def stored_nbytes(self) -> int:
        """How many bytes the tensor occupies in the source when contiguous."""
        # a quantized tensor is computed from a stored tensor of another shape
        shape = self.quant.source_shape if self.quant is not None else self.shape
        return dtype_nbytes(self.stored_dtype, shape)

    @property
    def is_single_range(self) -> bool:
        """The stored bytes are one contiguous range of one source."""
        return (
            len(self.extents) == 1
            and self.strides is None
            and self.extents[0].dest == 0
            and self.extents[0].is_contiguous
        )

    @property
    def is_plain_copy(self) -> bool:
        """True when the output bytes are exactly ``file[offset:offset + nbytes]``."""
        return self.src_dtype is None and self.quant is None and self.is_single_range

    def converted_to(self, dtype: str) -> TensorInfo:
        """The same tensor written as ``dtype`` (no-op when it already is)."""
        if dtype == self.stored_dtype:
            return replace(self, dtype=dtype, src_dtype=None, nbytes=self.stored_nbytes)
        return replace(self, dtype=dtype, src_dtype=self.stored_dtype, nbytes=dtype_nbytes(dtype, self.shape))

    def check_extents(self) -> None:
        """Refuse extents that cannot tile the stored bytes: out of range, or not adding
        up to the tensor's size. (Readers check the finer geometry of what they parse.)

        Raises:
            FormatError: naming the tensor.
        """
        if self.strides is not None:
            if len(self.extents) != 1:
                raise FormatError(f"tensor {self.name!r}: a strided view must have one extent")
            return
        total = self.stored_nbytes
        covered = 0
        for e in self.extents:
            last = e.dest + (e.rows - 1) * e.step_dest + e.length if e.rows else e.dest
            if e.dest < 0 or e.length < 0 or e.rows < 0 or last > total:
                raise FormatError(
                    f"tensor {self.name!r}: a piece from {e.source.key} lands outside "
                    f"its {total} bytes; the checkpoint metadata is inconsistent"
                )
            covered += e.nbytes
        if covered != total:
            raise FormatError(
                f"tensor {self.name!r}: its pieces hold {covered} bytes but the tensor "
                f"needs {total}; the checkpoint is incomplete or inconsistent"
            )


@dataclass(frozen=True)
class Checkpoint:
    """Every tensor of a source, in natural order, plus what else the model folder holds.

    Attributes:
        tensors: descriptors sorted by ``natural_key`` of their names.
        weight_files: every file a tensor byte comes from, in source order (watched for
            changes while the run reads them).
        metadata: merged ``__metadata__`` of the source files (string to string).
        extra_files: non-weight files to copy beside the output (config, tokenizer, ...).
        format: the reader that described it (``"safetensors"``, ``"bin"``, ...).
        dropped: names not written, with the reason (tied aliases, nested extras).
        warnings: things the user must hear about (kept tensors the index omits, ...).
        skipped: what the source holds besides weights and was not read, as
            ``{what: (bytes, tensor count)}`` (optimizer state of a training checkpoint).
        facts: format facts for ``reshard inspect`` (ZeRO stage, mesh, world size, step).
    """

    tensors: tuple[TensorInfo, ...]
    weight_files: tuple[Path, ...]
    metadata: dict[str, str] = field(default_factory=dict)
    extra_files: tuple[Path, ...] = ()
    format: str = "safetensors"
    dropped: dict[str, str] = field(default_factory=dict)
    warnings: tuple[str, ...] = ()
    skipped: dict[str, tuple[int, int]] = field(default_factory=dict)
    facts: dict[str, object] = field(default_factory=dict)

    @property
    def total_size(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    @property
    def total_parameters(self) -> int:
        return sum(t.numel for t in self.tensors)


def add_unique(tensors: dict[str, TensorInfo], t: TensorInfo, path: Path) -> None:
    """``tensors[t.name] = t``, refusing a name that an earlier file of the source has.

    Raises:
        FormatError: naming the tensor and both files.
    """
    if t.name in tensors:
        raise FormatError(
            f"tensor {t.name!r} is in both {tensors[t.name].file} and {path}; "
            "remove the stale file or fix the checkpoint"
        )
    tensors[t.name] = t
