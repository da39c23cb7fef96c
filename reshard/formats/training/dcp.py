"""PyTorch Distributed Checkpoint (DCP) folders as sources, read without torch.distributed.

What FSDP2, torchtitan, accelerate (``pytorch_model_fsdp_0/``) and Megatron's
``torch_dist`` write with ``FileSystemWriter``: a ``.metadata`` pickle and
``__{rank}_{n}.distcp`` files. ``.metadata`` maps every saved name to its full size,
dtype and chunks (a block per rank and mesh coordinate), and each chunk to a byte range
of a ``.distcp`` file, where the chunk is a complete ``torch.save`` zip holding one
contiguous tensor. So a weight is its chunks' storage bytes placed as blocks: nothing
is loaded, and optimizer state is never opened (only counted).

``HuggingFaceStorageWriter(save_distributed=True)`` writes the same chunks as safetensors
files (``shard-00001-model-00001-of-00001.safetensors``) with each chunk's offset in the
header's ``DCP_SHARDING_INFO``; ``load_dcp_safetensors`` reads that flavour.

Both the ``.metadata`` pickle and each chunk's pickle go through reshard's allow-list
interpreter (``reshard.formats.unpickle``, with ``DCP_METADATA_GLOBALS``): DCP's
metadata classes become inert records, and a hostile pickle runs nothing.

>>> is_dcp_folder(Path("no/such/folder"))
False
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reshard.errors import FormatError, ReshardError, UnsafePickleError
from reshard.formats.training.layout import (
    ModelFolder,
    TrainingState,
    add_skipped,
    block_extents,
    clean_names,
    itemsize_of,
    make_tensor,
    resolve_tied,
    tied_alias_targets,
)
from reshard.formats.unpickle import DCP_METADATA_GLOBALS, TORCH_DTYPES, Global, Reader, Record, run_pickle
from reshard.tensors import natural_key
from reshard.units import dtype_nbytes, numel

log = logging.getLogger(__name__)

METADATA_FILE = ".metadata"
DCP_SUFFIX = ".distcp"
# A .metadata lists every chunk of every saved tensor, optimizer state included: a few MB
# for a 70B model on hundreds of ranks; far below this.
MAX_METADATA_BYTES = 256 * 1024 * 1024
# Top-level entries of what trainers save beside the model (planner paths start with them).
OPTIMIZER_KEYS = frozenset({"optim", "optimizer", "optimizers", "optimizer_state_dict", "optim_state", "opt"})
OTHER_STATE_KEYS = frozenset(
    {
        "lr_scheduler",
        "lr_schedulers",
        "scheduler",
        "schedulers",
        "dataloader",
        "dataloaders",
        "train_state",
        "trainer_state",
        "rng",
        "rng_state",
        "rng_states",
        "extra_state",
        "step",
        "epoch",
        "args",
        "config",
        "ft_state",
        "grad_scaler",
        "scaler",
    }
)
# The nested entry holding the weights in ``{"model": ..., "optim": ...}`` saves.
MODEL_KEYS = ("model", "model_state_dict", "state_dict", "module", "models")
SHARDING_INFO_KEY = "DCP_SHARDING_INFO"
_RANK_FILE = re.compile(r"^__(\d+)_(\d+)\.distcp$")
# HuggingFaceStorageWriter(save_distributed=True) names: one shard index per rank, from 1.
_HF_SHARD_FILE = re.compile(r"^shard-(\d+)-model-(\d+)-of-(\d+)\.safetensors$")


@dataclass(frozen=True)
class StorageItem:
    """Where DCP put one chunk: ``length`` bytes at ``offset`` of ``relative_path``."""

    relative_path: str
    offset: int
    length: int
    transforms: tuple[str, ...] = ()


@dataclass(frozen=True)
class Chunk:
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    item: StorageItem | None


@dataclass(frozen=True)
class Entry:
    """One saved name of the checkpoint: a tensor (dtype, full size, chunks) or bytes."""

    fqn: str
    path: tuple[str, ...]
    dtype: str | None
    size: tuple[int, ...]
    chunks: tuple[Chunk, ...]
    byte_items: tuple[StorageItem, ...] = ()

    @property
    def is_tensor(self) -> bool:
        return self.dtype is not None


def is_dcp_folder(path: Path) -> bool:
    """A folder with DCP's ``.metadata``."""
    return (Path(path) / METADATA_FILE).is_file()


