"""Move byte ranges between files without holding them: shared blocks, then the kernel,
then one reusable buffer.

A ``CopyChain`` takes a byte range and tries, in order:

1. **Block sharing** (``FICLONERANGE``, the ioctl behind ``cp --reflink``): on XFS, btrfs,
   bcachefs and ZFS with block cloning, the destination's blocks then *are* the source's,
   copy-on-write, with no data moved and no new disk. The kernel shares only whole
   filesystem blocks at block-aligned source *and* destination offsets, so the range is
   cut at block boundaries: the unaligned head and tail go by step 2, the aligned middle
   is shared. This needs the two offsets congruent modulo the block size (the writer pads
   headers so they are); a range where they are not is copied whole by step 2.
2. **``splice`` through a 1 MiB pipe** (one per thread), for a range whose offset within
   a page differs between source and destination (every torch.save entry of a ``.bin``
   is one), where the destination is a local filesystem (ext2/3/4, XFS, btrfs, tmpfs,
   f2fs, bcachefs). One kernel copy per byte, as step 3, but ``copy_file_range`` copies
   through the kernel's own 16-page pipe, 64 KiB a round, and such a range costs it about
   1.4x the CPU of a congruent one. ``bench/bench_copy_paths.py`` (1 GiB from the page
   cache to ext4, 5 alternating rounds, median CPU), two runs: ``copy_file_range``
   0.53/0.38 s congruent and 0.75/0.58 s shifted by 64 bytes; the 1 MiB pipe 0.50/0.35 s
   shifted, but 1.53/0.31 s congruent. Congruent ranges stay with step 3: the pipe's
   congruent figure swings (the first run came after hours of multi-GB benchmarks; not
   explained), and a plain ext4 split that spliced them used about twice the system
   CPU. It works across filesystems too, where step 3 cannot. On other filesystems (NFS,
   Lustre, CIFS, FUSE, overlay) it is skipped: their ``copy_file_range`` may copy on the
   server, with no bytes over the network.
3. **``os.copy_file_range``**: copies inside the kernel with no user-space buffer. It fails
   with EXDEV across filesystems and is missing on some platforms.
4. **``pread``/``pwrite``** through one reusable 512 KiB buffer.

A strategy that fails for a pair of filesystems in a way that says "never here" (EOPNOTSUPP
from ext4 or tmpfs for step 1, EXDEV for steps 1 and 3) is not tried again for that pair,
so ext4 pays one failed ioctl per process and otherwise copies in the kernel. Every
step works in chunks, so progress is reported and Ctrl-C is noticed between chunks.

Each copy returns a ``CopyStats``: bytes shared with the source, bytes copied in the
kernel, bytes written through a buffer.

>>> stats = CopyStats(shared=4096 * 1000, kernel=3000, buffered=100)
>>> stats.written, stats.total
(3100, 4099100)
>>> stats.describe()
'4.10 MB shared with the source (reflink), 3.10 KB written'
>>> CopyStats(kernel=5) + CopyStats(shared=4096)
CopyStats(shared=4096, kernel=5, buffered=0)
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass

from reshard.errors import FormatError
from reshard.units import format_size

# Big enough that syscall overhead vanishes, small enough for smooth progress.
KERNEL_CHUNK = 64 * 1024 * 1024
# Sharing moves no data, so a chunk only bounds the time between progress reports.
CLONE_CHUNK = 1024 * 1024 * 1024
# The user-space fallback's one reusable buffer. Half the 1 MiB L2 cache: the pwrite then
# reads what the pread just wrote from cache. Measured (perf stat task-clock, 512 MiB in
# the page cache, 10 alternating runs): median 0.83 s with 512 KiB vs 1.12 s with 8 MiB.
BUFFER_CHUNK = 512 * 1024

# linux/fs.h: _IOW(0x94, 13, struct file_clone_range {s64 src_fd; u64 src_offset,
# src_length, dest_offset}). The same number on every Linux architecture.
FICLONERANGE = 0x4020940D
_CLONE_ARGS = struct.Struct("qQQQ")

# copy_file_range errors after which a buffered copy may still work.
_KERNEL_FALLBACK = {errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EBADF, errno.EPERM}
# ... of which these hold for every file on the same pair of filesystems.
_KERNEL_NEVER = {errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP}
# FICLONERANGE errors after which a copy may still work (ENOSPC, EDQUOT and EIO are real
# failures: a copy would need more space than sharing, so they propagate).
_CLONE_FALLBACK = {
    errno.EOPNOTSUPP,
    errno.ENOTTY,
    errno.EXDEV,
    errno.EINVAL,
    errno.ENOSYS,
    errno.EBADF,
    errno.EPERM,
    errno.ETXTBSY,
    errno.EISDIR,
}
# ... of which these hold for every file on the same pair of filesystems. EINVAL can be
# about one range (say, past the source's end), so it only skips sharing for that range.
_CLONE_NEVER = {errno.EOPNOTSUPP, errno.ENOTTY, errno.EXDEV, errno.ENOSYS}

STRATEGIES = ("clone", "splice", "kernel", "buffer")

# The splice step takes only ranges whose source and destination offsets differ modulo
# this (see step 2 above).
SPLICE_PAGE = 4096
# The pipe the splice step copies through. 1 MiB is the most an unprivileged process may
# ask for by default (/proc/sys/fs/pipe-max-size); a pipe of 256 KiB was measured slower
# than copy_file_range for congruent ranges, so anything short of 1 MiB disables the step.
SPLICE_PIPE = 1024 * 1024
# linux/fcntl.h
_F_SETPIPE_SZ, _F_GETPIPE_SZ = 1031, 1032
# linux/magic.h: the f_type of local filesystems, where copy_file_range either shares
# blocks (step 1 does that) or copies through the kernel's pipe: ext2/3/4, XFS, btrfs,
# tmpfs, f2fs, bcachefs.
LOCAL_FILESYSTEMS = frozenset({0xEF53, 0x58465342, 0x9123683E, 0x01021994, 0xF2F52010, 0xCA451A4E})
# splice errors after which copy_file_range may still work (EINVAL: a file that cannot
# splice, such as one opened O_DIRECT or O_APPEND; ESPIPE, EBADF likewise).
_SPLICE_FALLBACK = {errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ESPIPE, errno.EBADF, errno.EPERM}

OnBytes = Callable[[int], None]


@dataclass
class CopyStats:
    """Bytes moved, by how they moved. Add them up with ``+`` or ``+=``.

    Attributes:
        shared: bytes whose blocks the destination shares with the source (reflink):
            no data moved, no new disk used.
        kernel: bytes copied inside the kernel, by ``splice`` or ``copy_file_range`` (the
            filesystem may still share some of these on its own; they are counted as
            written).
        buffered: bytes written from user space: the pread/pwrite fallback, plus whatever
            callers pass to ``write_all`` with these stats (headers, converted tensors).
    """

    shared: int = 0
    kernel: int = 0
    buffered: int = 0

    @property
    def written(self) -> int:
        """Bytes that took new space: everything not shared."""
        return self.kernel + self.buffered

    @property
    def total(self) -> int:
        return self.shared + self.kernel + self.buffered

    def __add__(self, other: CopyStats) -> CopyStats:
        return CopyStats(
            self.shared + other.shared, self.kernel + other.kernel, self.buffered + other.buffered
        )

    def __sub__(self, other: CopyStats) -> CopyStats:
        return CopyStats(
            self.shared - other.shared, self.kernel - other.kernel, self.buffered - other.buffered
        )

    def __iadd__(self, other: CopyStats) -> CopyStats:
        self.shared += other.shared
        self.kernel += other.kernel
        self.buffered += other.buffered
        return self

    def to_json(self) -> dict[str, int]:
        """For ``--json``: ``{"shared_bytes": ..., "kernel_bytes": ..., "buffered_bytes": ...,
        "written_bytes": ...}``."""
        return {
            "shared_bytes": self.shared,
            "kernel_bytes": self.kernel,
            "buffered_bytes": self.buffered,
            "written_bytes": self.written,
        }

    def describe(self) -> str:
        """One line for the summary, e.g. ``3.99 GB shared with the source (reflink),
        4.1 MB written``; just ``... written`` when nothing was shared."""
        written = f"{format_size(self.written)} written"
        if not self.shared:
            return written
        return f"{format_size(self.shared)} shared with the source (reflink), {written}"


class CopyChain:
    """Copies byte ranges between open files by the cheapest strategy that works.

    Args:
        strategies: the steps to try, in this order, from ``STRATEGIES``; tests use
            ``("buffer",)`` and ``("kernel", "buffer")`` to force the other paths.
        stats: the running total every copy adds to (a new one by default).

    The chain remembers, per pair of filesystems (``st_dev``), which strategies cannot
    work there, and each filesystem's block size (``statvfs``'s ``f_bsize``, else
    ``st_blksize``). One chain can serve a whole run; ``copy_range`` uses a shared one.
    """

    def __init__(self, strategies: tuple[str, ...] = STRATEGIES, stats: CopyStats | None = None) -> None:
        unknown = set(strategies) - set(STRATEGIES)
        if unknown or "buffer" not in strategies:
            raise ValueError(f"strategies must be from {STRATEGIES} and end with 'buffer', got {strategies}")
        self.strategies = tuple(s for s in STRATEGIES if s in strategies and _available(s))
        self.stats = stats if stats is not None else CopyStats()
        self._never: set[tuple[str, int, int]] = set()  # (strategy, src st_dev, dst st_dev)
        self._block_sizes: dict[int, int] = {}
        self._local: dict[int, bool] = {}  # st_dev -> a local filesystem (splice pays)
        self._lock = threading.Lock()
        self._spliced = 0  # of stats.kernel, the bytes the splice step copied

    def copy(
        self,
        src_fd: int,
        dst_fd: int,
        src_offset: int,
        dst_offset: int,
        length: int,
        on_bytes: OnBytes | None = None,
        src_name: str = "source",
    ) -> CopyStats:
        """Copy ``length`` bytes from ``src_fd@src_offset`` to ``dst_fd@dst_offset``.

        Returns:
            This call's counts (also added to ``self.stats``).

        Raises:
            FormatError: the source ended early (truncated, or it changed while being read).
            OSError: from the destination (ENOSPC, EDQUOT, EFBIG): the caller maps these.
        """
        stats = CopyStats()
        if length <= 0:
            return stats
        pair = (os.fstat(src_fd).st_dev, os.fstat(dst_fd).st_dev)
        middle = self._shareable_middle(pair, dst_fd, src_offset, dst_offset, length)
        spliced = 0  # of stats.kernel, by the splice step
        if middle is None:
            spliced = self._copy_bytes(
                pair, src_fd, dst_fd, src_offset, dst_offset, length, on_bytes, src_name, stats
            )
        else:  # a congruent range: its head and tail are not spliced
            start, size = middle  # relative to the range: [start, start + size) is shareable
            self._copy_bytes(pair, src_fd, dst_fd, src_offset, dst_offset, start, on_bytes, src_name, stats)
            shared = self._share(
                pair, src_fd, dst_fd, src_offset + start, dst_offset + start, size, on_bytes, stats
            )
            rest = start + shared
            self._copy_bytes(
                pair,
                src_fd,
                dst_fd,
                src_offset + rest,
                dst_offset + rest,
                length - rest,
                on_bytes,
                src_name,
                stats,
            )
        with self._lock:  # --workers: shards are written by several threads
            self.stats += stats
            self._spliced += spliced
        return stats

    @property
    def moved(self) -> dict[str, int]:
        """Bytes moved so far by each strategy (``"clone"``, ``"splice"``, ``"kernel"``,
        ``"buffer"``): ``stats`` with its kernel bytes told apart (what the tests check)."""
        with self._lock:
            stats, spliced = self.stats + CopyStats(), self._spliced
        return {
            "clone": stats.shared,
            "splice": spliced,
            "kernel": stats.kernel - spliced,
            "buffer": stats.buffered,
        }

    def snapshot(self) -> CopyStats:
        """A copy of ``stats``, taken while no thread is adding to it."""
        with self._lock:
            return self.stats + CopyStats()

    def count_written(self, size: int) -> None:
        """Add ``size`` bytes written from user space (headers, converted data) to ``stats``."""
        with self._lock:
            self.stats.buffered += size

    @property
    def unusable(self) -> frozenset[tuple[str, int, int]]:
        """``(strategy, src st_dev, dst st_dev)`` of the strategies this chain no longer
        tries for that pair of filesystems, because they failed there for good."""
        return frozenset(self._never)

    def block_size(self, fd: int) -> int:
        """The block size sharing aligns to on ``fd``'s filesystem (cached per ``st_dev``)."""
        return self._block_size(os.fstat(fd).st_dev, fd)

    def _block_size(self, dev: int, fd: int) -> int:
        if dev not in self._block_sizes:
            try:
                size = os.fstatvfs(fd).f_bsize
            except OSError:
                size = 0
            self._block_sizes[dev] = size or os.fstat(fd).st_blksize
        return self._block_sizes[dev]

    def _shareable_middle(
        self, pair: tuple[int, int], dst_fd: int, src_offset: int, dst_offset: int, length: int
    ) -> tuple[int, int] | None:
        """(start, size) of the block-aligned part of the range, or None when there is none
        or sharing cannot work on this pair of filesystems."""
        if "clone" not in self.strategies or ("clone", *pair) in self._never:
            return None
        block = self._block_size(pair[1], dst_fd)
        if block <= 0 or block & (block - 1) or (src_offset - dst_offset) % block:
            return None  # not a power of two, or the offsets are not congruent
        start = -dst_offset % block
        size = (length - start) // block * block
        return (start, size) if size > 0 else None

    def _share(
        self,
        pair: tuple[int, int],
        src_fd: int,
        dst_fd: int,
        src_offset: int,
        dst_offset: int,
        length: int,
        on_bytes: OnBytes | None,
        stats: CopyStats,
    ) -> int:
        """Share as much of the aligned range as the filesystem allows; returns how much."""
        done = 0
        while done < length:
            want = min(CLONE_CHUNK, length - done)
            try:
                fcntl.ioctl(
                    dst_fd, FICLONERANGE, _CLONE_ARGS.pack(src_fd, src_offset + done, want, dst_offset + done)
                )
            except OSError as e:
                if e.errno not in _CLONE_FALLBACK:
                    raise
                if e.errno in _CLONE_NEVER:
                    self._never.add(("clone", *pair))
                break  # the caller copies the rest; a half-done clone is overwritten
            done += want
            stats.shared += want
            if on_bytes is not None:
                on_bytes(want)
        return done

    def _copy_bytes(
        self,
        pair: tuple[int, int],
        src_fd: int,
        dst_fd: int,
        src_offset: int,
        dst_offset: int,
        length: int,
        on_bytes: OnBytes | None,
        src_name: str,
        stats: CopyStats,
    ) -> int:
        """Copy by splice (a range that is not page-congruent), copy_file_range or the
        buffer, adding to ``stats``; returns the bytes the splice step copied."""
        done = spliced = 0
        if (src_offset - dst_offset) % SPLICE_PAGE and self._splices(pair, dst_fd):
            done = spliced = self._splice(
                pair, src_fd, dst_fd, src_offset, dst_offset, length, on_bytes, src_name
            )
            stats.kernel += done
        use_kernel = "kernel" in self.strategies and ("kernel", *pair) not in self._never
        while done < length:
            want = min(KERNEL_CHUNK, length - done)
            if use_kernel:
                try:
                    n = os.copy_file_range(src_fd, dst_fd, want, src_offset + done, dst_offset + done)
                except OSError as e:
                    if e.errno not in _KERNEL_FALLBACK:
                        raise
                    if e.errno in _KERNEL_NEVER:
                        self._never.add(("kernel", *pair))
                    use_kernel = False
                    continue
                stats.kernel += n
            else:
                n = _copy_with_buffer(src_fd, dst_fd, src_offset + done, dst_offset + done, want)
                stats.buffered += n
            if n == 0:
                raise _ended_early(src_name, length - done)
            done += n
            if on_bytes is not None:
                on_bytes(n)
        return spliced

    def _splices(self, pair: tuple[int, int], dst_fd: int) -> bool:
        """Whether the splice step applies: allowed, not failed for good on this pair, a
        local destination filesystem, and a pipe of ``SPLICE_PIPE`` for this thread."""
        if "splice" not in self.strategies or ("splice", *pair) in self._never:
            return False
        dev = pair[1]
        if dev not in self._local:
            self._local[dev] = filesystem_type(dst_fd) in LOCAL_FILESYSTEMS
        return self._local[dev] and _thread_pipe() is not None

    def _splice(
        self,
        pair: tuple[int, int],
        src_fd: int,
        dst_fd: int,
        src_offset: int,
        dst_offset: int,
        length: int,
        on_bytes: OnBytes | None,
        src_name: str,
    ) -> int:
        """Copy by ``splice`` through this thread's pipe (the caller checks the range is
        not page-congruent); returns the bytes copied, all of
        ``length`` unless a file cannot splice (the caller copies the rest by the next
        step, and this pair is not spliced again)."""
        done = 0
        while done < length:
            pipe = _thread_pipe()
            try:
                n = pipe.move(src_fd, dst_fd, src_offset + done, dst_offset + done, length - done)
            except OSError as e:
                if e.errno not in _SPLICE_FALLBACK:
                    raise
                self._never.add(("splice", *pair))
                break  # the range from ``done`` on goes by copy_file_range or the buffer
            if n == 0:
                raise _ended_early(src_name, length - done)
            done += n
            if on_bytes is not None:
                on_bytes(n)
        return done


