"""Benchmark: sharing a split's shards (issue 13) on one machine.

1. ``--workers 2`` vs ``--workers 1`` on a Mistral-shaped fp32 checkpoint (~4.5 GB with
   4 layers): ``--dtype bf16`` and ``--quantize q8_0``. Target: at least 1.6x faster.
   ``--workers N`` is N compute threads (casts, quantization) and N shards at once;
   ``--workers 1`` does all the CPU work on one thread.
2. ``torchrun --standalone --nproc-per-node 2 -m reshard split`` vs one process on a plain
   split (kernel copies) of the same source, start-up included, reported as measured: on
   one (virtual) disk there is nothing for a second rank to add but its start-up.

Method (bench/common.py): A and B alternate in ABBA pairs after one untimed warm-up of
each (the source stays in the page cache), every timed run ends with ``sync``; the figure
is the geometric mean of the per-pair ratios B/A (the speed-up) with their min and max.
Every output of A is compared with B's (sha256 of every file) once.

    python bench/bench_distributed.py [--pairs 2] [--layers 4] [--dir /tmp/reshard-bench-dist]

Prints a table and one JSON line. Generated files are deleted at the end.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import abba, clean, own_rss_mb, print_json_line, timed  # noqa: E402

from reshard.demo import make_mistral_checkpoint  # noqa: E402
from reshard.units import format_size  # noqa: E402

TARGET = 1.6


def checksums(folder: Path) -> dict[str, str]:
    sums = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            h = hashlib.sha256()
            with open(path, "rb") as f:
                while block := f.read(1 << 24):
                    h.update(block)
            sums[str(path.relative_to(folder))] = h.hexdigest()
    return sums


def compare(name: str, cmd_a: list[str], cmd_b: list[str], out_a: Path, out_b: Path, pairs: int) -> dict:
    """Time A (the shared run) against B (the single one); check they write the same bytes."""

    def run(cmd: list[str], out: Path):
        def go():
            clean(out)
            return timed(cmd, env={"OMP_NUM_THREADS": "1"})

        return go

    run_a, run_b = run(cmd_a, out_a), run(cmd_b, out_b)
    run_a(), run_b()  # warm-up (page cache) and the identity check
    same = checksums(out_a) == checksums(out_b)
    a_runs, b_runs = abba(run_a, run_b, pairs)
    clean(out_a), clean(out_b)
    speedups = [b.seconds / a.seconds for a, b in zip(a_runs, b_runs)]
    return {
        "case": name,
        "identical": same,
        "speedup_geomean": float(geomean(speedups)),
        "speedup_min": min(speedups),
        "speedup_max": max(speedups),
        "a_seconds": [round(r.seconds, 2) for r in a_runs],
        "b_seconds": [round(r.seconds, 2) for r in b_runs],
        "a_cpu_seconds": [round(r.cpu_seconds, 2) for r in a_runs],
        "b_cpu_seconds": [round(r.cpu_seconds, 2) for r in b_runs],
        "a_peak_rss_mb": max(r.peak_rss_mb for r in a_runs),
        "b_peak_rss_mb": max(r.peak_rss_mb for r in b_runs),
        "pairs": pairs,
    }


def geomean(values: list[float]) -> float:
    import math

    return math.exp(sum(math.log(v) for v in values) / len(values))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pairs", type=int, default=2)
    parser.add_argument("--layers", type=int, default=4, help="4 layers is about 4.5 GB in fp32")
    parser.add_argument("--dir", type=Path, default=Path("/tmp/reshard-bench-dist"))
    parser.add_argument(
        "--out-dir",
        type=Path,
        default=None,
        help="where outputs go (default: --dir); /dev/shm takes the disk out and leaves the CPU work",
    )
    args = parser.parse_args()
    root = args.dir
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    src = root / "mistral-fp32"
    make_mistral_checkpoint(src, layers=args.layers, dtype="F32", files=2)
    size = sum(p.stat().st_size for p in src.glob("*.safetensors"))
    reshard = [sys.executable, "-m", "reshard", "split", str(src), "--quiet"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    outs = args.out_dir or root
    outs.mkdir(parents=True, exist_ok=True)
    a, b = outs / "out-a", outs / "out-b"
    cases = {
        "fp32->bf16 --workers 2 vs 1": (["--dtype", "bf16", "--max-shard", "250MB"], "workers"),
        "q8_0 --workers 2 vs 1": (["--quantize", "q8_0", "--max-shard", "150MB"], "workers"),
        "plain split torchrun 2 ranks vs 1 process": (["--max-shard", "500MB"], "torchrun"),
    }
    results = []
    for name, (options, kind) in cases.items():
        single = [*reshard, "-o", str(b), *options]
        if kind == "workers":  # explicit 1: without --workers, casts/quantization use every CPU
            single = [*single, "--workers", "1"]
            shared = [*reshard, "-o", str(a), *options, "--workers", "2"]
        else:
            shared = [*torchrun, "-m", "reshard", "split", str(src), "--quiet", "-o", str(a), *options]
        results.append(compare(name, shared, single, a, b, args.pairs))
    shutil.rmtree(root, ignore_errors=True)
    print(
        f"source {format_size(size)} fp32 ({args.layers} layers), {os.cpu_count()} CPUs, pairs {args.pairs}"
    )
    print(f"{'case':<44} {'shared s':>9} {'single s':>9} {'speed-up':>9} {'(min-max)':>12} {'same':>5}")
    for r in results:
        print(
            f"{r['case']:<44} {min(r['a_seconds']):9.2f} {min(r['b_seconds']):9.2f} "
            f"{r['speedup_geomean']:8.2f}x {r['speedup_min']:5.2f}-{r['speedup_max']:.2f} "
            f"{'yes' if r['identical'] else 'NO':>5}"
        )
    workers = [r for r in results if "--workers" in r["case"]]
    targets = {
        f"workers>={TARGET}x": all(r["speedup_geomean"] >= TARGET for r in workers),
        "identical": all(r["identical"] for r in results),
    }
    print("targets: " + ", ".join(f"{k} {'met' if v else 'MISSED'}" for k, v in targets.items()))
    print_json_line(
        {
            "bench": "distributed",
            "bytes": size,
            "cpus": os.cpu_count(),
            "load_average": os.getloadavg(),
            "outputs": str(outs),
            "results": results,
            "parent_rss_mb": own_rss_mb(),
            "targets_met": targets,
        }
    )


if __name__ == "__main__":
    main()
