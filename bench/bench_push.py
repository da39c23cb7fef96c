"""Benchmark: ``reshard push`` of a ~1 GiB, 4-shard folder to a local fake Hub
(tests/hubserver.py in its own process, LFS path with HF_HUB_DISABLE_XET=1), against ``cp``
of the same files, in ABBA pairs; plus a rerun of a finished push (nothing to send).

What it shows: the client's peak RSS stays flat (files are streamed and hashed in chunks,
never held whole), the cost of a push over raw file copying, and what a no-op rerun costs
(every file is hashed again to compare with the Hub's oids).

Caveat: the fake Hub runs on the same 2 cores and hashes every upload too, so the ratio is
pessimistic for the client; over a real network the upload bandwidth dominates instead.

    flock /tmp/reshard-bench.lock python bench/bench_push.py [--pairs 6] [--dir /tmp/reshard-bench-push]

Prints a table and one JSON line. Generated files are deleted at the end.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import abba, clean, print_json_line, ratio_stats, timed  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "hf_benchToken"
TENSORS, SHAPE = 16, (4096, 4096)  # 16 x 64 MiB of F32 = 1 GiB
SERVER = (
    "import sys, time; sys.path.insert(0, {tests!r}); from hubserver import HubServer;"
    "hub = HubServer(tokens={{{token!r}: 'me'}}).__enter__(); print(hub.endpoint, flush=True);"
    "time.sleep(10**6)"
)


def make_source(folder: Path) -> None:
    """A 1 GiB safetensors file of random bytes, streamed (never held in memory)."""
    from reshard.formats.safetensors import build_header

    nbytes = SHAPE[0] * SHAPE[1] * 4
    entries = [(f"model.layers.{i}.weight", "F32", SHAPE, nbytes) for i in range(TENSORS)]
    folder.mkdir(parents=True)
    with open(folder / "model.safetensors", "wb") as f:
        f.write(build_header({"format": "pt"}, entries))
        for _ in range(TENSORS):
            # Random bytes so nothing compresses or deduplicates; NaN patterns are harmless.
            f.write(os.urandom(nbytes))
    (folder / "config.json").write_text('{"model_type": "llama"}')


class Hub:
    """The fake Hub in its own process (its CPU and memory are not the client's)."""

    def __init__(self) -> None:
        code = SERVER.format(tests=str(ROOT / "tests"), token=TOKEN)
        self.proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
        self.endpoint = self.proc.stdout.readline().strip()

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


def push_env(endpoint: str, hf_home: Path) -> dict:
    return {
        "HF_ENDPOINT": endpoint,
        "HF_HOME": str(hf_home),
        "HF_TOKEN": TOKEN,
        "HF_HUB_DISABLE_XET": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "NO_PROXY": "127.0.0.1",
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pairs", type=int, default=6)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/reshard-bench-push"))
    args = parser.parse_args()
    work = args.dir
    shutil.rmtree(work, ignore_errors=True)
    reshard = str(Path(sys.executable).parent / "reshard")
    try:
        make_source(work / "src")
        folder = work / "folder"
        subprocess.run(
            [reshard, "split", str(work / "src"), "-o", str(folder), "--max-shard", "300MB", "-q"], check=True
        )
        files = sorted(p for p in folder.iterdir() if p.is_file())
        total = sum(p.stat().st_size for p in files)
        copy_out = work / "cp-out"
        counter = iter(range(10**6))

        def run_push():
            hub = Hub()
            try:
                return timed(
                    [reshard, "push", str(folder), f"me/bench-{next(counter)}", "-q"],
                    push_env(hub.endpoint, work / "hf-home"),
                )
            finally:
                hub.close()

        def run_cp():
            clean(copy_out)
            copy_out.mkdir()
            return timed(["cp", *map(str, files), str(copy_out)])

        run_push()  # warm the page cache and write the model card once, untimed
        push_runs, cp_runs = abba(run_push, run_cp, args.pairs)
        stats = ratio_stats(push_runs, cp_runs)
        hub = Hub()
        try:
            env = push_env(hub.endpoint, work / "hf-home")
            first = timed([reshard, "push", str(folder), "me/rerun", "-q"], env)
            start = time.perf_counter()
            rerun = timed([reshard, "push", str(folder), "me/rerun", "-q"], env)
            rerun_s = time.perf_counter() - start
        finally:
            hub.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    mb = total / 1e6
    print(f"{'case':<34}{'median s':>10}{'MB/s':>9}{'peak RSS MB':>13}")
    print(
        f"{'reshard push (4 shards, LFS)':<34}{stats['a_seconds_median']:>10.2f}"
        f"{mb / stats['a_seconds_median']:>9.0f}{stats['a_peak_rss_mb']:>13.0f}"
    )
    print(
        f"{'cp of the same files':<34}{stats['b_seconds_median']:>10.2f}"
        f"{mb / stats['b_seconds_median']:>9.0f}{'':>13}"
    )
    print(f"{'rerun, nothing to upload':<34}{rerun_s:>10.2f}{'':>9}{rerun.peak_rss_mb:>13.0f}")
    print(
        f"push/cp time: geomean {stats['ratio_geomean']:.2f}x "
        f"(min {stats['ratio_min']:.2f}, max {stats['ratio_max']:.2f}, {stats['pairs']} pairs), "
        f"{mb:.0f} MB in {len(files)} files"
    )
    print_json_line(
        {
            "bench": "push",
            "bytes": total,
            "files": len(files),
            **stats,
            "rerun_seconds": rerun_s,
            "rerun_peak_rss_mb": rerun.peak_rss_mb,
            "single_push_seconds": first.seconds,
        }
    )


if __name__ == "__main__":
    main()
