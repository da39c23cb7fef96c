"""Benchmark: `reshard split --quantize q8_0` (GGUF) and `--quantize fp8` with
--max-shard 2GB on the Mistral-shaped bf16 checkpoint (~4.45 GB), against `cp` of the
source (ABBA pairs, see bench/common.py), plus gguf-py's numpy reference quantizer
(`gguf.quants.quantize`) on the same tensors, in this process, for the quantizer speed.

Targets (issue 12): peak RSS <= 400 MB, time <= 2x cp.

    python bench/bench_quantize.py [--pairs 3] [--layers 9] [--dir /tmp/reshard-bench-quant]
        [--workers N] [--kernel-elements 100000000] [--kernel-only]

The kernel speeds (no I/O: one thread, and two threads on alternate bands) are the
figures that survive a shared machine; ``--kernel-only`` runs just those.

Prints a table and one JSON line. Generated files are deleted at the end.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import compare_with_cp, own_rss_mb, print_json_line  # noqa: E402

from reshard.demo import make_mistral_checkpoint  # noqa: E402
from reshard.transfer.cast import default_workers  # noqa: E402
from reshard.units import format_size  # noqa: E402


def _bands(tensors: list, rows_for) -> list:
    """Every tensor cut into the bands split quantizes (``rows_for(cols)`` rows each)."""
    bands = []
    for t in tensors:
        step = rows_for(t.shape[1])
        bands.extend(t[r : r + step] for r in range(0, t.shape[0], step))
    return bands


def _kernel_seconds(kernel, bands: list, threads: int) -> tuple[float, float]:
    """Wall seconds and CPU seconds (all threads) for ``threads`` threads (torch
    single-threaded in each, one Workspace each, as split's compute threads) to run
    ``kernel(band, ws)`` over every band. On a shared machine the wall time shows the
    cores this run got; the CPU time what the work costs."""
    import threading

    import torch

    from reshard.quant.ggml import Workspace

    shares = [bands[k::threads] for k in range(threads)]
    ready = threading.Barrier(threads + 1)
    cpu: list[float] = []

    def run(share: list) -> None:
        torch.set_num_threads(1)
        ws = Workspace()
        kernel(share[0], ws)  # scratch allocated before the clock starts
        ready.wait()
        start = time.thread_time()
        for band in share:
            kernel(band, ws)
        cpu.append(time.thread_time() - start)

    workers = [threading.Thread(target=run, args=(share,)) for share in shares]
    for w in workers:
        w.start()
    ready.wait()
    start = time.perf_counter()
    for w in workers:
        w.join()
    return time.perf_counter() - start, sum(cpu)


def reference_quantizer_rate(src: Path, limit_elements: int) -> dict:
    """Kernel speed on the first 2-D tensors of the source (about ``limit_elements``),
    in millions of elements per second: gguf-py's numpy ``gguf.quants.quantize(Q8_0)`` on
    whole float32 tensors (as gguf-py's converter calls it, one thread), and reshard's
    torch Q8_0 and FP8 kernels as split runs them: on the stored bf16 bands (1 MiB of
    float32, reused scratch), one thread, and two threads on alternate bands (the
    scaling). No I/O in any of them; the Q8_0 bytes are checked equal to gguf-py's."""
    import numpy as np
    import torch
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize
    from safetensors import safe_open

    from reshard.quant import FP8_BLOCK
    from reshard.quant.fp8 import quantize_fp8_block
    from reshard.quant.ggml import quantize_q8_0
    from reshard.quant.stream import BAND_ELEMENTS

    tensors, count = [], 0
    for path in sorted(src.glob("*.safetensors")):
        with safe_open(path, "pt") as f:
            for name in f.keys():
                t = f.get_tensor(name)
                if t.dim() == 2 and count < limit_elements:
                    tensors.append(t)
                    count += t.numel()
    torch.set_num_threads(1)
    floats = [t.float() for t in tensors]
    start = time.perf_counter()
    reference = [quantize(a.numpy(), GGMLQuantizationType.Q8_0) for a in floats]
    ref_s = time.perf_counter() - start
    del floats
    q8_bands = _bands(tensors, lambda cols: max(1, BAND_ELEMENTS // cols))
    fp8_bands = _bands(tensors, lambda cols: max(1, BAND_ELEMENTS // cols // FP8_BLOCK) * FP8_BLOCK)

    def q8(band, ws):
        quantize_q8_0(band, ws)

    def fp8(band, ws):
        quantize_fp8_block(band.float(), ws=ws)  # split casts FP8 bands to float32 first

    rates = {}
    for name, kernel, bands in (("q8_0", q8, q8_bands), ("fp8", fp8, fp8_bands)):
        for threads in (1, 2):
            wall, cpu = min(_kernel_seconds(kernel, bands, threads) for _ in range(2))
            rates[f"{name}_{threads}t_melem_s"] = count / wall / 1e6
            rates[f"{name}_{threads}t_melem_per_cpu_s"] = count / cpu / 1e6
        rates[f"{name}_scaling_2t"] = rates[f"{name}_2t_melem_s"] / rates[f"{name}_1t_melem_s"]
    same = True
    for t, want in zip(tensors, reference):
        step = max(1, BAND_ELEMENTS // t.shape[1])
        for r in range(0, t.shape[0], step):
            same = same and np.array_equal(quantize_q8_0(t[r : r + step]).numpy(), want[r : r + step])
    return {
        "elements": count,
        "gguf_numpy_melem_s": count / ref_s / 1e6,
        **rates,
        "same_bytes": bool(same),
    }


def print_kernel_rates(reference: dict) -> None:
    print(
        f"kernels on {reference['elements'] / 1e6:.0f} M elements (M elem/s): gguf numpy Q8_0 "
        f"{reference['gguf_numpy_melem_s']:.0f}; reshard Q8_0 {reference['q8_0_1t_melem_s']:.0f} "
        f"(2 threads {reference['q8_0_2t_melem_s']:.0f}, x{reference['q8_0_scaling_2t']:.2f}), "
        f"FP8 {reference['fp8_1t_melem_s']:.0f} (2 threads {reference['fp8_2t_melem_s']:.0f}, "
        f"x{reference['fp8_scaling_2t']:.2f}); same Q8_0 bytes as gguf: {reference['same_bytes']}"
    )
    print(
        f"  per CPU second: Q8_0 {reference['q8_0_1t_melem_per_cpu_s']:.0f} (1 thread), "
        f"{reference['q8_0_2t_melem_per_cpu_s']:.0f} (2 threads); FP8 "
        f"{reference['fp8_1t_melem_per_cpu_s']:.0f}, {reference['fp8_2t_melem_per_cpu_s']:.0f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--layers", type=int, default=9, help="9 layers is about 4.45 GB in bf16")
    parser.add_argument("--dir", type=Path, default=Path("/tmp/reshard-bench-quant"))
    parser.add_argument(
        "--workers", type=int, default=None, help="pass --workers N to split (default: split's default)"
    )
    parser.add_argument(
        "--kernel-elements", type=int, default=100_000_000, help="elements for the kernel speeds"
    )
    parser.add_argument("--kernel-only", action="store_true", help="only the kernel speeds (no split, no cp)")
    args = parser.parse_args()
    root = args.dir
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    src = root / "mistral"
    make_mistral_checkpoint(src, layers=args.layers, files=2)
    weights = sorted(src.glob("*.safetensors"))
    size = sum(p.stat().st_size for p in weights)
    if args.kernel_only:
        reference = reference_quantizer_rate(src, args.kernel_elements)
        shutil.rmtree(root, ignore_errors=True)
        print_kernel_rates(reference)
        print_json_line({"bench": "quantize-kernels", "reference": reference, "cpus": os.cpu_count()})
        return
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
            *(["--workers", str(args.workers)] if args.workers else []),
        ]
        results[quant] = compare_with_cp(cmd, out, weights, root / "out-cp", args.pairs)
    reference = reference_quantizer_rate(src, args.kernel_elements)
    shutil.rmtree(root, ignore_errors=True)
    workers = args.workers or default_workers()
    print(f"source {format_size(size)}, {os.cpu_count()} CPUs, split with {workers} compute threads")
    print(f"{'quant':>6} {'reshard s':>10} {'cp s':>8} {'ratio':>6} {'(min-max)':>13} {'peak RSS':>9}")
    for quant, r in results.items():
        print(
            f"{quant:>6} {r['a_seconds_median']:10.2f} {r['b_seconds_median']:8.2f} "
            f"{r['ratio_geomean']:6.3f} {r['ratio_min']:6.3f}-{r['ratio_max']:.3f} "
            f"{r['a_peak_rss_mb']:7.1f}MB"
        )
    print_kernel_rates(reference)
    targets = {
        "ratio<=2": all(r["ratio_geomean"] <= 2 for r in results.values()),
        "rss<=400MB": all(r["a_peak_rss_mb"] <= 400 for r in results.values()),
    }
    print("targets: " + ", ".join(f"{k} {'met' if v else 'MISSED'}" for k, v in targets.items()))
    print_json_line(
        {
            "bench": "quantize",
            "bytes": size,
            "cpus": os.cpu_count(),
            "compute_threads": workers,
            "load_average": os.getloadavg(),
            "results": results,
            "reference": reference,
            "parent_rss_mb": own_rss_mb(),
            "targets_met": targets,
        }
    )


if __name__ == "__main__":
    main()
