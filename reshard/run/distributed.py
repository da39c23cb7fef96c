"""Sharing a run's shards: ``--workers N`` threads in one process, and ranks under torchrun.

Both keep the pipeline's guarantees (``reshard.run.pipeline``): every shard is written
exactly as a single process writes it, journaled after it is complete, and the output
appears only by the final rename, so the result is byte-identical whatever the sharing.

**Threads** (``--workers N``): shards are written concurrently by a thread pool. The
work releases the GIL where it is heavy (``copy_file_range``, ``pwrite``, torch's cast
and quantization kernels), so threads scale on CPU-bound jobs (``--dtype``,
``--quantize``) without the cost of processes. Each thread has its own source
descriptors; run events go through one lock; the first error stops the others at their
next chunk.

**Ranks** (``torchrun ... -m reshard split``): every rank builds the same plan from the
same arguments; they join a gloo process group (``torch.distributed``, from torchrun's
``WORLD_SIZE``/``RANK``/``MASTER_ADDR``) and compare a fingerprint of their plans. Rank 0
takes the output lock and prepares the temporary folder beside the output (resuming or
removing a leftover), every rank checks it sees that folder (the output must be on a
filesystem every node mounts), shards are assigned to ranks balanced by bytes, each rank
writes, journals, syncs and checks its own shards, and rank 0 writes the index and the
extra files, verifies and publishes once every rank has reported. Every rank returns only
after the output exists.

Failures end every rank within seconds, without hanging: each rank beats a counter in
the job's c10d store; rank 0 watches every rank and the others watch rank 0. A rank's
error is posted with its message and every other rank stops at its next chunk with that
message; a rank that stops beating (kill -9, a lost node) is declared dead after
``RESHARD_RANK_TIMEOUT`` seconds (default 10). No output appears: an error removes the
temporary folder; a dead rank leaves it with every journaled shard for ``--resume``
(under any world size), as a kill -9 of a single process does.

Shards are assigned largest first to the least-loaded rank:

>>> assign_by_bytes({"a": 5, "b": 4, "c": 3, "d": 3, "e": 1}, 2)
[['a', 'd'], ['b', 'c', 'e']]
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from reshard.errors import OutputError, ReshardError
from reshard.run.events import Progress
from reshard.transfer.sources import SourceReader

if TYPE_CHECKING:
    from reshard.run.pipeline import RunJob

log = logging.getLogger(__name__)

RANK_JOURNAL_PREFIX = ".reshard-journal.rank-"
TEAM_FILE = ".reshard-team"
BEAT_SECONDS = 0.5
VISIBLE_WAIT_SECONDS = 10.0  # NFS attribute caches can hide a fresh folder for a few seconds


class PeerFailed(ReshardError):
    """Another rank of the job failed or died; this rank stopped (message: why)."""


class RankDied(PeerFailed):
    """A rank stopped beating (kill -9, lost node): the journaled shards are kept for
    ``--resume``, as after a kill -9 of a single process."""

    keep_temporary = True


class Cancelled(BaseException):
    """Raised inside a worker thread to stop it at its next chunk (another failed)."""


def assign_by_bytes(sizes: dict[str, int], ranks: int) -> list[list[str]]:
    """Split shards (name -> bytes) over ``ranks``: largest first, each to the rank with the
    fewest bytes so far (ties: the lowest rank); each rank's list keeps plan order."""
    order = {name: i for i, name in enumerate(sizes)}
    loads = [0] * ranks
    chosen: list[list[str]] = [[] for _ in range(ranks)]
    for name in sorted(sizes, key=lambda n: (-sizes[n], order[n])):
        rank = min(range(ranks), key=lambda r: (loads[r], r))
        loads[rank] += sizes[name]
        chosen[rank].append(name)
    return [sorted(names, key=order.__getitem__) for names in chosen]


# -- threads ---------------------------------------------------------------------------


