"""The ``reshard plan`` job: read config.json and tensor headers, plan, estimate memory.

No weight is read: a local source's headers are parsed from its files; a Hub repo's
headers come through range requests (``reshard.hub.resolve.remote_checkpoint``) and only its
config.json is downloaded.

>>> from reshard.parallel.planner import plan_parallel  # doctest: +SKIP
>>> plan = plan_parallel("mistralai/Mistral-7B-v0.1", gpus=2)  # doctest: +SKIP
>>> [g.total for g in plan.per_gpu]  # doctest: +SKIP
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from reshard.errors import ReshardError, UsageError
from reshard.parallel.arch import Family, family_for
from reshard.parallel.memory import GpuEstimate, activation_bytes, kv_cache_bytes
from reshard.parallel.modelconfig import ModelShape, read_config
from reshard.parallel.pipeline import PipelinePlan, plan_pipeline
from reshard.parallel.tensor import plan_tensor_parallel
from reshard.tensors import Checkpoint
from reshard.units import FLOAT_DTYPES, dtype_itemsize

STRATEGIES = ("pipeline", "tensor")
MAX_GPUS_SEARCHED = 1024


@dataclass(frozen=True)
class ParallelPlan:
    """A plan and its per-GPU estimates.

    Attributes:
        per_gpu: one estimate per GPU, in order.
        min_gpus: with ``gpu_memory``, the fewest GPUs for which this strategy fits
            (``None`` when no count does, or without ``gpu_memory``).
        pipeline: the stage assignment (pipeline strategy only).
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

    @property
    def fits(self) -> bool | None:
        if self.gpu_memory is None:
            return None
        return all(g.total <= self.gpu_memory for g in self.per_gpu)

    def to_json(self) -> dict:
        s = self.shape
        return {
            "source": self.source, "family": self.family.name, "strategy": self.strategy,
            "gpus": self.gpus, "batch": self.batch, "context": self.context,
            "dtype": self.compute_dtype,
            "model": {"layers": s.layers, "hidden_size": s.hidden, "attention_heads": s.heads,
                      "kv_heads": s.kv_heads, "head_dim": s.head_dim,
                      "intermediate_size": s.intermediate, "vocab_size": s.vocab},
            "per_gpu": [g.to_json() for g in self.per_gpu],
            "total": sum(g.total for g in self.per_gpu),
            "gpu_memory": self.gpu_memory, "fits": self.fits, "min_gpus": self.min_gpus,
        }


def compute_dtype(checkpoint: Checkpoint, dtype: str | None) -> str:
    """The dtype activations and the KV cache use: ``--dtype``, else the floating-point
    dtype holding most of the checkpoint's bytes (BF16 when there is none)."""
    if dtype:
        return dtype
    by_bytes = Counter()
    for t in checkpoint.tensors:
        if t.dtype in FLOAT_DTYPES:
            by_bytes[t.dtype] += t.nbytes
    return by_bytes.most_common(1)[0][0] if by_bytes else "BF16"


def estimate(checkpoint: Checkpoint, family: Family, shape: ModelShape, strategy: str, gpus: int,
             batch: int, context: int, dtype: str) -> tuple[tuple[GpuEstimate, ...], PipelinePlan | None]:
    """Per-GPU estimates for one strategy and GPU count.

    Raises:
        UsageError: an unknown strategy, or a GPU count the model cannot be split over.
    """
    if batch < 1 or context < 1:
        raise UsageError(f"--batch and --context must be positive, got {batch} and {context}")
    size = dtype_itemsize(dtype)
    if strategy == "pipeline":
        plan = plan_pipeline([(t.name, t.nbytes) for t in checkpoint.tensors], family, gpus)
        act = activation_bytes(shape, batch, context, size)
        return tuple(GpuEstimate(s.index, s.describe(), s.layers, s.nbytes,
                                 kv_cache_bytes(shape, batch, context, size, len(s.layers)), act)
                     for s in plan.stages), plan
    if strategy == "tensor":
        tp = plan_tensor_parallel(checkpoint.tensors, family, shape, gpus)
        kv = kv_cache_bytes(shape, batch, context, size, shape.layers, tp=gpus)
        act = activation_bytes(shape, batch, context, size, tp=gpus)
        layers = tuple(range(shape.layers))
        holds = f"1/{gpus} of every layer, embedding and head" if gpus > 1 else "everything"
        return tuple(GpuEstimate(r, holds, layers, tp.rank_bytes(r), kv, act)
                     for r in range(gpus)), None
    raise UsageError(f"unknown --strategy {strategy!r}: use pipeline or tensor")