def _ended_early(src_name: str, missing: int) -> FormatError:
    return FormatError(
        f"{src_name}: ended {missing} bytes early while being read; "
        "the file is truncated or changed during the run"
    )


class SplicePipe:
    """A pipe of ``size`` bytes (asked for; ``self.size`` is what the system gave) that
    moves file ranges by ``splice``: the source's page-cache pages go into the pipe by
    reference and are copied once, into the destination's pages. The copy chain keeps
    one per thread; ``bench/bench_copy_paths.py`` times it at other sizes."""

    def __init__(self, size: int = SPLICE_PIPE) -> None:
        self.read_fd, self.write_fd = os.pipe()
        try:
            fcntl.fcntl(self.write_fd, _F_SETPIPE_SZ, size)
        except OSError:
            pass  # over pipe-max-size, or the user's pipe quota: the size check says no
        self.size = fcntl.fcntl(self.write_fd, _F_GETPIPE_SZ)

    def move(self, src_fd: int, dst_fd: int, src_offset: int, dst_offset: int, length: int) -> int:
        """Move up to one pipe's worth; returns the bytes moved (0 at the source's end).
        On any error the pipe may hold bytes, so it is closed and the thread gets a new one."""
        try:
            n = os.splice(src_fd, self.write_fd, min(self.size, length), offset_src=src_offset)
            moved = 0
            while moved < n:
                k = os.splice(self.read_fd, dst_fd, n - moved, offset_dst=dst_offset + moved)
                if k == 0:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                moved += k
        except BaseException:  # also Ctrl-C: a pipe with bytes left in it is no use
            self.close()
            if getattr(_pipes, "pipe", None) is self:
                _pipes.pipe = None  # the thread gets a new one
            raise
        return n

    def close(self) -> None:
        for fd in (self.read_fd, self.write_fd):
            try:
                os.close(fd)
            except OSError:
                pass
        self.read_fd = self.write_fd = -1

    def __del__(self) -> None:  # a thread's pipe goes with its thread
        if self.read_fd >= 0:
            self.close()