class SerializedProgress(Progress):
    """Forwards run events from several threads to one ``Progress``, one call at a time,
    and stops the calling thread (``Cancelled``) once ``stop`` is set, or raises the
    team's failure (``check``), at its next chunk."""

    def __init__(self, inner: Progress, stop: threading.Event, check: Callable[[], None]) -> None:
        self.inner, self.stop, self.check = inner, stop, check
        self.lock = threading.Lock()

    def _call(self, name: str, *args) -> None:
        with self.lock:
            getattr(self.inner, name)(*args)

    def begin(self, total: int, shards: int) -> None:
        self._call("begin", total, shards)

    def start_shard(self, number: int, count: int, file_name: str, size: int) -> None:
        self._call("start_shard", number, count, file_name, size)

    def advance(self, nbytes: int) -> None:
        if self.stop.is_set():
            raise Cancelled()
        self.check()
        self._call("advance", nbytes)

    def end_shard(self) -> None:
        self._call("end_shard")

    def shard_written(self, file_name: str) -> None:
        self._call("shard_written", file_name)

    def before_publish(self) -> None:
        self._call("before_publish")


WriteOne = Callable[[object, SourceReader, Progress], None]


def write_concurrently(
    items: Sequence, write_one: WriteOne, workers: int, progress: Progress, check: Callable[[], None]
) -> None:
    """Call ``write_one(item, reader, progress)`` for every item, ``workers`` at a time.

    One worker runs in the calling thread, as before threads existed. With more,
    each thread has its own ``SourceReader``; the first exception stops the others at
    their next chunk and is raised here once all have stopped (so nothing writes into a
    temporary folder that is being removed).
    """
    if workers <= 1 or len(items) <= 1:
        # ``check`` at every chunk too: a peer's failure stops a rank within one chunk,
        # not at the end of a 5 GB shard
        checking = SerializedProgress(progress, threading.Event(), check)
        with SourceReader() as reader:
            for item in items:
                check()
                write_one(item, reader, checking)
        return
    stop = threading.Event()
    shared = SerializedProgress(progress, stop, check)
    readers: list[SourceReader] = []
    local = threading.local()
    lock = threading.Lock()

    def task(item) -> None:
        if stop.is_set():
            raise Cancelled()
        reader = getattr(local, "reader", None)
        if reader is None:
            reader = local.reader = SourceReader()
            with lock:
                readers.append(reader)
        write_one(item, reader, shared)

    pool = ThreadPoolExecutor(min(workers, len(items)), thread_name_prefix="reshard-shard")
    futures = [pool.submit(task, item) for item in items]
    try:
        wait(futures, return_when=FIRST_EXCEPTION)
    finally:  # done, an error, or Ctrl-C while waiting: stop the others at their next chunk
        stop.set()
        pool.shutdown(wait=True, cancel_futures=True)
        for reader in readers:
            reader.close()
    errors = [f.exception() for f in futures if f.done() and not f.cancelled() and f.exception()]
    real = [e for e in errors if not isinstance(e, Cancelled)]
    if real:
        raise real[0]


class Locked:
    """Calls ``func`` under a lock (the journal's appends, from several threads)."""

    def __init__(self, func: Callable) -> None:
        self.func, self.lock = func, threading.Lock()

    def __call__(self, *args):
        with self.lock:
            return self.func(*args)


# -- rank journals ---------------------------------------------------------------------


class RankJournal:
    """Rank ``rank``'s journal in the shared temporary folder: the run's fingerprint, then
    one line per finished shard (the main journal's format). Each rank appends only to its
    own file (appends from several nodes to one file are not safe on NFS); rank 0 merges
    them into the main journal when it resumes (``merge_rank_journals``)."""

    def __init__(self, tmp: Path, rank: int, fingerprint: str, snapshot) -> None:
        from reshard.run.journal import JOURNAL_VERSION, journal_line

        self.path = tmp / f"{RANK_JOURNAL_PREFIX}{rank}"
        self.tmp, self.snapshot = tmp, snapshot
        self.path.write_text(journal_line({"fingerprint": fingerprint, "version": JOURNAL_VERSION}))

    def record(self, rel: str) -> None:
        from reshard.run.journal import journal_line

        self.snapshot.check_unchanged()
        entry = {"shard": rel, "size": (self.tmp / rel).stat().st_size}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(journal_line(entry))
            f.flush()
            os.fsync(f.fileno())


