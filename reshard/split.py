"""The ``split`` job: resolve -> describe -> plan -> one run (write, verify, publish).

The output folder appears only when complete: the run pipeline (``reshard.run.pipeline``)
builds everything in a temporary folder beside it, verifies it, then renames it into
place. Any failure removes the temporary folder.

Example (needs a model on disk, so it is not run as a doctest)::

    from reshard.split import split_checkpoint
    result = split_checkpoint("./tiny", "./tiny-2GB", max_shard_size=2 * 10**9)
    [s.file_name for s in result.plan.shards]
    # -> ['model.safetensors']
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from reshard.formats.registry import ReadOptions, convert_checkpoint, load_checkpoint
from reshard.hub.resolve import ResolvedSource, is_local, remote_checkpoint, resolve_source
from reshard.plan import ShardPlan, plan_shards
from reshard.run.events import Progress
from reshard.run.journal import sha256_of_folder
from reshard.run.pipeline import OutputPart, RunJob, check_source_output, run_job
from reshard.run.provenance import shard_metadata, source_provenance
from reshard.tensors import Checkpoint, TensorInfo
from reshard.transfer.ranges import CopyStats, copy_totals
from reshard.writers.safetensors import SAFETENSORS

log = logging.getLogger(__name__)

DEFAULT_MAX_SHARD_SIZE = 5 * 10**9  # huggingface_hub's default, "5GB"


def shareable_origin(tensor: TensorInfo) -> Path | None:
    """The local file whose blocks ``tensor``'s bytes can share by reference, else None.

    Only a plain copy of one byte range can be shared (no dtype change, view,
    quantization, or bytes gathered from several files, as ZeRO-3 and FSDP shards are).
    """
    if tensor.src_dtype or tensor.strides or tensor.quant or len(tensor.extents) != 1:
        return None
    return tensor.file


def shard_origins(checkpoint: Checkpoint) -> list[Path | None] | None:
    """Per tensor, the file its shard should not mix with another (``plan_shards``), or
    None for plain greedy packing: ``.bin`` entries sit at 64-byte offsets, each at its own
    offset modulo 4096, so keeping a shard to one file shares nothing more there.

    The writer pads each shard's header to make its data congruent with the source file
    that gives it the most bytes; safetensors and ZeRO-1/2 flat partitions keep one offset
    modulo 4096 through a file, so a shard from one file shares every whole block.
    """
    if checkpoint.format == "bin":
        return None
    return [shareable_origin(t) for t in checkpoint.tensors]


@dataclass(frozen=True)
class SplitResult:
    """What a split did (or, with ``dry_run``, would do)."""

    output: Path
    plan: ShardPlan
    checkpoint: Checkpoint
    source_spec: str
    dry_run: bool = False
    warnings: tuple[str, ...] = field(default=())
    checksums: dict[str, str] | None = None  # file name -> sha256, with checksum=True
    quantize: dict | None = None  # with --quantize: type, bytes before and after (issue 12)
    # Bytes of the output this run made (files kept by --resume are not counted): how many
    # share the source's blocks (reflink, no new disk) and how many were written.
    disk: dict[str, int] | None = None
    rank: int = 0  # under torchrun: this process's rank (issue 13)
    ranks: list[dict] | None = None  # under torchrun, on rank 0: [{rank, shards, bytes}]

    def to_json(self) -> dict:
        tensors = {t.name: t for t in self.checkpoint.tensors}
        return {
            "output": str(self.output),
            "dry_run": self.dry_run,
            "source": self.source_spec,
            "total_size": self.plan.total_size,
            "total_parameters": self.checkpoint.total_parameters,
            "max_shard_size": self.plan.max_shard_size,
            "shards": [
                {
                    "file": s.file_name,
                    "size": s.size,
                    "tensors": len(s.names),
                    "parameters": sum(tensors[n].numel for n in s.names),
                }
                for s in self.plan.shards
            ],
            "dropped": dict(self.checkpoint.dropped),
            "skipped": {
                what: {"size": size, "tensors": count}
                for what, (size, count) in self.checkpoint.skipped.items()
            },
            "warnings": list(self.warnings),
            **({"sha256": self.checksums} if self.checksums is not None else {}),
            **({"quantize": self.quantize} if self.quantize is not None else {}),
            **({"disk": self.disk} if self.disk is not None else {}),
            **({"ranks": self.ranks} if self.ranks is not None else {}),
        }


def split_checkpoint(
    spec: str,
    output: str | Path | None = None,
    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
    *,
    revision: str | None = None,
    token: str | None = None,
    dtype: str | None = None,
    key: str | None = None,
    overwrite: bool = False,
    dry_run: bool = False,
    progress: Progress | None = None,
    resume: bool = False,
    checksum: bool = False,
    options: ReadOptions | None = None,
    quantize: str | None = None,
    workers: int | None = None,
    no_cache: bool | None = None,
    connections: int | None = None,
) -> SplitResult:
    """Reshard ``spec`` into ``output`` with shards of at most ``max_shard_size`` tensor bytes.

    Args:
        spec: a local folder or file, or a Hub repo id.
        output: the folder to create (default ``./<source name>-resharded``).
        max_shard_size: bytes of tensor data per shard.
        revision, token: for Hub sources.
        dtype: ``"BF16"``/``"F16"``/``"F32"`` to convert floating-point tensors.
        key: the entry holding the weights in a nested training checkpoint.
        overwrite: replace a non-empty output folder.
        dry_run: plan only; for a repo id, from remote headers, downloading no weights.
        progress: receives run events (``reshard.run.events``).
        resume: keep the verified shards of an interrupted run's temporary folder
            (reshard.run.journal); without it a leftover folder is removed. Either way the
            result's warnings say what happened to it.
        checksum: report every output file's sha256 in ``SplitResult.checksums``.
        options: further reader options (``ReadOptions``: DeepSpeed tag, config source).
        quantize: ``q8_0``/``q4_0``/``f16``/``bf16``/``f32`` for GGUF output, ``fp8`` for
            FP8 block-128 safetensors (``reshard.writers.quantized``).
        workers: threads for casts and quantization (``reshard.transfer.cast``), and
            shards written at once; the output is the same for any number. None: one
            shard at a time, casts and quantization on every CPU. Under torchrun the ranks also share the shards
            (``reshard.run.distributed``).
        no_cache: for a Hub repo, stream the weights into the shards by range requests
            instead of downloading them into the cache first (``reshard.hub.stream``);
            None (the default) does so when the cache plus the output would not fit.
        connections: range requests in flight when streaming (default 8).

    Raises:
        ReshardError: with a one-line message naming the file or tensor and the fix.
    """
    from reshard.run.distributed import join_team

    team = None if dry_run else join_team()  # under torchrun: before reading, so a rank's error reaches all
    source: ResolvedSource | None = None
    stream = stream_note = None
    # --no-cache, or the default when the disk is short (reshard.hub.remote)
    found = (
        None
        if dry_run
        else _hub_stream(spec, output, no_cache, revision, token, dtype, quantize, connections)
    )
    if found is not None:
        stream, source, checkpoint, stream_note = found
        name = source.name
    elif dry_run and not is_local(spec) and not _offline():
        checkpoint = remote_checkpoint(spec, revision, token)
        name = spec.split("/")[-1]
    else:
        source = resolve_source(spec, revision=revision, token=token)
        checkpoint = load_checkpoint(source, key=key, options=options)
        name = source.name
    if dtype:
        checkpoint = convert_checkpoint(checkpoint, dtype)
    # --quantize (issue 12): quantized descriptors, and for GGUF its own format; shards
    # are sized by the bytes actually written (the quantized sizes).
    quantized = None
    if quantize:
        from reshard.writers.quantized import prepare_quantized

        quantized = prepare_quantized(checkpoint, quantize, name)
        checkpoint = quantized.checkpoint
    fmt = quantized.fmt if quantized and quantized.fmt else SAFETENSORS
    plan = plan_shards(
        [(t.name, t.nbytes) for t in checkpoint.tensors],
        max_shard_size,
        naming=fmt.shard_file_name,
        origins=None if quantized else shard_origins(checkpoint),
    )
    if hasattr(fmt, "assign"):  # a format whose headers depend on the shard number (GGUF)
        fmt.assign([s.names for s in plan.shards])
    qsummary = quantized.summary if quantized else None
    warnings = (
        checkpoint.warnings
        + (quantized.warnings if quantized else ())
        + tuple(
            f"tensor {n!r} is larger than the shard limit; it gets a shard of its own" for n in plan.oversized
        )
    )
    out = Path(output) if output else Path.cwd() / f"{name}-resharded"
    out = out.expanduser().absolute()
    if source is not None:
        check_source_output(out, source, overwrite, dry_run)
    if dry_run:
        return SplitResult(out, plan, checkpoint, spec, True, warnings, quantize=qsummary)
    # Provenance for `reshard push`'s model card: in the index, or the single file's header.
    provenance = source_provenance(source, spec, max_shard_size, dtype)
    part = OutputPart(
        "",
        checkpoint,
        plan,
        shard_metadata(checkpoint.metadata, provenance, plan.is_sharded),
        index_metadata=provenance if plan.is_sharded else {},
        config_dtype=dtype,
        config_updates=quantized.config_updates if quantized else {},
    )
    job = RunJob(
        out,
        (part,),
        options={
            "dtype": dtype,
            "key": key,
            **({"read": vars(options)} if options else {}),
            **({"quantize": quantize} if quantize else {}),
        },
        overwrite=overwrite,
        resume=resume,
        fmt=fmt,
        workers=max(1, workers or 1),
        stream=stream,
    )
    before = copy_totals()
    from reshard.transfer.cast import compute_threads

    with compute_threads(workers):
        note = run_job(job, progress, team)
    disk = disk_report(copy_totals() - before)  # under torchrun: this rank's bytes
    warnings += (note,) if note else ()
    warnings += (stream_note,) if stream_note else ()
    rank = team.rank if team else 0
    checksums = sha256_of_folder(out) if checksum and rank == 0 else None
    ranks = team.report if team else None  # rank 0: every rank's share; others: their own
    return SplitResult(
        out, plan, checkpoint, spec, False, warnings, checksums, qsummary, disk=disk, rank=rank, ranks=ranks
    )


def disk_report(moved: CopyStats) -> dict[str, int]:
    """``{"shared": ..., "written": ...}`` for ``--json``: the shard bytes this process
    made that share the source's blocks (reflink: no new disk), and those it wrote
    (kernel copies, headers, converted data), counted from the calls. Shards kept by
    ``--resume`` count as neither; the index and the small copied files are not counted.
    Under torchrun each rank counts its own shards.

    >>> disk_report(CopyStats(shared=4096, kernel=10, buffered=90))
    {'shared': 4096, 'written': 100}
    """
    return {"shared": moved.shared, "written": moved.written}


def _hub_stream(spec, output, no_cache, revision, token, dtype, quantize, connections):
    """``(HubStream, source, checkpoint, note)`` when the split streams from the Hub."""
    if no_cache is False or (no_cache is None and is_local(spec)):
        return None
    from reshard.hub.remote import choose_stream, open_hub_checkpoint
    from reshard.hub.stream import DEFAULT_CONNECTIONS, HubStream

    name = spec.rstrip("/").split("/")[-1]
    out = Path(output) if output else Path.cwd() / f"{name}-resharded"
    choice = choose_stream(spec, out, no_cache, revision, token, bool(dtype or quantize))
    if choice is None:
        return None
    source, checkpoint = open_hub_checkpoint(spec, revision, token, choice.files)
    return HubStream(token, connections or DEFAULT_CONNECTIONS), source, checkpoint, choice.note


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)
