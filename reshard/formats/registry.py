"""Every input format, registered in one place: detection, reading, pickle allow-list.

``load_checkpoint`` turns a resolved source (``reshard.hub.resolve``) into a
``Checkpoint`` of descriptors through the reader registered for its format. A reader is
a few functions; a new input format registers one and everything downstream (plan,
writers, verify, resume) works on it unchanged.

>>> {"safetensors", "bin"} <= {r.name for r in READERS.values()}
True
>>> parse_dtype("bf16"), parse_dtype("F32")
('BF16', 'F32')
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from reshard.errors import FormatError, UsageError
from reshard.tensors import Checkpoint, TensorInfo, add_unique, natural_key
from reshard.units import FLOAT_DTYPES, parse_dtype

if TYPE_CHECKING:
    from reshard.hub.resolve import ResolvedSource

log = logging.getLogger(__name__)

__all__ = [
    "Reader",
    "ReadOptions",
    "READERS",
    "register",
    "detect_folder",
    "load_checkpoint",
    "convert_checkpoint",
    "parse_dtype",
]


@dataclass(frozen=True)
class ReadOptions:
    """What the user told reshard about reading a source.

    Attributes:
        key: the entry holding the weights in a nested ``.bin`` training checkpoint.
        tag: the DeepSpeed tag (``global_step1000``) instead of ``latest``.
        config: a folder or repo id to take config.json and tokenizer files from.
    """

    key: str | None = None
    tag: str | None = None
    config: str | None = None


@dataclass(frozen=True)
class Reader:
    """One input format.

    Attributes:
        name: the format name (``ResolvedSource.format`` and ``Checkpoint.format``).
        load: ``(source, options) -> Checkpoint``.
        detect: for formats that are whole folders (training checkpoints): does this
            folder hold one? Readers of plain weight files are picked by suffix instead.
        options: the ``ReadOptions`` fields this reader understands (others are refused).
        pickle_globals: globals its pickles may name beyond a state dict's, served as
            inert placeholders by the allow-list interpreter (``reshard.formats.unpickle``).
    """

    name: str
    load: Callable[[ResolvedSource, ReadOptions], Checkpoint]
    detect: Callable[[Path], bool] | None = None
    options: frozenset[str] = frozenset()
    pickle_globals: frozenset[tuple[str, str]] = field(default_factory=frozenset)


READERS: dict[str, Reader] = {}


def register(reader: Reader) -> Reader:
    """Add (or replace) the reader for ``reader.name``."""
    READERS[reader.name] = reader
    return reader


def detect_folder(folder: Path) -> Reader | None:
    """The folder-format reader that recognises ``folder``, if any."""
    _load_plugins()
    for reader in READERS.values():
        if reader.detect is not None and reader.detect(folder):
            return reader
    return None


def load_checkpoint(
    source: ResolvedSource, key: str | None = None, options: ReadOptions | None = None
) -> Checkpoint:
    """Describe every tensor of a resolved source, in natural order.

    Args:
        source: from ``resolve_source``.
        key: shorthand for ``ReadOptions(key=...)``.
        options: everything else the reader may need.

    Raises:
        FormatError: a malformed file, a tensor in two files, an index and files that
            disagree (a tensor the index names but no file has, or one it does not name),
            or no tensors at all.
        UsageError: an option this format does not take.
    """
    _load_plugins()
    options = options or ReadOptions()
    if key is not None:
        options = replace(options, key=key)
    reader = READERS.get(source.format)
    if reader is None:
        raise FormatError(f"{source.spec}: no reader for format {source.format!r}")
    for name, flag in (("key", "--key"), ("tag", "--tag"), ("config", "--config")):
        if getattr(options, name) is not None and name not in reader.options:
            raise UsageError(f"{flag} does not apply to a {reader.name} source ({source.spec})")
    return reader.load(source, options)


def _load_safetensors(source: ResolvedSource, options: ReadOptions) -> Checkpoint:
    """Read every header; check the index and the files agree."""
    from reshard.formats.index import check_against_index
    from reshard.formats.safetensors import read_header

    tensors: dict[str, TensorInfo] = {}
    metadata: dict[str, str] = {}
    for path in source.weight_files:
        header = read_header(path)
        for key, value in header.metadata.items():
            metadata.setdefault(key, value)
        for t in header.tensors:
            add_unique(tensors, t, path)
    if source.index_file is not None:
        check_against_index(
            source.index_file,
            tensors,
            {},
            source.unindexed_files,
            lambda p: [t.name for t in read_header(p).tensors],
        )
    if not tensors:
        files = ", ".join(str(p) for p in source.weight_files)
        raise FormatError(f"{files}: the checkpoint holds no tensors; nothing to reshard")
    ordered = tuple(sorted(tensors.values(), key=lambda t: natural_key(t.name)))
    return Checkpoint(ordered, source.weight_files, metadata, source.extra_files, "safetensors")


def _load_bin(source: ResolvedSource, options: ReadOptions) -> Checkpoint:
    from reshard.formats.torchbin import load_bin_checkpoint

    return load_bin_checkpoint(source, key=options.key)


register(Reader("safetensors", _load_safetensors))
register(Reader("bin", _load_bin, options=frozenset({"key"})))

# Readers in their own modules register themselves when imported.
PLUGIN_MODULES = ("reshard.formats.training",)
_plugins_loaded = False


def _load_plugins() -> None:
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    import importlib
    import importlib.util

    for name in PLUGIN_MODULES:
        if importlib.util.find_spec(name) is not None:
            importlib.import_module(name)


def convert_checkpoint(checkpoint: Checkpoint, dtype: str) -> Checkpoint:
    """Describe the checkpoint as written with floating-point tensors cast to ``dtype``;
    integer and bool tensors are left as they are."""
    tensors = tuple(
        t.converted_to(dtype) if t.stored_dtype in FLOAT_DTYPES else t for t in checkpoint.tensors
    )
    return replace(checkpoint, tensors=tensors)