def merge_rank_journals(tmp: Path) -> None:
    """Fold the rank journals of an interrupted torchrun run into the main journal, so a
    resume (under any world size) sees every shard any rank finished. Entries of a rank
    journal with another fingerprint than the main journal's are dropped (the resume then
    decides about the main journal as usual).

    >>> import tempfile
    >>> tmp = Path(tempfile.mkdtemp())
    >>> _ = (tmp / ".reshard-journal").write_text('{"fingerprint":"f"}\\n')
    >>> _ = (tmp / ".reshard-journal.rank-1").write_text('{"fingerprint":"f"}\\n{"shard":"a","size":1}\\n')
    >>> merge_rank_journals(tmp)
    >>> (tmp / ".reshard-journal").read_text().splitlines()[1]
    '{"shard":"a","size":1}'
    """
    from reshard.run.journal import JOURNAL_NAME, journal_line, read_journal

    if not tmp.is_dir() or tmp.is_symlink():
        return
    rank_files = sorted(tmp.glob(RANK_JOURNAL_PREFIX + "*"))
    if not rank_files:
        return
    main = read_journal(tmp / JOURNAL_NAME)
    extra = []
    for path in rank_files:
        entries = read_journal(path)
        if (
            main is not None
            and entries is not None
            and entries[0].get("fingerprint") == main[0]["fingerprint"]
        ):
            extra += entries[1:]
        path.unlink()
    if main is not None and extra:
        with open(tmp / JOURNAL_NAME, "a", encoding="utf-8") as f:
            f.write("".join(journal_line(e) for e in extra))
            f.flush()
            os.fsync(f.fileno())


# -- ranks -------------------------------------------------------------------------------


