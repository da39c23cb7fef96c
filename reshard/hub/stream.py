"""``split --no-cache``: Hub bytes routed straight into the shards, every byte checked.

Design (one pass per source file, in file order):

* Each source file that feeds a shard still to write is read whole, front to back, in
  chunks of ``CHUNK`` bytes; ``connections`` range requests are in flight at once, and
  at most ``connections + 2`` chunks are held (in flight, or arrived and waiting their
  turn), so memory is bounded by the ranges in flight, never by a tensor or a shard.
* The worker that fetched a chunk writes (``pwrite``) its bytes at their places in the
  shards, wherever the plan put them; chunks are then consumed in file order by the main
  thread, which updates the file's sha256 and counts each shard's bytes. The plan may read a file out of order (natural tensor order against
  a file's alphabetical order, tensors of one file in several shards): routing the
  sequential stream to the shards makes that free, and the hash still sees every byte of
  the file in order, header included. A file's last chunk completes its hash; a
  mismatch with the sha256 the Hub publishes (the LFS oid) is one line naming the file,
  and the run stops before anything is published.
* A shard is finished once all its bytes are written *and* every file that fed it has
  been verified. Then it is fsynced (in a thread of its own, while the stream goes on)
  and, once durable, journaled: unlike the local writer, a streamed run cannot re-read
  its source cheaply on ``--resume``, so the journal only ever names shards that are
  durable and made of verified bytes, and a resumed run keeps a journaled shard after
  checking its size and header (``StreamedRun``; the run's fingerprint pins the commit
  and every descriptor). A shard is journaled as soon as its fsync ends, even while the
  main thread waits for a slow or stalled chunk, so an interrupted run keeps it.
* ``--resume`` downloads only the files that feed the shards still missing (a file that
  also fed a kept shard is read whole again, since its hash needs every byte).

Writing overlaps downloading: the workers fetch and write in parallel while the main
thread hashes, and every written range is queued for writeback at once
(``reshard.hub.writeback``), so the disk writes while the network reads and a shard's
fsync finds little left to do. Shards are created with their header and their final
size up front (sparse: disk use grows with what is written), so the peak disk use is the
output alone.

>>> chunk_ranges(10, 4)
[(0, 4), (4, 4), (8, 2)]
"""

from __future__ import annotations

import bisect
import hashlib
import logging
import os
import threading
from collections import deque
from collections.abc import Iterator
from concurrent import futures
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from reshard.errors import FormatError, SourceError, UsageError
from reshard.hub.fetch import Cancelled, HubAccess, fetch_range
from reshard.hub.writeback import start_writeback
from reshard.run.events import Progress
from reshard.run.journal import JOURNAL_NAME, ResumableRun, read_journal
from reshard.tensors import natural_key
from reshard.transfer.ranges import write_all
from reshard.transfer.sources import HubRangeSource

log = logging.getLogger(__name__)

CHUNK = 8 * 1024 * 1024
DEFAULT_CONNECTIONS = 8
MAX_CONNECTIONS = 64


class IntegrityError(SourceError):
    """A streamed file's bytes do not hash to the sha256 the Hub publishes for it."""


def chunk_ranges(size: int, chunk: int = CHUNK) -> list[tuple[int, int]]:
    """``(offset, length)`` of the chunks a file of ``size`` bytes is read in."""
    return [(at, min(chunk, size - at)) for at in range(0, size, chunk)]


def check_connections(connections: int) -> int:
    """Refuse a ``--connections`` value that cannot work.

    >>> check_connections(0)
    Traceback (most recent call last):
    ...
    reshard.errors.UsageError: --connections must be between 1 and 64, got 0
    """
    if not 1 <= connections <= MAX_CONNECTIONS:
        raise UsageError(f"--connections must be between 1 and {MAX_CONNECTIONS}, got {connections}")
    return connections


@dataclass
class _Shard:
    """One shard being written: its file, what is left to write, the files it needs."""

    rel: str
    number: int
    size: int
    fd: int = -1
    remaining: int = 0
    sources: set[str] = field(default_factory=set)


@dataclass(frozen=True)
class _Piece:
    """``length`` bytes at ``offset`` of a source file that go to ``shard`` at ``at``."""

    offset: int
    length: int
    shard: _Shard
    at: int


