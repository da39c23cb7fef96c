"""The ``split`` job end to end: resolve -> describe -> plan -> write -> verify -> publish.

The output folder appears only when complete: everything is built in a temporary folder
beside it, verified, then renamed into place. Any failure removes the temporary folder.

>>> from reshard.split import split_checkpoint  # doctest: +SKIP
>>> result = split_checkpoint("./tiny", "./tiny-2GB", max_shard_size=2 * 10**9)  # doctest: +SKIP
>>> [s.file_name for s in result.plan.shards]  # doctest: +SKIP
['model.safetensors']
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from reshard.formats.registry import convert_checkpoint, load_checkpoint
from reshard.errors import OutputError, ReshardError
from reshard.run.lock import output_lock
from reshard.hub.card import add_index_provenance, shard_metadata, source_provenance
from reshard.plan import ShardPlan, plan_shards
from reshard.run.journal import ResumableRun, pause_point, sha256_of_folder
from reshard.hub.resolve import ResolvedSource, is_local, remote_checkpoint, resolve_source
from reshard.tensors import Checkpoint
from reshard.run.verify import check_same_tensors, read_output
from reshard.writers.safetensors import Progress, write_checkpoint

log = logging.getLogger(__name__)

DEFAULT_MAX_SHARD_SIZE = 5 * 10**9  # huggingface_hub's default, "5GB"
TORCH_DTYPE_NAMES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}


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

    def to_json(self) -> dict:
        tensors = {t.name: t for t in self.checkpoint.tensors}
        return {
            "output": str(self.output),
            "dry_run": self.dry_run,
            "source": self.source_spec,
            "total_size": self.plan.total_size,
            "total_parameters": self.checkpoint.total_parameters,
            "max_shard_size": self.plan.max_shard_size,
            "shards": [{"file": s.file_name, "size": s.size, "tensors": len(s.names),
                        "parameters": sum(tensors[n].numel for n in s.names)}
                       for s in self.plan.shards],
            "dropped": dict(self.checkpoint.dropped),
            "warnings": list(self.warnings),
            **({"sha256": self.checksums} if self.checksums is not None else {}),
        }


def split_checkpoint(spec: str, output: str | Path | None = None,
                     max_shard_size: int = DEFAULT_MAX_SHARD_SIZE, *, revision: str | None = None,
                     token: str | None = None, dtype: str | None = None, key: str | None = None,
                     overwrite: bool = False, dry_run: bool = False,
                     progress: Progress | None = None, resume: bool = False,
                     checksum: bool = False) -> SplitResult:
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
        progress: receives byte counts while writing.
        resume: keep the verified shards of an interrupted run's temporary folder
            (reshard.run.journal); without it a leftover folder is removed. Either way the
            result's warnings say what happened to it.
        checksum: report every output file's sha256 in ``SplitResult.checksums``.

    Raises:
        ReshardError: with a one-line message naming the file or tensor and the fix.
    """
    source: ResolvedSource | None = None
    if dry_run and not is_local(spec) and not _offline():
        checkpoint = remote_checkpoint(spec, revision, token)
        name = spec.split("/")[-1]
    else:
        source = resolve_source(spec, revision=revision, token=token)
        checkpoint = load_checkpoint(source, key=key)
        name = source.name
    if dtype:
        checkpoint = convert_checkpoint(checkpoint, dtype)
    plan = plan_shards([(t.name, t.nbytes) for t in checkpoint.tensors], max_shard_size)
    warnings = tuple(f"tensor {n!r} is larger than the shard limit; it gets a shard of its own"
                     for n in plan.oversized)
    out = Path(output) if output else Path.cwd() / f"{name}-resharded"
    out = out.expanduser().absolute()
    if source is not None:
        check_output_location(out, source, overwrite)
    if dry_run:
        return SplitResult(out, plan, checkpoint, spec, True, warnings)
    # Provenance for `reshard push`'s model card: in the index, or the single file's header.
    provenance = source_provenance(source, spec, max_shard_size, dtype)
    metadata = shard_metadata(checkpoint.metadata, provenance, plan.is_sharded)
    run = ResumableRun.create(checkpoint, plan, metadata, {"dtype": dtype, "key": key}, resume)

    def build(tmp: Path) -> None:
        _write_all(tmp, checkpoint, plan, metadata, dtype, progress, run)
        add_index_provenance(tmp, provenance)

    note = build_and_publish(out, overwrite, build, run)
    warnings += (note,) if note else ()
    checksums = sha256_of_folder(out) if checksum else None
    return SplitResult(out, plan, checkpoint, spec, False, warnings, checksums)


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _write_all(tmp: Path, checkpoint: Checkpoint, plan: ShardPlan, metadata: dict[str, str],
               dtype: str | None, progress: Progress | None, run: ResumableRun) -> None:
    write_checkpoint(checkpoint, plan, tmp, metadata, progress, skip=run.kept,
                     on_shard_done=run.record)
    if dtype:
        set_config_dtype(tmp / "config.json", dtype)
    # Structural verification before publishing: index, headers, names, dtypes, shapes.
    check_same_tensors(read_output(tmp), checkpoint.tensors, tmp)