_pipes = threading.local()
_pipes_too_small = False  # set once: this system gives no pipe of SPLICE_PIPE bytes


def _thread_pipe() -> SplicePipe | None:
    """This thread's splice pipe (made on first use), or None where the system will not
    give a pipe of ``SPLICE_PIPE`` bytes."""
    global _pipes_too_small
    pipe = getattr(_pipes, "pipe", None)
    if pipe is None and not _pipes_too_small:
        pipe = SplicePipe()
        if pipe.size < SPLICE_PIPE:
            pipe.close()
            _pipes_too_small, pipe = True, None
        _pipes.pipe = pipe
    return pipe


def filesystem_type(fd: int) -> int:
    """The ``f_type`` magic number of ``fd``'s filesystem (``fstatfs``; Python's
    ``statvfs`` does not report it), or 0 where it cannot be read.

    >>> fd = os.open("/proc", os.O_RDONLY); hex(filesystem_type(fd)); os.close(fd)
    '0x9fa0'
    """
    import ctypes

    if not sys.platform.startswith("linux"):
        return 0
    # struct statfs starts with __fsword_t f_type (a C long); 120 bytes on 64-bit
    # Linux, 64 on 32-bit: 256 is room enough for both.
    buf = ctypes.create_string_buffer(256)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.fstatfs(fd, buf) != 0:
            return 0
    except (OSError, AttributeError):
        return 0
    return ctypes.c_long.from_buffer(buf).value & 0xFFFFFFFF


