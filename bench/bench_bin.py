"""Benchmark: PyTorch ``.bin`` -> safetensors, and fp32 -> bf16 conversion, each against
``cp`` of the same input, with reshard's peak RSS.

1. A Mistral-shaped bf16 ``.bin`` checkpoint of 4.0 GB (8 layers) in 2 shards
   (``pytorch_model-0000i-of-00002.bin`` + index), written by a streaming torch-zip writer
   in this script (torch.save would hold each shard in memory), then
   ``reshard split SRC -o OUT`` vs ``cp`` of the two ``.bin`` files.
2. A Mistral-shaped fp32 safetensors checkpoint of >= 4 GB, then
   ``reshard split SRC -o OUT --dtype bf16`` vs ``cp`` of its shards.

Each reports the wall-time and CPU-time ratios to cp (user + system of the child).

Targets (issue 3): .bin conversion <= 1.3x cp time, peak RSS <= 400 MB;
fp32 -> bf16 <= 1.5x cp time, peak RSS <= 400 MB. (Issue 15 asks 1.2x for .bin.)

    flock /tmp/reshard-bench.lock python bench/bench_bin.py [--pairs 6] [--dir /tmp/reshard-bench-bin]
    python bench/bench_bin.py --profile     # where the .bin split's time goes (issue 15)

``--profile`` splits the .bin checkpoint three times: under ``strace -c -f`` (syscalls),
under cProfile (time per phase: parse, journal, copy, fsync, verify, publish) and under
``perf stat`` when present; it also reports how many tensor bytes keep their source offset
within a 4 KiB page (the kernel's copy is markedly cheaper for those).

Prints a table and one JSON line. Generated files are deleted at the end.
"""

from __future__ import annotations

import argparse
import collections
import io
import json
import pickle
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import clean, compare_with_cp, own_rss_mb, print_json_line, timed  # noqa: E402

from reshard.demo import (  # noqa: E402
    MISTRAL_7B_CONFIG,
    _random_pool,
    make_mistral_checkpoint,
    mistral_tensors,
)
from reshard.formats.index import index_json  # noqa: E402
from reshard.units import dtype_nbytes, format_size  # noqa: E402

TARGETS = {"bin": {"ratio": 1.3, "rss_mb": 400}, "bf16": {"ratio": 1.5, "rss_mb": 400}}


class _Storage:
    def __init__(self, key: str, numel: int) -> None:
        self.key, self.numel = key, numel


class _Tensor:
    """Pickles exactly as torch pickles a contiguous bf16 tensor, without any data."""

    def __init__(self, storage: _Storage, shape: tuple[int, ...]) -> None:
        self.storage, self.shape = storage, shape

    def __reduce__(self):
        import torch

        strides, acc = [], 1
        for n in reversed(self.shape):
            strides.append(acc)
            acc *= n
        return (
            torch._utils._rebuild_tensor_v2,
            (self.storage, 0, self.shape, tuple(reversed(strides)), False, collections.OrderedDict()),
        )