def world_size() -> int:
    """The job's number of ranks as torchrun (or SLURM through torchrun) set it; 1 alone."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def this_rank() -> int:
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def rank_timeout() -> float:
    """Seconds without a beat after which a rank is declared dead (RESHARD_RANK_TIMEOUT)."""
    try:
        return max(1.0, float(os.environ.get("RESHARD_RANK_TIMEOUT", "10")))
    except ValueError:
        return 10.0


class Team:
    """This process's place in a torchrun job: rank, size, the gloo group and its store,
    and a watcher thread that beats this rank's counter and notices failures.

    ``join_team()`` makes the one team of a process; ``check()`` raises the failure a peer
    posted or the death the watcher noticed (called between chunks and while waiting).
    """

    def __init__(self, rank: int, size: int) -> None:
        self.rank, self.size = rank, size
        self.store: Any = None  # a torch.distributed Store once connected
        self.failure: PeerFailed | None = None
        self.report: list[dict] | None = None  # after a run: [{rank, shards, bytes}], every rank
        # on rank 0, only its own elsewhere
        self._idle = threading.Event()  # between runs: a peer's exit is no failure
        self._stop = threading.Event()  # the process is exiting: the watcher ends
        self._watcher: threading.Thread | None = None
        self._run = 0

    # set-up ------------------------------------------------------------------------------
    def connect(self) -> None:
        """Join the gloo group through torchrun's rendezvous (env://) and start beating."""
        import torch.distributed as dist

        timeout = timedelta(seconds=max(60.0, 6 * rank_timeout()))
        try:
            if not dist.is_initialized():
                dist.init_process_group("gloo", init_method="env://", timeout=timeout)
            from torch.distributed.distributed_c10d import _get_default_store

            # The group's own c10d store (torchrun's), under our prefix: the watcher's
            # beats and the ranks' reports live there.
            self.store = dist.PrefixStore("reshard/", _get_default_store())
        except (RuntimeError, ValueError) as e:
            raise OutputError(
                f"cannot join the torchrun job (rank {self.rank} of {self.size}): {e}; "
                "start reshard with torchrun, which sets MASTER_ADDR, MASTER_PORT, RANK and WORLD_SIZE"
            ) from e
        self._start_watching()
        import atexit

        atexit.register(self._leave)

    def _start_watching(self) -> None:
        """Beat once, then start the watcher thread (``_watch``)."""
        self.store.add(f"beat/{self.rank}", 1)
        self._watcher = threading.Thread(target=self._watch, name="reshard-rank-watch", daemon=True)
        self._watcher.start()

    def _leave(self) -> None:
        """At exit (after the CLI printed this rank's result or error line): wait briefly
        until every live rank is exiting too. torchrun stops a node's other workers as soon
        as one exits, so without this a rank's error line could be cut off."""
        self._idle.set()
        try:
            self.store.set(f"exiting/{self.rank}", "1")
            deadline = time.monotonic() + 2 * rank_timeout()
            keys = [f"exiting/{r}" for r in range(self.size)]
            while time.monotonic() < deadline and not isinstance(self.failure, RankDied):
                if self.store.check(keys):
                    break
                time.sleep(0.05)
        except Exception:  # the store is gone: nobody left to wait for
            log.debug("leaving the torchrun job", exc_info=True)
        self._stop_watching()

    def _stop_watching(self) -> None:
        """End the watcher before the interpreter finalizes: a daemon thread still inside a
        store call (C++, without the GIL) while the process tears down torch's objects may
        crash the exit. A worker that fails after its node published makes that node's
        agent skip torchrun's exit barrier, and the other node's agent waits there for
        minutes (seen once in CI, with every job published, not reproduced since)."""
        self._stop.set()
        if self._watcher is not None:  # _leave runs in the main thread, never the watcher
            self._watcher.join(timeout=4 * BEAT_SECONDS)

    def _watch(self) -> None:
        """Beat every BEAT_SECONDS; rank 0 watches every rank, the others watch rank 0."""
        peers = range(1, self.size) if self.rank == 0 else [0]
        last = {r: (-1, time.monotonic()) for r in peers}
        limit = rank_timeout()
        while self.failure is None and not self._stop.is_set():
            try:
                self.store.add(f"beat/{self.rank}", 1)
                if self.store.add("failed", 0):
                    self.failure = self._posted_failure()
                    return
                now = time.monotonic()
                for r in peers:
                    beats = self.store.add(f"beat/{r}", 0)
                    if beats != last[r][0]:
                        last[r] = (beats, now)
                    elif now - last[r][1] > limit and not self._idle.is_set():
                        self.failure = RankDied(
                            f"rank {r} stopped responding for {limit:.0f}s (killed, or its node is gone); "
                            "every rank stopped and no output was published; rerun with --resume to "
                            "keep the shards already written"
                        )
                        self._post("died", r, str(self.failure))
                        return
            except Exception as e:  # the store went away: rank 0's node (torchrun's store) is gone
                if self._idle.is_set():  # the job is over and torchrun is tearing it down
                    return
                self.failure = RankDied(
                    f"lost contact with the torchrun job's store ({e}); every rank stopped and no "
                    "output was published; rerun with --resume to keep the shards already written"
                )
                return
            self._stop.wait(BEAT_SECONDS)

    def _post(self, kind: str, rank: int, message: str) -> None:
        try:
            if self.store.add("failed", 1) == 1:  # the first failure is the one everyone reports
                self.store.set("failure", json.dumps({"kind": kind, "rank": rank, "message": message}))
        except Exception:
            log.debug("could not post the failure of rank %d", rank, exc_info=True)

    def _posted_failure(self) -> PeerFailed:
        for _ in range(100):
            if self.store.check(["failure"]):
                doc = json.loads(self.store.get("failure"))
                cls = RankDied if doc["kind"] == "died" else PeerFailed
                if doc["kind"] == "died":
                    return cls(doc["message"])
                return cls(f"rank {doc['rank']} failed: {doc['message']}")
            time.sleep(0.05)
        return PeerFailed("another rank failed (its log says why)")

    # during a run ----------------------------------------------------------------------
    def check(self) -> None:
        """Raise the failure the watcher noticed, if any."""
        if self.failure is not None:
            raise self.failure

    def fail(self, error: BaseException) -> None:
        """Post this rank's own error so every rank stops with its message."""
        if not isinstance(error, PeerFailed):
            if isinstance(error, KeyboardInterrupt):
                message = "interrupted"
            elif isinstance(error, ReshardError):
                message = str(error)
            else:
                message = f"{type(error).__name__}: {error}"
            self._post("error", self.rank, message or type(error).__name__)

    def key(self, name: str) -> str:
        return f"run{self._run}/{name}"

    def publish_value(self, name: str, value) -> None:
        self.store.set(self.key(name), json.dumps(value))

    def wait_value(self, name: str, timeout: float | None = None, check: bool = True):
        """The value posted under ``name``, waiting as long as every rank is alive (or up
        to ``timeout`` seconds, then None). Raises the failure of a peer (unless ``check``
        is False: waiting for rank 0 to clean up after one)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        key = self.key(name)
        while True:
            if check:
                self.check()
            if self.store.check([key]):
                return json.loads(self.store.get(key))
            if deadline is not None and time.monotonic() > deadline:
                return None
            time.sleep(0.05)

    def gather(self, name: str, value) -> list | None:
        """Every rank's ``value``, in rank order, on rank 0 (None elsewhere); waits while
        every rank is alive."""
        self.publish_value(f"{name}/{self.rank}", value)
        if self.rank != 0:
            return None
        return [self.wait_value(f"{name}/{r}") for r in range(self.size)]

    def agree(self, fingerprint: str) -> None:
        """Every rank built the same plan: compare fingerprints through the gloo group
        (after every rank has arrived, so the collective itself never waits long)."""
        import torch.distributed as dist

        self.publish_value(f"arrived/{self.rank}", True)
        for r in range(self.size):
            self.wait_value(f"arrived/{r}")
        prints: list = [None] * self.size
        dist.all_gather_object(prints, fingerprint)
        differ = [r for r, p in enumerate(prints) if p != prints[0]]
        if differ:
            raise OutputError(
                f"ranks {', '.join(map(str, differ))} planned a different job than rank 0 (other "
                "arguments, or another view of the source); start every rank with the same "
                "command on the same shared files"
            )

    def end_run(self) -> None:
        self._run += 1

    def finish(self) -> None:
        """This rank's run is done (the output exists): until the next one, a peer that
        exits is no failure."""
        self._idle.set()

    def begin(self) -> None:
        """A run starts: every rank must stay alive until it ends."""
        self.check()
        self._idle.clear()


_team: Team | None = None


def join_team() -> Team | None:
    """This process's ``Team`` when started by torchrun with more than one rank (joined
    once per process), else None."""
    global _team
    size = world_size()
    if size <= 1:
        return None
    if _team is None:
        team = Team(this_rank(), size)
        team.connect()
        _team = team
    return _team


@dataclass
class RankShards:
    """One rank's share: its shard paths (relative to the output) and their bytes."""

    rank: int
    shards: list[str]
    bytes: int

    def to_json(self) -> dict:
        return {"rank": self.rank, "shards": self.shards, "bytes": self.bytes}