def fewest_gpus(checkpoint: Checkpoint, family: Family, shape: ModelShape, strategy: str,
                batch: int, context: int, dtype: str, gpu_memory: int) -> int | None:
    """The smallest GPU count for which every GPU's total fits ``gpu_memory``."""
    limit = min(MAX_GPUS_SEARCHED, shape.layers if strategy == "pipeline" else shape.heads)
    # Some GPU holds at least the average share of the weights: no need to try fewer GPUs
    # than that bound (which also keeps the search fast for 100+ layer models).
    start = max(1, -(-checkpoint.total_size // gpu_memory))
    for n in range(start, limit + 1):
        try:
            per_gpu, _ = estimate(checkpoint, family, shape, strategy, n, batch, context, dtype)
        except UsageError:
            continue  # heads or dims that do not divide by n: not a candidate
        if max(g.total for g in per_gpu) <= gpu_memory:
            return n
    return None


def plan_checkpoint(checkpoint: Checkpoint, config: dict, source: str, gpus: int,
                    strategy: str = "pipeline", context: int = 4096, batch: int = 1,
                    gpu_memory: int | None = None, dtype: str | None = None) -> ParallelPlan:
    """Plan an already-described checkpoint (pure: no I/O)."""
    family = family_for(config)
    shape = ModelShape.from_config(config)
    if dtype:
        from reshard.formats.registry import convert_checkpoint

        checkpoint = convert_checkpoint(checkpoint, dtype)
    cdtype = compute_dtype(checkpoint, dtype)
    per_gpu, pipeline = estimate(checkpoint, family, shape, strategy, gpus, batch, context, cdtype)
    min_gpus = None
    if gpu_memory is not None:
        min_gpus = fewest_gpus(checkpoint, family, shape, strategy, batch, context, cdtype, gpu_memory)
    tied = bool(config.get("tie_word_embeddings", False))
    return ParallelPlan(source, family, shape, strategy, gpus, batch, context, cdtype, gpu_memory,
                        per_gpu, min_gpus, pipeline, tied)


def load_headers_and_config(spec: str, revision: str | None = None,
                            token: str | None = None) -> tuple[Checkpoint, dict]:
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
    if source.format != "safetensors":
        raise UsageError(f"{spec}: plan reads safetensors headers; convert the .bin checkpoint "
                         "first with `reshard split`")
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


def plan_parallel(spec: str, gpus: int, strategy: str = "pipeline", context: int = 4096,
                  batch: int = 1, gpu_memory: int | None = None, dtype: str | None = None,
                  revision: str | None = None, token: str | None = None) -> ParallelPlan:
    """Plan ``spec`` (local folder/file or Hub repo id) over ``gpus`` GPUs.

    Raises:
        ReshardError: one line naming the file or setting at fault.
    """
    checkpoint, config = load_headers_and_config(spec, revision, token)
    return plan_checkpoint(checkpoint, config, spec, gpus, strategy, context, batch,
                           gpu_memory, dtype)


def write_plan_device_map(plan: ParallelPlan, path: Path) -> dict:
    """Write a pipeline plan's device map (GPU ``i`` for stage ``i``) to ``path``.

    Raises:
        UsageError: the plan is not a pipeline plan (a tensor-parallel model is placed
            by its framework, not by a device map).
    """
    from reshard.parallel.devicemap import device_map, write_device_map

    if plan.pipeline is None:
        raise UsageError("--device-map needs --strategy pipeline: a device map places whole "
                         "modules, and tensor parallelism splits every module")
    mapping = device_map(plan.pipeline, plan.family, tied_embeddings=plan.tied_embeddings)
    write_device_map(path, mapping)
    return mapping