# linux/fiemap.h: FS_IOC_FIEMAP = _IOWR('f', 11, struct fiemap); a 32-byte header, then
# 56-byte extents (logical, physical, length, 2 reserved u64, flags, 3 reserved u32).
FS_IOC_FIEMAP = 0xC020660B
_FIEMAP_HEADER = struct.Struct("QQIIII")
_FIEMAP_EXTENT = struct.Struct("QQQ16xI12x")
_FIEMAP_FLAG_SYNC = 0x1
_FIEMAP_LAST = 0x1
# Extents whose physical address does not map byte for byte to their data (or has no data
# yet): UNKNOWN, DELALLOC, ENCODED, DATA_ENCRYPTED, NOT_ALIGNED, DATA_INLINE, DATA_TAIL,
# UNWRITTEN. Two ranges on these are never called shared.
_FIEMAP_INEXACT = 0x2 | 0x4 | 0x8 | 0x80 | 0x100 | 0x200 | 0x400 | 0x800
_FIEMAP_BATCH = 256


def file_extents(fd: int, offset: int, length: int) -> list[tuple[int, int, int]]:
    """``(logical, physical, length)`` of the extents that map ``[offset, offset + length)``
    of ``fd`` to disk (FIEMAP, after syncing the file), leaving out holes and extents
    whose physical address does not locate their bytes exactly. Raises OSError where the
    filesystem has no FIEMAP (tmpfs: EOPNOTSUPP)."""
    found: list[tuple[int, int, int]] = []
    start, end = offset, offset + length
    while start < end:
        request = bytearray(_FIEMAP_HEADER.size + _FIEMAP_BATCH * _FIEMAP_EXTENT.size)
        _FIEMAP_HEADER.pack_into(request, 0, start, end - start, _FIEMAP_FLAG_SYNC, 0, _FIEMAP_BATCH, 0)
        fcntl.ioctl(fd, FS_IOC_FIEMAP, request)
        mapped = _FIEMAP_HEADER.unpack_from(request)[3]
        last = False
        for i in range(mapped):
            logical, physical, size, flags = _FIEMAP_EXTENT.unpack_from(
                request, _FIEMAP_HEADER.size + i * _FIEMAP_EXTENT.size
            )
            if not flags & _FIEMAP_INEXACT:
                found.append((logical, physical, size))
            start = max(start, logical + size)
            last = bool(flags & _FIEMAP_LAST)
        if mapped == 0 or last:
            break
    return found


