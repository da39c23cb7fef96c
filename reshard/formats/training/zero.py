"""DeepSpeed ZeRO checkpoints (stages 1, 2 and 3) as sources, read without DeepSpeed.

``engine.save_checkpoint(dir)`` writes ``dir/latest`` (the tag) and ``dir/<tag>/`` with
``*_model_states.pt`` (parameter names and shapes, the 16-bit module, frozen parameters)
and one ``*_optim_states.pt`` per data-parallel rank, holding that rank's partition of
the fp32 master weights beside its Adam moments. The weights are taken from there by
byte range, the way DeepSpeed's ``zero_to_fp32.py`` reassembles them, without loading:

- ZeRO-1/2: per parameter group, the ranks' partitions concatenated form one flat vector
  (``single_partition_of_fp32_groups``); parameters follow in ``param_shapes`` order,
  each followed by its ``param_alignment_paddings``.
- ZeRO-3: every parameter has ``ceil(numel / world)`` elements on each rank, in order, in
  the rank's ``fp32_flat_groups``; the last rank's part ends in padding.

A parameter is so a few contiguous runs of the optimizer files (one per rank it spans).
The pickles reference DeepSpeed's enums and loss scaler; reshard's allow-list interpreter
keeps them as inert records (``unpickle.DEEPSPEED_GLOBALS``) and runs nothing, where
``zero_to_fp32.py`` needs ``torch.load(weights_only=False)``.

>>> zero3_partition(33, 2)
17
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reshard.errors import FormatError, SourceError, UsageError
from reshard.formats.torchzip import LazyTensor, TorchFile, read_torch_file
from reshard.formats.training.layout import (
    ModelFolder,
    TrainingState,
    add_skipped,
    clean_names,
    flat_extents,
    itemsize_of,
    make_tensor,
    resolve_tied,
)
from reshard.formats.unpickle import DEEPSPEED_GLOBALS, Record
from reshard.tensors import natural_key
from reshard.units import FLOAT_DTYPES, numel

log = logging.getLogger(__name__)

LATEST_FILE = "latest"
_OPTIM_FILE = re.compile(r"^(bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")
_MODEL_FILE = re.compile(r"^(?:zero_pp_rank_(\d+)_)?mp_rank_(\d+)_model_states\.pt$")


@dataclass(frozen=True)
class Partition:
    """One flat fp32 group partition of one rank: ``numel`` elements of ``dtype`` at
    ``offset`` of ``path``."""

    path: Path
    offset: int
    numel: int
    dtype: str = "F32"


def zero3_partition(count: int, world: int) -> int:
    """Elements of a ZeRO-3 parameter on each rank (the last one padded)."""
    return math.ceil(count / world)


def is_zero_folder(path: Path) -> bool:
    """A DeepSpeed checkpoint: a ``latest`` file, or a tag folder of ZeRO state files."""
    path = Path(path)
    if not path.is_dir():
        return False
    if (path / LATEST_FILE).is_file():
        return True
    return _has_state(path) or any(_has_state(p) for p in _subdirs(path))


def _subdirs(path: Path) -> list[Path]:
    return sorted((p for p in path.iterdir() if p.is_dir()), key=lambda p: natural_key(p.name))


def _has_state(folder: Path) -> bool:
    return any(p.name.endswith("_optim_states.pt") for p in folder.iterdir()) and any(
        p.name.endswith("_model_states.pt") for p in folder.iterdir()
    )


def tag_folder(folder: Path, tag: str | None = None) -> Path:
    """The folder of one saved tag: ``--tag``, else what ``latest`` names, else the only one.

    Raises:
        SourceError: the tag does not exist, ``latest`` names a missing folder, or several
            tags and no ``--tag``.
    """
    folder = Path(folder)
    tags = [p for p in _subdirs(folder) if _has_state(p)]
    if tag is not None:
        chosen = folder / tag
        if chosen.is_dir() and _has_state(chosen):
            return chosen
        if folder.name == tag and _has_state(folder):
            return folder
        known = ", ".join(p.name for p in tags) or "none"
        raise SourceError(
            f"{folder}: no DeepSpeed tag {tag!r} (tags here: {known}); pass one of them with --tag"
        )
    if _has_state(folder):
        return folder
    latest = folder / LATEST_FILE
    if latest.is_file():
        name = latest.read_text(encoding="utf-8", errors="replace").strip()
        chosen = folder / name
        if not name or "/" in name or not chosen.is_dir() or not _has_state(chosen):
            known = ", ".join(p.name for p in tags) or "none"
            raise SourceError(
                f"{latest}: names tag {name!r}, which is not a DeepSpeed checkpoint "
                f"folder here (tags: {known}); pass --tag"
            )
        return chosen
    if len(tags) == 1:
        return tags[0]
    if not tags:
        raise SourceError(
            f"{folder}: no DeepSpeed checkpoint (*_model_states.pt and "
            "*_optim_states.pt) here or in its subfolders"
        )
    raise SourceError(
        f"{folder}: several DeepSpeed tags ({', '.join(p.name for p in tags)}) and no "
        "'latest' file; pass --tag"
    )


def load_zero(folder: Path, model: ModelFolder, tag: str | None = None) -> TrainingState:
    """Describe the fp32 master weights (and frozen parameters, buffers) of a ZeRO
    checkpoint as tensors over byte ranges of its files.

    Raises:
        SourceError: unknown tag. FormatError: missing or extra rank files, world sizes
            that disagree, truncated files, layouts DeepSpeed would not write.
        UnsafePickleError: a pickle asking for anything beyond DeepSpeed's data classes.
    """
    root = Path(folder)
    folder = tag_folder(root, tag)
    model_files, optim_files = _state_files(folder)
    models = [_read(p) for p in model_files]
    optims = [_read(p) for p in optim_files]
    first = _model_state(models[0])
    osds = [_optimizer_state(o) for o in optims]
    stage = _stage(osds[0], optims[0].path)
    world = _world(osds, optims, first, models[0].path)
    if stage == 3 and len(models) != world:
        raise FormatError(
            f"{folder}: ZeRO-3 needs one model states file per rank ({world}), found "
            f"{len(models)}; copy every zero_pp_rank_*_model_states.pt"
        )
    shapes = _param_shapes(first, models[0].path)
    key = "fp32_flat_groups" if stage == 3 else "single_partition_of_fp32_groups"
    groups = [_groups(osd, key, o) for osd, o in zip(osds, optims)]
    master = _master_dtype(groups, optims[0].path)
    tensors: dict = {}
    if stage == 3:
        _zero3_params(tensors, shapes, groups, world, master, folder)
    else:
        _zero12_params(tensors, shapes, groups, osds[0], world, master, folder)
    trainable = set(tensors)
    from_module: set[int] = set()  # 16-bit module tensors taken as weights (frozen, buffers)
    _frozen(tensors, first, models, stage, world, master, folder, from_module)
    _buffers(tensors, first, models[0], master, from_module)
    names = clean_names(list(tensors), folder)
    tensors = {names[n]: _renamed(t, names[n]) for n, t in tensors.items()}
    shared = {
        names.get(a, a): names.get(t, t)
        for a, t in (first.get("shared_params") or {}).items()
        if isinstance(a, str) and isinstance(t, str)
    }
    dropped: dict[str, str] = {}
    resolve_tied(tensors, shared, model.tie_word_embeddings, dropped)
    skipped: dict[str, tuple[int, int]] = {}
    for o, osd in zip(optims, osds):
        used = {id(t) for t in _as_list(osd.get(key))}
        _count_tensors(o.obj, used, skipped, "optimizer state")
    if stage < 3:
        _count_tensors(first.get("module"), from_module, skipped, "16-bit copy of the weights")
    ordered = sorted(tensors.values(), key=lambda t: natural_key(t.name))
    facts = {
        "format": "DeepSpeed ZeRO",
        "ZeRO stage": stage,
        "world size": world,
        "tag": folder.name,
        "step": first.get("global_steps"),
        "DeepSpeed version": first.get("ds_version"),
        "master dtype": master,
        "trainable parameters": sum(numel(tensors[names[n]].shape) for n in trainable if names[n] in tensors),
    }
    files = [*model_files, *optim_files]
    return TrainingState("deepspeed", ordered, files, skipped, facts, dropped, [], model)


def _state_files(folder: Path) -> tuple[list[Path], list[Path]]:
    names = [p.name for p in folder.iterdir() if p.is_file()]
    others = [n for n in names if n.endswith("_model_states.pt") and not _MODEL_FILE.match(n)]
    if others:
        raise FormatError(
            f"{folder}: holds {others[0]} (MoE experts or pipeline stages); reshard "
            "reads data-parallel ZeRO checkpoints only: convert with DeepSpeed's "
            "ds_to_universal.py first"
        )
    model_files: dict = {}
    optim_files: dict = {}
    for n in names:
        m = _MODEL_FILE.match(n)
        if m:
            if int(m.group(2)) != 0:
                raise FormatError(
                    f"{folder / n}: model-parallel rank {int(m.group(2))}; reshard reads "
                    "data-parallel ZeRO checkpoints only (mp_rank_00)"
                )
            model_files[int(m.group(1) or 0)] = folder / n
        m = _OPTIM_FILE.match(n)
        if m:
            if int(m.group(3)) != 0:
                raise FormatError(
                    f"{folder / n}: model-parallel rank {int(m.group(3))}; reshard reads "
                    "data-parallel ZeRO checkpoints only (mp_rank_00)"
                )
            rank = int(m.group(2))
            if rank in optim_files:
                raise FormatError(
                    f"{folder}: two optimizer files for rank {rank} ({optim_files[rank].name}, "
                    f"{n}); remove the stale one"
                )
            optim_files[rank] = folder / n
    if not model_files or not optim_files:
        raise FormatError(
            f"{folder}: no {'*_model_states.pt' if not model_files else '*_optim_states.pt'} "
            "files; the checkpoint is incomplete"
        )
    for found, what in ((optim_files, "optimizer"), (model_files, "model states")):
        missing = [r for r in range(max(found) + 1) if r not in found]
        if missing:
            raise FormatError(
                f"{folder}: the {what} file of rank {missing[0]} is missing (have ranks "
                f"{', '.join(map(str, sorted(found)))}); copy every rank's file"
            )
    return [model_files[r] for r in sorted(model_files)], [optim_files[r] for r in sorted(optim_files)]


def _read(path: Path) -> TorchFile:
    return read_torch_file(path, DEEPSPEED_GLOBALS)


def _model_state(parsed: TorchFile) -> dict:
    obj = parsed.obj
    if not isinstance(obj, dict) or "param_shapes" not in obj or "module" not in obj:
        raise FormatError(f"{parsed.path}: not a DeepSpeed model states file (no param_shapes)")
    return obj


def _optimizer_state(parsed: TorchFile) -> dict:
    obj = parsed.obj
    osd = obj.get("optimizer_state_dict") if isinstance(obj, dict) else None
    if not isinstance(osd, dict) or "partition_count" not in osd:
        raise FormatError(
            f"{parsed.path}: not a DeepSpeed ZeRO optimizer file (no optimizer_state_dict.partition_count)"
        )
    return osd


def _stage(osd: dict, path: Path) -> int:
    value = osd.get("zero_stage")
    if isinstance(value, Record) and value.args and isinstance(value.args[0], int):
        value = value.args[0]
    if value is None and "single_partition_of_fp32_groups" in osd:
        value = 1  # DeepSpeed's BF16_Optimizer (ZeRO-1 with bf16) writes no zero_stage
    if value not in (1, 2, 3):
        raise FormatError(f"{path}: ZeRO stage {value!r}; reshard reads stages 1, 2 and 3")
    return value


def _world(osds: list[dict], optims: list[TorchFile], first: dict, model_path: Path) -> int:
    counts = []
    for osd, parsed in zip(osds, optims):
        count = osd.get("partition_count")
        if isinstance(count, list) and count and all(isinstance(c, int) for c in count):
            count = max(count)
        if not isinstance(count, int) or count < 1:
            raise FormatError(f"{parsed.path}: malformed partition_count {count!r}")
        counts.append(count)
    if len(set(counts)) != 1:
        raise FormatError(
            f"{optims[0].path.parent}: the optimizer files disagree on the world size "
            f"({', '.join(f'{p.path.name}: {c}' for p, c in zip(optims, counts))}); "
            "they are from different runs"
        )
    world = counts[0]
    if world != len(optims):
        raise FormatError(
            f"{optims[0].path.parent}: partition_count says {world} ranks but there are "
            f"{len(optims)} optimizer files; a rank's file is missing or left from "
            "another run"
        )
    dp = first.get("dp_world_size")
    if isinstance(dp, int) and dp != world:
        raise FormatError(
            f"{model_path}: dp_world_size {dp} disagrees with the {world} optimizer "
            "partitions; the files are from different runs"
        )
    return world


def _param_shapes(first: dict, path: Path) -> list[dict[str, tuple[int, ...]]]:
    groups = first.get("param_shapes")
    if isinstance(groups, dict):
        groups = [groups]
    if not isinstance(groups, list) or not all(isinstance(g, dict) for g in groups):
        raise FormatError(f"{path}: malformed param_shapes")
    out = []
    for g in groups:
        shapes = {}
        for name, shape in g.items():
            if not isinstance(name, str) or not _uints(shape):
                raise FormatError(f"{path}: malformed param_shapes entry {name!r}")
            shapes[name] = tuple(shape)
        out.append(shapes)
    return out


def _uints(v: Any) -> bool:
    return isinstance(v, (tuple, list)) and all(
        isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in v
    )


def _as_list(value: Any) -> list:
    return value if isinstance(value, list) else []


def _groups(osd: dict, key: str, parsed: TorchFile) -> list[Partition]:
    groups = osd.get(key)
    if not isinstance(groups, list) or not groups:
        raise FormatError(f"{parsed.path}: no {key}; not a ZeRO optimizer file of this stage")
    return [_partition(t, parsed, f"{key}[{i}]") for i, t in enumerate(groups)]


def _partition(t: Any, parsed: TorchFile, what: str) -> Partition:
    if not isinstance(t, LazyTensor) or len(t.shape) != 1 or (t.shape[0] > 1 and t.strides != (1,)):
        raise FormatError(f"{parsed.path}: {what} is not a flat tensor; the file is damaged")
    storage = parsed.storages[t.storage.key]
    itemsize = itemsize_of(t.dtype, f"{parsed.path}: {what}")
    if (t.offset + t.shape[0]) * itemsize > storage.nbytes:
        raise FormatError(f"{parsed.path}: {what} reaches past its storage; the file is damaged")
    return Partition(parsed.path, storage.data_offset + t.offset * itemsize, t.shape[0], t.dtype)


def _master_dtype(groups: list[list[Partition]], path: Path) -> str:
    """The dtype of the master weights (fp32 in every DeepSpeed mixed-precision mode)."""
    dtypes = {p.dtype for rank_groups in groups for p in rank_groups}
    if len(dtypes) != 1 or not dtypes <= FLOAT_DTYPES:
        raise FormatError(
            f"{path.parent}: the master weight partitions have dtypes "
            f"{', '.join(sorted(dtypes))}; expected one floating-point dtype"
        )
    return dtypes.pop()


def _zero12_params(
    tensors: dict,
    shapes: list[dict],
    groups: list[list[Partition]],
    osd0: dict,
    world: int,
    master: str,
    folder: Path,
) -> None:
    """ZeRO-1/2: the ranks' partitions of each group, concatenated, hold the group's
    parameters in order (``zero_to_fp32._zero2_merge_trainable_params``)."""
    if any(len(g) != len(shapes) for g in groups):
        raise FormatError(
            f"{folder}: {len(shapes)} parameter groups in param_shapes but "
            f"{', '.join(str(len(g)) for g in groups)} in the optimizer files"
        )
    paddings = osd0.get("param_alignment_paddings")
    itemsize = itemsize_of(master, str(folder))
    for g, group_shapes in enumerate(shapes):
        parts = [rank_groups[g] for rank_groups in groups]
        starts = [0]
        for p in parts:
            starts.append(starts[-1] + p.numel)
        pads = paddings[g] if isinstance(paddings, list) and g < len(paddings) else None
        if pads is not None and (not _uints(pads) or len(pads) != len(group_shapes)):
            raise FormatError(
                f"{folder}: param_alignment_paddings of group {g} do not match its "
                f"{len(group_shapes)} parameters"
            )
        cursor = 0
        for i, (name, shape) in enumerate(group_shapes.items()):
            count = numel(shape)
            pieces = _split_flat(cursor, count, parts, starts, itemsize)
            if pieces is None:
                raise FormatError(
                    f"{folder}: parameter {name!r} lies past the end of the optimizer "
                    "partitions; the files are from different runs or damaged"
                )
            tensors[name] = make_tensor(name, master, shape, flat_extents(pieces, itemsize))
            cursor += count + (pads[i] if pads else 0)
        align = 2 * world
        if math.ceil(cursor / align) * align != math.ceil(starts[-1] / align) * align:
            raise FormatError(
                f"{folder}: parameter group {g} uses {cursor} elements but the ranks' "
                f"partitions hold {starts[-1]}; the checkpoint is inconsistent"
            )


def _split_flat(first: int, count: int, parts: list[Partition], starts: list[int], itemsize: int):
    """The pieces ``(path, byte offset, elements, element of the tensor)`` of the flat
    range ``[first, first + count)`` over partitions laid end to end."""
    if first + count > starts[-1]:
        return None
    pieces = []
    for part, start in zip(parts, starts):
        lo, hi = max(first, start), min(first + count, start + part.numel)
        if lo < hi:
            pieces.append((part, lo - start, hi - lo, lo - first))
    return [(p.path, p.offset + local * itemsize, n, dest) for p, local, n, dest in pieces]


def _zero3_params(
    tensors: dict, shapes: list[dict], groups: list[list[Partition]], world: int, master: str, folder: Path
) -> None:
    """ZeRO-3: each parameter's ``ceil(numel / world)`` elements per rank, in order
    (``zero_to_fp32._zero3_merge_trainable_params``)."""
    itemsize = itemsize_of(master, str(folder))
    totals = {sum(p.numel for p in rank_groups) for rank_groups in groups}
    if len(totals) != 1:
        raise FormatError(
            f"{folder}: the ranks' fp32_flat_groups differ in size "
            f"({', '.join(map(str, sorted(totals)))}); the files are from different runs"
        )
    per_rank = totals.pop()
    starts = [[0] for _ in groups]
    for r, rank_groups in enumerate(groups):
        for p in rank_groups:
            starts[r].append(starts[r][-1] + p.numel)
    offset = 0
    for name, shape in ((n, s) for g in shapes for n, s in g.items()):
        count = numel(shape)
        part = zero3_partition(count, world)
        pieces = []
        for r in range(world):
            have = max(0, min(count, (r + 1) * part) - r * part)
            if not have:
                continue
            found = _split_flat(offset, have, groups[r], starts[r], itemsize)
            if found is None:
                raise FormatError(
                    f"{folder}: parameter {name!r} lies past the end of rank {r}'s "
                    "fp32_flat_groups; the files are from different runs or damaged"
                )
            pieces += [(path, off, n, dest + r * part) for path, off, n, dest in found]
        tensors[name] = make_tensor(name, master, shape, flat_extents(pieces, itemsize))
        offset += part
    if offset != per_rank:
        raise FormatError(
            f"{folder}: param_shapes use {offset} elements per rank but the optimizer "
            f"files hold {per_rank}; the checkpoint is inconsistent"
        )


def _frozen(
    tensors: dict,
    first: dict,
    models: list[TorchFile],
    stage: int,
    world: int,
    master: str,
    folder: Path,
    from_module: set[int],
) -> None:
    """Frozen parameters: ZeRO-2/3 save them as ``frozen_param_fragments`` (whole on
    rank 0 for ZeRO-2, partitioned like ZeRO-3 parameters); ZeRO-1 only in its 16-bit
    ``module``. They have no master copy: they are written in their own (16-bit) dtype,
    as zero_to_fp32 writes them (``--dtype`` makes the model uniform)."""
    shapes = first.get("frozen_param_shapes")
    if isinstance(shapes, dict) and shapes:
        for name, shape in shapes.items():
            if not isinstance(name, str) or not _uints(shape):
                raise FormatError(f"{models[0].path}: malformed frozen_param_shapes entry {name!r}")
            shape = tuple(shape)
            count = numel(shape)
            pieces, dtype = [], None
            ranks = range(world) if stage == 3 else range(1)
            part = zero3_partition(count, world) if stage == 3 else count
            for r in ranks:
                frags = models[r].obj.get("frozen_param_fragments") or {}
                t = frags.get(name)
                if not isinstance(t, LazyTensor):
                    raise FormatError(
                        f"{models[r].path}: frozen parameter {name!r} has no fragment; the file is damaged"
                    )
                have = max(0, min(count, (r + 1) * part) - r * part)
                p = _partition(_flat(t), models[r], f"frozen parameter {name!r}")
                if p.numel < have:
                    raise FormatError(
                        f"{models[r].path}: frozen parameter {name!r} is shorter than "
                        "its shape; the file is damaged"
                    )
                dtype = t.dtype
                pieces.append((p.path, p.offset, have, r * part))
            tensors[name] = make_tensor(name, dtype, shape, flat_extents(pieces, itemsize_of(dtype, name)))
        return
    if stage != 1:
        return
    buffers = set(_as_list(first.get("buffer_names")))
    shared = set(first.get("shared_params") or {})
    for name, t in (first.get("module") or {}).items():
        if name in tensors or name in buffers or name in shared or not isinstance(t, LazyTensor):
            continue
        tensors[name] = _whole(name, t, models[0], t.dtype)
        from_module.add(id(t))


def _buffers(tensors: dict, first: dict, model0: TorchFile, master: str, from_module: set[int]) -> None:
    """Persistent buffers, from rank 0's module; floating ones in the master dtype, as
    zero_to_fp32 writes them."""
    module = first.get("module") or {}
    for name in _as_list(first.get("buffer_names")):
        t = module.get(name)
        if isinstance(name, str) and isinstance(t, LazyTensor) and name not in tensors:
            tensors[name] = _whole(name, t, model0, master)
            from_module.add(id(t))


def _whole(name: str, t: LazyTensor, parsed: TorchFile, master: str):
    from reshard.transfer.strided import contiguous_block

    if numel(t.shape) > 1 and contiguous_block(t.shape, t.strides)[0] != 0:
        raise FormatError(f"{parsed.path}: {name!r} is a non-contiguous view; re-save the checkpoint")
    itemsize = itemsize_of(t.dtype, f"{parsed.path}: {name!r}")
    storage = parsed.storages[t.storage.key]
    if (t.offset + numel(t.shape)) * itemsize > storage.nbytes:
        raise FormatError(f"{parsed.path}: {name!r} reaches past its storage; the file is damaged")
    start = storage.data_offset + t.offset * itemsize
    return make_tensor(
        name,
        _out_dtype(t.dtype, master),
        t.shape,
        flat_extents([(parsed.path, start, numel(t.shape), 0)], itemsize),
        src_dtype=t.dtype,
    )


def _flat(t: LazyTensor) -> LazyTensor:
    if len(t.shape) == 1:
        return t
    from dataclasses import replace

    return replace(t, shape=(numel(t.shape),), strides=(1,))


def _out_dtype(dtype: str, master: str) -> str:
    return master if dtype in FLOAT_DTYPES else dtype


def _renamed(t, name: str):
    from dataclasses import replace

    return t if t.name == name else replace(t, name=name)


def _count_tensors(obj: Any, used: set[int], skipped: dict, what: str) -> None:
    """Add every tensor in ``obj`` not in ``used`` to ``skipped[what]`` (bytes, count)."""
    stack = [obj]
    seen: set[int] = set()
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, LazyTensor):
            if id(node) not in used:
                add_skipped(skipped, what, numel(node.shape) * itemsize_of(node.dtype, what))
        elif isinstance(node, dict):
            stack.extend(node.values())
        elif isinstance(node, (list, tuple)):
            stack.extend(node)
        elif isinstance(node, Record):
            stack.extend(node.args)
            if node.state is not None:
                stack.append(node.state)


def check_tag_option(tag: str | None, fmt: str) -> None:
    if tag is not None and fmt != "deepspeed":
        raise UsageError("--tag only applies to DeepSpeed checkpoints")
