"""``reshard merge FOLDER -o OUT``: tensor- or pipeline-parallel outputs back into one
ordinary checkpoint, streamed.

Pipeline stages hold whole tensors, so their union is an ordinary checkpoint of
descriptors. Tensor-parallel ranks hold slices: each merged tensor is described by
extents over the rank files (``reshard.tensors.Extent``): a dim-0 split is the ranks'
pieces one after another (kernel copies); a dim-d split interleaves them, one strided
extent per rank (its rows land every ``sum(widths)`` bytes), gathered a band of rows at a
time so memory stays bounded, never by a tensor. Both are one ``reshard.run.pipeline``
job, like ``split``.

>>> from pathlib import Path
>>> a = TensorInfo.from_file("w", "U8", (2, 2), Path("r0"), 0, 4)
>>> b = TensorInfo.from_file("w", "U8", (2, 1), Path("r1"), 8, 2)
>>> [(e.source.key, e.length, e.dest, e.rows, e.step_dest) for e in stitched_extents([a, b], 1, (2, 3))]
[('r0', 2, 0, 2, 3), ('r1', 1, 2, 2, 3)]
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from reshard.errors import FormatError, UsageError
from reshard.formats.registry import load_checkpoint
from reshard.hub.resolve import ResolvedSource, resolve_local
from reshard.parallel.split_parallel import PP_PLAN_FILE, TP_PLAN_FILE
from reshard.plan import plan_shards
from reshard.run.events import Progress
from reshard.run.pipeline import OutputPart, RunJob, check_source_output, run_job
from reshard.run.verify import read_output
from reshard.tensors import Checkpoint, Extent, TensorInfo, natural_key
from reshard.units import dtype_nbytes, numel
from reshard.writers.safetensors import SafetensorsFormat

# Merged tensors come from several rank files: no source order to keep (see
# SafetensorsFormat), so shards keep the plan's natural order.
MERGED_FORMAT = SafetensorsFormat(source_order=False)


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
        """The merged tensor, its bytes described over the rank files."""
        if self.dim is None:
            return TensorInfo(self.name, self.dtype, self.shape, self.parts[0].extents, self.nbytes)
        return TensorInfo(
            self.name, self.dtype, self.shape, stitched_extents(self.parts, self.dim, self.shape), self.nbytes
        )


def stitched_extents(parts: Sequence[TensorInfo], dim: int, shape: tuple[int, ...]) -> tuple[Extent, ...]:
    """Extents that place equal-rank slices along ``dim`` into the full tensor of ``shape``:
    consecutive pieces when every dim before ``dim`` is 1, else one strided extent per
    rank whose rows (one per index of the dims before ``dim``) interleave."""
    rows = numel(shape[:dim])
    widths = [t.nbytes // rows if rows else 0 for t in parts]
    row = sum(widths)
    extents, column = [], 0
    for t, width in zip(parts, widths):
        if rows == 1:
            extents.append(Extent(t.extents[0].source, t.offset, t.nbytes, column))
        else:
            extents.append(Extent(t.extents[0].source, t.offset, width, column, rows, width, row))
        column += width
    return tuple(extents)


@dataclass(frozen=True)
class MergeResult:
    output: Path
    strategy: str
    tensors: int
    total_size: int
    shards: tuple[str, ...]
    warnings: tuple[str, ...] = field(default=())

    def to_json(self) -> dict:
        return {
            "output": str(self.output),
            "strategy": self.strategy,
            "tensors": self.tensors,
            "total_size": self.total_size,
            "shards": list(self.shards),
            "warnings": list(self.warnings),
        }


def merge_parallel(
    folder: str | Path,
    output: str | Path,
    max_shard_size: int = 5 * 10**9,
    overwrite: bool = False,
    progress: Progress | None = None,
    resume: bool = False,
) -> MergeResult:
    """Reassemble a folder written by ``split --tp`` or ``split --pp`` into ``output``.

    Raises:
        UsageError: the folder has neither ``tp_plan.json`` nor ``pp_plan.json``.
        FormatError: a rank/stage folder disagrees with the plan file.
        ReshardError: output problems, as for ``reshard split``.
    """
    folder = Path(folder).expanduser()
    out = Path(output).expanduser().absolute()
    if (folder / TP_PLAN_FILE).is_file():
        strategy, checkpoint, sources, fmt = "tensor", *_tensor_checkpoint(folder)
    elif (folder / PP_PLAN_FILE).is_file():
        strategy, checkpoint, sources, fmt = "pipeline", *_pipeline_checkpoint(folder)
    else:
        raise UsageError(
            f"{folder}: neither {TP_PLAN_FILE} nor {PP_PLAN_FILE} is here; pass a folder "
            "written by reshard split --tp N or --pp N"
        )
    check_source_output(out, sources, overwrite)
    shard_plan = plan_shards(
        [(t.name, t.nbytes) for t in checkpoint.tensors], max_shard_size, fmt.shard_file_name
    )
    job = RunJob(
        out,
        (OutputPart("", checkpoint, shard_plan, {"format": "pt"}),),
        options={"merge": strategy},
        overwrite=overwrite,
        resume=resume,
        fmt=fmt,
    )
    note = run_job(job, progress)
    return MergeResult(
        out,
        strategy,
        len(checkpoint.tensors),
        shard_plan.total_size,
        tuple(s.file_name for s in shard_plan.shards),
        (note,) if note else (),
    )


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


def _pipeline_checkpoint(folder: Path) -> tuple[Checkpoint, ResolvedSource, SafetensorsFormat]:
    plan_path = folder / PP_PLAN_FILE
    plan = _read_plan(plan_path)
    stages = plan.get("stages")
    names = (
        [s.get("folder") for s in stages]
        if isinstance(stages, list) and all(isinstance(s, dict) for s in stages)
        else None
    )
    parts = _sub_folders(folder, plan_path, names)
    tensors: dict[str, TensorInfo] = {}
    for part in parts:
        for t in load_checkpoint(resolve_local(part)).tensors:
            if t.name in tensors:
                raise FormatError(
                    f"{part}: tensor {t.name!r} is also in {tensors[t.name].file}; "
                    "the stages overlap; re-run reshard split --pp"
                )
            tensors[t.name] = t
    first = resolve_local(parts[0])
    checkpoint = Checkpoint(
        tuple(sorted(tensors.values(), key=lambda t: natural_key(t.name))),
        tuple(p for part in parts for p in resolve_local(part).weight_files),
        {"format": "pt"},
        first.extra_files,
    )
    return checkpoint, _as_source(folder, parts), SafetensorsFormat()


def _tensor_checkpoint(folder: Path) -> tuple[Checkpoint, ResolvedSource, SafetensorsFormat]:
    plan_path = folder / TP_PLAN_FILE
    plan = _read_plan(plan_path)
    parts = _sub_folders(folder, plan_path, plan.get("ranks"))
    specs = plan.get("tensors")
    if not isinstance(specs, dict) or not specs:
        raise FormatError(f'{plan_path}: no "tensors" map; re-run reshard split --tp')
    rank_tensors = [read_output(part) for part in parts]
    ordered = sorted(specs.items(), key=lambda kv: natural_key(kv[0]))
    if plan.get("version", 1) >= 2:  # every cut recorded in full (reshard.parallel.tensor.Cut)
        merged = tuple(_merged_from_cut(name, spec, rank_tensors, plan_path) for name, spec in ordered)
    else:
        merged = tuple(
            _merged_tensor(name, spec, rank_tensors, parts, plan_path).descriptor() for name, spec in ordered
        )
    source = _as_source(folder, parts)
    checkpoint = Checkpoint(
        merged, source.weight_files, {"format": "pt"}, resolve_local(parts[0]).extra_files
    )
    return checkpoint, source, MERGED_FORMAT


def _merged_from_cut(
    name: str, record: object, rank_tensors: list[dict[str, TensorInfo]], plan_path: Path
) -> TensorInfo:
    """A version-2 record: segments, replicas and the ranks holding each piece."""
    from reshard.parallel.tensor import merged_tensor

    if not isinstance(record, dict) or not isinstance(record.get("shape"), list):
        raise FormatError(f"{plan_path}: entry for tensor {name!r} has no shape; re-run reshard split")
    pieces = {r: tensors[name] for r, tensors in enumerate(rank_tensors) if name in tensors}
    try:
        return merged_tensor(name, record, len(rank_tensors), pieces)
    except (UsageError, ValueError, KeyError, TypeError) as e:
        raise FormatError(f"{plan_path}: {e}; re-run reshard split --tp") from e


def _merged_tensor(
    name: str, spec: object, rank_tensors: list[dict[str, TensorInfo]], parts: list[Path], plan_path: Path
) -> MergedTensor:
    if not isinstance(spec, dict) or not isinstance(spec.get("shape"), list):
        raise FormatError(f"{plan_path}: entry for tensor {name!r} has no shape; re-run reshard split")
    dim = spec.get("dim")
    shape = tuple(spec["shape"])
    pieces = []
    for part, tensors in zip(parts, rank_tensors):
        t = tensors.get(name)
        if t is None:
            raise FormatError(
                f"{part}: lacks tensor {name!r} that {plan_path.name} lists; re-run reshard split --tp"
            )
        want = list(shape)
        if dim is not None:
            want[dim] = shape[dim] // len(parts)
        if list(t.shape) != want or t.dtype != spec.get("dtype"):
            raise FormatError(
                f"{t.file}: tensor {name!r} is {t.dtype}{list(t.shape)}, but "
                f"{plan_path.name} expects {spec.get('dtype')}{want}"
            )
        pieces.append(t)
    return MergedTensor(name, pieces[0].dtype, shape, dim, tuple(pieces))
