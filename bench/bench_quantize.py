"""Benchmark: `reshard split --quantize q8_0` (GGUF) and `--quantize fp8` with
--max-shard 2GB on the Mistral-shaped bf16 checkpoint (~4.45 GB), against `cp` of the
source (ABBA pairs, see bench/common.py), plus gguf-py's numpy reference quantizer
(`gguf.quants.quantize`) on the same tensors, in this process, for the quantizer speed.

Targets (issue 12): peak RSS <= 400 MB, time <= 2x cp.

    python bench/bench_quantize.py [--pairs 3] [--layers 9] [--dir /tmp/reshard-bench-quant]

Prints a table and one JSON line. Generated files are deleted at the end.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import compare_with_cp, own_rss_mb, print_json_line  # noqa: E402

from reshard.demo import make_mistral_checkpoint  # noqa: E402
from reshard.units import format_size  # noqa: E402


def reference_quantizer_rate(src: Path, limit_elements: int) -> dict:
    """Elements per second, one thread, of gguf.quants.quantize(Q8_0) (numpy, whole
    tensors, as gguf-py's converter calls it) and of reshard's torch Q8_0 kernel as split
    runs it (bands of ``BAND_ELEMENTS`` with a reused Workspace), on the first 2-D tensors
    of the source (bf16 -> f32 first, outside the timing for both). Both give the same
    bytes; the check is done here too."""
    import numpy as np
    import torch
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize
    from safetensors import safe_open

    from reshard.quant.ggml import Workspace, quantize_q8_0
    from reshard.quant.stream import BAND_ELEMENTS

    arrays, count = [], 0
    for path in sorted(src.glob("*.safetensors")):
        with safe_open(path, "pt") as f:
            for name in f.keys():
                t = f.get_tensor(name)
                if t.dim() == 2 and count < limit_elements:
                    arrays.append(t.float())
                    count += t.numel()
    torch.set_num_threads(1)
    start = time.perf_counter()
    reference = [quantize(a.numpy(), GGMLQuantizationType.Q8_0) for a in arrays]
    ref_s = time.perf_counter() - start
    ws = Workspace()
    same = True
    start = time.perf_counter()
    for a, want in zip(arrays, reference):
        band = max(1, BAND_ELEMENTS // a.shape[1])
        for r in range(0, a.shape[0], band):
            got = quantize_q8_0(a[r : r + band], ws)
            same = same and np.array_equal(got.numpy(), want[r : r + band])
    ours_s = time.perf_counter() - start
    return {
        "elements": count,
        "gguf_numpy_melem_s": count / ref_s / 1e6,
        "reshard_torch_melem_s": count / ours_s / 1e6,
        "same_bytes": bool(same),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--layers", type=int, default=9, help="9 layers is about 4.45 GB in bf16")
    parser.add_argument("--dir", type=Path, default=Path("/tmp/reshard-bench-quant"))
    args = parser.parse_args()
    root = args.dir
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    src = root / "mistral"
    make_mistral_checkpoint(src, layers=args.layers, files=2)
    weights = sorted(src.glob("*.safetensors"))
    size = sum(p.stat().st_size for p in weights)
    results = {}
    for quant in ("q8_0", "fp8"):
        out = root / f"out-{quant}"
        cmd = [
            sys.executable,
            "-m",
            "reshard.cli",
            "split",
            str(src),
            "-o",
            str(out),
            "--quantize",
            quant,
            "--max-shard",
            "2GB",
            "--quiet",
        ]
        results[quant] = compare_with_cp(cmd, out, weights, root / "out-cp", args.pairs)
    reference = reference_quantizer_rate(src, 100_000_000)
    shutil.rmtree(root, ignore_errors=True)
    print(f"source {format_size(size)}")
    print(f"{'quant':>6} {'reshard s':>10} {'cp s':>8} {'ratio':>6} {'(min-max)':>13} {'peak RSS':>9}")
    for quant, r in results.items():
        print(
            f"{quant:>6} {r['a_seconds_median']:10.2f} {r['b_seconds_median']:8.2f} "
            f"{r['ratio_geomean']:6.3f} {r['ratio_min']:6.3f}-{r['ratio_max']:.3f} "
            f"{r['a_peak_rss_mb']:7.1f}MB"
        )
    print(
        f"Q8_0 quantizer, one thread: gguf numpy {reference['gguf_numpy_melem_s']:.0f} M elem/s, "
        f"reshard torch {reference['reshard_torch_melem_s']:.0f} M elem/s"
    )
    targets = {
        "ratio<=2": all(r["ratio_geomean"] <= 2 for r in results.values()),
        "rss<=400MB": all(r["a_peak_rss_mb"] <= 400 for r in results.values()),
    }
    print("targets: " + ", ".join(f"{k} {'met' if v else 'MISSED'}" for k, v in targets.items()))
    print_json_line(
        {
            "bench": "quantize",
            "bytes": size,
            "results": results,
            "reference": reference,
            "parent_rss_mb": own_rss_mb(),
            "targets_met": targets,
        }
    )


if __name__ == "__main__":
    main()
