"""Benchmark: `reshard split --tp 2`, `reshard merge` and `split --pp 2` vs `cp` of the same
files, with each command's peak RSS, on Mistral-shaped bf16 checkpoints.

Claims checked: streaming, so peak RSS is bounded by a chunk, not by a tensor: it stays
far below the largest tensor (the 262 MB embedding / output head; a column slice of
down_proj is 58.7 MB) and does not grow with the model (issue 6). Issue 11's targets on
the 4 GB Mistral-shaped checkpoint (8 layers): `split --tp 2` and `merge` at most 1.5x
`cp` (geometric mean of per-pair ratios, ABBA pairs) and at most 150 MiB peak RSS.

    flock /tmp/reshard-bench.lock python bench/bench_parallel.py [--pairs 6] [--layers 2] [--large-layers 8]

Prints a table (wall seconds with writeback, as medians, their ratio to `cp`, and the
median CPU seconds, user + system, of the command and of `cp`) and one JSON line.
Generated files are deleted at the end.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import abba, clean, print_json_line, ratio_stats, timed  # noqa: E402

from reshard.demo import make_mistral_checkpoint  # noqa: E402
from reshard.units import format_size  # noqa: E402

LARGEST_TENSOR_MB = 32000 * 4096 * 2 / 2**20  # embed_tokens / lm_head, bf16 (MiB like ru_maxrss)


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "reshard.cli", *args]


def bench_size(root: Path, layers: int, pairs: int) -> dict:
    src = root / f"mistral-{layers}-layers"
    shutil.rmtree(src, ignore_errors=True)
    make_mistral_checkpoint(src, layers=layers, files=2)
    weights = sorted(src.glob("*.safetensors"))
    size = sum(p.stat().st_size for p in weights)
    tp_out, merged, pp_out, cp_out = (root / n for n in ("tp", "merged", "pp", "cp"))

    def run_tp():
        clean(tp_out)
        return timed(cli("split", str(src), "--tp", "2", "-o", str(tp_out), "--max-shard", "2GB", "-q"))

    def run_merge():
        clean(merged)
        return timed(cli("merge", str(tp_out), "-o", str(merged), "--max-shard", "2GB", "-q"))

    def run_pp():
        clean(pp_out)
        return timed(cli("split", str(src), "--pp", "2", "-o", str(pp_out), "--max-shard", "2GB", "-q"))

    def run_cp():
        clean(cp_out)
        cp_out.mkdir()
        return timed(["cp", *map(str, weights), str(cp_out)])

    run_tp(), run_cp()  # warm the page cache for both sides equally
    result = {"layers": layers, "bytes": size}
    for name, fn in (("split_tp2", run_tp), ("merge_tp2", run_merge), ("split_pp2", run_pp)):
        a_runs, b_runs = abba(fn, run_cp, pairs)
        result[name] = ratio_stats(a_runs, b_runs)
        if name == "split_pp2":
            clean(pp_out)
    verify = timed(cli("verify", str(merged), "--against", str(src)))  # bit for bit, or exits 1
    result["verify_merged_against_source"] = "ok"
    result["verify_seconds"] = verify.seconds
    for path in (tp_out, merged, pp_out, cp_out, src):
        clean(path)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pairs", type=int, default=6)
    parser.add_argument("--layers", type=int, default=2, help="2 layers is about 1.4 GB in bf16")
    parser.add_argument("--large-layers", type=int, default=8, help="8 layers is about 4.0 GB")
    parser.add_argument("--dir", type=Path, default=Path("/tmp/reshard-bench-parallel"))
    args = parser.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    try:
        results = [
            bench_size(args.dir, args.layers, max(2, args.pairs // 3)),
            bench_size(args.dir, args.large_layers, args.pairs),
        ]
    finally:
        shutil.rmtree(args.dir, ignore_errors=True)
    print(
        f"{'checkpoint':>10} {'command':>10} {'s':>7} {'cp s':>7} {'ratio':>6} {'(min-max)':>13} "
        f"{'cpu s':>6} {'cp cpu':>6} {'peak RSS':>9} {'pairs':>5}"
    )
    for r in results:
        for name in ("split_tp2", "merge_tp2", "split_pp2"):
            s = r[name]
            print(
                f"{format_size(r['bytes']):>10} {name:>10} {s['a_seconds_median']:7.2f} "
                f"{s['b_seconds_median']:7.2f} {s['ratio_geomean']:6.2f} "
                f"{s['ratio_min']:6.2f}-{s['ratio_max']:<6.2f} {s['a_cpu_seconds_median']:6.2f} "
                f"{s['b_cpu_seconds_median']:6.2f} {s['a_peak_rss_mb']:7.1f}MB {s['pairs']:>5}"
            )
    worst_rss = max(r[n]["a_peak_rss_mb"] for r in results for n in ("split_tp2", "merge_tp2", "split_pp2"))
    growth = max(
        abs(results[1][n]["a_peak_rss_mb"] - results[0][n]["a_peak_rss_mb"])
        for n in ("split_tp2", "merge_tp2", "split_pp2")
    )
    large = results[1]
    targets = {
        "rss_below_largest_tensor": worst_rss < LARGEST_TENSOR_MB,
        "rss_growth<=25MB": growth <= 25,
        "tp_split_and_merge<=1.5x_cp": all(
            large[n]["ratio_geomean"] <= 1.5 for n in ("split_tp2", "merge_tp2")
        ),
        "tp_peak_rss<=150MiB": all(large[n]["a_peak_rss_mb"] <= 150 for n in ("split_tp2", "merge_tp2")),
    }
    print(
        f"largest tensor {LARGEST_TENSOR_MB:.0f} MiB; worst peak RSS {worst_rss:.1f} MiB; "
        f"RSS growth between sizes {growth:.1f} MiB; "
        + ", ".join(f"{k} {'met' if v else 'MISSED'}" for k, v in targets.items())
    )
    print_json_line(
        {
            "bench": "parallel",
            "results": results,
            "worst_peak_rss_mb": worst_rss,
            "rss_growth_mb": growth,
            "targets_met": targets,
        }
    )


if __name__ == "__main__":
    main()
