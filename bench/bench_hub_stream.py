"""Benchmark: ``reshard split REPO --no-cache`` vs the cached path (snapshot_download, then
split) on a 4 GB repo served by the project's Hub server with a bandwidth cap.

The repo: the demo model's names and shapes, 8 layers, bf16, 4.0 GB in 4 safetensors
files plus index and config (``reshard.demo.make_mistral_checkpoint``), served from disk
by tests/hubserver.py in its own process, all connections together capped at ``--mbps``
MB/s (the link). The two paths run in alternation (AB, BA, ...), each from an empty
Hub cache and no output; each timed run ends with ``sync``.

Figures:

* wall time of each path, and of its download alone: for the cached path,
  ``snapshot_download`` is timed on its own; the "download time" is that figure. Target:
  ``--no-cache`` wall <= download time + 10 %. Also reported against the link time (repo
  bytes / cap), the floor no client can beat.
* peak disk use: the bytes in the Hub cache, the output and its temporary folder, sampled
  every 0.1 s (allocated blocks, so sparse shards count what is written). Target for
  ``--no-cache``: the output alone.
* peak RSS of the ``reshard`` process (``wait4``). Target: <= 200 MB.
* CPU seconds (user + system, ``wait4``) per GB of the client: the ``reshard`` process,
  and ``snapshot_download`` alone; and of the server process over each run (it shares the
  cores). On a shared machine these move much less with the load than wall times do.

    flock /tmp/reshard-bench.lock python bench/bench_hub_stream.py [--pairs 2] [--mbps 100] [--layers 8] [--connections 8] [--dir /tmp/reshard-bench-stream]

Prints a table and one JSON line. Generated files are deleted at the end.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import geomean, own_rss_mb, print_json_line  # noqa: E402

from reshard.units import format_size  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
REPO = "bench/mistral-8L"
LAYERS, FILES = 8, 4
TARGETS = {"wall_over_download": 1.10, "rss_mb": 200}
SERVER = (
    "import sys, time, pathlib; sys.path.insert(0, {tests!r}); from hubserver import HubServer;"
    "hub = HubServer().__enter__(); src = pathlib.Path({src!r});"
    "hub.add_repo({repo!r}, {{p.name: p for p in src.iterdir()}}); hub.state.bandwidth = {bandwidth};"
    "print(hub.endpoint, flush=True); time.sleep(10**6)"
)
DOWNLOAD = (
    "import sys; from huggingface_hub import snapshot_download;"
    "snapshot_download(sys.argv[1], allow_patterns=['*.safetensors', '*.json'])"
)


class Hub:
    """The fake Hub in its own process (its CPU and memory are not the client's)."""

    def __init__(self, source: Path, bandwidth: int) -> None:
        code = SERVER.format(tests=str(ROOT / "tests"), src=str(source), repo=REPO, bandwidth=bandwidth)
        self.proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
        self.endpoint = self.proc.stdout.readline().strip()
        if not self.endpoint:
            raise SystemExit("the Hub server did not start")

    def env(self, hf_home: Path) -> dict:
        return {
            "HF_ENDPOINT": self.endpoint,
            "HF_HOME": str(hf_home),
            "HF_HUB_DISABLE_XET": "1",
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "HF_HUB_DISABLE_PROGRESS_BARS": "1",
            "HF_HUB_OFFLINE": "0",
            "NO_PROXY": "127.0.0.1",
            "HF_TOKEN": "",
        }

    def cpu_s(self) -> float:
        """CPU seconds the server process has used so far (user + system)."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


def allocated(paths: list[Path]) -> int:
    """Bytes of disk allocated under ``paths`` (files that vanish meanwhile are skipped)."""
    total = 0
    for top in paths:
        for root, _dirs, files in os.walk(top):
            for name in files:
                try:
                    total += os.lstat(os.path.join(root, name)).st_blocks * 512
                except OSError:
                    pass
    return total


class DiskSampler:
    """The peak of ``allocated(paths)``, sampled every 0.1 s in a thread."""

    def __init__(self, paths: list[Path]) -> None:
        self.paths, self.peak, self._stop = paths, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            self.peak = max(self.peak, allocated(self.paths))

    def __enter__(self) -> DiskSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, allocated(self.paths))


def run(cmd: list[str], env: dict) -> tuple[float, float, float]:
    """Wall seconds, peak RSS (MB) and CPU seconds (user + system) of ``cmd``; exits on
    failure."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env={**os.environ, **env}, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"benchmark command failed: {' '.join(cmd)}")
    return time.perf_counter() - start, usage.ru_maxrss / 1024, usage.ru_utime + usage.ru_stime


def fresh(work: Path) -> tuple[Path, Path]:
    for name in ("hf", "out", ".out.reshard-tmp"):
        shutil.rmtree(work / name, ignore_errors=True)
    os.sync()
    return work / "hf", work / "out"


def streamed(hub: Hub, work: Path, connections: int) -> dict:
    hf, out = fresh(work)
    cmd = [
        sys.executable,
        "-m",
        "reshard.cli",
        "split",
        REPO,
        "--no-cache",
        "--connections",
        str(connections),
        "-o",
        str(out),
        "--max-shard",
        "2GB",
        "-q",
    ]
    with DiskSampler([hf, out, work / ".out.reshard-tmp"]) as disk:
        start, server = time.perf_counter(), hub.cpu_s()
        _, rss, cpu = run(cmd, hub.env(hf))
        subprocess.run(["sync", "-f", str(work)], check=True)  # writeback counts
        wall = time.perf_counter() - start
    return {
        "wall_s": wall,
        "rss_mb": rss,
        "cpu_s": cpu,
        "server_cpu_s": hub.cpu_s() - server,
        "peak_disk": disk.peak,
        "output": allocated([out]),
    }


def cached(hub: Hub, work: Path) -> dict:
    hf, out = fresh(work)
    split = [sys.executable, "-m", "reshard.cli", "split", REPO, "-o", str(out), "--max-shard", "2GB", "-q"]
    with DiskSampler([hf, out, work / ".out.reshard-tmp"]) as disk:
        start, server = time.perf_counter(), hub.cpu_s()
        download_s, _, download_cpu = run([sys.executable, "-c", DOWNLOAD, REPO], hub.env(hf))  # alone
        server_download = hub.cpu_s() - server
        _, rss, split_cpu = run(split, hub.env(hf))
        subprocess.run(["sync", "-f", str(work)], check=True)
        wall = time.perf_counter() - start
    return {
        "wall_s": wall,
        "download_s": download_s,
        "download_cpu_s": download_cpu,
        "server_download_cpu_s": server_download,
        "split_cpu_s": split_cpu,
        "rss_mb": rss,
        "peak_disk": disk.peak,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=2)
    parser.add_argument("--mbps", type=float, default=100.0, help="bandwidth cap in MB/s (10^6 bytes)")
    parser.add_argument("--layers", type=int, default=LAYERS, help="decoder layers of the repo (8: 4.0 GB)")
    parser.add_argument("--connections", type=int, default=8, help="--connections of the streamed run")
    parser.add_argument("--dir", type=Path, default=Path("/tmp/reshard-bench-stream"))
    args = parser.parse_args()
    from reshard.demo import make_mistral_checkpoint

    root = args.dir
    shutil.rmtree(root, ignore_errors=True)
    source, work = root / "repo", root / "work"
    work.mkdir(parents=True)
    make_mistral_checkpoint(source, layers=args.layers, files=FILES)
    repo_bytes = sum(p.stat().st_size for p in source.glob("*.safetensors"))
    hub = Hub(source, int(args.mbps * 10**6))
    runs: dict[str, list[dict]] = {"no_cache": [], "cached": []}
    try:
        for pair in range(args.pairs):
            order = ("no_cache", "cached") if pair % 2 == 0 else ("cached", "no_cache")
            for side in order:
                result = streamed(hub, work, args.connections) if side == "no_cache" else cached(hub, work)
                runs[side].append(result)
                print(f"pair {pair + 1} {side}: {result['wall_s']:.1f}s", file=sys.stderr, flush=True)
    finally:
        hub.close()
        shutil.rmtree(root, ignore_errors=True)
    report(runs, repo_bytes, args)


def report(runs: dict[str, list[dict]], repo_bytes: int, args) -> None:
    ratios = [s["wall_s"] / c["download_s"] for s, c in zip(runs["no_cache"], runs["cached"])]
    link_s = repo_bytes / (args.mbps * 10**6)  # the cap's floor: the bytes at full speed
    over_link = [s["wall_s"] / link_s for s in runs["no_cache"]]
    vs_cached = [s["wall_s"] / c["wall_s"] for s, c in zip(runs["no_cache"], runs["cached"])]
    stream_disk = max(r["peak_disk"] for r in runs["no_cache"])
    cached_disk = max(r["peak_disk"] for r in runs["cached"])
    output = max(r["output"] for r in runs["no_cache"])
    stream_rss = max(r["rss_mb"] for r in runs["no_cache"])
    gb = repo_bytes / 1e9
    cpu = {  # CPU seconds per GB of the repo: median, min, max over the runs
        "no_cache": _spread([s["cpu_s"] / gb for s in runs["no_cache"]]),
        "download": _spread([c["download_cpu_s"] / gb for c in runs["cached"]]),
        "cached_split": _spread([c["split_cpu_s"] / gb for c in runs["cached"]]),
        "server_no_cache": _spread([s["server_cpu_s"] / gb for s in runs["no_cache"]]),
        "server_download": _spread([c["server_download_cpu_s"] / gb for c in runs["cached"]]),
    }
    rows = [
        ("repo", format_size(repo_bytes), f"{args.layers} layers, {FILES} files, cap {args.mbps:g} MB/s"),
        ("download alone (cached path)", f"{_median([c['download_s'] for c in runs['cached']]):.1f} s", ""),
        ("--no-cache wall", f"{_median([s['wall_s'] for s in runs['no_cache']]):.1f} s", ""),
        ("cached path wall", f"{_median([c['wall_s'] for c in runs['cached']]):.1f} s", "download + split"),
        (
            "--no-cache / download",
            f"{geomean(ratios):.3f}",
            f"range {min(ratios):.3f}-{max(ratios):.3f}; target <= {TARGETS['wall_over_download']}",
        ),
        (
            "--no-cache / cached path",
            f"{geomean(vs_cached):.3f}",
            f"range {min(vs_cached):.3f}-{max(vs_cached):.3f}",
        ),
        (
            "--no-cache / link time",
            f"{geomean(over_link):.3f}",
            f"range {min(over_link):.3f}-{max(over_link):.3f}; link time {link_s:.1f} s = bytes / cap",
        ),
        ("CPU s/GB --no-cache", f"{cpu['no_cache'][0]:.2f}", _range(cpu["no_cache"], "reshard process")),
        (
            "CPU s/GB download alone",
            f"{cpu['download'][0]:.2f}",
            _range(cpu["download"], "snapshot_download"),
        ),
        ("CPU s/GB cached split", f"{cpu['cached_split'][0]:.2f}", _range(cpu["cached_split"], "after it")),
        (
            "CPU s/GB server",
            f"{cpu['server_no_cache'][0]:.2f}",
            _range(
                cpu["server_no_cache"],
                f"under --no-cache; {cpu['server_download'][0]:.2f} under the download",
            ),
        ),
        ("peak disk --no-cache", format_size(stream_disk), f"output alone: {format_size(output)}"),
        ("peak disk cached path", format_size(cached_disk), "cache + output"),
        ("peak RSS --no-cache", f"{stream_rss:.0f} MB", f"target <= {TARGETS['rss_mb']} MB"),
        ("peak RSS cached split", f"{max(c['rss_mb'] for c in runs['cached']):.0f} MB", ""),
    ]
    width = max(len(r[0]) for r in rows)
    for name, value, note in rows:
        print(f"{name:<{width}}  {value:>10}  {note}")
    print_json_line(
        {
            "bench": "hub_stream",
            "repo_bytes": repo_bytes,
            "mbps": args.mbps,
            "pairs": len(ratios),
            "wall_over_download_geomean": geomean(ratios),
            "wall_over_download_min": min(ratios),
            "wall_over_download_max": max(ratios),
            "wall_over_cached_geomean": geomean(vs_cached),
            "link_s": link_s,
            "wall_over_link_geomean": geomean(over_link),
            "wall_over_link_min": min(over_link),
            "wall_over_link_max": max(over_link),
            "peak_disk_no_cache": stream_disk,
            "peak_disk_cached": cached_disk,
            "output_bytes": output,
            "peak_rss_mb_no_cache": stream_rss,
            "cpu_s_per_gb": {k: {"median": v[0], "min": v[1], "max": v[2]} for k, v in cpu.items()},
            "layers": args.layers,
            "connections": args.connections,
            "parent_rss_mb": own_rss_mb(),
            "targets": TARGETS,
            "ok": geomean(ratios) <= TARGETS["wall_over_download"]
            and stream_rss <= TARGETS["rss_mb"]
            and stream_disk <= output * 1.01 + 16 * 1024 * 1024,
            "runs": runs,
        }
    )


def _median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def _spread(values: list[float]) -> tuple[float, float, float]:
    return _median(values), min(values), max(values)


def _range(spread: tuple[float, float, float], note: str) -> str:
    return f"range {spread[1]:.2f}-{spread[2]:.2f}; {note}"


if __name__ == "__main__":
    main()
