"""One run per output folder: an advisory lock file in the output's parent.

Two ``reshard split`` runs writing the same output would share one temporary folder and
destroy each other's work, so the second refuses with ``LockedError``. The lock is
``fcntl.flock`` on ``<parent>/.<name>.reshard-lock``: the kernel drops it when the
holder exits for any reason (kill -9 included), so a crash never leaves a stale lock that
needs manual removal; the file itself is removed on a clean exit.

>>> import tempfile, pathlib
>>> out = pathlib.Path(tempfile.mkdtemp()) / "model-2GB"
>>> with output_lock(out) as lock_path:
...     lock_path.name
'.model-2GB.reshard-lock'
>>> lock_path.exists()
False
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from reshard.errors import LockedError, OutputError

log = logging.getLogger(__name__)


def lock_path_for(out: Path) -> Path:
    """The lock file guarding ``out`` (beside it, so it is on a filesystem we can write)."""
    return out.parent / f".{out.name}.reshard-lock"


@contextmanager
def output_lock(out: Path) -> Iterator[Path]:
    """Hold the exclusive lock for ``out`` for the duration of the ``with`` block.

    Raises:
        LockedError: another process holds it (the message names its pid when known).
        OutputError: the parent folder cannot be written (permission, read-only disk).
    """
    path = lock_path_for(out)
    fd = _acquire(path, out)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)  # only for the other run's message
        yield path
    finally:
        # Unlink while still holding the lock: a waiter that opened the old file notices
        # (inode check in _acquire) and retries on a fresh one.
        try:
            os.unlink(path)
        except OSError:
            pass
        os.close(fd)


def _acquire(path: Path, out: Path) -> int:
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise _open_error(e, path, out) from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = _read_pid(fd)
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                who = f" (pid {holder})" if holder else ""
                raise LockedError(
                    f"{out}: another reshard run{who} is writing this output "
                    f"(lock {path}); wait for it to finish or choose another -o"
                ) from e
            raise _open_error(e, path, out) from e
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)  # the holder removed the file between our open and flock: retry


def _read_pid(fd: int) -> str:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return ""
    return text if text.isdigit() else ""


def _open_error(error: OSError, path: Path, out: Path) -> OutputError:
    if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return OutputError(f"{path.parent}: permission denied; choose an -o you can write to")
    return OutputError(f"{path}: cannot create the lock file for {out}: {error.strerror or error}")
