"""Turn resolved source files into a ``Checkpoint``: every tensor described, cross-checked.

>>> from reshard.hub.resolve import resolve_source
>>> load_checkpoint(resolve_source("tests/data/none"))  # doctest: +SKIP
"""

from __future__ import annotations

import logging
from pathlib import Path

from reshard.errors import FormatError, UsageError
from reshard.formats.index import read_index
from reshard.formats.safetensors import read_header
from reshard.hub.resolve import ResolvedSource
from reshard.tensors import Checkpoint, TensorInfo, natural_key
from reshard.units import FLOAT_DTYPES

log = logging.getLogger(__name__)


def load_checkpoint(source: ResolvedSource, key: str | None = None) -> Checkpoint:
    """Describe every tensor of a resolved source, in natural order.

    Args:
        source: from ``resolve_source``.
        key: for nested ``.bin`` training checkpoints, the entry holding the weights.

    Raises:
        FormatError: a malformed file, a tensor in two files, a tensor the index names but
            its file lacks, or no tensors at all.
    """
    if source.format == "bin":
        from reshard.formats.torchbin import load_bin_checkpoint

        return load_bin_checkpoint(source, key=key)
    if key is not None:
        raise UsageError("--key only applies to nested PyTorch .bin/.pt training checkpoints")
    return load_safetensors_checkpoint(source)


def load_safetensors_checkpoint(source: ResolvedSource) -> Checkpoint:
    """Read every header; check the index and the files agree."""
    tensors: dict[str, TensorInfo] = {}
    metadata: dict[str, str] = {}
    for path in source.weight_files:
        header = read_header(path)
        for key, value in header.metadata.items():
            metadata.setdefault(key, value)
        for t in header.tensors:
            if t.name in tensors:
                raise FormatError(f"tensor {t.name!r} is in both {tensors[t.name].file} and {path}; "
                                  "remove the stale file or fix the checkpoint")
            tensors[t.name] = t
    if source.index_file is not None:
        _check_against_index(source.index_file, tensors)
    if not tensors:
        files = ", ".join(str(p) for p in source.weight_files)
        raise FormatError(f"{files}: the checkpoint holds no tensors; nothing to reshard")
    ordered = tuple(sorted(tensors.values(), key=lambda t: natural_key(t.name)))
    return Checkpoint(ordered, source.weight_files, metadata, source.extra_files, "safetensors")


def _check_against_index(index_file: Path, tensors: dict[str, TensorInfo]) -> None:
    for name, file_name in read_index(index_file).items():
        found = tensors.get(name)
        if found is None:
            raise FormatError(f"{index_file}: names tensor {name!r} in {file_name}, but that file "
                              "lacks it; regenerate the index or re-download the shard")
        if found.file is not None and found.file.name != file_name:
            raise FormatError(f"{index_file}: maps tensor {name!r} to {file_name}, but it is in "
                              f"{found.file.name}; regenerate the index")
    indexed = set(read_index(index_file))
    for name in tensors:
        if name not in indexed:
            log.warning("%s: tensor %r is in %s but not in the index; keeping it",
                        index_file, name, tensors[name].file)


def convert_checkpoint(checkpoint: Checkpoint, dtype: str) -> Checkpoint:
    """Describe the checkpoint as written with floating-point tensors cast to ``dtype``;
    integer and bool tensors are left as they are."""
    from dataclasses import replace

    tensors = tuple(t.converted_to(dtype) if t.stored_dtype in FLOAT_DTYPES else t
                    for t in checkpoint.tensors)
    return replace(checkpoint, tensors=tensors)
