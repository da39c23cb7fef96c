"""Real filesystems for tests: a sparse image file, ``mkfs``, and a loop mount (as root).

Block sharing (reflink) only happens on filesystems that have it, so the tests that check
it make real XFS and btrfs filesystems, and an ext4 one to compare against. The image
files are sparse and live under pytest's tmp_path: they take only the disk their contents
use, and go away with the unmount. The helpers are bench/common.py's (the benchmarks
make the same filesystems).

``make test`` installs xfsprogs and btrfs-progs where they are missing (as root). Without
root nothing can be mounted, so the tests that need these skip, saying why.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location(
    "bench_common", Path(__file__).resolve().parents[1] / "bench" / "common.py"
)
_common = sys.modules.setdefault("bench_common", importlib.util.module_from_spec(_spec))
_spec.loader.exec_module(_common)
mounted, used_bytes = _common.mounted, _common.used_bytes


def require_loop_mounts() -> None:
    """Skip (not root) or fail (root, but a mkfs tool is missing) before making images."""
    problem = _common.loop_mount_problem(list(_common.MKFS))
    if problem and "root" in problem:
        pytest.skip(f"{problem} (make test runs as root in CI)")
    if problem:
        pytest.fail(f"{problem}: make test installs them as root with apt-get")


@contextmanager
def mounted_all(root: Path, sizes: dict[str, str]) -> Iterator[dict[str, Path]]:
    """``mounted`` for each ``{kind: size}``, all at once."""
    with ExitStack() as stack:
        yield {kind: stack.enter_context(mounted(kind, root, size)) for kind, size in sizes.items()}