def write_torch_zip(path: Path, tensors: list[tuple[str, tuple[int, ...]]], seed: int) -> int:
    """Stream a torch.save-compatible zip of random bf16 tensors (64-byte aligned storages,
    as torch writes them); memory stays at the random pool. Returns tensor bytes."""
    import torch

    storages = [_Storage(str(i), dtype_nbytes("BF16", shape) // 2) for i, (_, shape) in enumerate(tensors)]
    state = {name: _Tensor(s, shape) for (name, shape), s in zip(tensors, storages)}
    buffer = io.BytesIO()
    pickler = pickle.Pickler(buffer, protocol=2)
    pickler.persistent_id = lambda obj: (
        ("storage", torch.BFloat16Storage, obj.key, "cpu", obj.numel) if isinstance(obj, _Storage) else None
    )
    pickler.dump(state)
    pool = _random_pool("BF16", seed)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
        archive.writestr("archive/data.pkl", buffer.getvalue())
        archive.writestr("archive/byteorder", "little")
        for s in storages:
            info = zipfile.ZipInfo(f"archive/data/{s.key}")
            start = archive.fp.tell() + 30 + len(info.filename) + 4 + 20  # + zip64 extra
            pad = -start % 64
            info.extra = b"FB" + pad.to_bytes(2, "little") + b"\0" * pad
            with archive.open(info, "w", force_zip64=True) as entry:
                left, shift = s.numel * 2, 0
                while left:
                    n = min(len(pool) - 4096, left)
                    entry.write(memoryview(pool)[shift : shift + n])
                    left -= n
                    shift = (shift + 64) % 4096
        archive.writestr("archive/version", "3\n")
    return sum(s.numel * 2 for s in storages)


def make_bin_checkpoint(folder: Path, layers: int) -> list[Path]:
    """Two ``pytorch_model-*.bin`` shards + index + config, Mistral names and shapes."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors = mistral_tensors(layers)
    half = sum(dtype_nbytes("BF16", s) for _, s in tensors) / 2
    groups, acc = [[], []], 0
    for item in tensors:
        groups[0 if acc < half else 1].append(item)
        acc += dtype_nbytes("BF16", item[1])
    weight_map, files, total = {}, [], 0
    for i, group in enumerate(groups, start=1):
        name = f"pytorch_model-{i:05d}-of-00002.bin"
        total += write_torch_zip(folder / name, group, seed=i)
        weight_map.update({n: name for n, _ in group})
        files.append(folder / name)
    (folder / "pytorch_model.bin.index.json").write_text(index_json(weight_map, total, total // 2))
    (folder / "config.json").write_text(json.dumps(dict(MISTRAL_7B_CONFIG, num_hidden_layers=layers)))
    return files


def compare(name: str, src: Path, weights: list[Path], extra: list[str], pairs: int, root: Path) -> dict:
    out_split = root / "out-split"
    reshard = [
        sys.executable,
        "-m",
        "reshard.cli",
        "split",
        str(src),
        "-o",
        str(out_split),
        "--quiet",
        *extra,
    ]
    stats = compare_with_cp(reshard, out_split, weights, root / "out-cp", pairs)
    target = TARGETS[name]
    return {
        "case": name,
        "bytes": sum(p.stat().st_size for p in weights),
        **stats,
        "target_ratio": target["ratio"],
        "target_rss_mb": target["rss_mb"],
        "ok": stats["ratio_geomean"] <= target["ratio"] and stats["a_peak_rss_mb"] <= target["rss_mb"],
    }


def small_bin_rss(root: Path, layers: int) -> float:
    """Peak RSS of one split of a smaller .bin checkpoint: equal to the big one's when
    memory does not grow with the size of a shard."""
    src, out = root / "mistral-bin-small", root / "out-small"
    subprocess.run(
        [sys.executable, __file__, "--generate-bin", str(src), "--bin-layers", str(layers)], check=True
    )
    run = timed(
        [
            sys.executable,
            "-m",
            "reshard.cli",
            "split",
            str(src),
            "-o",
            str(out),
            "--quiet",
            "--max-shard",
            "2GB",
        ]
    )
    shutil.rmtree(src), clean(out)
    return run.peak_rss_mb


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pairs", type=int, default=6)
    parser.add_argument("--bin-layers", type=int, default=8, help="8 layers: 4.0 GB of bf16")
    parser.add_argument("--f32-layers", type=int, default=4, help="4 layers: about 4.4 GB of fp32")
    parser.add_argument("--dir", type=Path, default=Path("/tmp/reshard-bench-bin"))
    parser.add_argument("--only", choices=("bin", "bf16"), help="run one case")
    parser.add_argument("--profile", action="store_true", help="profile one .bin split instead")
    parser.add_argument("--generate-bin", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.generate_bin:
        make_bin_checkpoint(args.generate_bin, args.bin_layers)
        return
    args.dir.mkdir(parents=True, exist_ok=True)
    if args.profile:
        try:
            return profile_bin(args.dir, args.bin_layers)
        finally:
            shutil.rmtree(args.dir, ignore_errors=True)
    results = []
    try:
        if args.only in (None, "bin"):
            src = args.dir / "mistral-bin"
            # Generated in a child: this process must never import torch, because a child
            # forked from a big parent reports the parent's RSS as its own peak.
            subprocess.run(
                [sys.executable, __file__, "--generate-bin", str(src), "--bin-layers", str(args.bin_layers)],
                check=True,
            )
            weights = sorted(src.glob("*.bin"))
            results.append(compare("bin", src, weights, ["--max-shard", "2GB"], args.pairs, args.dir))
            shutil.rmtree(src)
            results[-1]["peak_rss_mb_small"] = small_bin_rss(args.dir, layers=2)
        if args.only in (None, "bf16"):
            src = args.dir / "mistral-f32"
            make_mistral_checkpoint(src, layers=args.f32_layers, dtype="F32", files=2)
            weights = sorted(src.glob("*.safetensors"))
            results.append(compare("bf16", src, weights, ["--dtype", "bf16"], args.pairs, args.dir))
            shutil.rmtree(src)
    finally:
        shutil.rmtree(args.dir, ignore_errors=True)
    print(
        f"{'case':<6} {'input':>10} {'reshard s':>10} {'cp s':>8} {'wall ratio (min-max)':>22} "
        f"{'CPU ratio (min-max)':>22} {'peak RSS':>10} {'target':>16}"
    )
    for r in results:
        spread = f"{r['ratio_geomean']:.2f} ({r['ratio_min']:.2f}-{r['ratio_max']:.2f})"
        cpu = f"{r['cpu_ratio_geomean']:.2f} ({r['cpu_ratio_min']:.2f}-{r['cpu_ratio_max']:.2f})"
        target = f"<={r['target_ratio']}x, <={r['target_rss_mb']}MB"
        print(
            f"{r['case']:<6} {format_size(r['bytes']):>10} {r['a_seconds_median']:>10.2f} "
            f"{r['b_seconds_median']:>8.2f} {spread:>22} {cpu:>22} {r['a_peak_rss_mb']:>8.0f}MB "
            f"{target:>16}{'' if r['ok'] else '  MISSED'}"
        )
    for r in results:
        if "peak_rss_mb_small" in r:
            print(
                f"peak RSS of the .bin split at 1.4 GB input: {r['peak_rss_mb_small']:.0f}MB "
                f"(vs {r['a_peak_rss_mb']:.0f}MB at {format_size(r['bytes'])})"
            )
    # wait4's peak RSS is floored at this process's RSS at fork: show the floor is low.
    print_json_line({"bench": "bin", "parent_rss_mb": round(own_rss_mb(), 1), "results": results})


# Where a split's time goes, by the functions that make up its phases (cProfile's
# cumulative time; "start-up" is the rest: the interpreter, imports and the CLI).
PHASES = {
    "parse (zip + pickle)": ("registry.py", "load_checkpoint"),
    "plan": ("plan.py", "plan_shards"),
    "journal": ("journal.py", "prepare"),
    "copy": ("ranges.py", "copy_range"),
    "index, config, extras": ("pipeline.py", "_write_files"),
    "fsync": ("pipeline.py", "fsync_tree"),
    "verify (headers, names)": ("pipeline.py", "_verify_parts"),
    "publish": ("pipeline.py", "publish"),
}


def profile_bin(root: Path, layers: int) -> None:
    """Split the .bin checkpoint under strace -c, cProfile and perf stat; print each."""
    import pstats

    src, out = root / "mistral-bin", root / "out-profile"
    subprocess.run(
        [sys.executable, __file__, "--generate-bin", str(src), "--bin-layers", str(layers)], check=True
    )
    split = ["-m", "reshard.cli", "split", str(src), "-o", str(out), "--max-shard", "2GB", "--quiet"]
    report: dict = {
        "bench": "bin-profile",
        "bytes": sum(p.stat().st_size for p in src.glob("*.bin")),
        "page_congruent": page_congruent_bytes(src, "2GB"),
    }
    c = report["page_congruent"]
    print(
        f"tensor bytes at their source's offset within a 4 KiB page: {format_size(c['congruent'])} "
        f"of {format_size(c['total'])} ({100 * c['congruent'] / c['total']:.1f}%)"
    )
    clean(out)
    stats_file = root / "profile.out"
    wall = timed([sys.executable, "-m", "cProfile", "-o", str(stats_file), *split])
    clean(out)
    cumulative = {
        (Path(f).name, fn): ct for (f, _, fn), (_, _, _, ct, _) in pstats.Stats(str(stats_file)).stats.items()
    }
    phases = {name: cumulative.get(key, 0.0) for name, key in PHASES.items()}
    phases["start-up and the rest"] = wall.seconds - sum(phases.values())
    report["phases_s"] = phases
    report["wall_s"], report["cpu_s"] = wall.seconds, wall.cpu_seconds
    print(
        f"{'phase':<24} {'seconds':>8}   (one split under cProfile: {wall.seconds:.2f} s wall, "
        f"{wall.cpu_seconds:.2f} s CPU, sync included)"
    )
    for name, seconds in phases.items():
        print(f"{name:<24} {seconds:8.2f}")
    if shutil.which("strace"):
        trace = root / "strace.txt"
        timed(["strace", "-c", "-f", "-o", str(trace), sys.executable, *split])
        clean(out)
        lines = trace.read_text().splitlines()
        report["strace"] = lines[:12]
        print("\n".join(lines[:10]))
    if shutil.which("perf"):
        counters = root / "perf.txt"
        timed(
            [
                "perf",
                "stat",
                "-x,",
                "-o",
                str(counters),
                "-e",
                "task-clock,context-switches,page-faults",
                sys.executable,
                *split,
            ]
        )
        clean(out)
        report["perf_stat"] = [line for line in counters.read_text().splitlines() if line and line[0] != "#"]
        print("perf stat:", "; ".join(report["perf_stat"]))
    shutil.rmtree(src)
    print_json_line(report)


def page_congruent_bytes(src: Path, max_shard: str) -> dict[str, int]:
    """Of the plain-copy tensor bytes the split moves, how many land at the same offset
    within a 4 KiB page as in the source, with the writer's layout (data_order, shard_header)."""
    from reshard.formats.registry import load_checkpoint
    from reshard.hub.resolve import resolve_source
    from reshard.plan import plan_shards
    from reshard.units import parse_size
    from reshard.writers.safetensors import data_order, shard_header

    checkpoint = load_checkpoint(resolve_source(str(src)))
    tensors = {t.name: t for t in checkpoint.tensors}
    plan = plan_shards([(t.name, t.nbytes) for t in checkpoint.tensors], parse_size(max_shard))
    congruent = total = 0
    for shard in plan.shards:
        order = data_order(tensors[n] for n in shard.names)
        cursor = len(shard_header(order, {}))  # metadata changes the length, not the padding target
        for t in order:
            if t.is_plain_copy:
                total += t.nbytes
                congruent += t.nbytes if (t.offset - cursor) % 4096 == 0 else 0
            cursor += t.nbytes
    return {"congruent": congruent, "total": total}


if __name__ == "__main__":
    main()
