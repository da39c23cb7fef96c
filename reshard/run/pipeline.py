"""The one run pipeline behind ``split``, ``split --tp/--pp`` and ``merge``.

A job is a list of output parts (the whole output for split and merge, one folder per
rank or stage for ``--tp``/``--pp``), each a checkpoint of descriptors with its shard
plan. ``run_job`` does everything that makes the result safe, in this order:

1. refuse outputs that would clobber data (``check_output_location``, by the caller);
2. take the output's lock, set up the temporary folder beside it, and resume from or
   remove a leftover one (``reshard.run.journal``);
3. write every shard through the output format's writer, journaling each one and
   checking the source has not changed;
4. write each part's index, extra files (config.json with its dtype rewritten) and the
   job's own files (``tp_plan.json``);
5. fsync every file, once, then the folders;
6. verify the structure of every part against its descriptors;
7. rename the folder into place atomically.

Any failure removes the temporary folder and leaves the output as it was. Ctrl-C and
SIGTERM (``reshard.run.signals``) keep it, journal and finished shards, for ``--resume``,
and so does a kill -9; the next run resumes from it or removes it.

A job may bring its own shard writer (``RunJob.stream``: ``split --no-cache`` routes bytes
streamed from the Hub into the shards, ``reshard.hub.stream``); everything else is the same.

>>> temp_dir_for(Path("/data/out")).name
'.out.reshard-tmp'
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from reshard.errors import OutputError, ReshardError
from reshard.plan import ShardPlan
from reshard.run.events import Progress
from reshard.run.lock import output_lock
from reshard.tensors import Checkpoint
from reshard.transfer.sources import SourceReader
from reshard.writers.base import ShardFormat, write_shard
from reshard.writers.safetensors import SAFETENSORS

log = logging.getLogger(__name__)

TORCH_DTYPE_NAMES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}


@dataclass(frozen=True)
class OutputPart:
    """One checkpoint folder of the output.

    Attributes:
        folder: relative to the output (``""``: the output itself; ``"rank-0"``).
        checkpoint: the tensors to write (their descriptors) and the extra files to copy.
        plan: its shards.
        metadata: every shard's ``__metadata__``.
        index_metadata: keys added to the index's ``metadata`` (provenance).
        config_dtype: when set, the copied config.json records this dtype.
        config_updates: top-level keys set in the copied config.json (FP8 output's
            ``quantization_config``).
    """

    folder: str
    checkpoint: Checkpoint
    plan: ShardPlan
    metadata: dict[str, str]
    index_metadata: dict[str, str] = field(default_factory=dict)
    config_dtype: str | None = None
    config_updates: dict = field(default_factory=dict)  # added for quantized output (issue 12)

    def shard_path(self, file_name: str) -> str:
        """A shard's path relative to the output."""
        return f"{self.folder}/{file_name}" if self.folder else file_name


@dataclass(frozen=True)
class RunJob:
    """Everything a run writes. ``files`` are extra top-level files (name -> text);
    ``options`` are what decides the bytes besides the descriptors (for the journal)."""

    output: Path
    parts: tuple[OutputPart, ...]
    files: dict[str, str] = field(default_factory=dict)
    options: dict = field(default_factory=dict)
    overwrite: bool = False
    resume: bool = False
    fmt: ShardFormat = SAFETENSORS
    workers: int = 1  # shards written concurrently (reshard.run.distributed); bytes are the same
    # Writes the shards instead of the local writer: ``create_run(job)`` and
    # ``write_parts(job, tmp, run, progress)`` (``reshard.hub.stream.HubStream``).
    stream: object | None = None

    @property
    def source_files(self) -> tuple[Path, ...]:
        seen: dict[str, Path] = {}
        for part in self.parts:
            for path in part.checkpoint.weight_files:
                seen.setdefault(str(path), Path(path))
        return tuple(seen.values())

    @property
    def total_size(self) -> int:
        return sum(part.plan.total_size for part in self.parts)

    @property
    def shard_count(self) -> int:
        return sum(len(part.plan.shards) for part in self.parts)

    @property
    def computed_elements(self) -> tuple[int, int]:
        """``(cast, quantized)``: elements the job casts and quantizes (what
        ``kernels_for`` sizes the job by)."""
        tensors = [t for part in self.parts for t in part.checkpoint.tensors]
        casts = sum(t.numel for t in tensors if t.src_dtype and t.quant is None)
        return casts, sum(t.numel for t in tensors if t.quant is not None)