def shared_bytes(src_fd: int, src_offset: int, dst_fd: int, dst_offset: int, length: int) -> int:
    """How many bytes of ``dst_fd[dst_offset:dst_offset + length]`` sit in the very disk
    blocks that hold the matching bytes of ``src_fd`` (block sharing, measured from the
    filesystem). Those bytes are equal by construction, so a check that the two ranges hold
    the same bytes can skip them exactly and read only the rest. 0 on different
    filesystems and where the filesystem cannot say (no FIEMAP).
    """
    if length <= 0 or os.fstat(src_fd).st_dev != os.fstat(dst_fd).st_dev:
        return 0
    try:
        src = file_extents(src_fd, src_offset, length)
        dst = file_extents(dst_fd, dst_offset, length)
    except OSError:
        return 0
    # For each pair of overlapping extents, the part where both map a byte to the same
    # physical address: physical - logical must agree after shifting by the offsets.
    shared = 0
    for d_logical, d_physical, d_size in dst:
        d_lo, d_hi = max(d_logical, dst_offset), min(d_logical + d_size, dst_offset + length)
        for s_logical, s_physical, s_size in src:
            lo = max(d_lo, s_logical - src_offset + dst_offset)
            hi = min(d_hi, s_logical + s_size - src_offset + dst_offset)
            if lo < hi and d_physical - d_logical == s_physical - (s_logical - src_offset + dst_offset):
                shared += hi - lo
    return shared


