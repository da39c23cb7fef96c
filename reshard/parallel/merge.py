"""``reshard merge FOLDER -o OUT``: tensor- or pipeline-parallel outputs back into one
ordinary checkpoint, streamed.

Pipeline stages hold whole tensors, so their union is written by ``write_checkpoint``
(kernel copies). Tensor-parallel ranks hold slices: a dim-0 split is the ranks' pieces
one after another (kernel copies too); a dim-1 split interleaves them row by row, so
it is gathered a block of rows at a time, each rank's rows read as one contiguous
range, and memory stays bounded by ``MERGE_CHUNK``, never by a tensor.

>>> interleave_rows([b"abcd", b"EF"], rows=2)  # rank 0: 2 bytes per row, rank 1: 1
b'abEcdF'
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from reshard.transfer.copy import copy_range, read_exact, write_all
from reshard.errors import FormatError, UsageError
from reshard.formats.safetensors import build_header, is_aligned
from reshard.parallel.split_parallel import PP_PLAN_FILE, TP_PLAN_FILE
from reshard.plan import PlannedShard, plan_shards
from reshard.hub.resolve import ResolvedSource, resolve_local
from reshard.split import build_and_publish, check_output_location
from reshard.tensors import Checkpoint, TensorInfo, natural_key
from reshard.units import dtype_itemsize, dtype_nbytes, numel
from reshard.run.verify import check_same_tensors, read_output
from reshard.writers.safetensors import Progress, copy_extra_files, write_checkpoint, write_index

MERGE_CHUNK = 16 * 1024 * 1024


@dataclass(frozen=True)
class MergedTensor:
    """One output tensor and the rank pieces it is made of (``dim=None``: take rank 0's)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    dim: int | None
    parts: tuple[TensorInfo, ...]

    @property
    def nbytes(self) -> int:
        return dtype_nbytes(self.dtype, self.shape)

    def descriptor(self) -> TensorInfo:
        """What the merged file must hold (for verification)."""
        return TensorInfo(self.name, self.dtype, self.shape, None, 0, self.nbytes)


@dataclass(frozen=True)
class MergeResult:
    output: Path
    strategy: str
    tensors: int
    total_size: int
    shards: tuple[str, ...]

    def to_json(self) -> dict:
        return {"output": str(self.output), "strategy": self.strategy, "tensors": self.tensors,
                "total_size": self.total_size, "shards": list(self.shards)}


def interleave_rows(blocks: Sequence[bytes], rows: int) -> bytes:
    """Row ``i`` of the output is row ``i`` of each block in turn; ``blocks[r]`` holds
    ``rows`` equal-width rows of rank ``r``'s piece."""
    widths = [len(b) // rows for b in blocks]
    out = bytearray(sum(len(b) for b in blocks))
    views = [memoryview(b) for b in blocks]
    cursor = 0
    for i in range(rows):
        for view, width in zip(views, widths):
            out[cursor:cursor + width] = view[i * width:(i + 1) * width]
            cursor += width
    return bytes(out)


def merge_parallel(folder: str | Path, output: str | Path, max_shard_size: int = 5 * 10**9,
                   overwrite: bool = False, progress: Progress | None = None) -> MergeResult:
    """Reassemble a folder written by ``split --tp`` or ``split --pp`` into ``output``.

    Raises:
        UsageError: the folder has neither ``tp_plan.json`` nor ``pp_plan.json``.
        FormatError: a rank/stage folder disagrees with the plan file.
        ReshardError: output problems, as for ``reshard split``.
    """
    folder = Path(folder).expanduser()
    out = Path(output).expanduser().absolute()
    if (folder / TP_PLAN_FILE).is_file():
        return _merge_tensor(folder, out, max_shard_size, overwrite, progress or Progress())
    if (folder / PP_PLAN_FILE).is_file():
        return _merge_pipeline(folder, out, max_shard_size, overwrite, progress or Progress())
    raise UsageError(f"{folder}: neither {TP_PLAN_FILE} nor {PP_PLAN_FILE} is here; pass a folder "
                     "written by reshard split --tp N or --pp N")


def _read_plan(path: Path) -> dict:
    try:
        plan = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(f"{path}: cannot read the plan: {e}; re-run reshard split") from e
    if not isinstance(plan, dict):
        raise FormatError(f"{path}: not a JSON object; re-run reshard split")
    return plan


def _sub_folders(folder: Path, plan_path: Path, names: object) -> list[Path]:
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise FormatError(f"{plan_path}: no list of rank/stage folders; re-run reshard split")
    paths = []
    for name in names:
        path = folder / name
        if "/" in name or name.startswith(".") or not path.is_dir():
            raise FormatError(f"{plan_path}: names folder {name!r}, which is missing from {folder}")
        paths.append(path)
    return paths


def _as_source(folder: Path, parts: list[Path]) -> ResolvedSource:
    """The split folder as a 'source', so split's output checks (not inside, not over it) apply."""
    weights = tuple(p for part in parts for p in sorted(part.glob("*.safetensors")))
    return ResolvedSource(str(folder), folder, "safetensors", weights)


def _merge_pipeline(folder: Path, out: Path, max_shard_size: int, overwrite: bool,
                    progress: Progress) -> MergeResult:
    plan_path = folder / PP_PLAN_FILE
    plan = _read_plan(plan_path)
    stages = plan.get("stages")
    names = [s.get("folder") for s in stages] if isinstance(stages, list) and all(
        isinstance(s, dict) for s in stages) else None
    parts = _sub_folders(folder, plan_path, names)
    from reshard.formats.registry import load_checkpoint

    tensors: dict[str, TensorInfo] = {}
    for part in parts:
        for t in load_checkpoint(resolve_local(part)).tensors:
            if t.name in tensors:
                raise FormatError(f"{part}: tensor {t.name!r} is also in {tensors[t.name].file}; "
                                  "the stages overlap; re-run reshard split --pp")
            tensors[t.name] = t
    first = resolve_local(parts[0])
    checkpoint = Checkpoint(tuple(sorted(tensors.values(), key=lambda t: natural_key(t.name))),
                            tuple(p for part in parts for p in resolve_local(part).weight_files),
                            {"format": "pt"}, first.extra_files)
    check_output_location(out, _as_source(folder, parts), overwrite)
    shard_plan = plan_shards([(t.name, t.nbytes) for t in checkpoint.tensors], max_shard_size)

    def build(tmp: Path) -> None:
        write_checkpoint(checkpoint, shard_plan, tmp, {"format": "pt"}, progress)
        check_same_tensors(read_output(tmp), checkpoint.tensors, tmp)

    build_and_publish(out, overwrite, build)
    return MergeResult(out, "pipeline", len(checkpoint.tensors), shard_plan.total_size,
                       tuple(s.file_name for s in shard_plan.shards))


def _merge_tensor(folder: Path, out: Path, max_shard_size: int, overwrite: bool,
                  progress: Progress) -> MergeResult:
    plan_path = folder / TP_PLAN_FILE
    plan = _read_plan(plan_path)
    parts = _sub_folders(folder, plan_path, plan.get("ranks"))
    specs = plan.get("tensors")
    if not isinstance(specs, dict) or not specs:
        raise FormatError(f"{plan_path}: no \"tensors\" map; re-run reshard split --tp")
    rank_tensors = [read_output(part) for part in parts]
    merged = tuple(_merged_tensor(name, spec, rank_tensors, parts, plan_path)
                   for name, spec in sorted(specs.items(), key=lambda kv: natural_key(kv[0])))
    extra = resolve_local(parts[0]).extra_files
    check_output_location(out, _as_source(folder, parts), overwrite)
    shard_plan = plan_shards([(m.name, m.nbytes) for m in merged], max_shard_size)
    by_name = {m.name: m for m in merged}

    def build(tmp: Path) -> None:
        progress.begin(shard_plan.total_size, len(shard_plan.shards))
        count = len(shard_plan.shards)
        for number, shard in enumerate(shard_plan.shards, start=1):
            progress.start_shard(number, count, shard.file_name, shard.size)
            write_merged_shard(tmp / shard.file_name, shard, by_name, progress)
            progress.end_shard()
        if shard_plan.is_sharded:
            write_index(tmp, shard_plan, Checkpoint(tuple(m.descriptor() for m in merged), ()))
        copy_extra_files(extra, tmp)
        check_same_tensors(read_output(tmp), tuple(m.descriptor() for m in merged), tmp)

    build_and_publish(out, overwrite, build)
    return MergeResult(out, "tensor", len(merged), shard_plan.total_size,
                       tuple(s.file_name for s in shard_plan.shards))


def _merged_tensor(name: str, spec: object, rank_tensors: list[dict[str, TensorInfo]],
                   parts: list[Path], plan_path: Path) -> MergedTensor:
    if not isinstance(spec, dict) or not isinstance(spec.get("shape"), list):
        raise FormatError(f"{plan_path}: entry for tensor {name!r} has no shape; re-run reshard split")
    dim = spec.get("dim")
    shape = tuple(spec["shape"])
    pieces = []
    for part, tensors in zip(parts, rank_tensors):
        t = tensors.get(name)
        if t is None:
            raise FormatError(f"{part}: lacks tensor {name!r} that {plan_path.name} lists; "
                              "re-run reshard split --tp")
        want = list(shape)
        if dim is not None:
            want[dim] = shape[dim] // len(parts)
        if list(t.shape) != want or t.dtype != spec.get("dtype"):
            raise FormatError(f"{t.file}: tensor {name!r} is {t.dtype}{list(t.shape)}, but "
                              f"{plan_path.name} expects {spec.get('dtype')}{want}")
        pieces.append(t)
    return MergedTensor(name, pieces[0].dtype, shape, dim, tuple(pieces))


def write_merged_shard(path: Path, shard: PlannedShard, tensors: dict[str, MergedTensor],
                       progress: Progress) -> None:
    """Write one shard of merged tensors: header, then each tensor streamed from its pieces."""
    order = [tensors[n] for n in shard.names]
    fake = [m.descriptor() for m in order]
    if not is_aligned(fake):  # same rule as the main writer: widest elements first aligns
        order.sort(key=lambda m: -dtype_itemsize(m.dtype))
    header = build_header({"format": "pt"}, [(m.name, m.dtype, m.shape, m.nbytes) for m in order],
                          pad_to=8, key_order=sorted(shard.names, key=natural_key))
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    sources: dict[Path, int] = {}
    try:
        write_all(fd, header, 0)
        cursor = len(header)
        for m in order:
            cursor = _write_tensor(fd, cursor, m, sources, progress)
        os.ftruncate(fd, cursor)
        os.fsync(fd)
    finally:
        for src in sources.values():
            os.close(src)
        os.close(fd)


def _write_tensor(fd: int, cursor: int, m: MergedTensor, sources: dict[Path, int],
                  progress: Progress) -> int:
    def source(t: TensorInfo) -> int:
        if t.file not in sources:
            sources[t.file] = os.open(t.file, os.O_RDONLY)
        return sources[t.file]

    if m.dim is None or all(n == 1 for n in m.shape[:m.dim]):
        # Replicated, or pieces that follow one another: kernel copies, no buffer.
        for t in (m.parts[:1] if m.dim is None else m.parts):
            copy_range(source(t), fd, t.offset, cursor, t.nbytes, progress.advance, str(t.file))
            cursor += t.nbytes
        return cursor
    rows = numel(m.shape[:m.dim])
    widths = [t.nbytes // rows for t in m.parts]  # bytes of one outer row of each piece
    step = max(1, MERGE_CHUNK // sum(widths))
    for start in range(0, rows, step):
        count = min(step, rows - start)
        blocks = [read_exact(source(t), t.offset + start * w, count * w, str(t.file))
                  for t, w in zip(m.parts, widths)]
        data = interleave_rows(blocks, rows=count)
        write_all(fd, data, cursor)
        cursor += len(data)
        progress.advance(len(data))
    return cursor
