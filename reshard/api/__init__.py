"""reshard's Python API: the functions the ``reshard`` commands call, with the same options.

Each function returns a frozen dataclass whose ``to_json()`` is exactly what the command
prints with ``--json`` (less ``"ok": true``): the CLI calls these functions, so the two
cannot drift. Each raises a ``reshard.ReshardError`` subclass with the same one-line
message the CLI prints; messages name the CLI option (``--checksum``), which here is the
keyword argument of the same name (``checksum=``). See docs/python.md.

Example (needs a model on disk, so it is not run as a doctest; docs/python.md's examples
are run by tests/test_api_docs.py)::

    import reshard
    result = reshard.split("./my-model", "./my-model-2GB", max_shard="2GB")
    result.to_json()["shards"]

Nothing heavy is imported until a function runs: ``import reshard`` stays instant.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from reshard.api.options import refuse_unused, size_option
from reshard.api.progress import (
    CallbackProgress,
    ProgressLike,
    RichProgress,
    TqdmProgress,
    as_progress,
)
from reshard.errors import UsageError

if TYPE_CHECKING:
    from reshard.formats.registry import ReadOptions
    from reshard.hub.push import PushResult
    from reshard.parallel.merge import MergeResult
    from reshard.parallel.planner import ParallelPlan
    from reshard.parallel.split_parallel import ParallelSplitResult
    from reshard.run.verify import VerifyReport
    from reshard.split import SplitResult
    from reshard.summary import InspectResult

__all__ = [
    "split",
    "inspect",
    "verify",
    "plan",
    "merge",
    "push",
    "CallbackProgress",
    "RichProgress",
    "TqdmProgress",
]

PathLike = str | Path


def _read_options(tag: str | None, config: str | None) -> ReadOptions | None:
    """``tag`` / ``config`` for the reader, or None when neither is given."""
    from reshard.formats.registry import ReadOptions

    return ReadOptions(tag=tag, config=config) if tag is not None or config is not None else None


def split(
    source: PathLike,
    output: PathLike | None = None,
    max_shard: int | str = "5GB",
    *,
    dtype: str | None = None,
    tp: int | None = None,
    pp: int | None = None,
    expert_parallel: bool = False,
    quantize: str | None = None,
    format: str | None = None,
    revision: str | None = None,
    token: str | None = None,
    key: str | None = None,
    tag: str | None = None,
    config: str | None = None,
    overwrite: bool = False,
    dry_run: bool = False,
    resume: bool = False,
    checksum: bool = False,
    workers: int | None = None,
    no_cache: bool | None = None,
    connections: int | None = None,
    progress: ProgressLike = None,
) -> SplitResult | ParallelSplitResult:
    """``reshard split``: write ``source`` as shards of at most ``max_shard`` tensor bytes.

    Args:
        source: a local folder or file (.safetensors, .bin, an index, a DeepSpeed or DCP
            training checkpoint folder) or a Hub repo id.
        output: the folder to create (default ``./<name>-resharded``, ``-tp N``/``-pp N``);
            it appears only when complete and verified.
        max_shard: ``"2GB"`` (10^9), ``"2GiB"`` (2^30) or a byte count.
        dtype: ``"bf16"``/``"fp16"``/``"fp32"`` to convert floating-point tensors.
        tp, pp: per-GPU checkpoints for tensor or pipeline parallelism over N GPUs.
        expert_parallel: with ``tp``, whole experts per rank (mixture of experts).
        quantize, format: ``quantize="q8_0"``/``"q4_0"`` (GGUF) or ``"fp8"``;
            ``format="gguf"`` for unquantized GGUF (docs/quantize.md).
        revision, token: for Hub repo ids.
        key, tag, config: where a training checkpoint keeps its weights, which DeepSpeed
            tag, and where to take config.json and tokenizer files from.
        overwrite: replace a non-empty output folder.
        dry_run: plan only, write nothing (a repo id: headers only, no weights).
        resume: keep the verified shards of an interrupted run.
        checksum: the sha256 of every output file in ``result.checksums``.
        workers: threads for casts and quantization, and shards written at once; the
            output is the same (docs/distributed.md). None: one shard at a time, casts
            and quantization on every CPU (``reshard.transfer.cast.default_workers``).
        no_cache, connections: for a Hub repo id, stream the weights into the shards by
            range requests with ``connections`` in flight (default 8), no copy in the Hub
            cache; None does so when cache plus output would not fit (docs/split.md).
        progress: None, a ``Progress``, a callable ``fn(done, total)``, or
            ``TqdmProgress()`` / ``RichProgress()`` (``reshard.api.progress``).

    Returns:
        a ``SplitResult`` (``ParallelSplitResult`` with ``tp``/``pp``).

    Raises:
        UsageError: option values that cannot be used together (exit status 2 in the CLI).
        ReshardError: anything else (``SourceError``, ``FormatError``, ``OutputError``,
            ``HubError``...), one line naming the file or tensor and what to do.
    """
    from reshard.units import parse_dtype

    limit = size_option(max_shard)
    target_dtype = parse_dtype(dtype) if dtype else None
    if expert_parallel and tp is None:
        raise UsageError(
            "--expert-parallel needs --tp N (experts are placed across the tensor-parallel ranks)"
        )
    if dry_run:
        refuse_unused([("--checksum", checksum)], "a dry run writes nothing; drop --dry-run or these")
    quant = None
    if quantize or format:
        from reshard.writers.quantized import quantize_option

        quant = quantize_option(quantize, format, target_dtype, tp, pp)
        target_dtype = None
    parallel = tp is not None or pp is not None
    if parallel:
        unsupported = [
            name
            for name, on in (
                ("--dry-run", dry_run),
                ("--checksum", checksum),
                ("--workers", (workers or 1) > 1),
                ("--no-cache", bool(no_cache)),
            )
            if on
        ]
        if unsupported:
            raise UsageError(
                f"{', '.join(unsupported)} does not apply with --tp/--pp yet; `reshard plan` previews the split"
            )
    events = as_progress(progress)
    try:
        if parallel:
            from reshard.parallel.split_parallel import split_parallel

            return split_parallel(
                str(source),
                output,
                tp=tp,
                pp=pp,
                max_shard_size=limit,
                revision=revision,
                token=token,
                dtype=target_dtype,
                key=key,
                overwrite=overwrite,
                progress=events,
                resume=resume,
                expert_parallel=expert_parallel,
                options=_read_options(tag, config),
            )
        from reshard.split import split_checkpoint

        return split_checkpoint(
            str(source),
            output,
            limit,
            revision=revision,
            token=token,
            dtype=target_dtype,
            key=key,
            overwrite=overwrite,
            dry_run=dry_run,
            progress=events,
            resume=resume,
            checksum=checksum,
            quantize=quant,
            options=_read_options(tag, config),
            workers=workers,
            no_cache=no_cache,
            connections=connections,
        )
    finally:
        events.close()


def inspect(
    source: PathLike,
    *,
    revision: str | None = None,
    token: str | None = None,
    key: str | None = None,
    tag: str | None = None,
    config: str | None = None,
    on_warning: Callable[[str], object] | None = None,
) -> InspectResult:
    """``reshard inspect``: tensor count, parameters by dtype, bytes, largest tensor, shards.

    A Hub repo id is read from its safetensors headers by range requests (no weights are
    downloaded); a repo without safetensors is downloaded, with a warning. Warnings go to
    ``on_warning(message)`` as they happen (default: the ``reshard`` logger) and are kept
    in ``result.warnings``.

    Raises:
        UsageError: ``key``/``tag``/``config`` for a remote repo (they apply to local
            training checkpoints).
        ReshardError: the source cannot be found or read (one line naming it).
    """
    from reshard.formats.gguf import is_gguf_source, read_gguf_folder
    from reshard.formats.registry import load_checkpoint
    from reshard.hub.resolve import (
        NotSafetensorsRepoError,
        could_be_repo_id,
        hub_offline,
        is_local,
        remote_checkpoint,
        resolve_source,
    )
    from reshard.summary import InspectResult

    spec = str(source)
    warnings: list[str] = []

    def warn(message: str) -> None:
        warnings.append(message)
        if on_warning is not None:
            on_warning(message)
        else:
            import logging

            logging.getLogger("reshard").warning(message)

    checkpoint = None
    if is_gguf_source(spec):  # GGUF files (issue 12)
        checkpoint = read_gguf_folder(Path(spec))
    elif not is_local(spec) and could_be_repo_id(spec) and not hub_offline():
        try:
            checkpoint = remote_checkpoint(spec, revision, token)
        except NotSafetensorsRepoError:
            warn(
                f"{spec} has no model.safetensors or model.safetensors.index.json, so its "
                "headers cannot be read remotely; downloading its weights"
            )
        else:
            if key is not None or tag is not None or config is not None:
                raise UsageError("--key, --tag and --config apply to local training checkpoints")
    if checkpoint is None:
        checkpoint = load_checkpoint(
            resolve_source(spec, revision, token), key=key, options=_read_options(tag, config)
        )
    return InspectResult.from_checkpoint(checkpoint, spec, tuple(warnings))


def verify(
    folder: PathLike,
    against: PathLike | None = None,
    *,
    key: str | None = None,
    tag: str | None = None,
    config: str | None = None,
) -> VerifyReport:
    """``reshard verify``: index and files agree, headers are valid, and (with
    ``against``) every tensor's bytes equal the source's.

    Returns:
        a ``VerifyReport`` (files, tensors, bytes, bytes compared).

    Raises:
        VerifyError: the folder does not match its index or the source (names the tensor).
        UsageError: ``key``/``tag``/``config`` without ``against``.
        ReshardError: the folder or source cannot be read.
    """
    from reshard.formats.registry import load_checkpoint
    from reshard.hub.resolve import resolve_source
    from reshard.quant.check import verify_quantized_folder  # GGUF / FP8 outputs (issue 12)
    from reshard.run.verify import verify_folder

    if against is None:
        refuse_unused(
            [("--key", key), ("--tag", tag), ("--config", config)],
            "it names the weights of the --against source",
        )
    source = (
        load_checkpoint(resolve_source(str(against)), key=key, options=_read_options(tag, config))
        if against
        else None
    )
    folder = Path(folder)
    return (verify_quantized_folder(folder, source) if source else None) or verify_folder(folder, source)


def plan(
    source: PathLike,
    gpus: int = 1,
    *,
    strategy: str = "pipeline",
    context: int = 4096,
    batch: int = 1,
    gpu_memory: int | str | None = None,
    dtype: str | None = None,
    headroom: int | str = "1GB",
    expert_parallel: bool = False,
    device_map: PathLike | None = None,
    revision: str | None = None,
    token: str | None = None,
) -> ParallelPlan:
    """``reshard plan``: per-GPU weights, KV cache and activations over ``gpus`` GPUs,
    from config.json and the tensor headers only (no weight is read).

    Args:
        strategy: ``"pipeline"`` (whole layers per GPU) or ``"tensor"`` (every layer split).
        context, batch: tokens per sequence and sequences at once (size the KV cache).
        gpu_memory: memory per GPU (``"80GB"``): ``result.fits`` and ``result.min_gpus``.
        dtype: the dtype the weights run in (default: as stored).
        headroom: memory per GPU kept free (CUDA context, allocator); ``0`` for none.
        device_map: write the pipeline plan as a transformers/accelerate device_map file.

    Returns:
        a ``ParallelPlan``: ``per_gpu`` estimates, ``fits``, ``min_gpus``, ``to_json()``.

    Raises:
        UsageError: a strategy, count or option the model cannot take (heads that do not
            divide, ``device_map`` with the tensor strategy, ...).
        ReshardError: the source or its config.json cannot be read.
    """
    from reshard.parallel.planner import plan_parallel, write_plan_device_map
    from reshard.units import parse_dtype

    result = plan_parallel(
        str(source),
        gpus,
        strategy,
        context,
        batch,
        size_option(gpu_memory) if gpu_memory else None,
        parse_dtype(dtype) if dtype else None,
        revision,
        token,
        expert_parallel=expert_parallel,
        headroom=size_option(headroom, zero_allowed=True),
    )
    if device_map is not None:
        write_plan_device_map(result, Path(device_map))
        result = replace(result, device_map=Path(device_map))
    return result


def merge(
    folder: PathLike,
    output: PathLike,
    max_shard: int | str = "5GB",
    *,
    overwrite: bool = False,
    resume: bool = False,
    progress: ProgressLike = None,
) -> MergeResult:
    """``reshard merge``: reassemble a ``split(tp=N)`` or ``split(pp=N)`` folder into one
    ordinary checkpoint in ``output``.

    Raises:
        UsageError: ``folder`` has neither tp_plan.json nor pp_plan.json.
        FormatError: a rank or stage folder disagrees with the plan file.
        ReshardError: output problems, as for ``split``.
    """
    from reshard.parallel.merge import merge_parallel

    limit = size_option(max_shard)
    events = as_progress(progress)
    try:
        return merge_parallel(folder, output, limit, overwrite, events, resume=resume)
    finally:
        events.close()


def push(
    folder: PathLike,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    create_pr: bool = False,
    commit_message: str | None = None,
    token: str | None = None,
) -> PushResult:
    """``reshard push``: verify ``folder`` and upload its model files to ``repo_id`` (created
    if missing), with a generated model card if it has no README.md.

    Returns:
        a ``PushResult``: ``url``, ``commit``, ``pr_url``, ``files``, ``changed``.

    Raises:
        HubError: no token or no write access, a refused commit, the Hub unreachable.
        VerifyError: the folder does not verify (nothing is uploaded).
    """
    from reshard.hub.push import push_folder

    return push_folder(
        folder,
        repo_id,
        private=private,
        revision=revision,
        create_pr=create_pr,
        commit_message=commit_message,
        token=token,
    )
