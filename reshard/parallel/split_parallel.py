"""``reshard split --tp N`` / ``--pp N``: one ordinary sharded checkpoint per GPU.

``--tp N`` writes ``rank-0/`` ... ``rank-(N-1)/``, each holding that rank's slice of
every tensor, plus ``tp_plan.json`` recording every tensor's split. ``--pp N`` writes
``stage-0/`` ... with each stage's whole layers, plus ``pp_plan.json``. Every sub-folder
is a valid safetensors checkpoint (size-bounded shards + index, config.json copied).

The guarantees of ``reshard split`` hold because it is the same run: shards are planned by
``plan_shards`` and the whole output (every rank or stage folder plus the plan file) is
one ``reshard.run.pipeline`` job: row slices are plain byte ranges copied in the kernel,
column slices are strided views read in bounded chunks, everything is built in a
temporary folder beside the output, journaled for ``--resume``, fsynced once, verified,
then renamed into place.

Example (needs a model on disk, so it is not run as a doctest)::

    from reshard.parallel.split_parallel import split_parallel
    result = split_parallel("./tiny", "./tiny-tp2", tp=2)
    sorted(p.name for p in result.output.iterdir())
    # -> ['rank-0', 'rank-1', 'tp_plan.json']
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path

from reshard.errors import UsageError
from reshard.formats.registry import ReadOptions, convert_checkpoint, load_checkpoint
from reshard.hub.resolve import resolve_source
from reshard.parallel.arch import family_for
from reshard.parallel.modelconfig import ModelShape, read_config
from reshard.parallel.pipeline import plan_pipeline
from reshard.parallel.tensor import plan_tensor_parallel
from reshard.plan import ShardPlan, plan_shards
from reshard.run.events import Progress
from reshard.run.pipeline import OutputPart, RunJob, check_source_output, run_job
from reshard.tensors import Checkpoint, natural_key

log = logging.getLogger(__name__)

TP_PLAN_FILE = "tp_plan.json"
PP_PLAN_FILE = "pp_plan.json"
PLAN_FORMAT_VERSION = 1
# tp_plan.json with every tensor's cut (segments, replicas, ranks): merge needs no family table.
CUTS_FORMAT_VERSION = 2


@dataclass(frozen=True)
class ParallelSplitResult:
    """What was written: one ``(folder name, checkpoint, shard plan)`` per rank/stage."""

    output: Path
    strategy: str
    parts: tuple[tuple[str, Checkpoint, ShardPlan], ...]
    warnings: tuple[str, ...] = field(default=())

    def to_json(self) -> dict:
        return {
            "output": str(self.output),
            "strategy": self.strategy,
            "parts": [
                {
                    "folder": name,
                    "tensors": len(ckpt.tensors),
                    "total_size": plan.total_size,
                    "shards": [{"file": s.file_name, "size": s.size} for s in plan.shards],
                }
                for name, ckpt, plan in self.parts
            ],
            "warnings": list(self.warnings),
        }


def split_parallel(
    spec: str,
    output: str | Path | None = None,
    *,
    tp: int | None = None,
    pp: int | None = None,
    max_shard_size: int = 5 * 10**9,
    revision: str | None = None,
    token: str | None = None,
    dtype: str | None = None,
    key: str | None = None,
    overwrite: bool = False,
    progress: Progress | None = None,
    resume: bool = False,
    expert_parallel: bool = False,
    options: ReadOptions | None = None,
) -> ParallelSplitResult:
    """Write per-GPU checkpoints of ``spec`` for tensor (``tp``) or pipeline (``pp``)
    parallelism into ``output``.

    Raises:
        UsageError: both or neither of ``tp``/``pp``; heads or dims that do not divide;
            more stages than layers; a model family with no table.
        ReshardError: whatever ``reshard split`` raises for the same source and output.
    """
    if (tp is None) == (pp is None):
        raise UsageError("pass exactly one of --tp N or --pp N")
    degree = tp if tp is not None else pp
    if degree < 1:
        raise UsageError(f"--{'tp' if tp is not None else 'pp'} must be at least 1, got {degree}")
    if expert_parallel and tp is None:
        raise UsageError("--expert-parallel needs --tp N (experts are placed across its ranks)")
    source = resolve_source(spec, revision=revision, token=token)
    checkpoint = load_checkpoint(source, key=key, options=options)
    if dtype:
        checkpoint = convert_checkpoint(checkpoint, dtype)
    # The config the output gets: the source's, or the one --config supplied (training
    # checkpoints keep theirs outside the weights folder).
    config_file = next(
        (p for p in checkpoint.extra_files if p.name == "config.json"), source.root / "config.json"
    )
    config = read_config(config_file)
    family = family_for(config)
    strategy = "tensor" if tp is not None else "pipeline"
    if tp is not None:
        parts, plan_json = _tensor_parts(checkpoint, config, family, tp, expert_parallel)
    else:
        parts, plan_json = _pipeline_parts(checkpoint, config, family, pp)
    suffix = f"tp{tp}" if tp is not None else f"pp{pp}"
    out = Path(output) if output else Path.cwd() / f"{source.name}-{suffix}"
    out = out.expanduser().absolute()
    check_source_output(out, source, overwrite)
    planned = tuple(
        (name, ckpt, plan_shards([(t.name, t.nbytes) for t in ckpt.tensors], max_shard_size))
        for name, ckpt in parts
    )
    plan_file = TP_PLAN_FILE if tp is not None else PP_PLAN_FILE
    metadata = {**checkpoint.metadata, "format": "pt"}
    job = RunJob(
        out,
        tuple(OutputPart(name, ckpt, plan, metadata, config_dtype=dtype) for name, ckpt, plan in planned),
        files={plan_file: json.dumps(plan_json, indent=2) + "\n"},
        options={
            "strategy": strategy,
            "degree": degree,
            "dtype": dtype,
            "key": key,
            "expert_parallel": expert_parallel,
            **({"read": vars(options)} if options else {}),
        },
        overwrite=overwrite,
        resume=resume,
    )
    note = run_job(job, progress)
    return ParallelSplitResult(out, strategy, planned, (note,) if note else ())


def _tensor_parts(checkpoint: Checkpoint, config: dict, family, degree: int, expert_parallel: bool = False):
    shape = ModelShape.from_config(config)
    plan = plan_tensor_parallel(checkpoint.tensors, family, shape, degree, expert_parallel)
    parts = [(f"rank-{r}", replace(checkpoint, tensors=plan.rank_tensors(r))) for r in range(degree)]
    try:  # every tensor an equal slice per rank: the version-1 record older merges read
        records, version = {s.name: s.to_json() for s in plan.splits}, PLAN_FORMAT_VERSION
    except UsageError:  # fused segments, replicated KV heads, placed experts: every cut in full
        records, version = {c.name: c.to_json() for c in plan.cuts}, CUTS_FORMAT_VERSION
    plan_json = {
        "format": "reshard-tensor-parallel",
        "version": version,
        "family": family.name,
        "tp": degree,
        "ranks": [name for name, _ in parts],
        **({"expert_parallel": True} if expert_parallel else {}),
        "tensors": records,
    }
    return parts, plan_json


def _pipeline_parts(checkpoint: Checkpoint, config: dict, family, stages: int):
    plan = plan_pipeline([(t.name, t.nbytes) for t in checkpoint.tensors], family, stages)
    by_name = {t.name: t for t in checkpoint.tensors}
    parts = [
        (
            f"stage-{s.index}",
            replace(
                checkpoint,
                tensors=tuple(sorted((by_name[n] for n in s.names), key=lambda t: natural_key(t.name))),
            ),
        )
        for s in plan.stages
    ]
    from reshard.parallel.devicemap import device_map

    plan_json = {
        "format": "reshard-pipeline-parallel",
        "version": PLAN_FORMAT_VERSION,
        "family": family.name,
        "pp": stages,
        "stages": [
            {
                "folder": f"stage-{s.index}",
                "layers": list(s.layers),
                "holds": s.describe(),
                "size": s.nbytes,
                "tensors": list(s.names),
            }
            for s in plan.stages
        ],
        "device_map": device_map(plan, family, tied_embeddings=bool(config.get("tie_word_embeddings"))),
    }
    return parts, plan_json