def run_job(job: RunJob, progress: Progress | None = None, team=None) -> str | None:
    """Write ``job`` into place; return a note about a leftover temporary folder (resumed
    from or removed), or None.

    Under torchrun with several ranks (``team``: ``reshard.run.distributed.join_team()``,
    joined here when not given) the ranks share the shards; see that module.

    Raises:
        ReshardError: output problems (one line), a source that changed while being read,
            or a verification failure; nothing is left behind.
    """
    from reshard.transfer.cast import kernels_for

    casts, quantized = job.computed_elements
    with kernels_for(casts, quantized):  # numpy's kernels, or torch's for a big job
        return _run_job(job, progress, team)


def _run_job(job: RunJob, progress: Progress | None, team) -> str | None:
    from reshard.run.distributed import Locked, join_team, merge_rank_journals, run_team_job
    from reshard.run.journal import ResumableRun

    progress = progress or Progress()
    team = team or join_team()
    if team is not None:
        try:
            return run_team_job(job, team, progress)
        finally:
            progress.close()
    out = job.output
    tmp = temp_dir_for(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise os_error_to_output_error(e, out) from e
    try:
        with output_lock(out):
            stream = job.stream
            run = stream.create_run(job) if stream is not None else ResumableRun.create(job)  # type: ignore[attr-defined]
            try:
                merge_rank_journals(tmp)  # shards finished by any rank of a torchrun run
                note = run.prepare(tmp)
                if stream is not None:
                    stream.write_parts(job, tmp, run, progress)  # type: ignore[attr-defined]
                else:
                    write_parts(job, tmp, run.kept, Locked(run.record), progress)
                _write_files(job, tmp)
                fsync_tree(tmp)
                _verify_parts(job, tmp)
                progress.before_publish()
                run.finish()
                publish(tmp, out, job.overwrite)
            except BaseException as e:
                if isinstance(e, KeyboardInterrupt) and tmp.is_dir():  # Ctrl-C, SIGTERM
                    from reshard.run.signals import RunInterrupted

                    raise RunInterrupted(e, tmp, len(run.finished), job.shard_count) from e
                if not getattr(e, "keep_temporary", False):
                    shutil.rmtree(tmp, ignore_errors=True)
                if isinstance(e, OSError) and not isinstance(e, ReshardError):
                    raise os_error_to_output_error(e, out) from e
                raise
    finally:
        progress.close()
    return note


def write_parts(
    job: RunJob,
    tmp: Path,
    kept: frozenset[str],
    record,
    progress: Progress,
    mine: set[str] | None = None,
    check=lambda: None,
) -> None:
    """Write every shard (or the shards in ``mine``, by path relative to the output) that
    is not ``kept``, ``job.workers`` at a time; ``record(path)`` journals each one."""
    from reshard.run.distributed import write_concurrently

    items = []
    for part in job.parts:
        (tmp / part.folder).mkdir(exist_ok=True)
        tensors = {t.name: t for t in part.checkpoint.tensors}
        for shard in part.plan.shards:
            rel = part.shard_path(shard.file_name)
            if mine is None or rel in mine:
                items.append((part, tensors, shard, rel))
    count = len(items)
    progress.begin(sum(shard.size for _, _, shard, _ in items), count)
    numbered = {rel: number for number, (_, _, _, rel) in enumerate(items, 1)}

    def write_one(item, reader: SourceReader, progress: Progress) -> None:
        part, tensors, shard, rel = item
        progress.start_shard(numbered[rel], count, rel, shard.size)
        if rel in kept:
            progress.advance(shard.size)
            progress.end_shard()
            return
        layout = job.fmt.layout([tensors[n] for n in shard.names], part.metadata)
        write_shard(tmp / rel, layout, reader, progress)
        progress.end_shard()
        record(rel)
        progress.shard_written(rel)

    write_concurrently(items, write_one, job.workers, progress, check)


def _write_files(job: RunJob, tmp: Path) -> None:
    for part in job.parts:
        folder = tmp / part.folder
        if part.plan.is_sharded and job.fmt.index_file_name:  # GGUF splits have no index
            weight_map = part.plan.weight_map()
            text = job.fmt.index_text(weight_map, part.checkpoint, part.index_metadata)
            (folder / job.fmt.index_file_name).write_text(text, encoding="utf-8")
        copy_extra_files(part.checkpoint.extra_files, folder)
        if part.config_dtype:
            set_config_dtype(folder / "config.json", part.config_dtype)
        if part.config_updates:
            update_config(folder / "config.json", part.config_updates)
    for name, text in job.files.items():
        (tmp / name).write_text(text, encoding="utf-8")


def _verify_parts(job: RunJob, tmp: Path) -> None:
    """Structural verification before publishing: index, headers, names, dtypes, shapes."""
    from reshard.run.verify import check_same_tensors

    for part in job.parts:
        folder = tmp / part.folder
        check_same_tensors(job.fmt.read_back(folder), part.checkpoint.tensors, folder)


def copy_extra_files(files: Sequence[Path], out_dir: Path) -> None:
    """Copy config, tokenizer and other small files (following Hub cache symlinks)."""
    for path in files:
        shutil.copyfile(path, out_dir / path.name)


def set_config_dtype(config_path: Path, dtype: str) -> None:
    """Record the converted dtype in a copied config.json (``torch_dtype`` and ``dtype``)."""
    if not config_path.exists():
        return
    config = json.loads(config_path.read_text(encoding="utf-8"))
    name = TORCH_DTYPE_NAMES[dtype]
    config["torch_dtype"] = name
    config["dtype"] = name
    config_path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def update_config(config_path: Path, updates: dict) -> None:
    """Set top-level keys of a copied config.json (when there is one)."""
    if not config_path.exists():
        return
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config.update(updates)
    config_path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


FSYNC_THREADS = 8


def fsync_tree(folder: Path) -> None:
    """Make every file under ``folder`` durable, then every folder (deepest first),
    before the tree is renamed into place."""
    from concurrent.futures import ThreadPoolExecutor

    folders, files = [], []
    for root, _dirs, names in os.walk(folder):
        folders.append(Path(root))
        files += [Path(root) / name for name in sorted(names)]
    # All at once, as `sync` does: one fsync at a time leaves the disk's queue idle between
    # files (a shard's writeback waits for the previous one's). fsync releases the GIL.
    with ThreadPoolExecutor(max_workers=max(1, min(FSYNC_THREADS, len(files)))) as pool:
        list(pool.map(_fsync, files))
    for path in reversed(folders):
        _fsync(path)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def check_output_location(
    out: Path,
    source_root: Path,
    source_files: Sequence[Path],
    source_is_folder: bool,
    overwrite: bool,
    dry_run: bool = False,
) -> None:
    """Refuse outputs that would clobber data: non-empty without ``overwrite``, equal to or
    inside the source folder, or (with ``overwrite``) a folder that contains the source.
    A dry run writes nothing, so only the checks against the source apply to it."""
    out_real = out.resolve()
    src_root = source_root.resolve()
    src_files = [Path(p).resolve() for p in source_files]
    if out_real in src_files or (source_is_folder and out_real.is_relative_to(src_root)):
        raise OutputError(f"{out}: the output is the source or inside it; choose another -o")
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out}: exists and is not a folder; choose another -o")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite and not dry_run:
            raise OutputError(
                f"{out}: exists and is not empty; pass --overwrite to replace it or choose another -o"
            )
        if overwrite and any(p.is_relative_to(out_real) for p in [src_root, *src_files]):
            raise OutputError(f"{out}: holds the source, so --overwrite would delete it; choose another -o")


def check_source_output(out: Path, source, overwrite: bool, dry_run: bool = False) -> None:
    """``check_output_location`` for a resolved source (``reshard.hub.resolve.ResolvedSource``)."""
    source_is_folder = Path(source.spec).expanduser().is_dir() or source.repo_id is not None
    check_output_location(out, source.root, source.weight_files, source_is_folder, overwrite, dry_run)


def temp_dir_for(out: Path) -> Path:
    """The deterministic build folder beside ``out`` (same filesystem, so rename is atomic)."""
    return out.parent / f".{out.name}.reshard-tmp"


def publish(tmp: Path, out: Path, overwrite: bool) -> None:
    """Rename the finished folder into place, replacing ``out`` when allowed."""
    from reshard.run.atomic import exchange

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
    _fsync(out.parent)


def os_error_to_output_error(error: OSError, out: Path) -> OutputError:
    """One line for the usual resource failures while writing ``out``."""
    where = error.filename or out
    if error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return OutputError(
            f"{where}: disk full (or file size limit) while writing {out}; free "
            "space or choose an -o on another disk. Nothing was left behind"
        )
    if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return OutputError(f"{where}: permission denied; choose an -o you can write to")
    return OutputError(f"{where}: {error.strerror or error} while writing {out}")