def _available(strategy: str) -> bool:
    """FICLONERANGE and splice are Linux calls; copy_file_range is Linux and FreeBSD."""
    if strategy in ("clone", "splice"):
        return sys.platform.startswith("linux") and (strategy == "clone" or hasattr(os, "splice"))
    return strategy != "kernel" or hasattr(os, "copy_file_range")


_shared_chain = CopyChain()


def copy_range(
    src_fd: int,
    dst_fd: int,
    src_offset: int,
    dst_offset: int,
    length: int,
    on_bytes: OnBytes | None = None,
    src_name: str = "source",
    stats: CopyStats | None = None,
) -> CopyStats:
    """Copy ``length`` bytes from ``src_fd@src_offset`` to ``dst_fd@dst_offset`` with the
    shared ``CopyChain``. Returns this call's counts, also added to ``stats`` when given.

    Raises:
        FormatError: the source ended early (truncated, or it changed while being read).
        OSError: from the destination (ENOSPC, EDQUOT, EFBIG): the caller maps these.
    """
    counts = _shared_chain.copy(src_fd, dst_fd, src_offset, dst_offset, length, on_bytes, src_name)
    if stats is not None:
        stats += counts
    return counts


def block_size_of(fd: int) -> int:
    """The block size sharing aligns to on ``fd``'s filesystem (``statvfs``, else
    ``st_blksize``)."""
    return _shared_chain.block_size(fd)


