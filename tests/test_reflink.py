"""Reshard by reference (issue 16): on real XFS and btrfs, a split shares the source's
blocks instead of copying them, writes the same bytes as on ext4, and says how much it
shared.

Two checkpoints, each generated on every filesystem (the generator is deterministic):

- ``hub``: Mistral-shaped, 4 layers, 2.27 GB in two safetensors files as the Hub ships
  them, split with ``--max-shard 1GB``. One output shard takes tensors from both files.
  Every Mistral tensor size is a multiple of 4096, so inside one shard every tensor sits
  at the same offset modulo 4096, while the two source files' data start at different
  offsets modulo 4096: only one file's tensors can be block-aligned with their source
  (safetensors allows no gap to realign the others). Those bytes are copied; everything
  else must be shared.
- ``single``: 1 layer, 0.96 GB in one file, split with ``--max-shard 300MB``: every shard
  comes from one file, so new disk must stay under 1% of the model.

The ext4 result is the same split written onto an ext4 filesystem.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import tree_checksums
from loopfs import mounted, mounted_all, require_loop_mounts, used_bytes
from pausing import pausing_command, wait_stopped
from training_fixtures import generator_env

from reshard.demo import make_mistral_checkpoint
from reshard.formats.index import read_index
from reshard.formats.safetensors import read_header

pytestmark = pytest.mark.xdist_group("loopfs")  # one worker mounts at a time

CASES = {
    # 2 files: greedy packing's 3 shards must mix them (each file needs 2 shards alone).
    "hub": {"layers": 4, "files": 2, "max_shard": "1GB"},
    # 2 files, 5 shards: greedy would mix them in one shard; the break moves to the file
    # boundary at no extra shard (reshard.plan), so every shard comes from one file.
    "hub-breaks": {"layers": 2, "files": 2, "max_shard": "400MB"},
    "single": {"layers": 1, "files": 1, "max_shard": "300MB"},
}
BLOCK = 4096


def split_and_count(source: Path, out: Path, max_shard: str) -> dict[str, int]:
    """Run ``reshard split --json`` (a real CLI subprocess); return what it reported of the
    disk: ``{"shared": ..., "written": ...}``."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "reshard",
            "split",
            str(source),
            "-o",
            str(out),
            "--max-shard",
            max_shard,
            "--json",
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)["disk"]


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    """Every case split on XFS, btrfs and ext4: checksums, copy counters, df growth, and
    the bytes that cannot be block-aligned with their source (from the headers)."""
    require_loop_mounts()
    out: dict = {}
    with mounted_all(
        tmp_path_factory.mktemp("reflink"), {"xfs": "7G", "btrfs": "8G", "ext4": "7G"}
    ) as points:
        for case, spec in CASES.items():
            sources = {}
            for kind in ("xfs", "btrfs"):
                sources[kind] = make_mistral_checkpoint(
                    points[kind] / f"src-{case}", layers=spec["layers"], files=spec["files"]
                )
            # The ext4 result: the same split, written onto ext4 (from the XFS copy).
            ext4_out = points["ext4"] / f"out-{case}"
            ext4_counts = split_and_count(sources["xfs"], ext4_out, spec["max_shard"])
            out[case, "ext4"] = {
                "checksums": tree_checksums(ext4_out),
                "counts": ext4_counts,
                "shard_bytes": sum(p.stat().st_size for p in ext4_out.glob("*.safetensors")),
            }
            for kind, source in sources.items():
                target = points[kind] / f"out-{case}"
                before = used_bytes(points[kind])
                counts = split_and_count(source, target, spec["max_shard"])
                out[case, kind] = {
                    "checksums": tree_checksums(target),
                    "counts": counts,
                    "df_growth": used_bytes(points[kind]) - before,
                    "model_bytes": sum(p.stat().st_size for p in source.glob("*.safetensors")),
                    "facts": layout_facts(source, target),
                }
    return out


