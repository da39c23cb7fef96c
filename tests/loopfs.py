"""Real filesystems for tests: a sparse image file, ``mkfs``, and a loop mount (as root).

Block sharing (reflink) only happens on filesystems that have it, so the tests that check
it make real XFS and btrfs filesystems, and an ext4 one to compare against. The image
files are sparse and live under pytest's tmp_path: they take only the disk their contents
use, and go away with the unmount.

``make test`` installs xfsprogs and btrfs-progs where they are missing (as root). Without
root nothing can be mounted, so the tests that need these skip, saying why.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Iterator

import pytest

MKFS = {
    "xfs": ["mkfs.xfs", "-q", "-f"],  # reflink=1 is the default since xfsprogs 5.1
    "btrfs": ["mkfs.btrfs", "-q", "-f"],
    "ext4": ["mkfs.ext4", "-q", "-F"],
}


def require_loop_mounts() -> None:
    """Skip (not root) or fail (root, but a mkfs tool is missing) before making images."""
    if os.geteuid() != 0:
        pytest.skip("needs root to loop-mount XFS/btrfs/ext4 images (make test runs as root in CI)")
    missing = [cmd[0] for cmd in MKFS.values() if shutil.which(cmd[0]) is None]
    if missing:
        pytest.fail(f"{', '.join(missing)} not found: install xfsprogs, btrfs-progs and e2fsprogs "
                    "(make test does this as root with apt-get)")


@contextmanager
def mounted(kind: str, root: Path, size: str) -> Iterator[Path]:
    """Make a ``kind`` filesystem of ``size`` (``truncate -s`` syntax) in a sparse image
    under ``root``, mount it, yield the mount point; unmount and delete on exit."""
    root.mkdir(parents=True, exist_ok=True)
    image, point = root / f"{kind}.img", root / kind
    subprocess.run(["truncate", "-s", size, str(image)], check=True)
    subprocess.run([*MKFS[kind], str(image)], check=True, capture_output=True)
    point.mkdir(exist_ok=True)
    subprocess.run(["mount", "-o", "loop", str(image), str(point)], check=True, capture_output=True)
    try:
        yield point
    finally:
        if subprocess.run(["umount", str(point)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(point)], capture_output=True)  # busy: detach lazily
        image.unlink(missing_ok=True)


@contextmanager
def mounted_all(root: Path, sizes: dict[str, str]) -> Iterator[dict[str, Path]]:
    """``mounted`` for each ``{kind: size}``, all at once."""
    with ExitStack() as stack:
        yield {kind: stack.enter_context(mounted(kind, root, size)) for kind, size in sizes.items()}


def used_bytes(path: Path) -> int:
    """Bytes in use on ``path``'s filesystem, as ``df`` reports them, after ``sync -f``
    (syncfs) so that delayed allocation and btrfs's pending extents are counted."""
    subprocess.run(["sync", "-f", str(path)], check=True)
    stat = os.statvfs(path)
    return (stat.f_blocks - stat.f_bfree) * stat.f_frsize