def run_team_job(job: RunJob, team: Team, progress: Progress) -> str | None:
    """``run_job`` for one rank of a torchrun job (see the module docstring)."""
    team.begin()
    try:
        note = _run_team_job(job, team, progress)
    except BaseException as e:
        team.fail(e)
        if team.rank == 0:  # the temporary folder is dealt with (removed, or kept for --resume)
            _quietly(team.publish_value, "closed", True)
        elif not isinstance(e, RankDied):  # let rank 0 clean up before torchrun stops the workers
            _quietly(team.wait_value, "closed", 3 * rank_timeout(), False)
        raise
    finally:
        team.end_run()
    team.finish()
    return note


def _quietly(func, *args) -> None:
    """Best effort while failing: the store may be gone with rank 0's node."""
    try:
        func(*args)
    except Exception:
        log.debug("%s failed while stopping", func.__name__, exc_info=True)


def _run_team_job(job: RunJob, team: Team, progress: Progress) -> str | None:
    from reshard.run.journal import ResumableRun, SourceSnapshot, run_fingerprint
    from reshard.run.pipeline import os_error_to_output_error, temp_dir_for

    out = job.output
    tmp = temp_dir_for(out)
    snapshot = SourceSnapshot.take(job.source_files)
    fingerprint = run_fingerprint(job, snapshot)
    team.agree(fingerprint)
    if team.rank != 0:
        _follow(job, team, tmp, fingerprint, snapshot, progress)
        return None
    from reshard.run.lock import output_lock

    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise os_error_to_output_error(e, out) from e
    with output_lock(out):
        run = ResumableRun(job, snapshot, fingerprint)
        try:
            return _lead(job, team, tmp, run, progress)
        except BaseException as e:
            if isinstance(e, KeyboardInterrupt) and tmp.is_dir():  # Ctrl-C, SIGTERM: as run_job
                from reshard.run.signals import RunInterrupted

                done = len(run.finished) if hasattr(run, "_done") else 0  # rank 0's own shards
                raise RunInterrupted(e, tmp, done, job.shard_count) from e
            if not getattr(e, "keep_temporary", False):
                shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(e, OSError) and not isinstance(e, ReshardError):
                raise os_error_to_output_error(e, out) from e
            raise


