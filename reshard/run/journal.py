"""Crash recovery for ``split``: a journal of finished shards, leftover handling, checksums.

A split builds its output in ``.<name>.reshard-tmp`` beside the target. This module keeps a
journal there (``.reshard-journal``, JSON lines): first the run's *fingerprint*, then one
line per shard, appended only after that shard is completely written. After a crash
(kill -9, power loss) the next run finds the leftover folder and:

* without ``--resume`` removes it and says so;
* with ``--resume`` keeps a shard only if the journal lists it, the fingerprint equals
  this run's (same source files by name, size and mtime; same options; same plan), its
  size is what the plan gives, and every byte equals what this run would write (header
  bytes rebuilt, tensor bytes compared with the source); everything else in the folder is
  removed and rewritten. The result is byte-identical to an uninterrupted run.

It also watches the source: each source file's (size, mtime) is checked after every shard
and before publishing, so a file that changes while being read stops the run.

``RESHARD_TEST_PAUSE_AT=<point>`` (tests only) makes the process stop itself (SIGSTOP) at a
named point so a test can kill -9 it there deterministically; see ``pause_point``.

>>> journal_line({"shard": "model-00001-of-00002.safetensors", "size": 8})
'{"shard":"model-00001-of-00002.safetensors","size":8}\\n'
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import signal
from dataclasses import dataclass, field
from pathlib import Path

from reshard.errors import FormatError, SourceError
from reshard.plan import PlannedShard, ShardPlan
from reshard.tensors import Checkpoint, TensorInfo

log = logging.getLogger(__name__)

JOURNAL_NAME = ".reshard-journal"
JOURNAL_VERSION = 1
PAUSE_ENV = "RESHARD_TEST_PAUSE_AT"
HASH_CHUNK = 8 * 1024 * 1024


def pause_point(point: str) -> None:
    """Test hook: stop this process (SIGSTOP) when ``RESHARD_TEST_PAUSE_AT`` equals ``point``.

    Points: ``mid:<shard file>`` (header and first run of that shard written),
    ``after:<shard file>`` (shard written and journaled), ``index`` (index half written),
    ``publish`` (all verified, before the rename). The test waits for the stop, then
    kills, changes the source, or resumes the process with SIGCONT. Costs one dict lookup.
    """
    if os.environ.get(PAUSE_ENV) == point:
        log.warning("test pause at %s (pid %d)", point, os.getpid())
        os.kill(os.getpid(), signal.SIGSTOP)


def journal_line(entry: dict) -> str:
    """One compact, key-sorted JSON line (so journals are deterministic too)."""
    return json.dumps(entry, sort_keys=True, separators=(",", ":")) + "\n"


@dataclass(frozen=True)
class SourceSnapshot:
    """(path, size, mtime_ns) of every source file, taken when the run starts."""

    files: tuple[tuple[str, int, int], ...]

    @classmethod
    def take(cls, paths: tuple[Path, ...]) -> "SourceSnapshot":
        entries = []
        for path in paths:
            st = os.stat(path)
            entries.append((str(Path(path).absolute()), st.st_size, st.st_mtime_ns))
        return cls(tuple(entries))

    def check_unchanged(self) -> None:
        """Raises SourceError naming the first source file whose size or mtime moved."""
        for name, size, mtime in self.files:
            try:
                st = os.stat(name)
            except OSError as e:
                raise SourceError(f"{name}: disappeared while being read ({e.strerror}); "
                                  "rerun when nothing else touches the source") from e
            if st.st_size != size:
                raise SourceError(f"{name}: changed size while being read ({size} -> "
                                  f"{st.st_size} bytes); rerun when nothing else writes to it")
            if st.st_mtime_ns != mtime:
                raise SourceError(f"{name}: was modified while being read; rerun when nothing "
                                  "else writes to it")


def run_fingerprint(checkpoint: Checkpoint, plan: ShardPlan, metadata: dict[str, str],
                    snapshot: SourceSnapshot, options: dict) -> str:
    """sha256 over everything that decides the output bytes: source files (name, size,
    mtime), options, metadata, every tensor descriptor and the plan."""
    from reshard import __version__

    doc = {
        "version": JOURNAL_VERSION, "reshard": __version__, "sources": snapshot.files,
        "options": options, "metadata": metadata,
        "tensors": [(t.name, t.dtype, t.shape, str(t.file), t.offset, t.nbytes, t.src_dtype,
                     t.strides) for t in checkpoint.tensors],
        "plan": [(s.file_name, s.names, s.size) for s in plan.shards],
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=list).encode()).hexdigest()


@dataclass
class ResumableRun:
    """The journal of one split run. ``prepare`` sets up the temporary folder, ``record``
    marks a shard done, ``finish`` removes the journal before publishing."""

    checkpoint: Checkpoint
    plan: ShardPlan
    metadata: dict[str, str]
    snapshot: SourceSnapshot
    fingerprint: str
    resume: bool = False
    kept: frozenset[str] = frozenset()
    tmp: Path | None = None
    _done: list[dict] = field(default_factory=list)

    @classmethod
    def create(cls, checkpoint: Checkpoint, plan: ShardPlan, metadata: dict[str, str],
               options: dict, resume: bool = False) -> "ResumableRun":
        snapshot = SourceSnapshot.take(checkpoint.weight_files)
        return cls(checkpoint, plan, metadata, snapshot,
                   run_fingerprint(checkpoint, plan, metadata, snapshot, options), resume)

    def prepare(self, tmp: Path) -> str | None:
        """Create ``tmp``, resuming from or removing a leftover one. Returns the message
        to show the user (None when there was no leftover)."""
        self.tmp = tmp
        note = None
        if tmp.exists():
            if self.resume:
                self.kept, reason = self._reusable_shards(tmp)
                if self.kept:
                    note = (f"resuming from {tmp}: kept {len(self.kept)} of {len(self.plan.shards)} "
                            "shards already written and verified; writing the rest")
                else:
                    note = f"removed the leftover temporary folder {tmp} ({reason}); starting over"
            else:
                note = (f"removed the leftover temporary folder {tmp} of an interrupted run "
                        "(pass --resume to keep its finished shards)")
            log.info("%s", note)
            self._clear(tmp)
        tmp.mkdir(exist_ok=True)
        self._done = [{"shard": s.file_name, "size": self._size_of(s.file_name)}
                      for s in self.plan.shards if s.file_name in self.kept]
        self._write_journal()
        return note

    def record(self, file_name: str) -> None:
        """Shard ``file_name`` is completely written: journal it.

        The shard itself is fsynced with the rest at the end; that is safe because a resume
        never trusts the journal alone: every kept byte is compared with the source."""
        self.snapshot.check_unchanged()
        entry = {"shard": file_name, "size": self._size_of(file_name)}
        self._done.append(entry)
        with open(self._journal_path(), "a", encoding="utf-8") as f:
            f.write(journal_line(entry))
            f.flush()
            os.fsync(f.fileno())

    def finish(self) -> None:
        """Everything is written and verified: check the source once more, drop the journal."""
        self.snapshot.check_unchanged()
        self._journal_path().unlink(missing_ok=True)

    def _journal_path(self) -> Path:
        if self.tmp is None:
            raise RuntimeError("ResumableRun.prepare() must run first")
        return self.tmp / JOURNAL_NAME

    def _size_of(self, file_name: str) -> int:
        return (self.tmp / file_name).stat().st_size

    def _write_journal(self) -> None:
        text = journal_line({"fingerprint": self.fingerprint, "version": JOURNAL_VERSION})
        text += "".join(journal_line(e) for e in self._done)
        part = self.tmp / (JOURNAL_NAME + ".part")
        with open(part, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        part.replace(self._journal_path())

    def _clear(self, tmp: Path) -> None:
        """Remove everything in ``tmp`` but the kept shards (all of it when none is kept)."""
        if not tmp.is_dir() or not self.kept:
            if tmp.is_dir() and not tmp.is_symlink():
                shutil.rmtree(tmp)
            else:
                tmp.unlink()
            return
        for child in tmp.iterdir():
            if child.name in self.kept and child.is_file():
                continue
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()

    def _reusable_shards(self, tmp: Path) -> tuple[frozenset[str], str]:
        entries = read_journal(tmp / JOURNAL_NAME)
        if entries is None:
            return frozenset(), "it has no readable journal"
        if entries[0].get("fingerprint") != self.fingerprint:
            return frozenset(), "it was made from another source, other options or another plan"
        planned = {s.file_name: s for s in self.plan.shards}
        tensors = {t.name: t for t in self.checkpoint.tensors}
        kept = set()
        for entry in entries[1:]:
            name, size = entry.get("shard"), entry.get("size")
            shard = planned.get(name) if isinstance(name, str) else None
            if shard is None or not isinstance(size, int):
                continue
            problem = shard_problem(tmp / name, shard, tensors, self.metadata, size)
            if problem:
                log.info("not keeping %s: %s", name, problem)
            else:
                kept.add(name)
        return frozenset(kept), "none of its shards could be kept"


def read_journal(path: Path) -> list[dict] | None:
    """The journal's entries (fingerprint first), or None when missing or unreadable.
    A torn last line (crash while appending) is ignored."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return None
    entries = []
    for line in lines:
        try:
            entry = json.loads(line)
        except ValueError:
            break
        if not isinstance(entry, dict):
            break
        entries.append(entry)
    if not entries or "fingerprint" not in entries[0]:
        return None
    return entries


