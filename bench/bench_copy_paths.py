"""Benchmark: the kernel's copy paths for one range, at a congruent and a shifted offset.

Why the copy chain (reshard/transfer/ranges.py) splices through its own 1 MiB pipe before
``copy_file_range`` on local filesystems (issue 15): a torch.save ``.bin`` puts every
tensor at its own offset within a 4 KiB page, and a safetensors shard cannot keep those
offsets (no gaps allowed), so most ``.bin`` bytes are copied between offsets that differ
modulo the page size.

1 GiB of a page-cached source file goes into a new file in the same folder, by
``copy_file_range`` (what ``cp`` uses; the kernel splices through its own 16-page pipe)
and by ``splice`` through pipes of 64 KiB, 256 KiB and 1 MiB, each with the source offset
congruent to the destination's and shifted by 64 bytes. The cases alternate, ``--reps``
rounds; the figure is the median CPU time (user + system) of the copying process, which is
the copy itself (writeback is the kernel's, the same for all, and ``sync`` runs between).

    python bench/bench_copy_paths.py [--reps 5] [--dir /tmp/reshard-bench-copy]

Prints a table and one JSON line. The files are deleted at the end.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_json_line  # noqa: E402

from reshard.transfer.ranges import SplicePipe  # noqa: E402

LENGTH = 1 << 30


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def copy_file_range(src: int, dst: int, offset: int) -> None:
    done = 0
    while done < LENGTH:
        done += os.copy_file_range(src, dst, LENGTH - done, offset + done, done)


def spliced(pipe_bytes: int):
    """A copy through reshard's own ``SplicePipe`` of ``pipe_bytes``."""

    def copy(src: int, dst: int, offset: int) -> None:
        pipe = SplicePipe(pipe_bytes)
        try:
            done = 0
            while done < LENGTH:
                done += pipe.move(src, dst, offset + done, done, LENGTH - done)
        finally:
            pipe.close()

    return copy


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/reshard-bench-copy"))
    args = parser.parse_args()
    shutil.rmtree(args.dir, ignore_errors=True)
    args.dir.mkdir(parents=True)
    src_path, dst_path = args.dir / "source.bin", args.dir / "copy.bin"
    with open(src_path, "wb") as f:  # 1 GiB + a page, random-ish (no zero pages)
        block = os.urandom(1 << 20)
        for _ in range(LENGTH // len(block) + 1):
            f.write(block)
    methods = {
        "copy_file_range": copy_file_range,
        "splice, 64 KiB pipe": spliced(64 << 10),
        "splice, 256 KiB pipe": spliced(256 << 10),
        "splice, 1 MiB pipe": spliced(1 << 20),
    }
    cases = [(m, shift) for m in methods for shift in (0, 64)]
    cpu: dict[tuple[str, int], list[float]] = {c: [] for c in cases}
    wall: dict[tuple[str, int], list[float]] = {c: [] for c in cases}
    src = os.open(src_path, os.O_RDONLY)
    try:
        for rep in range(args.reps + 1):  # round 0 warms the page cache, untimed
            for method, shift in cases:
                dst_path.unlink(missing_ok=True)
                os.sync()
                dst = os.open(dst_path, os.O_WRONLY | os.O_CREAT, 0o644)
                t, c = time.perf_counter(), _cpu()
                methods[method](src, dst, 4096 + shift)
                t, c = time.perf_counter() - t, _cpu() - c
                os.close(dst)
                if rep:
                    cpu[(method, shift)].append(c)
                    wall[(method, shift)].append(t)
    finally:
        os.close(src)
        shutil.rmtree(args.dir, ignore_errors=True)
    print(f"1 GiB from the page cache, {args.reps} alternating rounds, median CPU s (min-max)")
    print(f"{'method':<24} {'congruent':>18} {'shifted 64 B':>18}")
    rows = []
    for method in methods:
        cells = []
        for shift in (0, 64):
            v = cpu[(method, shift)]
            cells.append(f"{statistics.median(v):.3f} ({min(v):.2f}-{max(v):.2f})")
            rows.append(
                {
                    "method": method,
                    "shift": shift,
                    "cpu_median_s": statistics.median(v),
                    "cpu_s": [round(x, 3) for x in v],
                    "wall_median_s": statistics.median(wall[(method, shift)]),
                }
            )
        print(f"{method:<24} {cells[0]:>18} {cells[1]:>18}")
    print_json_line({"bench": "copy_paths", "bytes": LENGTH, "reps": args.reps, "results": rows})


if __name__ == "__main__":
    main()