def layout_facts(source: Path, out: Path) -> dict[str, int]:
    """From the headers alone: the output's tensor count and bytes, the bytes whose output
    offset differs from their source offset modulo the block size (no filesystem can share
    these: they must be copied), and, per output shard, the bytes not from the source file
    that gives it the most."""
    src = {t.name: t for f in source.glob("*.safetensors") for t in read_header(f).tensors}
    files = sorted(set(read_index(out / "model.safetensors.index.json").values()))
    facts = {"tensors": 0, "tensor_bytes": 0, "unalignable": 0, "minority_bytes": 0}
    facts["shard_bytes"] = sum((out / f).stat().st_size for f in files)
    for f in files:
        per_source: dict[Path, int] = {}
        for t in read_header(out / f).tensors:
            facts["tensors"] += 1
            facts["tensor_bytes"] += t.nbytes
            if (t.offset - src[t.name].offset) % BLOCK:
                facts["unalignable"] += t.nbytes
            per_source[src[t.name].file] = per_source.get(src[t.name].file, 0) + t.nbytes
        facts["minority_bytes"] += sum(per_source.values()) - max(per_source.values())
    return facts


@pytest.mark.parametrize("kind", ["xfs", "btrfs"])
@pytest.mark.parametrize("case", list(CASES))
def test_output_is_byte_identical_to_ext4(results, case, kind):
    assert results[case, kind]["checksums"] == results[case, "ext4"]["checksums"]


@pytest.mark.parametrize("kind", ["xfs", "btrfs"])
@pytest.mark.parametrize("case", list(CASES))
def test_every_alignable_block_is_shared_and_counted(results, case, kind):
    """``--json``'s shared + written is every shard byte; written is the headers plus the
    unalignable bytes plus at most a head and a tail block per tensor; df grows by the
    unalignable bytes plus < 1%."""
    r = results[case, kind]
    counts, facts = r["counts"], r["facts"]
    assert counts["shared"] + counts["written"] == facts["shard_bytes"]
    headers = facts["shard_bytes"] - facts["tensor_bytes"]
    assert counts["written"] <= headers + facts["unalignable"] + 2 * BLOCK * facts["tensors"]
    assert r["df_growth"] <= facts["unalignable"] + 0.01 * r["model_bytes"], (
        f"{kind}: df grew {r['df_growth']} bytes, {facts['unalignable']} of them unalignable"
    )


@pytest.mark.parametrize("kind", ["xfs", "btrfs"])
@pytest.mark.parametrize("case", ["single", "hub-breaks"])
def test_shards_drawn_from_one_file_each_take_under_one_percent_new_disk(results, case, kind):
    r = results[case, kind]
    assert r["facts"]["minority_bytes"] == 0
    assert r["facts"]["unalignable"] == 0
    assert r["counts"]["shared"] > 0.99 * r["model_bytes"]
    assert r["df_growth"] < 0.01 * r["model_bytes"], f"{kind}: df grew {r['df_growth']} bytes"


@pytest.mark.parametrize("case", list(CASES))
def test_ext4_shares_nothing_and_reports_every_byte_written(results, case):
    r = results[case, "ext4"]
    assert r["counts"] == {"shared": 0, "written": r["shard_bytes"]}


def test_the_hub_layout_copies_only_the_smaller_part_of_a_straddling_shard(results):
    """The physical limit, measured: what cannot be shared is, in each shard, the bytes from
    the source file that gives it fewer (the writer aligns the data to the bigger part)."""
    facts = results["hub", "xfs"]["facts"]
    assert facts["unalignable"] == facts["minority_bytes"] > 0


# Runs the CLI in this process, then prints the bytes this process read (/proc/self/io).
RUN_AND_COUNT_READS = """
import sys
from reshard.cli import main
sys.argv = ["reshard", *sys.argv[1:]]
try:
    main()
except SystemExit as e:
    code = e.code
else:
    code = 0
rchar = next(int(l.split()[1]) for l in open("/proc/self/io") if l.startswith("rchar"))
print(f"rchar={rchar}", file=sys.stderr)
sys.exit(code)
"""


