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
from dataclasses import dataclass
from pathlib import Path


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


def compare_with_cp(cmd: list[str], out: Path, weights: list[Path], cp_out: Path,
                    pairs: int) -> dict:
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
        **({"cpu_ratio_geomean": geomean(cpu), "cpu_ratio_min": min(cpu), "cpu_ratio_max": max(cpu)}
           if cpu else {}),
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