def shard_problem(path: Path, shard: PlannedShard, tensors: dict[str, TensorInfo],
                  metadata: dict[str, str], journal_size: int) -> str | None:
    """Why the existing file at ``path`` is not exactly what this run would write for
    ``shard``, or None when it is: size (journal and plan), header bytes, and every
    tensor's bytes against the source (through the same conversion the writer uses)."""
    from reshard.writers.safetensors import data_order, shard_header

    order = data_order(tensors[n] for n in shard.names)
    header = shard_header(order, metadata)
    expected = len(header) + sum(t.nbytes for t in order)
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as e:
        return f"cannot open it ({e.strerror})"
    try:
        size = os.fstat(fd).st_size
        if size != expected or size != journal_size:
            return f"{size} bytes, expected {expected} (journal says {journal_size})"
        if os.pread(fd, len(header), 0) != header:
            return "its header differs from this run's"
        position = len(header)
        for t in order:
            if not _same_bytes(fd, position, t):
                return f"tensor {t.name!r} differs from the source"
            position += t.nbytes
    except (OSError, FormatError) as e:
        return f"cannot be compared ({e})"
    finally:
        os.close(fd)
    return None


def _same_bytes(fd: int, position: int, t: TensorInfo) -> bool:
    from reshard.transfer.cast import iter_tensor_bytes
    from reshard.transfer.copy import read_exact

    src_fd = os.open(t.file, os.O_RDONLY)  # never written
    try:
        for chunk in iter_tensor_bytes(t, src_fd, HASH_CHUNK):
            if read_exact(fd, position, len(chunk), "shard") != chunk:
                return False
            position += len(chunk)
    finally:
        os.close(src_fd)
    return True


def sha256_of_folder(folder: Path) -> dict[str, str]:
    """sha256 of every file directly in ``folder``, by name, read in bounded chunks.

    >>> import tempfile, pathlib
    >>> d = pathlib.Path(tempfile.mkdtemp()); _ = (d / "a").write_bytes(b"")
    >>> sha256_of_folder(d)["a"][:12]
    'e3b0c44298fc'
    """
    sums = {}
    for path in sorted(Path(folder).iterdir()):
        if path.is_file():
            h = hashlib.sha256()
            with open(path, "rb") as f:
                while block := f.read(HASH_CHUNK):
                    h.update(block)
            sums[path.name] = h.hexdigest()
    return sums
