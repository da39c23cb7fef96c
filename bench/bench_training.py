"""Benchmark: training checkpoints to HF shards, reshard against the stacks' own tools.

1. A genuine DeepSpeed ZeRO-3 checkpoint of a ~506M-parameter Llama (2 ranks, bf16, one
   AdamW step: ~6.1 GB, fp32 master weights 2.0 GB), written by
   tests/training_scripts/make_zero.py under torchrun on CPU. ``reshard split CKPT -o OUT
   --max-shard 5GB`` against DeepSpeed's ``zero_to_fp32.py CKPT OUT --safe_serialization
   --max_shard_size 5GB`` (lazy mode, its default since 0.16).
2. A genuine FSDP2 DCP checkpoint of the same model (``{"model", "optim"}``, ~6.1 GB) by
   tests/training_scripts/make_fsdp.py. reshard against torch's ``dcp_to_torch_save``
   followed by ``huggingface_hub.save_torch_state_dict`` (the documented way to HF shards).
3. reshard alone on a ZeRO-3 checkpoint of about twice the model (~978M parameters):
   peak RSS must not grow with the model. It is saved before any optimizer step (its
   files hold the fp32 master weights, no Adam moments): training it needs more memory
   than these machines have, and the moments are never read anyway.

The models do not tie their embeddings: zero_to_fp32.py --safe_serialization fails on
tied ones ("Some tensors share memory"); reshard handles both.

Each pair runs in alternation (ABBA, FORMATS.md's method). Before every run the outputs
are removed and the checkpoint's pages are dropped from the page cache (``sync`` then
``posix_fadvise(DONTNEED)``), so each tool reads from disk and ``bytes read`` (the
child's ``ru_inblock`` from ``wait4``) is what it really read. Wall time includes a final
``sync``. Targets (issue 10): reshard's peak RSS <= 200 MB and the same for the doubled
model; time <= 0.6x zero_to_fp32; bytes read close to the weight bytes.

    flock /tmp/reshard-bench.lock python bench/bench_training.py [--pairs 3] [--dir DIR] [--keep]

Generating the checkpoints takes several minutes and ~25 GB of disk (kept with --keep for
a rerun). Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import own_rss_mb, print_json_line  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = REPO / "tests" / "training_scripts"
TARGETS = {
    "rss_mb": 200,
    "ratio_vs_zero_to_fp32": 0.6,
    "bytes_read_vs_weights": 1.1,
    "rss_growth_when_doubled": 1.1,
}


@dataclass
class Run:
    seconds: float
    peak_rss_mb: float
    bytes_read: int


def generator_env() -> dict[str, str]:
    return {
        **os.environ,
        "DS_ACCELERATOR": "cpu",
        "OMP_NUM_THREADS": "2",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_VERBOSITY": "error",
        "PYTHONWARNINGS": "ignore",
    }


def generate(folder: Path, script: str, *args: str) -> None:
    """Run a fixture generator under torchrun (2 ranks) unless ``folder`` is complete."""
    if (folder / "complete").exists():
        return
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    start = time.perf_counter()
    with open(folder / "generate.log", "w") as log:
        code = subprocess.call(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                "--nproc-per-node=2",
                str(SCRIPTS / script),
                str(folder),
                *args,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=generator_env(),
        )
    if code != 0:
        raise SystemExit(f"generator {script} failed; see {folder / 'generate.log'}")
    (folder / "complete").write_text(f"{time.perf_counter() - start:.0f} s\n")


def tree_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file()]


def drop_from_page_cache(folder: Path) -> None:
    """Make the next reader of ``folder`` read from disk (clean pages only: sync first)."""
    os.sync()
    for path in tree_files(folder):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def timed(cmd: list[str], source: Path, out: Path) -> Run:
    """One cold run of ``cmd``: output removed, source evicted; wall time with the final
    sync; peak RSS and bytes read of exactly that child (``wait4``)."""
    if out.exists():
        shutil.rmtree(out)
    drop_from_page_cache(source)
    start = time.perf_counter()
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONWARNINGS": "ignore", "DS_ACCELERATOR": "cpu"},
    )
    _, status, usage = os.wait4(proc.pid, 0)
    stderr = proc.stderr.read().decode(errors="replace")
    proc.stderr.close()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"benchmark command failed: {' '.join(cmd)}\n{stderr[-2000:]}")
    os.sync()
    run = Run(time.perf_counter() - start, usage.ru_maxrss / 1024, usage.ru_inblock * 512)
    print(
        f"  {Path(cmd[1]).name if cmd[1] != '-m' else cmd[2]} {'dcp' if '-c' in cmd else ''} "
        f"{source.name}: {run.seconds:.1f} s, {run.peak_rss_mb:.0f} MB, read {run.bytes_read / 1e9:.2f} GB",
        file=sys.stderr,
        flush=True,
    )
    return run


def reshard_cmd(source: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "reshard", "split", str(source), "-o", str(out), "--max-shard", "5GB", "-q"]


def zero_to_fp32_cmd(source: Path, out: Path) -> list[str]:
    return [
        sys.executable,
        str(source / "zero_to_fp32.py"),
        str(source),
        str(out),
        "--safe_serialization",
        "--max_shard_size",
        "5GB",
    ]


DCP_TO_HF = """
import sys, torch
from pathlib import Path
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
from huggingface_hub import save_torch_state_dict
source, out = Path(sys.argv[1]), Path(sys.argv[2])
out.mkdir(parents=True)
dcp_to_torch_save(str(source), str(out / "full.pt"))
state = torch.load(out / "full.pt", mmap=True, weights_only=True)["model"]
save_torch_state_dict(state, str(out), max_shard_size="5GB")
(out / "full.pt").unlink()
"""


def dcp_cmd(source: Path, out: Path) -> list[str]:
    return [sys.executable, "-c", DCP_TO_HF, str(source), str(out)]


def abba(a, b, pairs: int) -> tuple[list[Run], list[Run]]:
    a_runs, b_runs = [], []
    for i in range(pairs):
        for which in "ab" if i % 2 == 0 else "ba":
            (a_runs if which == "a" else b_runs).append(a() if which == "a" else b())
    return a_runs, b_runs


def summary(a_runs: list[Run], b_runs: list[Run]) -> dict:
    ratios = [a.seconds / b.seconds for a, b in zip(a_runs, b_runs)]
    median = lambda runs, f: sorted(f(r) for r in runs)[len(runs) // 2]  # noqa: E731
    return {
        "ratio_geomean": math.exp(sum(map(math.log, ratios)) / len(ratios)),
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
        "pairs": len(ratios),
        "reshard_seconds_median": median(a_runs, lambda r: r.seconds),
        "peer_seconds_median": median(b_runs, lambda r: r.seconds),
        "reshard_peak_rss_mb": max(r.peak_rss_mb for r in a_runs),
        "peer_peak_rss_mb": max(r.peak_rss_mb for r in b_runs),
        "reshard_bytes_read": max(r.bytes_read for r in a_runs),
        "peer_bytes_read": max(r.bytes_read for r in b_runs),
    }


def weight_bytes(source: Path) -> tuple[int, int, int]:
    """(weight bytes, optimizer bytes, checkpoint bytes) as reshard reports them."""
    import json

    proc = subprocess.run(
        [sys.executable, "-m", "reshard", "inspect", str(source), "--json"],
        capture_output=True,
        text=True,
        check=True,
    )
    info = json.loads(proc.stdout)
    total = sum(p.stat().st_size for p in tree_files(source))
    return info["total_size"], info["skipped"].get("optimizer state", {}).get("size", 0), total


def verify(out: Path, source: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "reshard", "verify", str(out), "--against", str(source)],
        check=True,
        stdout=subprocess.DEVNULL,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/reshard-bench-training"))
    parser.add_argument("--keep", action="store_true", help="keep the generated checkpoints")
    parser.add_argument("--skip-double", action="store_true", help="skip the 2x model (RSS check)")
    parser.add_argument(
        "--dcp-pairs",
        type=int,
        default=None,
        help="pairs for the DCP case (default --pairs; its peer takes minutes a run)",
    )
    args = parser.parse_args()
    root = args.dir
    root.mkdir(parents=True, exist_ok=True)
    zero = root / "zero3"
    dcp = root / "dcp"
    double = root / "zero3-2x"
    generate(zero, "make_zero.py", "--stages", "3", "--size", "bench", "--steps", "1", "--no-reference")
    generate(dcp, "make_fsdp.py", "--size", "bench", "--steps", "1", "--only", "fsdp2", "--no-reference")
    zero_ckpt, dcp_ckpt = zero / "zero3" / "checkpoint-1", dcp / "fsdp2"
    shutil.copy(dcp / "config.json", dcp_ckpt.parent / "config.json") if not (
        dcp_ckpt.parent / "config.json"
    ).exists() else None
    out_a, out_b = root / "out-reshard", root / "out-peer"
    results: dict = {"parent_rss_mb": own_rss_mb(), "targets": TARGETS}
    cases = (
        ("zero3", zero_ckpt, zero_to_fp32_cmd, args.pairs),
        ("dcp", dcp_ckpt, dcp_cmd, args.dcp_pairs or args.pairs),
    )
    for label, source, peer, pairs in cases:
        weights, optimizer, total = weight_bytes(source)
        a_runs, b_runs = abba(
            lambda: timed(reshard_cmd(source, out_a), source, out_a),
            lambda: timed(peer(source, out_b), source, out_b),
            pairs,
        )
        verify(out_a, source)
        results[label] = {
            **summary(a_runs, b_runs),
            "weight_bytes": weights,
            "optimizer_bytes": optimizer,
            "checkpoint_bytes": total,
        }
        shutil.rmtree(out_a, ignore_errors=True)
        shutil.rmtree(out_b, ignore_errors=True)
    if not args.skip_double:
        generate(
            double, "make_zero.py", "--stages", "3", "--size", "bench2x", "--steps", "0", "--no-reference"
        )
        source = double / "zero3" / "checkpoint-0"
        runs = [timed(reshard_cmd(source, out_a), source, out_a) for _ in range(2)]
        verify(out_a, source)
        shutil.rmtree(out_a, ignore_errors=True)
        weights, _, total = weight_bytes(source)
        results["zero3_2x"] = {
            "reshard_peak_rss_mb": max(r.peak_rss_mb for r in runs),
            "reshard_seconds_median": sorted(r.seconds for r in runs)[0],
            "reshard_bytes_read": max(r.bytes_read for r in runs),
            "weight_bytes": weights,
            "checkpoint_bytes": total,
        }
    if not args.keep:
        for folder in (zero, dcp, double):
            shutil.rmtree(folder, ignore_errors=True)
    report(results)


def report(results: dict) -> None:
    gb = 1e9
    print(f"{'case':<8} {'tool':<28} {'time s':>8} {'peak RSS MB':>12} {'read GB':>8} {'weights GB':>10}")
    for label, peer in (("zero3", "zero_to_fp32.py (lazy)"), ("dcp", "dcp_to_torch_save + save")):
        r = results[label]
        print(
            f"{label:<8} {'reshard split':<28} {r['reshard_seconds_median']:>8.1f} "
            f"{r['reshard_peak_rss_mb']:>12.0f} {r['reshard_bytes_read'] / gb:>8.2f} {r['weight_bytes'] / gb:>10.2f}"
        )
        print(
            f"{'':<8} {peer:<28} {r['peer_seconds_median']:>8.1f} {r['peer_peak_rss_mb']:>12.0f} "
            f"{r['peer_bytes_read'] / gb:>8.2f}"
        )
        print(
            f"{'':<8} time ratio reshard/peer: {r['ratio_geomean']:.2f} "
            f"(range {r['ratio_min']:.2f}-{r['ratio_max']:.2f}, {r['pairs']} pairs); "
            f"checkpoint {r['checkpoint_bytes'] / gb:.2f} GB, optimizer state {r['optimizer_bytes'] / gb:.2f} GB"
        )
    if "zero3_2x" in results:
        r = results["zero3_2x"]
        print(
            f"{'zero3 2x':<8} {'reshard split':<28} {r['reshard_seconds_median']:>8.1f} "
            f"{r['reshard_peak_rss_mb']:>12.0f} {r['reshard_bytes_read'] / gb:>8.2f} {r['weight_bytes'] / gb:>10.2f}"
        )
    print(f"(bench script's own RSS, the floor of the peak figures: {results['parent_rss_mb']:.0f} MB)")
    print_json_line({"bench": "training", **results})


if __name__ == "__main__":
    main()
