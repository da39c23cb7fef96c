"""Move byte ranges between files without holding them: in the kernel when possible.

``os.copy_file_range`` copies inside the kernel with no user-space buffer; it fails with
EXDEV across filesystems (before Linux 5.3, and for some filesystem pairs after) and is
missing on some platforms, so a ``pread``/``pwrite`` loop through one reusable 8 MiB
buffer is the fallback. Every path works in chunks, so progress can be
reported and Ctrl-C is noticed between chunks.
"""

from __future__ import annotations

import errno
import os
from typing import Callable

from reshard.errors import FormatError

# Big enough that syscall overhead vanishes, small enough for smooth progress.
KERNEL_CHUNK = 64 * 1024 * 1024
# The user-space fallback's one reusable buffer.
BUFFER_CHUNK = 8 * 1024 * 1024
_FALLBACK_ERRNOS = {errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EBADF, errno.EPERM}

OnBytes = Callable[[int], None]


def copy_range(src_fd: int, dst_fd: int, src_offset: int, dst_offset: int, length: int,
               on_bytes: OnBytes | None = None, src_name: str = "source") -> None:
    """Copy ``length`` bytes from ``src_fd@src_offset`` to ``dst_fd@dst_offset``.

    Raises:
        FormatError: the source ended early (truncated, or it changed while being read).
        OSError: from the destination (ENOSPC, EDQUOT, EFBIG): the caller maps these.
    """
    done = 0
    use_kernel = hasattr(os, "copy_file_range")
    while done < length:
        want = min(KERNEL_CHUNK, length - done)
        if use_kernel:
            try:
                n = os.copy_file_range(src_fd, dst_fd, want, src_offset + done, dst_offset + done)
            except OSError as e:
                if e.errno not in _FALLBACK_ERRNOS:
                    raise
                use_kernel = False
                continue
        else:
            n = _copy_with_buffer(src_fd, dst_fd, src_offset + done, dst_offset + done, want)
        if n == 0:
            raise FormatError(f"{src_name}: ended {length - done} bytes early while being read; "
                              "the file is truncated or changed during the run")
        done += n
        if on_bytes is not None:
            on_bytes(n)


_buffer: bytearray | None = None


def _copy_with_buffer(src_fd: int, dst_fd: int, src_offset: int, dst_offset: int, length: int) -> int:
    global _buffer
    if _buffer is None:
        _buffer = bytearray(BUFFER_CHUNK)
    view = memoryview(_buffer)[: min(length, BUFFER_CHUNK)]
    n = os.preadv(src_fd, [view], src_offset)
    if n:
        write_all(dst_fd, view[:n], dst_offset)
    return n


def write_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    """``pwrite`` until every byte is written (short writes happen near a full disk)."""
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        if n == 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        view, offset = view[n:], offset + n


def read_exact(fd: int, offset: int, length: int, name: str = "source") -> bytes:
    """``pread`` exactly ``length`` bytes (callers keep ``length`` bounded)."""
    parts = []
    while length:
        chunk = os.pread(fd, length, offset)
        if not chunk:
            raise FormatError(f"{name}: ended early while being read; the file is truncated "
                              "or changed during the run")
        parts.append(chunk)
        offset, length = offset + len(chunk), length - len(chunk)
    return b"".join(parts)
