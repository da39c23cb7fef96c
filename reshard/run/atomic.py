"""Replace a folder with another in one atomic step, so a crash never leaves neither.

Renaming the old output aside and then the new one into place has a moment where the
output does not exist at all; a kill -9 there loses it. Linux's ``renameat2`` with
``RENAME_EXCHANGE`` swaps two paths atomically: at every instant the output is either
the old folder or the new one. Python does not expose it, so it is called through libc;
where it is unavailable (old glibc, a filesystem without support) ``exchange`` returns
False and the caller falls back to two renames.

>>> import tempfile, pathlib
>>> root = pathlib.Path(tempfile.mkdtemp())
>>> (root / "a").mkdir(); (root / "b").mkdir(); _ = (root / "a" / "new").write_text("1")
>>> exchange(root / "a", root / "b") or True  # False only where unsupported
True
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

RENAME_EXCHANGE = 2
AT_FDCWD = -100
_UNSUPPORTED = {errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP}


def _renameat2():
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name, use_errno=True)
        func = libc.renameat2
    except (OSError, AttributeError, TypeError):
        return None
    func.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    func.restype = ctypes.c_int
    return func


def exchange(a: Path, b: Path) -> bool:
    """Atomically swap the paths ``a`` and ``b`` (both must exist, same filesystem).

    Returns:
        True when swapped; False when this system cannot do it (nothing was changed).

    Raises:
        OSError: any other failure (permission, missing path).
    """
    func = _renameat2()
    if func is None:
        return False
    rc = func(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in _UNSUPPORTED:
        log.debug("renameat2(RENAME_EXCHANGE) unsupported here (%s); using two renames", os.strerror(err))
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))