def copy_totals() -> CopyStats:
    """What ``copy_range`` and ``write_all`` have moved in this process so far (a
    snapshot): a job reports the difference between two readings without threading a
    counter through its calls.

    >>> before = copy_totals(); fd = os.open(os.devnull, os.O_WRONLY)
    >>> write_all(fd, b"header", 0); os.close(fd)
    >>> (copy_totals() - before).buffered
    6
    """
    return _shared_chain.snapshot()


# One fallback buffer per thread: --workers writes shards from several threads.
_buffers = threading.local()


def _copy_with_buffer(src_fd: int, dst_fd: int, src_offset: int, dst_offset: int, length: int) -> int:
    buffer = getattr(_buffers, "buffer", None)
    if buffer is None:
        buffer = _buffers.buffer = bytearray(BUFFER_CHUNK)
    view = memoryview(buffer)[: min(length, BUFFER_CHUNK)]
    n = os.preadv(src_fd, [view], src_offset)
    if n:
        _pwrite_all(dst_fd, view[:n], dst_offset)
    return n


def write_all(fd: int, data: bytes | memoryview, offset: int, stats: CopyStats | None = None) -> None:
    """``pwrite`` until every byte is written (short writes happen near a full disk);
    counts them as ``buffered`` in ``stats`` when given, and in ``copy_totals()``."""
    size = _pwrite_all(fd, data, offset)
    _shared_chain.count_written(size)
    if stats is not None:
        stats.buffered += size


def write_views(fd: int, views: list[memoryview], offset: int) -> int:
    """``pwritev`` the byte views one after another from ``offset`` until every byte is
    written (at most ``IOV_MAX`` views a call; a short write resumes inside a view);
    counted as ``buffered`` in ``copy_totals()``. Returns the bytes written.

    >>> fd = os.open(os.devnull, os.O_WRONLY)
    >>> write_views(fd, [memoryview(b"ab"), memoryview(b"cde")], 0); os.close(fd)
    5
    """
    done = 0
    pending = [v for v in views if v.nbytes]
    first = 0  # pending[:first] are written
    while first < len(pending):
        n = os.pwritev(fd, pending[first : first + IOV_MAX], offset + done)
        if n == 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        done += n
        while first < len(pending) and n >= pending[first].nbytes:
            n -= pending[first].nbytes
            first += 1
        if n:  # a short write ended inside this view: resume after its written part
            pending[first] = pending[first][n:]
    _shared_chain.count_written(done)
    return done


def _iov_max() -> int:
    """The most buffers one ``pwritev`` takes (POSIX ``IOV_MAX``: 1024 on Linux)."""
    try:
        limit = os.sysconf("SC_IOV_MAX")
    except (AttributeError, ValueError, OSError):
        limit = -1
    return min(limit, 1024) if limit > 0 else 16


IOV_MAX = _iov_max()


def _pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> int:
    view = memoryview(data).cast("B")
    size = view.nbytes
    while view:
        n = os.pwrite(fd, view, offset)
        if n == 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        view, offset = view[n:], offset + n
    return size


def read_exact(fd: int, offset: int, length: int, name: str = "source") -> bytes:
    """``pread`` exactly ``length`` bytes (callers keep ``length`` bounded)."""
    parts = []
    while length:
        chunk = os.pread(fd, length, offset)
        if not chunk:
            raise FormatError(
                f"{name}: ended early while being read; the file is truncated or changed during the run"
            )
        parts.append(chunk)
        offset, length = offset + len(chunk), length - len(chunk)
    return b"".join(parts)
