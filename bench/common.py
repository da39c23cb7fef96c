"""Shared helpers for the benchmark scripts: timed subprocesses with their own peak RSS,
ABBA alternation against a baseline, and the summary statistics.

Method (FORMATS.md): timings on these machines are noisy, so the tool under test (A) and
the baseline (B, usually ``cp``) run in alternating pairs (AB, BA, AB, ...); before each
timed run the previous output is removed and ``sync``ed; each timed run ends with
``sync`` (inside the timing) so writeback is counted for both. The figure reported is
the geometric mean of the per-pair ratios A/B, with their min and max, for wall time and
for CPU time (user + system of exactly that child, from ``wait4``; the kernel's writeback
threads are not in it, for either side).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path


def compile_reshard() -> None:
    """Write reshard's bytecode (``__pycache__``) before anything is timed.

    A user's ``pip install`` writes it; this source checkout gets it on a first run, unless
    ``PYTHONDONTWRITEBYTECODE`` is set, as it is on the machines these figures come from.
    Then every timed ``reshard`` compiled its ~45 modules from source again: 0.2 s of each
    run's start-up (cProfile: ``builtins.compile``), which no user pays. Python still
    checks each ``.pyc`` against its source, so an edited module is never run stale.
    """
    import compileall

    compileall.compile_dir(str(Path(__file__).resolve().parent.parent / "reshard"), quiet=1)


compile_reshard()

MKFS = {
    "xfs": ["mkfs.xfs", "-q", "-f"],  # reflink=1 is the default since xfsprogs 5.1
    "btrfs": ["mkfs.btrfs", "-q", "-f"],
    "ext4": ["mkfs.ext4", "-q", "-F"],
}


@dataclass
class Run:
    seconds: float
    peak_rss_mb: float
    cpu_seconds: float = 0.0  # user + system time of the child


def timed(cmd: list[str], env: dict | None = None, sync_path: Path | None = None) -> Run:
    """Run ``cmd`` then ``sync``; return wall time (both included), the command's CPU time
    and its peak RSS as ``wait4`` reports them for exactly that child.

    ``sync_path``: flush only that filesystem (``sync -f``, syncfs) instead of all of them,
    so other jobs' dirty data on the machine's disk stay out of the timing.

    Linux carries the RSS the child had at fork (the parent's) into that figure, so it is
    really max(parent RSS at fork, child peak). The bench scripts keep their own RSS small
    and report it (``parent_rss_mb``) so a reader can see the floor is below the figures.
    """
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env={**os.environ, **(env or {})}, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"benchmark command failed: {' '.join(cmd)}")
    if sync_path is None:
        os.sync()
    else:
        subprocess.run(["sync", "-f", str(sync_path)], check=True)
    return Run(time.perf_counter() - start, usage.ru_maxrss / 1024, usage.ru_utime + usage.ru_stime)


def clean(path: Path) -> None:
    """Remove a previous output and flush, so the next timed run starts from the same state."""
    if path.exists():
        shutil.rmtree(path)
    os.sync()


def abba(run_a, run_b, pairs: int) -> tuple[list[Run], list[Run]]:
    """Alternate A and B in ``pairs`` pairs, flipping the order each pair."""
    a_runs, b_runs = [], []
    for i in range(pairs):
        order = (("a", run_a), ("b", run_b)) if i % 2 == 0 else (("b", run_b), ("a", run_a))
        for which, fn in order:
            (a_runs if which == "a" else b_runs).append(fn())
    return a_runs, b_runs


def compare_with_cp(cmd: list[str], out: Path, weights: list[Path], cp_out: Path, pairs: int) -> dict:
    """Time ``cmd`` (which writes ``out``) against ``cp`` of ``weights`` into ``cp_out``:
    one untimed warm-up of each, then ``pairs`` ABBA pairs; outputs are removed after.
    Returns ``ratio_stats`` of the pairs."""

    def run_cmd() -> Run:
        clean(out)
        return timed(cmd)

    def run_cp() -> Run:
        clean(cp_out)
        cp_out.mkdir()
        return timed(["cp", *map(str, weights), str(cp_out)])

    run_cmd(), run_cp()  # warm the page cache for both sides equally
    cmd_runs, cp_runs = abba(run_cmd, run_cp, pairs)
    clean(out), clean(cp_out)
    return ratio_stats(cmd_runs, cp_runs)


def geomean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


def median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def ratio_stats(a_runs: list[Run], b_runs: list[Run]) -> dict:
    ratios = [a.seconds / b.seconds for a, b in zip(a_runs, b_runs)]
    cpu = [a.cpu_seconds / b.cpu_seconds for a, b in zip(a_runs, b_runs) if b.cpu_seconds > 0]
    return {
        "ratio_geomean": geomean(ratios),
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
        **(
            {"cpu_ratio_geomean": geomean(cpu), "cpu_ratio_min": min(cpu), "cpu_ratio_max": max(cpu)}
            if cpu
            else {}
        ),
        "a_seconds_median": median([r.seconds for r in a_runs]),
        "b_seconds_median": median([r.seconds for r in b_runs]),
        "a_cpu_seconds_median": median([r.cpu_seconds for r in a_runs]),
        "b_cpu_seconds_median": median([r.cpu_seconds for r in b_runs]),
        "a_peak_rss_mb": max(r.peak_rss_mb for r in a_runs),
        "pairs": len(ratios),
    }


def own_rss_mb() -> float:
    """This process's current RSS (the floor under ``timed``'s peak RSS figures)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def print_json_line(obj: dict) -> None:
    print(json.dumps(obj, sort_keys=True), flush=True)


def loop_mount_problem(kinds: list[str]) -> str | None:
    """Why ``mounted`` cannot work here (not root, a mkfs missing), or None."""
    if os.geteuid() != 0:
        return "needs root to loop-mount filesystem images"
    missing = [MKFS[k][0] for k in kinds if shutil.which(MKFS[k][0]) is None]
    if missing:
        return f"{', '.join(missing)} not found (install xfsprogs, btrfs-progs, e2fsprogs)"
    return None


@contextmanager
def mounted(kind: str, root: Path, size: str) -> Iterator[Path]:
    """Make a ``kind`` filesystem of ``size`` (``truncate -s`` syntax) in a sparse image
    under ``root``, loop-mount it (as root), yield the mount point; unmount and delete the
    image on exit. The image takes only the disk its contents use."""
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


def used_bytes(path: Path) -> int:
    """Bytes in use on ``path``'s filesystem, as ``df`` reports them, after ``sync -f``
    (syncfs) so that delayed allocation and btrfs's pending extents are counted."""
    subprocess.run(["sync", "-f", str(path)], check=True)
    stat = os.statvfs(path)
    return (stat.f_blocks - stat.f_bfree) * stat.f_frsize