def set_config_dtype(config_path: Path, dtype: str) -> None:
    """Record the converted dtype in a copied config.json (``torch_dtype`` and ``dtype``)."""
    if not config_path.exists():
        return
    config = json.loads(config_path.read_text(encoding="utf-8"))
    name = TORCH_DTYPE_NAMES[dtype]
    config["torch_dtype"] = name
    config["dtype"] = name
    config_path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def check_output_location(out: Path, source: ResolvedSource, overwrite: bool) -> None:
    """Refuse outputs that would clobber data: non-empty without ``overwrite``, equal to or
    inside the source folder, or (with ``overwrite``) a folder that contains the source."""
    out_real = out.resolve()
    src_root = source.root.resolve()
    src_files = [p.resolve() for p in source.weight_files]
    source_is_folder = Path(source.spec).expanduser().is_dir() or source.repo_id is not None
    if out_real in src_files or (source_is_folder and out_real.is_relative_to(src_root)):
        raise OutputError(f"{out}: the output is the source or inside it; choose another -o")
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out}: exists and is not a folder; choose another -o")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise OutputError(f"{out}: exists and is not empty; pass --overwrite to replace it "
                              "or choose another -o")
        if any(p.is_relative_to(out_real) for p in [src_root, *src_files]):
            raise OutputError(f"{out}: holds the source, so --overwrite would delete it; "
                              "choose another -o")


def temp_dir_for(out: Path) -> Path:
    """The deterministic build folder beside ``out`` (same filesystem, so rename is atomic)."""
    return out.parent / f".{out.name}.reshard-tmp"


def build_and_publish(out: Path, overwrite: bool, build, run: ResumableRun | None = None) -> str | None:
    """Run ``build(tmp)`` in a temporary folder beside ``out``, then move it into place.

    Holds the output's lock (reshard.run.lock) throughout, so a second run refuses. A leftover
    temporary folder is resumed from or removed by ``run`` (reshard.run.journal); the returned
    message says which (None when there was none). On any failure (including Ctrl-C) the
    temporary folder is removed and ``out`` is left as it was; after a kill -9 it stays,
    for the next run to resume or remove.
    """
    tmp = temp_dir_for(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise os_error_to_output_error(e, out) from e
    with output_lock(out):
        try:
            if run is not None:
                note = run.prepare(tmp)
            else:
                note = None
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir()
            build(tmp)
            pause_point("publish")  # test hook (reshard.run.journal): all written, journal intact
            if run is not None:
                run.finish()
            publish(tmp, out, overwrite)
        except BaseException as e:
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(e, OSError) and not isinstance(e, ReshardError):
                raise os_error_to_output_error(e, out) from e
            raise
    return note


def publish(tmp: Path, out: Path, overwrite: bool) -> None:
    """Rename the finished folder into place, replacing ``out`` when allowed."""
    from reshard.run.atomic import exchange

    _fsync_dir(tmp)
    if out.exists():
        if any(out.iterdir()) and not overwrite:
            raise OutputError(f"{out}: appeared while writing and is not empty; pass --overwrite")
        if exchange(tmp, out):  # atomic: out is the old folder or the new one, never neither
            shutil.rmtree(tmp)
        else:
            old = out.parent / f".{out.name}.reshard-old"
            shutil.rmtree(old, ignore_errors=True)
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out)
    _fsync_dir(out.parent)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def os_error_to_output_error(error: OSError, out: Path) -> OutputError:
    """One line for the usual resource failures while writing ``out``."""
    where = error.filename or out
    if error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return OutputError(f"{where}: disk full (or file size limit) while writing {out}; free "
                           "space or choose an -o on another disk. Nothing was left behind")
    if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return OutputError(f"{where}: permission denied; choose an -o you can write to")
    return OutputError(f"{where}: {error.strerror or error} while writing {out}")
