"""Start writing a file range back to disk now, without waiting for it.

A streamed split (``split --no-cache``) fsyncs each shard before journaling it. Left to
the kernel, a shard's pages stay dirty until memory pressure or their 30 s expiry, so
that fsync would find most of a 2 GB shard still in memory and the download would wait
seconds for the disk, once per shard and again at the end. ``sync_file_range`` with
``SYNC_FILE_RANGE_WRITE`` queues the pages of a range that was just written, so the disk
writes while the network reads and the fsync only waits for the last few ranges. It is
a hint: it makes nothing durable (the fsync still does) and the data are the same with
or without it. Python does not expose it, so it is called through libc; where it is
unavailable (not Linux, a libc without it) or refused for a file (a pipe, a filesystem
without it) ``start_writeback`` does nothing.

>>> import tempfile
>>> with tempfile.TemporaryFile() as f:
...     _ = f.write(b"x" * 4096); f.flush()
...     start_writeback(f.fileno(), 0, 4096)
>>> read_end, write_end = os.pipe()
>>> start_writeback(write_end, 0, 4096)  # ESPIPE: ignored
>>> os.close(read_end); os.close(write_end)
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os
import threading

log = logging.getLogger(__name__)

SYNC_FILE_RANGE_WRITE = 2

_lock = threading.Lock()
_func = None
_looked_up = False


def _sync_file_range():
    global _func, _looked_up
    with _lock:
        if not _looked_up:
            _looked_up = True
            try:
                func = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True).sync_file_range
            except (OSError, AttributeError, TypeError):
                func = None
            if func is not None:
                func.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
                func.restype = ctypes.c_int
            _func = func
    return _func


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Queue the dirty pages of ``fd``'s ``length`` bytes at ``offset`` for writing
    (returns once queued; ctypes releases the GIL meanwhile). Failures are ignored: the
    caller's fsync is what makes the bytes durable."""
    global _func
    func = _sync_file_range()
    if func is None or length <= 0:
        return
    if func(fd, offset, length, SYNC_FILE_RANGE_WRITE) != 0:
        err = ctypes.get_errno()
        if err == errno.ENOSYS:  # the kernel has none: stop asking
            log.debug("sync_file_range is not implemented here; leaving writeback to the kernel")
            _func = None
        else:  # this file refuses it (ESPIPE, EINVAL): its fsync will do the work
            log.debug("sync_file_range(%d): %s", fd, os.strerror(err))