def _lead(job: RunJob, team: Team, tmp: Path, run, progress: Progress) -> str | None:
    """Rank 0: prepare, assign, write its share, wait for every rank, finish, publish."""
    from reshard.run.pipeline import _verify_parts, _write_files, fsync_tree, publish

    merge_rank_journals(tmp)
    note = run.prepare(tmp)
    token = secrets.token_hex(8)
    (tmp / TEAM_FILE).write_text(token)
    sizes = {rel: size for rel, size in _planned_sizes(job) if rel not in run.kept}
    shares = assign_by_bytes(sizes, team.size)
    team.publish_value("prepared", {"token": token, "shares": shares})
    journal = RankJournal(tmp, 0, run.fingerprint, run.snapshot)
    mine = _write_share(job, team, tmp, shares[0], journal, progress)
    reports = team.gather("written", mine.to_json())
    team.report = reports
    (tmp / TEAM_FILE).unlink()
    team.check()
    _write_files(job, tmp)
    fsync_tree(tmp)
    _verify_parts(job, tmp)
    progress.before_publish()
    run.finish()
    for path in tmp.glob(RANK_JOURNAL_PREFIX + "*"):
        path.unlink()
    publish(tmp, job.output, job.overwrite)
    team.publish_value("published", True)
    return note


def _follow(job: RunJob, team: Team, tmp: Path, fingerprint: str, snapshot, progress: Progress) -> None:
    """A rank other than 0: wait for the prepared folder, write its share, wait for the output."""
    prepared = team.wait_value("prepared")
    _check_visible(tmp, prepared["token"], team)
    journal = RankJournal(tmp, team.rank, fingerprint, snapshot)
    mine = _write_share(job, team, tmp, prepared["shares"][team.rank], journal, progress)
    team.gather("written", mine.to_json())
    team.report = [mine.to_json()]  # this rank's own share (for its one log line)
    team.wait_value("published")
    if not job.output.is_dir():
        raise OutputError(
            f"{job.output}: rank 0 published it but rank {team.rank} cannot see it; the output "
            "must be on a filesystem every node mounts"
        )


def _check_visible(tmp: Path, token: str, team: Team) -> None:
    deadline = time.monotonic() + VISIBLE_WAIT_SECONDS
    while True:
        try:
            if (tmp / TEAM_FILE).read_text() == token:
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise OutputError(
                f"{tmp}: rank {team.rank} cannot see the temporary folder rank 0 created; the "
                "output (-o) must be on a filesystem every node mounts (NFS, Lustre, GPFS), "
                "not a node-local disk"
            )
        team.check()
        time.sleep(0.2)


def _planned_sizes(job: RunJob) -> list[tuple[str, int]]:
    return [(part.shard_path(s.file_name), s.size) for part in job.parts for s in part.plan.shards]


def _write_share(job: RunJob, team: Team, tmp: Path, share: list[str], journal, progress) -> RankShards:
    """Write, sync and check this rank's shards."""
    from reshard.run.pipeline import _fsync, write_parts

    write_parts(job, tmp, frozenset(), Locked(journal.record), progress, mine=set(share), check=team.check)
    for rel in share:
        _fsync(tmp / rel)
    _check_headers(job, tmp, set(share))
    sizes = dict(_planned_sizes(job))
    return RankShards(team.rank, list(share), sum(sizes[rel] for rel in share))


def _check_headers(job: RunJob, tmp: Path, share: set[str]) -> None:
    """Each written shard has the planned size and header (the full structural check of
    every part runs on rank 0 before publishing)."""
    from reshard.errors import VerifyError

    for part in job.parts:
        tensors = {t.name: t for t in part.checkpoint.tensors}
        for shard in part.plan.shards:
            rel = part.shard_path(shard.file_name)
            if rel not in share:
                continue
            layout = job.fmt.layout([tensors[n] for n in shard.names], part.metadata)
            path = tmp / rel
            with open(path, "rb") as f:
                header = f.read(len(layout.header))
            if path.stat().st_size != layout.size or header != layout.header:
                raise VerifyError(f"{path}: not the shard this rank planned (size or header differs)")
