"""The ``reshard plan`` job: read config.json and tensor headers, plan, estimate memory.

No weight is read: a local source's headers are parsed from its files; a Hub repo's
headers come through range requests (``reshard.hub.resolve.remote_checkpoint``) and only its
config.json is downloaded.

Example (needs a model on disk, so it is not run as a doctest)::

    from reshard.parallel.planner import plan_parallel
    plan = plan_parallel("mistralai/Mistral-7B-v0.1", gpus=2)
    [g.total for g in plan.per_gpu]
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from reshard.errors import ReshardError, UsageError
from reshard.parallel.arch import VOCAB, Family
from reshard.parallel.families import family_for
from reshard.parallel.memory import GpuEstimate, activation_bytes, kv_cache_bytes
from reshard.parallel.modelconfig import ModelShape, read_config
from reshard.parallel.pipeline import PipelinePlan, plan_pipeline
from reshard.parallel.tensor import check_experts, parameters, plan_tensor_parallel
from reshard.tensors import Checkpoint
from reshard.units import FLOAT_DTYPES, dtype_itemsize

STRATEGIES = ("pipeline", "tensor")
MAX_GPUS_SEARCHED = 1024
# What the estimate leaves out and a GPU still needs: the CUDA context (~0.3-0.5 GB),
# allocator fragmentation and framework workspaces (docs: leave 1-2 GB). A plan only
# "fits" when weights + KV cache + activations + this headroom fit.
DEFAULT_HEADROOM = 10**9


@dataclass(frozen=True)
class ParallelPlan:
    """A plan and its per-GPU estimates.

    Attributes:
        per_gpu: one estimate per GPU, in order.
        headroom: bytes per GPU kept free for what the estimate does not count.
        min_gpus: with ``gpu_memory``, the fewest GPUs for which this strategy fits
            (``None`` when no count does, or without ``gpu_memory``).
        pipeline: the stage assignment (pipeline strategy only).
        parameters: ``(total, active)``: a mixture of experts counts every expert in the
            total and ``experts_per_token`` of them in the active count.
    """

    source: str
    family: Family
    shape: ModelShape
    strategy: str
    gpus: int
    batch: int
    context: int
    compute_dtype: str
    gpu_memory: int | None
    per_gpu: tuple[GpuEstimate, ...]
    min_gpus: int | None
    pipeline: PipelinePlan | None
    tied_embeddings: bool
    headroom: int = DEFAULT_HEADROOM
    expert_parallel: bool = False
    parameters: tuple[int, int] = (0, 0)
    device_map: Path | None = None  # where the plan's device map was written, if it was

    @property
    def largest(self) -> int:
        """The largest per-GPU total, before headroom."""
        return max(g.total for g in self.per_gpu)

    @property
    def fits(self) -> bool | None:
        if self.gpu_memory is None:
            return None
        return self.largest + self.headroom <= self.gpu_memory

    @property
    def notes(self) -> list[str]:
        """Facts a reader of the figures needs (the tied head's two placements)."""
        from reshard.parallel.devicemap import tied_head_note

        note = tied_head_note(self.pipeline) if self.pipeline else None
        return [note] if note else []

    def to_json(self) -> dict:
        total, active = self.parameters
        return {
            "source": self.source,
            "family": self.family.name,
            "strategy": self.strategy,
            "expert_parallel": self.expert_parallel,
            "gpus": self.gpus,
            "batch": self.batch,
            "context": self.context,
            "dtype": self.compute_dtype,
            "model": self.shape.to_json(),
            "parameters": {"total": total, "active": active},
            "per_gpu": [g.to_json() for g in self.per_gpu],
            "total": sum(g.total for g in self.per_gpu),
            "gpu_memory": self.gpu_memory,
            "headroom": self.headroom,
            "fits": self.fits,
            "min_gpus": self.min_gpus,
            "notes": self.notes,
            "device_map": str(self.device_map) if self.device_map else None,
        }


def compute_dtype(checkpoint: Checkpoint, dtype: str | None) -> str:
    """The dtype activations and the KV cache use: ``--dtype``, else the 16/32-bit
    floating-point dtype holding most of the checkpoint's bytes (BF16 when there is none:
    FP8 and MXFP4 checkpoints compute and cache in BF16)."""
    if dtype:
        return dtype
    by_bytes: Counter[str] = Counter()
    for t in checkpoint.tensors:
        if t.dtype in FLOAT_DTYPES:
            by_bytes[t.dtype] += t.nbytes
    return by_bytes.most_common(1)[0][0] if by_bytes else "BF16"


def tied_head_bytes(checkpoint: Checkpoint, family: Family, tied: bool) -> int:
    """Bytes of the embedding a last pipeline stage holds as its tied head (0 when the
    model is untied or the checkpoint has its own head tensor)."""
    if not tied:
        return 0

    def is_vocab(name: str) -> bool:
        try:
            return family.layer_of(name) is None and family.split_of(name) == VOCAB
        except UsageError:
            return False

    vocab = [t for t in checkpoint.tensors if is_vocab(t.name)]
    if any(family.is_last(t.name) for t in vocab):
        return 0
    return sum(t.nbytes for t in vocab)


def estimate(
    checkpoint: Checkpoint,
    family: Family,
    shape: ModelShape,
    strategy: str,
    gpus: int,
    batch: int,
    context: int,
    dtype: str,
    expert_parallel: bool = False,
    tied: bool = False,
) -> tuple[tuple[GpuEstimate, ...], PipelinePlan | None]:
    """Per-GPU estimates for one strategy and GPU count.

    Raises:
        UsageError: an unknown strategy, or a GPU count the model cannot be split over.
    """
    if batch < 1 or context < 1:
        raise UsageError(f"--batch and --context must be positive, got {batch} and {context}")
    size = dtype_itemsize(dtype)
    if strategy == "pipeline":
        if expert_parallel:
            raise UsageError(
                "--expert-parallel needs --strategy tensor (experts are placed "
                "across the tensor-parallel ranks)"
            )
        plan = plan_pipeline(
            [(t.name, t.nbytes) for t in checkpoint.tensors],
            family,
            gpus,
            tied_head_bytes(checkpoint, family, tied),
        )
        act = activation_bytes(shape, batch, context, size)
        return tuple(
            GpuEstimate(
                s.index,
                s.describe(),
                s.layers,
                s.weight_bytes,
                kv_cache_bytes(shape, batch, context, size, s.layers),
                act,
            )
            for s in plan.stages
        ), plan
    if strategy == "tensor":
        tp = plan_tensor_parallel(checkpoint.tensors, family, shape, gpus, expert_parallel)
        kv = kv_cache_bytes(shape, batch, context, size, shape.layers, tp=gpus)
        act = activation_bytes(shape, batch, context, size, tp=gpus)
        layers = tuple(range(shape.layers))
        return tuple(
            GpuEstimate(r, _tp_holds(shape, gpus, r, expert_parallel), layers, tp.rank_bytes(r), kv, act)
            for r in range(gpus)
        ), None
    raise UsageError(f"unknown --strategy {strategy!r}: use pipeline or tensor")


def _tp_holds(shape: ModelShape, gpus: int, rank: int, expert_parallel: bool) -> str:
    if gpus == 1:
        return "everything"
    replicated = (
        f" (KV head {rank * shape.kv_heads // gpus}, shared by {gpus // shape.kv_heads} GPUs)"
        if not shape.mla and gpus > shape.kv_heads
        else ""
    )
    if expert_parallel:
        per = shape.experts // gpus
        return (
            f"1/{gpus} of attention{replicated} and dense MLPs, experts {rank * per}-{(rank + 1) * per - 1}"
        )
    return f"1/{gpus} of every layer{replicated}, embedding and head"


def fewest_gpus(
    checkpoint: Checkpoint,
    family: Family,
    shape: ModelShape,
    strategy: str,
    batch: int,
    context: int,
    dtype: str,
    gpu_memory: int,
    headroom: int = DEFAULT_HEADROOM,
    expert_parallel: bool = False,
    tied: bool = False,
) -> int | None:
    """The smallest GPU count for which every GPU's total plus ``headroom`` fits
    ``gpu_memory``."""
    usable = gpu_memory - headroom
    if usable <= 0:
        return None
    limit = min(MAX_GPUS_SEARCHED, shape.layers if strategy == "pipeline" else shape.heads)
    # Some GPU holds at least the average share of the weights: no need to try fewer GPUs
    # than that bound (which also keeps the search fast for 100+ layer models).
    start = max(1, -(-checkpoint.total_size // usable))
    for n in range(start, limit + 1):
        try:
            per_gpu, _ = estimate(
                checkpoint, family, shape, strategy, n, batch, context, dtype, expert_parallel, tied
            )
        except UsageError:
            continue  # heads, experts or dims that do not divide by n: not a candidate
        if max(g.total for g in per_gpu) <= usable:
            return n
    return None


def plan_checkpoint(
    checkpoint: Checkpoint,
    config: dict,
    source: str,
    gpus: int,
    strategy: str = "pipeline",
    context: int = 4096,
    batch: int = 1,
    gpu_memory: int | None = None,
    dtype: str | None = None,
    expert_parallel: bool = False,
    headroom: int = DEFAULT_HEADROOM,
) -> ParallelPlan:
    """Plan an already-described checkpoint (pure: no I/O).

    Raises:
        UsageError: a setting the model cannot be planned with (one line).
    """
    family = family_for(config)
    shape = ModelShape.from_config(config, family=family)
    if headroom < 0:
        raise UsageError(f"--headroom must not be negative, got {headroom}")
    if expert_parallel:
        check_experts(shape, gpus)
    if dtype:
        from reshard.formats.registry import convert_checkpoint

        checkpoint = convert_checkpoint(checkpoint, dtype)
    cdtype = compute_dtype(checkpoint, dtype)
    tied = family.tied_embeddings(config)
    per_gpu, pipeline = estimate(
        checkpoint, family, shape, strategy, gpus, batch, context, cdtype, expert_parallel, tied
    )
    min_gpus = None
    if gpu_memory is not None:
        min_gpus = fewest_gpus(
            checkpoint,
            family,
            shape,
            strategy,
            batch,
            context,
            cdtype,
            gpu_memory,
            headroom,
            expert_parallel,
            tied,
        )
    return ParallelPlan(
        source,
        family,
        shape,
        strategy,
        gpus,
        batch,
        context,
        cdtype,
        gpu_memory,
        per_gpu,
        min_gpus,
        pipeline,
        tied,
        headroom,
        expert_parallel,
        parameters(checkpoint.tensors, family, shape),
    )


def load_headers_and_config(
    spec: str, revision: str | None = None, token: str | None = None
) -> tuple[Checkpoint, dict]:
    """Describe a source and read its config.json, downloading no weights.

    Raises:
        ReshardError: the source cannot be resolved, or has no config.json.
    """
    from reshard.hub.resolve import is_local, remote_checkpoint

    if not is_local(spec) and not _offline():
        checkpoint = remote_checkpoint(spec, revision, token)
        return checkpoint, read_config(_download_config(spec, revision, token))
    from reshard.formats.registry import load_checkpoint
    from reshard.hub.resolve import resolve_source

    source = resolve_source(spec, revision=revision, token=token)
    # A .bin is described from its pickle and zip directory only (no storage is read).
    return load_checkpoint(source), read_config(source.root / "config.json")


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _download_config(repo_id: str, revision: str | None, token: str | None) -> Path:
    from huggingface_hub import hf_hub_download

    from reshard.hub.access import to_hub_error

    try:
        return Path(hf_hub_download(repo_id, "config.json", revision=revision, token=token))
    except Exception as e:  # huggingface_hub raises many types; one line for each
        if isinstance(e, ReshardError):
            raise
        raise to_hub_error(e, repo_id, revision) from e


def plan_parallel(
    spec: str,
    gpus: int,
    strategy: str = "pipeline",
    context: int = 4096,
    batch: int = 1,
    gpu_memory: int | None = None,
    dtype: str | None = None,
    revision: str | None = None,
    token: str | None = None,
    expert_parallel: bool = False,
    headroom: int = DEFAULT_HEADROOM,
) -> ParallelPlan:
    """Plan ``spec`` (local folder/file or Hub repo id) over ``gpus`` GPUs.

    Raises:
        ReshardError: one line naming the file or setting at fault.
    """
    checkpoint, config = load_headers_and_config(spec, revision, token)
    return plan_checkpoint(
        checkpoint, config, spec, gpus, strategy, context, batch, gpu_memory, dtype, expert_parallel, headroom
    )


def write_plan_device_map(plan: ParallelPlan, path: Path) -> dict:
    """Write a pipeline plan's device map (GPU ``i`` for stage ``i``) to ``path``.

    Raises:
        UsageError: the plan is not a pipeline plan (a tensor-parallel model is placed
            by its framework, not by a device map).
    """
    from reshard.parallel.devicemap import device_map, write_device_map

    if plan.pipeline is None:
        raise UsageError(
            "--device-map needs --strategy pipeline: a device map places whole "
            "modules, and tensor parallelism splits every module"
        )
    mapping = device_map(plan.pipeline, plan.family, tied_embeddings=plan.tied_embeddings)
    write_device_map(path, mapping)
    return mapping