class HubStream:
    """The shard writer of a streamed run (``RunJob.stream``).

    Example (needs a Hub, so it is not run as a doctest)::

        stream = HubStream(token=None, connections=8)
        job = RunJob(out, (part,), stream=stream)   # part's tensors have HubRangeSource extents
        run_job(job)
    """

    def __init__(self, token: str | None = None, connections: int = DEFAULT_CONNECTIONS, chunk: int = CHUNK):
        self.token = token
        self.connections = check_connections(connections)
        self.chunk = chunk

    def create_run(self, job) -> ResumableRun:
        snapshot_run = ResumableRun.create(job)
        return StreamedRun(job, snapshot_run.snapshot, snapshot_run.fingerprint)

    def write_parts(self, job, tmp: Path, run: ResumableRun, progress: Progress) -> None:
        """Write every shard of ``job`` not kept by ``run`` into ``tmp``."""
        progress.begin(job.total_size, job.shard_count)
        shards: list[_Shard] = []
        try:
            pieces, sources = self._route(job, tmp, run, shards)
        except BaseException:
            _close_all(shards)
            raise
        writer = _Router(shards, pieces, run, progress)
        try:
            writer.skip_kept()
            self._stream(sources, pieces, writer)
            writer.finish()
        finally:
            writer.close()

    def _route(self, job, tmp: Path, run: ResumableRun, shards: list[_Shard]):
        """Append every shard to ``shards``, opening those still to write (header, final
        size), and map every byte of their tensors to a source file range."""
        pieces: dict[str, list[_Piece]] = {}
        sources: dict[str, HubRangeSource] = {}
        number = 0
        for part in job.parts:
            (tmp / part.folder).mkdir(exist_ok=True)
            tensors = {t.name: t for t in part.checkpoint.tensors}
            for planned in part.plan.shards:
                number += 1
                rel = part.shard_path(planned.file_name)
                layout = job.fmt.layout([tensors[n] for n in planned.names], part.metadata)
                shard = _Shard(rel, number, layout.size)
                shards.append(shard)
                if rel in run.kept:
                    continue
                for t, at in layout.placements:
                    source = t.source
                    if not t.is_plain_copy or not isinstance(source, HubRangeSource):
                        raise UsageError(
                            f"tensor {t.name!r}: --no-cache copies tensors as stored; drop "
                            "--no-cache for conversions"
                        )
                    sources[source.key] = source
                    pieces.setdefault(source.key, []).append(_Piece(t.offset, t.nbytes, shard, at))
                    shard.remaining += t.nbytes
                    shard.sources.add(source.key)
                shard.fd = os.open(tmp / rel, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                write_all(shard.fd, layout.header, 0)
                os.ftruncate(shard.fd, layout.size)  # padding is zeros; data fill the holes
        for key in pieces:
            pieces[key].sort(key=lambda p: p.offset)
        ordered = dict(sorted(sources.items(), key=lambda kv: natural_key(kv[1].filename)))
        return pieces, ordered

    def _stream(self, sources: dict[str, HubRangeSource], pieces, writer: _Router) -> None:
        """Fetch every chunk of every source, ``connections`` at once, and hand them to
        ``writer`` in file order."""
        access = HubAccess.create(self.token)
        cancel = threading.Event()
        window = self.connections + 2
        pool = ThreadPoolExecutor(self.connections, thread_name_prefix="reshard-fetch")
        pending: deque[tuple[HubRangeSource, int, bytearray, Future]] = deque()
        free: list[bytearray] = []  # at most `window` chunk buffers, reused
        try:
            for source, offset, length in _chunks(sources, self.chunk):
                while len(pending) >= window:
                    free.append(self._consume(pending.popleft(), writer))
                buffer = free.pop() if free else bytearray(self.chunk)
                future = pool.submit(_fetch_and_write, writer, access, source, offset, length, cancel, buffer)
                pending.append((source, offset, buffer, future))
            while pending:
                free.append(self._consume(pending.popleft(), writer))
        except BaseException:
            cancel.set()  # workers stop within one block (or one backoff wait)
            for *_, future in pending:
                future.cancel()
            # Wait for them: a worker must not write after the shards' descriptors close.
            pool.shutdown(wait=True, cancel_futures=True)
            raise
        pool.shutdown(wait=True)

    def _consume(self, item, writer: _Router) -> bytearray:
        """Hand a fetched chunk to ``writer``; returns its buffer for reuse."""
        source, offset, buffer, future = item
        writer.wait_for(future)
        try:
            data, written = future.result()
        except Cancelled:
            raise SourceError(f"{source.key}: the download was cancelled") from None
        writer.take(source, offset, data, written)
        return buffer


def _fetch_and_write(writer: _Router, access, source, offset, length, cancel, buffer):
    """A worker's job: fetch a chunk, then write its bytes into the shards, so writing
    runs in parallel with the main thread's hashing."""
    data = fetch_range(access, source, offset, length, cancel, buffer)
    if cancel.is_set():
        raise Cancelled()
    return data, writer.write(source.key, offset, data)


def _chunks(sources: dict[str, HubRangeSource], chunk: int) -> Iterator[tuple[HubRangeSource, int, int]]:
    for source in sources.values():
        for offset, length in chunk_ranges(source.size, chunk):
            yield source, offset, length


class _Router:
    """Hashes each file's chunks in order, writes their bytes into the shards, and
    finishes (fsync, journal, progress) the shards whose bytes are all written and
    verified, in shard order.

    A complete shard's fsync runs in a thread of its own: done in the main thread it would
    stop the hashing, and with it the downloads (at most ``connections + 2`` chunks wait
    to be hashed), for as long as the disk takes. The main thread journals the shard once
    its fsync is done, so the journal still names only durable shards, and every progress
    event still comes from the main thread, in shard order."""

    def __init__(self, shards: list[_Shard], pieces: dict[str, list[_Piece]], run, progress: Progress):
        self.shards, self.pieces, self.run, self.progress = shards, pieces, run, progress
        self.starts = {key: [p.offset for p in ps] for key, ps in pieces.items()}
        self.hashes: dict[str, hashlib._Hash] = {}
        self.hashed: dict[str, int] = {}
        self.verified: set[str] = set()
        self.next_shard = 0  # index of the first shard not yet announced as written
        self.started = -1
        self.syncing: dict[int, Future] = {}  # shard index -> its fsync, once complete
        self.syncer = ThreadPoolExecutor(1, thread_name_prefix="reshard-fsync")

    def skip_kept(self) -> None:
        self._announce()

    def take(
        self, source: HubRangeSource, offset: int, data: memoryview, written: list[tuple[_Shard, int]]
    ) -> None:
        """A chunk whose bytes ``write`` put in the shards (``written``): hash it in file
        order, count what each shard got, finish what is complete."""
        key = source.key
        if self.hashed.get(key, 0) != offset:
            raise RuntimeError(f"{key}: chunk at {offset} consumed out of order")
        self.hashes.setdefault(key, hashlib.sha256()).update(data)
        self.hashed[key] = offset + len(data)
        for shard, nbytes in written:
            shard.remaining -= nbytes
            self.progress.advance(nbytes)
        if self.hashed[key] == source.size:
            digest = self.hashes.pop(key).hexdigest()
            if digest != source.sha256:
                raise IntegrityError(
                    f"{source.repo_id}/{source.filename}: the bytes downloaded do not match the "
                    f"sha256 the Hub publishes for it ({digest[:12]}... instead of "
                    f"{source.sha256[:12]}...); nothing was published: run the same command again"
                )
            self.verified.add(key)
        self._announce()

    def write(self, key: str, offset: int, data: memoryview) -> list[tuple[_Shard, int]]:
        """Write a chunk's bytes where the plan puts them (in a worker thread: the pieces
        are read-only here and chunks never overlap, so writers never share a byte);
        returns what each shard got."""
        pieces, starts = self.pieces.get(key, []), self.starts.get(key, [])
        end = offset + len(data)
        written = []
        i = max(0, bisect.bisect_right(starts, offset) - 1)
        while i < len(pieces) and pieces[i].offset < end:
            p = pieces[i]
            lo, hi = max(p.offset, offset), min(p.offset + p.length, end)
            if lo < hi:
                at = p.at + (lo - p.offset)
                write_all(p.shard.fd, data[lo - offset : hi - offset], at)
                start_writeback(p.shard.fd, at, hi - lo)  # so the shard's fsync finds little dirty
                written.append((p.shard, hi - lo))
            i += 1
        return written

    def wait_for(self, chunk: Future) -> None:
        """Wait until ``chunk`` (a worker's fetch) is done, finishing every shard whose
        fsync ends meanwhile: were shards announced only as chunks arrive, a stalled
        download would hold back shards already durable, and an interrupted run would
        not keep them."""
        while not chunk.done():
            syncing = [f for f in self.syncing.values() if not f.done()]
            futures.wait([chunk, *syncing], return_when=futures.FIRST_COMPLETED)
            if syncing:
                self._announce()

    def _announce(self, wait: bool = False) -> None:
        """Finish the shards that are complete and durable, in shard order, and report the
        first unfinished one as the current shard (bytes land wherever the stream puts
        them, but events come in shard order). With ``wait``, wait for the fsyncs."""
        count = len(self.shards)
        self._start_fsyncs()
        while self.next_shard < count:
            shard = self.shards[self.next_shard]
            if self.started < self.next_shard:
                self.started = self.next_shard
                self.progress.start_shard(shard.number, count, shard.rel, shard.size)
                if shard.rel in self.run.kept:
                    self.progress.advance(shard.size)
            if shard.rel not in self.run.kept:
                synced = self.syncing.get(self.next_shard)
                if synced is None or not (wait or synced.done()):
                    return
                synced.result()  # durable before the journal names it (see module doc)
                del self.syncing[self.next_shard]
                os.close(shard.fd)
                shard.fd = -1
            self.progress.end_shard()
            if shard.rel not in self.run.kept:
                self.run.record(shard.rel)
                self.progress.shard_written(shard.rel)
            self.next_shard += 1

    def _start_fsyncs(self) -> None:
        """Start the fsync of every shard that has just become complete."""
        for i in range(self.next_shard, len(self.shards)):
            shard = self.shards[i]
            if i in self.syncing or shard.fd < 0 or shard.rel in self.run.kept:
                continue
            if not shard.remaining and shard.sources <= self.verified:
                self.syncing[i] = self.syncer.submit(os.fsync, shard.fd)

    def finish(self) -> None:
        self._announce(wait=True)
        if self.next_shard != len(self.shards):
            left = self.shards[self.next_shard]
            raise FormatError(
                f"{left.rel}: {left.remaining} bytes were never written; the plan is inconsistent"
            )

    def close(self) -> None:
        self.syncer.shutdown(wait=True)  # no fsync may outlive its descriptor
        _close_all(self.shards)


def _close_all(shards: list[_Shard]) -> None:
    for shard in shards:
        if shard.fd >= 0:
            os.close(shard.fd)
            shard.fd = -1


class StreamedRun(ResumableRun):
    """The journal of a streamed run. A journaled shard was fsynced from verified bytes
    before its line was written (``HubStream``), and the fingerprint pins the commit and
    every descriptor; a resume keeps it when its size and header are this run's, without
    downloading its source again."""

    def _reusable_shards(self, tmp: Path) -> tuple[frozenset[str], str]:
        entries = read_journal(tmp / JOURNAL_NAME)
        if entries is None:
            return frozenset(), "it has no readable journal"
        if entries[0].get("fingerprint") != self.fingerprint:
            return frozenset(), "it was made from another source, other options or another plan"
        planned = self._planned()
        kept: set[str] = set()
        for entry in entries[1:]:
            rel, size = entry.get("shard"), entry.get("size")
            if not isinstance(rel, str) or rel not in planned or not isinstance(size, int):
                continue
            part, shard = planned[rel]
            tensors = {t.name: t for t in part.checkpoint.tensors}
            layout = self.job.fmt.layout([tensors[n] for n in shard.names], part.metadata)
            problem = _size_or_header_problem(tmp / rel, layout, size)
            if problem:
                log.info("not keeping %s: %s", rel, problem)
            else:
                kept.add(rel)
        return frozenset(kept), "none of its shards could be kept"


def _size_or_header_problem(path: Path, layout, journal_size: int) -> str | None:
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size != layout.size or size != journal_size:
                return f"{size} bytes, expected {layout.size} (journal says {journal_size})"
            if f.read(len(layout.header)) != layout.header:
                return "its header differs from this run's"
    except OSError as e:
        return f"cannot read it ({e.strerror})"
    return None
