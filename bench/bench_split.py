"""Benchmark: `reshard split` vs `cp` of the same files, and reshard's peak RSS, on a
Mistral-shaped bf16 checkpoint of >= 4 GB and on one twice as big.

Targets (issue 2): split time <= 1.15x cp's, peak RSS <= 150 MB, and peak RSS within
25 MB at both sizes (memory does not grow with the model).

    python bench/bench_split.py [--pairs 6] [--dir /tmp/reshard-bench-split] [--layers 9]
                                [--plot docs/img/bench-split.png]

Prints a table and one JSON line. Generated files are deleted at the end.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import compare_with_cp, own_rss_mb, print_json_line  # noqa: E402

from reshard.demo import make_mistral_checkpoint  # noqa: E402
from reshard.units import format_size  # noqa: E402


def bench_size(root: Path, layers: int, pairs: int) -> dict:
    src = root / f"mistral-{layers}-layers"
    shutil.rmtree(src, ignore_errors=True)
    # Generated in a child: a child forked from this process reports this process's peak
    # RSS as its own when that is higher, and generating peaks at about 64 MB (the random
    # pool), which is what the split's figure used to show.
    subprocess.run([sys.executable, __file__, "--generate", str(src), "--layers", str(layers)],
                   check=True)
    weights = sorted(src.glob("*.safetensors"))
    size = sum(p.stat().st_size for p in weights)
    out_split = root / "out-split"
    reshard = [sys.executable, "-m", "reshard.cli", "split", str(src), "-o", str(out_split),
               "--max-shard", "2GB", "--quiet"]
    stats = compare_with_cp(reshard, out_split, weights, root / "out-cp", pairs)
    stats["parent_rss_mb"] = own_rss_mb()  # floor of the peak RSS figures (see common.timed)
    shutil.rmtree(src)
    return {"layers": layers, "bytes": size, **stats}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=6)
    parser.add_argument("--layers", type=int, default=9, help="9 layers is about 4.45 GB in bf16")
    parser.add_argument("--dir", type=Path, default=Path("/tmp/reshard-bench-split"))
    parser.add_argument("--plot", type=Path, help="also draw the results to this PNG")
    parser.add_argument("--from-json", type=Path, help="only plot a JSON line saved earlier")
    parser.add_argument("--generate", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.generate:
        make_mistral_checkpoint(args.generate, layers=args.layers, files=2)
        return
    if args.from_json:
        return plot(json.loads(args.from_json.read_text())["results"], args.plot)
    args.dir.mkdir(parents=True, exist_ok=True)
    results = [bench_size(args.dir, args.layers, args.pairs),
               bench_size(args.dir, args.layers * 2, args.pairs)]
    shutil.rmtree(args.dir, ignore_errors=True)

    print(f"{'checkpoint':>12} {'split s':>8} {'cp s':>8} {'ratio':>6} {'(min-max)':>13} {'peak RSS':>9}")
    for r in results:
        print(f"{format_size(r['bytes']):>12} {r['a_seconds_median']:8.2f} {r['b_seconds_median']:8.2f} "
              f"{r['ratio_geomean']:6.3f} {r['ratio_min']:6.3f}-{r['ratio_max']:.3f} "
              f"{r['a_peak_rss_mb']:7.1f}MB")
    rss_growth = results[1]["a_peak_rss_mb"] - results[0]["a_peak_rss_mb"]
    worst_ratio = max(r["ratio_geomean"] for r in results)
    worst_rss = max(r["a_peak_rss_mb"] for r in results)
    targets = {"ratio<=1.15": worst_ratio <= 1.15, "rss<=150MB": worst_rss <= 150,
               "rss_growth<=25MB": abs(rss_growth) <= 25}
    print(f"peak RSS growth from {format_size(results[0]['bytes'])} to "
          f"{format_size(results[1]['bytes'])}: {rss_growth:+.1f} MB; targets: "
          + ", ".join(f"{k} {'met' if v else 'MISSED'}" for k, v in targets.items()))
    print_json_line({"bench": "split", "results": results, "rss_growth_mb": rss_growth,
                     "targets_met": targets})
    if args.plot:
        plot(results, args.plot)


def plot(results: list[dict], path: Path) -> None:
    """Median times (split vs cp) and split's peak RSS at each checkpoint size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [format_size(r["bytes"]) for r in results]
    x = range(len(results))
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(8, 3.2), dpi=100)
    ax_t.bar([i - 0.2 for i in x], [r["a_seconds_median"] for r in results], 0.4, label="reshard split")
    ax_t.bar([i + 0.2 for i in x], [r["b_seconds_median"] for r in results], 0.4, label="cp")
    for i, r in zip(x, results):
        ax_t.annotate(f"{r['ratio_geomean']:.2f}x", (i - 0.2, r["a_seconds_median"]), ha="center", va="bottom")
    ax_t.set_ylim(0, 1.2 * max(max(r["a_seconds_median"], r["b_seconds_median"]) for r in results))
    ax_t.set_xticks(list(x), labels)
    ax_t.set_ylabel("seconds (median, incl. sync)")
    ax_t.set_title("time")
    ax_t.legend()
    ax_m.bar(list(x), [r["a_peak_rss_mb"] for r in results], 0.5, color="tab:green")
    ax_m.axhline(150, color="tab:red", linestyle="--", label="target 150 MB")
    ax_m.set_xticks(list(x), labels)
    ax_m.set_ylabel("MB")
    ax_m.set_title("reshard split peak RSS")
    ax_m.legend()
    fig.tight_layout()
    fig.savefig(path)


if __name__ == "__main__":
    main()