def is_dcp_safetensors_folder(path: Path) -> bool:
    """A folder of safetensors files written by ``HuggingFaceStorageWriter`` with
    ``save_distributed=True`` (each header has ``DCP_SHARDING_INFO``)."""
    from reshard.formats.safetensors import read_header

    path = Path(path)
    if not path.is_dir():
        return False
    files = sorted(p for p in path.iterdir() if p.name.endswith(".safetensors") and p.is_file())
    if not files:
        return False
    try:
        return SHARDING_INFO_KEY in read_header(files[0]).metadata
    except ReshardError:
        return False


def read_metadata(folder: Path) -> list[Entry]:
    """Every entry of a DCP folder's ``.metadata``, parsed without running its pickle.

    Raises:
        FormatError: not DCP metadata, or inconsistent. UnsafePickleError: a global
            outside DCP's metadata classes (nothing runs).
    """
    path = Path(folder) / METADATA_FILE
    where = str(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            root = run_pickle(
                Reader(f, size, where, limit=MAX_METADATA_BYTES),
                _no_storages(where),
                where=where,
                allow=DCP_METADATA_GLOBALS,
            )
    except OSError as e:
        raise FormatError(f"{path}: cannot be read ({e.strerror or e})") from e
    metadata = _expect(root, "Metadata", where, "the file is not DCP metadata")
    state_dict = metadata.get("state_dict_metadata")
    storage = metadata.get("storage_data") or {}
    planner = metadata.get("planner_data") or {}
    if not isinstance(state_dict, dict) or not isinstance(storage, dict):
        raise FormatError(f"{path}: DCP metadata without state_dict_metadata; the file is damaged")
    items = _storage_items(storage, where)
    entries = []
    for fqn, meta in state_dict.items():
        if not isinstance(fqn, str):
            raise FormatError(f"{path}: a saved name that is not a string; the file is damaged")
        nested = planner.get(fqn) if isinstance(planner, dict) else None
        tree = tuple(str(p) for p in nested) if isinstance(nested, (tuple, list)) and nested else (fqn,)
        entries.append(_entry(fqn, tree, meta, items, where))
    return entries


def _no_storages(where: str):
    def refuse(pid: Any) -> Any:
        raise FormatError(f"{where}: unexpected storage reference in DCP metadata; the file is damaged")

    return refuse


def _expect(value: Any, name: str, where: str, hint: str = "the file is damaged") -> Record:
    if not isinstance(value, Record) or value.name != name:
        got = value.qualname if isinstance(value, Record) else type(value).__name__
        raise FormatError(f"{where}: expected a DCP {name}, found {got}; {hint}")
    return value


def _storage_items(storage: dict, where: str) -> dict[tuple[str, tuple[int, ...] | None], StorageItem]:
    out = {}
    for index, info in storage.items():
        index = _expect(index, "MetadataIndex", where)
        info = _expect(info, "_StorageInfo", where)
        fqn, offset = index.get("fqn"), index.get("offset")
        rel, start, length = info.get("relative_path"), info.get("offset"), info.get("length")
        transforms = info.get("transform_descriptors") or ()
        if (
            not isinstance(fqn, str)
            or not isinstance(rel, str)
            or not _uint(start)
            or not _uint(length)
            or (offset is not None and not _uints(offset))
            or not isinstance(transforms, (list, tuple))
        ):
            raise FormatError(f"{where}: a malformed storage entry for {fqn!r}; the file is damaged")
        key = (fqn, tuple(offset) if offset is not None else None)
        out[key] = StorageItem(rel, start, length, tuple(str(t) for t in transforms))
    return out


def _entry(fqn: str, tree: tuple[str, ...], meta: Any, items: dict, where: str) -> Entry:
    if isinstance(meta, Record) and meta.name == "BytesStorageMetadata":
        item = items.get((fqn, None))
        return Entry(fqn, tree, None, (), (), (item,) if item else ())
    meta = _expect(meta, "TensorStorageMetadata", where)
    size, chunks = meta.get("size"), meta.get("chunks")
    if not _uints(size) or not isinstance(chunks, list):
        raise FormatError(f"{where}: tensor {fqn!r} has a malformed size or chunk list")
    dtype = _dtype_of(meta.get("properties"), fqn, where)
    parsed = []
    for chunk in chunks:
        chunk = _expect(chunk, "ChunkStorageMetadata", where)
        offsets, sizes = chunk.get("offsets"), chunk.get("sizes")
        if not _uints(offsets) or not _uints(sizes) or len(offsets) != len(size) or len(sizes) != len(size):
            raise FormatError(f"{where}: tensor {fqn!r} has a malformed chunk")
        parsed.append(Chunk(tuple(offsets), tuple(sizes), items.get((fqn, tuple(offsets)))))
    return Entry(fqn, tree, dtype, tuple(size), tuple(parsed))


def _dtype_of(properties: Any, fqn: str, where: str) -> str:
    props = _expect(properties, "TensorProperties", where)
    state = props.state
    dtype = state[0] if isinstance(state, tuple) and state else props.get("dtype")
    if not isinstance(dtype, Global) or dtype.module != "torch" or dtype.name not in TORCH_DTYPES:
        raise FormatError(f"{where}: tensor {fqn!r} has an unknown dtype; the file is damaged")
    return TORCH_DTYPES[dtype.name]


def _uint(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _uints(v: Any) -> bool:
    return isinstance(v, (tuple, list)) and all(_uint(x) for x in v)


def split_entries(entries: list[Entry]) -> tuple[dict[str, Entry], dict[str, tuple[int, int]]]:
    """The weights by model name, and what else was saved as ``{what: (bytes, count)}``.

    Nested saves (``{"model": sd, "optim": osd}``, accelerate's ``{"model": sd}``) put the
    weights under a model key: its name is dropped. torchtitan saves the model's names at
    the top level beside ``optimizer``, ``lr_scheduler`` and ``train_state``.
    """
    tops = {e.path[0] for e in entries if e.is_tensor and len(e.path) > 1}
    model_key = next((k for k in MODEL_KEYS if k in tops), None)
    weights: dict[str, Entry] = {}
    skipped: dict[str, tuple[int, int]] = {}
    for e in entries:
        top = e.path[0] if len(e.path) > 1 else None
        if top in OPTIMIZER_KEYS:
            add_skipped(skipped, "optimizer state", _entry_bytes(e))
        elif not e.is_tensor or top in OTHER_STATE_KEYS or (model_key and top != model_key):
            add_skipped(skipped, "other training state", _entry_bytes(e))
        elif model_key:
            weights[".".join(e.path[1:])] = e
        else:
            weights[".".join(e.path)] = e
    return weights, skipped


def _entry_bytes(e: Entry) -> int:
    if e.is_tensor:
        return dtype_nbytes(e.dtype, e.size)
    return sum(item.length for item in e.byte_items)


def load_dcp(folder: Path, model: ModelFolder) -> TrainingState:
    """Describe the weights of a DCP folder as tensors over byte ranges of its files.

    Raises:
        FormatError: missing or truncated rank files, metadata naming bytes that are not
            there, compressed items, no weights. UnsafePickleError: a hostile pickle.
    """
    folder = Path(folder)
    entries = read_metadata(folder)
    weights, skipped = split_entries(entries)
    if not weights:
        raise FormatError(
            f"{folder}: the checkpoint holds no model weights (only "
            f"{', '.join(skipped) or 'nothing'}); point reshard at the model's "
            "checkpoint folder (e.g. pytorch_model_fsdp_0/, not optimizer_0/)"
        )
    names = clean_names(weights, folder)
    tensors: dict = {}
    files: dict[Path, None] = {}
    for name, e in weights.items():
        tensors[names[name]] = _tensor(folder, names[name], e, files)
    dropped: dict[str, str] = {}
    resolve_tied(tensors, _saved_tied_aliases(tensors), model.tie_word_embeddings, dropped)
    ordered = sorted(tensors.values(), key=lambda t: natural_key(t.name))
    warnings = _stale_rank_files(folder, files)
    facts = {
        "format": "PyTorch DCP (torch.distributed.checkpoint)",
        "ranks": len(_ranks(files)) or None,
        "chunks per dim": _grid(weights.values()),
        "layout": "nested {model: ...}"
        if any(len(e.path) > 1 for e in weights.values())
        else "flat (model names at the top level, as torchtitan saves)",
    }
    return TrainingState("dcp", ordered, list(files), skipped, facts, dropped, warnings, model)


def _tensor(folder: Path, name: str, e: Entry, files: dict):
    where = f"{folder}: tensor {e.fqn!r}"
    itemsize = itemsize_of(e.dtype, where)
    extents = []
    covered = 0
    for chunk in e.chunks:
        if 0 in chunk.sizes:
            continue
        item = chunk.item
        if item is None:
            raise FormatError(
                f"{where}: the chunk at {list(chunk.offsets)} has no storage entry; "
                ".metadata is damaged or from another save"
            )
        if item.transforms:
            raise FormatError(
                f"{where} is stored compressed ({', '.join(item.transforms)}: written "
                "with FileSystemWriter(_extensions=[ZStandard()])); reshard copies "
                "byte ranges and does not decompress: save without _extensions, or "
                "convert with torch's dcp_to_torch_save first"
            )
        path = _rank_file(folder, item.relative_path, where)
        files[path] = None
        data_offset = _chunk_data(path, item, e.dtype, chunk.sizes, itemsize, where)
        extents += block_extents(path, data_offset, itemsize, e.size, chunk.offsets, chunk.sizes)
        covered += numel(chunk.sizes)
    if covered != numel(e.size):
        raise FormatError(
            f"{where}: its chunks hold {covered} of its {numel(e.size)} elements; "
            "a rank's save is missing or .metadata is inconsistent"
        )
    return make_tensor(name, e.dtype, e.size, extents)


def _rank_file(folder: Path, relative: str, where: str) -> Path:
    rel = Path(relative)
    if rel.is_absolute() or ".." in rel.parts or not relative:
        raise FormatError(
            f"{where}: .metadata names the file {relative!r} outside the checkpoint folder; refusing it"
        )
    path = folder / rel
    if not path.is_file():
        raise FormatError(
            f"{path}: missing (named by {folder / METADATA_FILE}); a rank's file was "
            "not saved or not copied: copy every *.distcp file of the checkpoint"
        )
    return path


def _chunk_data(
    path: Path, item: StorageItem, dtype: str, sizes: tuple[int, ...], itemsize: int, where: str
) -> int:
    """Absolute offset of a chunk's contiguous bytes: its ``torch.save`` item, parsed."""
    from reshard.formats.torchzip import LazyTensor, read_torch_range
    from reshard.transfer.strided import contiguous_block

    try:
        parsed = read_torch_range(path, item.offset, item.length)
    except UnsafePickleError:
        raise
    except FormatError as e:
        raise FormatError(f"{where}: {e}") from e
    t = parsed.obj
    if not isinstance(t, LazyTensor):
        raise FormatError(f"{where}: the item at byte {item.offset} of {path.name} is not a tensor")
    if t.dtype != dtype or tuple(t.shape) != tuple(sizes):
        raise FormatError(
            f"{where}: the item at byte {item.offset} of {path.name} is {t.dtype} "
            f"{list(t.shape)}, but .metadata says {dtype} {list(sizes)}; the files "
            "are from different saves"
        )
    if numel(t.shape) > 1 and contiguous_block(t.shape, t.strides)[0] != 0:
        raise FormatError(
            f"{where}: the item at byte {item.offset} of {path.name} is a non-contiguous view; re-save it"
        )
    storage = parsed.storages[t.storage.key]
    if (t.offset + numel(sizes)) * itemsize > storage.nbytes:
        raise FormatError(
            f"{where}: the item at byte {item.offset} of {path.name} is shorter "
            "than its tensor; the file is damaged"
        )
    return storage.data_offset + t.offset * itemsize


def _saved_tied_aliases(tensors: dict) -> dict[str, str]:
    """Known tied names (``lm_head.weight`` -> the embedding) when both were saved."""
    out = {}
    for alias, targets in tied_alias_targets().items():
        for target in targets:
            a, b = tensors.get(alias), tensors.get(target)
            if a is not None and b is not None and a.shape == b.shape and a.dtype == b.dtype:
                out[alias] = target
                break
    return out


def _ranks(files: dict) -> set[int]:
    out = set()
    for p in files:
        m = _RANK_FILE.match(p.name)
        if m:
            out.add(int(m.group(1)))
    return out


def _stale_rank_files(folder: Path, used: dict) -> list[str]:
    names = {p.name for p in used}
    stale = sorted(p.name for p in folder.iterdir() if p.name.endswith(DCP_SUFFIX) and p.name not in names)
    if not stale:
        return []
    return [
        f"{folder}: {', '.join(stale[:4])} hold no weights named by .metadata (optimizer "
        "state only, or left from another save); not read"
    ]


def _grid(entries) -> str:
    best: tuple[int, ...] = ()
    for e in entries:
        grid = tuple(len({c.offsets[d] for c in e.chunks}) for d in range(len(e.size)))
        if numel(grid) > numel(best or (1,)):
            best = grid
    return " x ".join(str(n) for n in best) if best else "1"


def load_dcp_safetensors(folder: Path, model: ModelFolder) -> TrainingState:
    """The ``HuggingFaceStorageWriter`` flavour: safetensors chunks with saved offsets.

    Raises:
        FormatError: a file without DCP_SHARDING_INFO, chunks that disagree or leave gaps.
    """
    from reshard.formats.safetensors import read_header

    folder = Path(folder)
    files = sorted(
        (p for p in folder.iterdir() if p.name.endswith(".safetensors") and p.is_file()),
        key=lambda p: natural_key(p.name),
    )
    _check_shard_indices(folder, files)
    chunks: dict[str, list] = {}
    for path in files:
        header = read_header(path)
        info = _sharding_info(path, header.metadata)
        for t in header.tensors:
            offsets = info.get(t.name, {}).get("saved_offsets")
            if not _uints(offsets) or len(offsets) != len(t.shape):
                raise FormatError(
                    f"{path}: tensor {t.name!r} has no saved offsets in "
                    f"{SHARDING_INFO_KEY}; the file is damaged"
                )
            chunks.setdefault(t.name, []).append((path, t, tuple(offsets)))
    names = clean_names(chunks, folder)
    tensors = {}
    for fqn, pieces in chunks.items():
        where = f"{folder}: tensor {fqn!r}"
        dtypes = {t.dtype for _, t, _ in pieces}
        if len(dtypes) != 1:
            raise FormatError(f"{where}: its chunks have different dtypes ({', '.join(sorted(dtypes))})")
        dtype = dtypes.pop()
        rank = len(pieces[0][1].shape)
        full = tuple(max(o[d] + t.shape[d] for _, t, o in pieces) for d in range(rank))
        itemsize = itemsize_of(dtype, where)
        extents = []
        for path, t, offsets in pieces:
            extents += block_extents(path, t.offset, itemsize, full, offsets, tuple(t.shape))
        if sum(numel(t.shape) for _, t, _ in pieces) != numel(full):
            raise FormatError(
                f"{where}: its chunks do not add up to its {list(full)} shape; a "
                "rank's file is missing or from another save"
            )
        tensors[names[fqn]] = make_tensor(names[fqn], dtype, full, extents)
    if not tensors:
        raise FormatError(f"{folder}: the safetensors files hold no tensors")
    dropped: dict[str, str] = {}
    resolve_tied(tensors, _saved_tied_aliases(tensors), model.tie_word_embeddings, dropped)
    ordered = sorted(tensors.values(), key=lambda t: natural_key(t.name))
    facts = {
        "format": "PyTorch DCP, HuggingFaceStorageWriter (safetensors)",
        "ranks": len(files),
        "chunks per dim": _grid_safetensors(chunks),
    }
    return TrainingState("dcp-safetensors", ordered, files, {}, facts, dropped, [], model)


def _check_shard_indices(folder: Path, files: list[Path]) -> None:
    """Every rank writes ``shard-<rank + 1>-...``: a gap in those numbers is a missing
    rank file. (A missing *last* rank cannot be told from the files: the format records
    no world size; the tensors' sizes then come out short, as torch's own reader has them.)"""
    ranks = {int(m.group(1)) for m in (_HF_SHARD_FILE.match(p.name) for p in files) if m}
    missing = [r for r in range(1, max(ranks, default=0) + 1) if r not in ranks]
    if missing:
        raise FormatError(
            f"{folder}: shard-{missing[0]:05d}-model-*.safetensors is missing (a rank's "
            "file of this HuggingFaceStorageWriter checkpoint); copy every rank's file"
        )


def _sharding_info(path: Path, metadata: dict[str, str]) -> dict:
    raw = metadata.get(SHARDING_INFO_KEY)
    if raw is None:
        raise FormatError(
            f"{path}: no {SHARDING_INFO_KEY} in its header, unlike the other files of "
            "this HuggingFaceStorageWriter checkpoint; remove files from other saves"
        )
    try:
        info = json.loads(raw)
    except ValueError as e:
        raise FormatError(f"{path}: {SHARDING_INFO_KEY} is not valid JSON") from e
    if not isinstance(info, dict):
        raise FormatError(f"{path}: {SHARDING_INFO_KEY} is not a JSON object")
    return {k: v for k, v in info.items() if isinstance(v, dict)}


def _grid_safetensors(chunks: dict[str, list]) -> str:
    best: tuple[int, ...] = ()
    for pieces in chunks.values():
        rank = len(pieces[0][2])
        grid = tuple(len({o[d] for _, _, o in pieces}) for d in range(rank))
        if numel(grid) > numel(best or (1,)):
            best = grid
    return " x ".join(str(n) for n in best) if best else "1"
