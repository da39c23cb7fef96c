"""Benchmark: what `--resume` saves after a kill -9, and what crash safety costs.

On a Mistral-shaped bf16 checkpoint (~1.4 GB, 2 layers), a split into ~300 MB shards is
killed (SIGKILL, paused there by tests/pausing.py's run-event hook) right after half of its shards are
journaled; the rerun with `--resume` (A) is timed against an uninterrupted split (B) in
alternating ABBA pairs. A resume re-reads the kept shards and their source ranges to
verify them byte for byte, then writes the rest, so A/B should sit between the
fraction of bytes left to write (~0.5) and 1. Also reports each side's peak RSS.

    python bench/bench_reliability.py [--pairs 4] [--dir /tmp/reshard-bench-reliability]

Prints a table and one JSON line. Generated files are deleted at the end.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import abba, clean, print_json_line, ratio_stats, timed  # noqa: E402

from reshard.demo import make_mistral_checkpoint  # noqa: E402
from reshard.plan import plan_shards  # noqa: E402
from reshard.units import format_size  # noqa: E402

MAX_SHARD = "300MB"


def kill_after(cmd: list[str], point: str) -> None:
    """Run reshard ``cmd`` until it stops itself at ``point``, then SIGKILL it."""
    pausing = Path(__file__).resolve().parent.parent / "tests" / "pausing.py"
    args = cmd[cmd.index("reshard.cli") + 1 :]
    proc = subprocess.Popen(
        [sys.executable, str(pausing), point, *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"never reached {point}")
        stat = Path(f"/proc/{proc.pid}/stat").read_text()
        if stat[stat.rindex(")") + 2] == "T":
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/reshard-bench-reliability"))
    args = parser.parse_args()
    root = args.dir
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    try:
        src = make_mistral_checkpoint(root / "src", layers=args.layers, files=2)
        from reshard.formats.registry import load_checkpoint
        from reshard.hub.resolve import resolve_local
        from reshard.units import parse_size

        ckpt = load_checkpoint(resolve_local(src))
        plan = plan_shards([(t.name, t.nbytes) for t in ckpt.tensors], parse_size(MAX_SHARD))
        half = len(plan.shards) // 2
        kept_bytes = sum(s.size for s in plan.shards[:half])
        point = f"after:{plan.shards[half - 1].file_name}"
        out = root / "out"
        split = [
            sys.executable,
            "-m",
            "reshard.cli",
            "split",
            str(src),
            "-o",
            str(out),
            "--max-shard",
            MAX_SHARD,
            "--quiet",
        ]

        def run_resume():
            clean(out)
            shutil.rmtree(root / ".out.reshard-tmp", ignore_errors=True)
            kill_after(split, point)
            os.sync()
            return timed([*split, "--resume"])

        def run_full():
            clean(out)
            shutil.rmtree(root / ".out.reshard-tmp", ignore_errors=True)
            return timed(split)

        resumed, full = abba(run_resume, run_full, args.pairs)
        stats = ratio_stats(resumed, full)
        total = plan.total_size
        print(
            f"source {format_size(total)}, {len(plan.shards)} shards of <= {MAX_SHARD}; "
            f"killed after shard {half} ({format_size(kept_bytes)} kept)"
        )
        print(f"{'run':<28} {'median s':>9} {'peak RSS MB':>12}")
        print(
            f"{'resume after kill (A)':<28} {stats['a_seconds_median']:>9.2f} {stats['a_peak_rss_mb']:>12.1f}"
        )
        print(
            f"{'uninterrupted split (B)':<28} {stats['b_seconds_median']:>9.2f} "
            f"{max(r.peak_rss_mb for r in full):>12.1f}"
        )
        print(
            f"A/B geomean {stats['ratio_geomean']:.2f} (min {stats['ratio_min']:.2f}, "
            f"max {stats['ratio_max']:.2f}) over {stats['pairs']} pairs; "
            f"bytes left to write: {1 - kept_bytes / total:.2f}"
        )
        print_json_line(
            {
                "bench": "reliability",
                "total_bytes": total,
                "shards": len(plan.shards),
                "kept_fraction": round(kept_bytes / total, 3),
                "resume_over_full": round(stats["ratio_geomean"], 3),
                "ratio_min": round(stats["ratio_min"], 3),
                "ratio_max": round(stats["ratio_max"], 3),
                "resume_seconds_median": round(stats["a_seconds_median"], 2),
                "full_seconds_median": round(stats["b_seconds_median"], 2),
                "resume_peak_rss_mb": round(stats["a_peak_rss_mb"], 1),
                "full_peak_rss_mb": round(max(r.peak_rss_mb for r in full), 1),
                "pairs": stats["pairs"],
            }
        )
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
