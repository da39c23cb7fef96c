"""`make fuzz`: run the fuzz properties of tests/test_fuzz.py far longer than the suite does.

Each reader target (safetensors bytes, safetensors header JSON, index, whole folder, torch
.bin, raw pickle) gets --cases hypothesis cases (default 100,000), split into --chunks
independent seeds and spread over --jobs processes. A case passes when the reader returns
or raises ReshardError within 10 s and traces under 16 MB; the first other outcome stops
that chunk and is reported with its input. Prints a table and one JSON line.

    .venv/bin/python bench/fuzz.py                      # 100,000 cases per reader
    .venv/bin/python bench/fuzz.py --cases 2000 --jobs 2 --targets index,pickle
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import resource
import shutil
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# One folder per run: parallel runs must not delete each other's scratch files.
SCRATCH = Path("/tmp/reshard-bench-fuzz") / str(os.getpid())
MAX_RSS_MB = 1024


def run_chunk(task: tuple[str, int, int]) -> dict:
    """Run ``cases`` cases of one target with one hypothesis seed, in this process."""
    name, cases, seed_value = task
    sys.path.insert(0, str(ROOT / "tests"))
    import test_fuzz
    from hypothesis import HealthCheck, Phase, given, seed, settings
    from hypothesis import strategies as st

    scratch = SCRATCH / f"{name}-{seed_value}"
    scratch.mkdir(parents=True, exist_ok=True)
    target = test_fuzz.TARGETS[name]
    test_fuzz.TRACE_MEMORY = False  # ~2x faster; peak RSS is checked instead
    count = 0

    @seed(seed_value)
    @settings(
        max_examples=cases,
        deadline=None,
        database=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(data=st.data())
    def prop(data):
        nonlocal count
        count += 1
        target(scratch, data)

    start = time.perf_counter()
    cpu0 = _cpu()
    failure = None
    try:
        prop()
    except BaseException as e:  # report, don't crash the pool
        failure = "".join(traceback.format_exception(e))[-4000:]
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return {
        "target": name,
        "seed": seed_value,
        "cases": count,
        "seconds": round(time.perf_counter() - start, 1),
        "cpu": round(_cpu() - cpu0, 1),
        "failure": failure,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main() -> int:
    sys.path.insert(0, str(ROOT / "tests"))
    import test_fuzz

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=100_000, help="cases per reader")
    parser.add_argument("--jobs", type=int, default=2, help="worker processes")
    parser.add_argument("--chunks", type=int, default=4, help="seeds per reader")
    parser.add_argument("--targets", default=",".join(test_fuzz.TARGETS))
    parser.add_argument("--seed-base", type=int, default=0, help="offset for the chunk seeds")
    args = parser.parse_args()
    names = args.targets.split(",")
    per_chunk = -(-args.cases // args.chunks)
    tasks = [
        (n, per_chunk, args.seed_base + 1000 * i + c) for i, n in enumerate(names) for c in range(args.chunks)
    ]
    start = time.perf_counter()
    results = []
    with multiprocessing.get_context("fork").Pool(args.jobs, maxtasksperchild=1) as pool:
        for r in pool.imap_unordered(run_chunk, tasks):
            results.append(r)
            status = "FAIL" if r["failure"] else "ok"
            print(
                f"  {r['target']:<20} seed {r['seed']:<6} {r['cases']:>7} cases "
                f"{r['seconds']:>7.1f} s  {status}",
                file=sys.stderr,
                flush=True,
            )
    wall = time.perf_counter() - start
    shutil.rmtree(SCRATCH, ignore_errors=True)
    summary = {}
    for n in names:
        mine = [r for r in results if r["target"] == n]
        summary[n] = {
            "cases": sum(r["cases"] for r in mine),
            "seconds": round(sum(r["seconds"] for r in mine), 1),
            "cpu_seconds": round(sum(r["cpu"] for r in mine), 1),
            "failures": sum(1 for r in mine if r["failure"]),
            "peak_rss_mb": max(r["peak_rss_mb"] for r in mine),
        }
    print(f"{'reader':<20} {'cases':>9} {'seconds':>9} {'CPU s':>9} {'failures':>9} {'peak RSS MB':>12}")
    for n, s in summary.items():
        print(
            f"{n:<20} {s['cases']:>9} {s['seconds']:>9} {s['cpu_seconds']:>9} {s['failures']:>9} "
            f"{s['peak_rss_mb']:>12}"
        )
    for r in results:
        if r["failure"]:
            print(f"\n--- {r['target']} seed {r['seed']} failed:\n{r['failure']}")
    # A reader that allocated in proportion to a claimed size would show here (torch's
    # import, used to make the .bin seeds, accounts for ~250 MB).
    ok = all(
        s["failures"] == 0 and s["cases"] >= args.cases and s["peak_rss_mb"] < MAX_RSS_MB
        for s in summary.values()
    )
    print(
        json.dumps(
            {
                "bench": "fuzz",
                "cases_per_reader": args.cases,
                "wall_seconds": round(wall, 1),
                "jobs": args.jobs,
                "ok": ok,
                "readers": summary,
            }
        )
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