def interrupted_split(source: Path, out: Path) -> Path:
    """kill -9 a ``split --max-shard 300MB`` once every shard is written (before the
    index); return the temporary folder it leaves."""
    proc = subprocess.Popen(
        pausing_command("index", "split", str(source), "-o", str(out), "--max-shard", "300MB", "-q"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        wait_stopped(proc.pid)
    finally:
        proc.kill()
        proc.wait()
    (tmp,) = [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.reshard-tmp")]
    return tmp


def resume_reading(source: Path, out: Path) -> tuple[str, int]:
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            RUN_AND_COUNT_READS,
            "split",
            str(source),
            "-o",
            str(out),
            "--max-shard",
            "300MB",
            "--resume",
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    rchar = int(result.stderr.rsplit("rchar=", 1)[1])
    return result.stderr, rchar


def test_resume_skips_the_blocks_a_kept_shard_shares_with_its_source(tmp_path):
    """On XFS, --resume checks a kept shard's shared middle from the filesystem's extent map
    (same disk blocks, so the same bytes) and reads only the head and tail of each tensor;
    a shard whose bytes were changed after it was written (copy-on-write gives the changed
    block a new place) is still caught and rewritten, and the result is byte-identical."""
    require_loop_mounts()
    with mounted("xfs", tmp_path, "4G") as root:
        source = make_mistral_checkpoint(root / "src", layers=1, files=1)
        model_bytes = sum(p.stat().st_size for p in source.glob("*.safetensors"))
        reference = root / "reference"
        split_and_count(source, reference, "300MB")

        out = root / "out"
        interrupted_split(source, out)
        stderr, rchar = resume_reading(source, out)
        assert "kept 4 of 4 shards" in stderr
        assert rchar < 0.05 * model_bytes, f"resume read {rchar} bytes of a {model_bytes}-byte model"
        assert tree_checksums(out) == tree_checksums(reference)

        damaged = root / "damaged"
        tmp = interrupted_split(source, damaged)
        shard = tmp / "model-00002-of-00004.safetensors"
        with open(shard, "r+b") as f:
            f.seek(shard.stat().st_size // 2)
            byte = f.read(1)
            f.seek(-1, 1)
            f.write(bytes([byte[0] ^ 1]))
        stderr, _ = resume_reading(source, damaged)
        assert "kept 3 of 4 shards" in stderr
        assert tree_checksums(damaged) == tree_checksums(reference)


def test_a_zero2_checkpoint_shares_its_flat_partitions(tmp_path):
    """DeepSpeed ZeRO-2 (real, on CPU) writes each rank's fp32 parameters as one flat
    partition in its optimizer file, in order; on XFS the split of that checkpoint shares
    those blocks and equals the ext4 split. (At 50MB each of the 3 shards can come from
    one rank's file; at 40MB the natural order, lm_head from rank 1 before the embedding
    from rank 0, forces a mixed shard, and a third of the bytes are copied.)"""
    require_loop_mounts()
    with mounted("xfs", tmp_path / "x", "2G") as xfs, mounted("ext4", tmp_path / "e", "1G") as ext4:
        script = Path(__file__).resolve().parent / "training_scripts" / "make_zero.py"
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node=2",
            str(script),
        ]
        made = subprocess.run(
            [*cmd, str(xfs / "ds"), "--stages", "2", "--size", "blocks", "--steps", "1", "--no-reference"],
            capture_output=True,
            text=True,
            env=generator_env(),
            timeout=600,
        )
        assert made.returncode == 0, made.stdout[-2000:] + made.stderr[-2000:]
        checkpoint = xfs / "ds" / "zero2" / "checkpoint-1"
        reference = split_and_count(checkpoint, ext4 / "out", "50MB")
        before = used_bytes(xfs)
        counts = split_and_count(checkpoint, xfs / "out", "50MB")
        growth = used_bytes(xfs) - before
        weights = reference["written"]
        assert counts["shared"] + counts["written"] == weights
        assert counts["shared"] > 0.9 * weights, counts
        assert growth < 0.1 * weights, f"df grew {growth} bytes for {weights} bytes of shards"
        assert tree_checksums(xfs / "out") == tree_checksums(ext4 / "out")
