"""Lazy tensor descriptors: what every reader yields and everything downstream consumes.

A ``TensorInfo`` says where a tensor's bytes live and what they are; it never holds them.
Readers (``reshard.formats``) build them, the planner sizes shards from them, the writer
copies the bytes they point at.

>>> t = TensorInfo("model.norm.weight", "BF16", (4096,), Path("m.safetensors"), 80, 8192)
>>> t.numel, t.is_plain_copy
(4096, True)
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from pathlib import Path

from reshard.units import dtype_nbytes, numel

_DIGITS = re.compile(r"(\d+)")


def natural_key(name: str) -> tuple:
    """Sort key that puts ``layers.2`` before ``layers.10``.

    >>> sorted(["l.10.w", "l.2.w", "emb"], key=natural_key)
    ['emb', 'l.2.w', 'l.10.w']
    """
    return tuple(int(part) if part.isdigit() else part for part in _DIGITS.split(name))


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a source checkpoint, described but not loaded.

    Attributes:
        name: the state-dict key.
        dtype: the safetensors dtype name the tensor will be written as (``"BF16"``).
        shape: the tensor's shape; ``()`` for a scalar.
        file: the file holding the bytes (``None`` when planning from remote headers).
        offset: absolute byte offset of the first element in ``file``.
        nbytes: byte length as written (after any dtype conversion).
        src_dtype: the dtype stored in ``file`` when it differs from ``dtype``
            (conversion while streaming), else ``None``.
        strides: element strides of a non-contiguous view into a storage (``.bin``
            sources), else ``None`` for bytes that are one contiguous run.
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: Path | None
    offset: int
    nbytes: int
    src_dtype: str | None = None
    strides: tuple[int, ...] | None = None

    @property
    def numel(self) -> int:
        return numel(self.shape)

    @property
    def stored_dtype(self) -> str:
        """The dtype of the bytes in the source file."""
        return self.src_dtype or self.dtype

    @property
    def stored_nbytes(self) -> int:
        """How many bytes the tensor occupies in the source when contiguous."""
        return dtype_nbytes(self.stored_dtype, self.shape)

    @property
    def is_plain_copy(self) -> bool:
        """True when the output bytes are exactly ``file[offset:offset + nbytes]``."""
        return self.src_dtype is None and self.strides is None

    def converted_to(self, dtype: str) -> "TensorInfo":
        """The same tensor written as ``dtype`` (no-op when it already is)."""
        if dtype == self.stored_dtype:
            return replace(self, dtype=dtype, src_dtype=None, nbytes=self.stored_nbytes)
        return replace(self, dtype=dtype, src_dtype=self.stored_dtype,
                       nbytes=dtype_nbytes(dtype, self.shape))


@dataclass(frozen=True)
class Checkpoint:
    """Every tensor of a source, in natural order, plus what else the model folder holds.

    Attributes:
        tensors: descriptors sorted by ``natural_key`` of their names.
        weight_files: the files the tensors come from, in source order.
        metadata: merged ``__metadata__`` of the source files (string to string).
        extra_files: non-weight files to copy beside the output (config, tokenizer, ...).
        format: ``"safetensors"`` or ``"bin"``.
        dropped: names not written, with the reason (tied aliases, nested extras).
    """

    tensors: tuple[TensorInfo, ...]
    weight_files: tuple[Path, ...]
    metadata: dict[str, str] = field(default_factory=dict)
    extra_files: tuple[Path, ...] = ()
    format: str = "safetensors"
    dropped: dict[str, str] = field(default_factory=dict)

    @property
    def total_size(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    @property
    def total_parameters(self) -> int:
        return sum(t.numel for t in self.tensors)
