"""The copy-strategy chain (reshard.transfer.ranges) on real XFS, btrfs, ext4, tmpfs and
overlay filesystems: every strategy moves the right bytes, block sharing happens exactly on the block-aligned
middle of congruent ranges, the counters say what happened, and a failing strategy falls
back to the next one."""

from __future__ import annotations

import errno
import os
import random
import subprocess
from pathlib import Path

import pytest
from loopfs import mounted_all, require_loop_mounts, used_bytes

from reshard.errors import FormatError
from reshard.transfer.ranges import (
    LOCAL_FILESYSTEMS,
    STRATEGIES,
    CopyChain,
    CopyStats,
    copy_range,
    filesystem_type,
    shared_bytes,
    write_all,
)

pytestmark = pytest.mark.xdist_group("loopfs")  # one worker mounts at a time

MiB = 1024 * 1024
SOURCE_BYTES = 24 * MiB + 1234  # not a whole number of blocks: the last block is partial


@pytest.fixture(scope="module")
def fs(tmp_path_factory) -> dict[str, Path]:
    require_loop_mounts()
    with mounted_all(
        tmp_path_factory.mktemp("copychain"), {"xfs": "512M", "btrfs": "512M", "ext4": "512M"}
    ) as points:
        data = random.Random(7).randbytes(SOURCE_BYTES)
        for point in points.values():
            (point / "source.bin").write_bytes(data)
        yield points


@pytest.fixture(scope="module")
def source_bytes() -> bytes:
    return random.Random(7).randbytes(SOURCE_BYTES)


def copy_into(chain: CopyChain, src: Path, dst: Path, ranges: list[tuple[int, int, int]]) -> CopyStats:
    """Copy (src_offset, dst_offset, length) ranges from ``src`` into a new ``dst``."""
    src_fd = os.open(src, os.O_RDONLY)
    dst_fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    total = CopyStats()
    try:
        for src_offset, dst_offset, length in ranges:
            total += chain.copy(src_fd, dst_fd, src_offset, dst_offset, length)
    finally:
        os.close(src_fd), os.close(dst_fd)
    return total


def expected_file(source: bytes, ranges: list[tuple[int, int, int]]) -> bytes:
    out = bytearray()
    for src_offset, dst_offset, length in ranges:
        if length and len(out) < dst_offset + length:
            out.extend(bytes(dst_offset + length - len(out)))
        out[dst_offset : dst_offset + length] = source[src_offset : src_offset + length]
    return bytes(out)


# A header of 1000 bytes is followed by runs like the writer's: congruent ones (the source
# offset minus the destination offset is a multiple of 4096) and one that is not.
RANGES = [
    (5000, 5000, 10 * MiB),  # congruent, unaligned head and tail
    (8, 5000 + 10 * MiB, 3000),  # shorter than a block, not congruent
    (12 * MiB + 8000, 10 * MiB + 8000, 6 * MiB),  # congruent again
    (10 * MiB, 17 * MiB, SOURCE_BYTES - 10 * MiB),  # congruent, ends at the source's end
    (777, 200 * MiB, 0),  # nothing
]
HEADER = (0, 1000)


@pytest.mark.parametrize("kind", ["xfs", "btrfs", "ext4"])
@pytest.mark.parametrize(
    "strategies",
    [STRATEGIES, ("clone", "kernel", "buffer"), ("splice", "buffer"), ("kernel", "buffer"), ("buffer",)],
)
def test_every_strategy_writes_the_source_bytes(fs, source_bytes, kind, strategies):
    chain = CopyChain(strategies)
    stats = copy_into(chain, fs[kind] / "source.bin", fs[kind] / "out.bin", RANGES)
    assert (fs[kind] / "out.bin").read_bytes() == expected_file(source_bytes, RANGES)
    moved = sum(length for _, _, length in RANGES)
    assert stats.total == moved and chain.stats == stats
    # per range: the block-aligned middle of a congruent one is shared where the
    # filesystem can; a range that is not page-congruent goes by splice (these are local
    # filesystems); the rest by copy_file_range, else the buffer
    want = dict.fromkeys(STRATEGIES, 0)
    for src_offset, dst_offset, length in RANGES:
        shared = (
            aligned_middle(src_offset, dst_offset, length) if "clone" in strategies and kind != "ext4" else 0
        )
        congruent = (src_offset - dst_offset) % 4096 == 0
        copier = "splice" if not congruent and "splice" in strategies else "kernel"
        copier = copier if copier in strategies else "buffer"
        want["clone"] += shared
        want[copier] += length - shared
    assert chain.moved == want
    assert want["splice"] == (3000 if "splice" in strategies else 0)  # the one range not congruent
    assert stats == CopyStats(
        shared=want["clone"], kernel=want["splice"] + want["kernel"], buffered=want["buffer"]
    )
    if "clone" in strategies and kind != "ext4":
        assert want["clone"] > 0.95 * moved


@pytest.mark.parametrize("kind", ["xfs", "btrfs", "ext4", "tmpfs"])
def test_local_filesystems_are_known_by_their_type(fs, kind, tmp_path):
    """fstatfs's f_type says which filesystems splice through reshard's pipe."""
    folder = Path("/dev/shm") if kind == "tmpfs" else fs[kind]
    fd = os.open(folder, os.O_RDONLY)
    try:
        magic = filesystem_type(fd)
    finally:
        os.close(fd)
    assert magic == {"xfs": 0x58465342, "btrfs": 0x9123683E, "ext4": 0xEF53, "tmpfs": 0x01021994}[kind]
    assert magic in LOCAL_FILESYSTEMS


def test_splice_moves_unaligned_ranges_to_tmpfs_and_across_filesystems(fs, source_bytes):
    """ext4 -> tmpfs: another filesystem, where copy_file_range fails with EXDEV and the
    chain used to fall back to the buffer; the pipe copies ranges that are not
    page-congruent in the kernel, longer than the pipe and shorter than a page."""
    ranges = [(64, 0, 3 * MiB + 5), (9, 3 * MiB + 5, 100), (4096 * 7 + 1, 3 * MiB + 105, 2 * MiB)]
    assert all((s - d) % 4096 for s, d, _ in ranges)
    dst = Path("/dev/shm") / f"reshard-splice-{os.getpid()}.bin"
    chain = CopyChain()
    try:
        stats = copy_into(chain, fs["ext4"] / "source.bin", dst, ranges)
        assert dst.read_bytes() == expected_file(source_bytes, ranges)
    finally:
        dst.unlink(missing_ok=True)
    moved = sum(n for _, _, n in ranges)
    assert stats == CopyStats(kernel=moved) and chain.moved["splice"] == moved


@pytest.fixture
def overlay(tmp_path):
    """An overlay filesystem (as in containers): not one of the local kinds the splice
    step knows, so copies go by copy_file_range as for NFS or Lustre."""
    layers = {name: tmp_path / name for name in ("lower", "upper", "work", "merged")}
    for folder in layers.values():
        folder.mkdir()
    options = f"lowerdir={layers['lower']},upperdir={layers['upper']},workdir={layers['work']}"
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o", options, str(layers["merged"])], check=True)
    try:
        yield layers["merged"]
    finally:
        subprocess.run(["umount", str(layers["merged"])], check=True)


def test_other_filesystems_keep_copy_file_range(fs, source_bytes, overlay):
    src = overlay / "source.bin"
    src.write_bytes(source_bytes)
    fd = os.open(overlay, os.O_RDONLY)
    magic = filesystem_type(fd)
    os.close(fd)
    assert magic == 0x794C7630 and magic not in LOCAL_FILESYSTEMS
    chain = CopyChain()
    stats = copy_into(chain, src, overlay / "out.bin", RANGES)
    assert (overlay / "out.bin").read_bytes() == expected_file(source_bytes, RANGES)
    moved = sum(n for _, _, n in RANGES)
    assert stats.total == moved and chain.moved["splice"] == 0
    assert chain.moved["kernel"] + chain.moved["buffer"] == moved


def aligned_middle(src_offset: int, dst_offset: int, length: int, block: int = 4096) -> int:
    if (src_offset - dst_offset) % block:
        return 0
    head = -dst_offset % block
    return max(0, (length - head) // block * block)


@pytest.mark.parametrize("kind", ["xfs", "btrfs"])
def test_shared_blocks_take_no_new_disk_and_stay_independent(fs, source_bytes, kind):
    """df grows by less than 256 KiB for 24 MiB shared; writing to the copy does not touch the
    source, and the copy outlives the source (it is an ordinary file)."""
    point = fs[kind]
    src = point / "shared-source.bin"
    src.write_bytes(source_bytes)
    before = used_bytes(point)
    stats = copy_into(CopyChain(), src, point / "copy.bin", [(0, 0, SOURCE_BYTES)])
    grew = used_bytes(point) - before
    assert stats.shared == SOURCE_BYTES // 4096 * 4096 and stats.written == SOURCE_BYTES % 4096
    assert grew < 256 * 1024, f"{kind}: df grew by {grew} bytes for a shared copy"
    dir_fd = os.open(point, os.O_RDONLY)
    assert CopyChain().block_size(dir_fd) == 4096
    os.close(dir_fd)

    fd = os.open(point / "copy.bin", os.O_WRONLY)
    write_all(fd, b"changed", 5 * MiB)
    os.close(fd)
    assert src.read_bytes() == source_bytes  # copy-on-write: the source is untouched
    src.unlink()
    copy = (point / "copy.bin").read_bytes()
    assert copy[: 5 * MiB] == source_bytes[: 5 * MiB] and copy[5 * MiB : 5 * MiB + 7] == b"changed"
    assert copy[5 * MiB + 7 :] == source_bytes[5 * MiB + 7 :]
    (point / "copy.bin").unlink()


@pytest.mark.parametrize("kind", ["xfs", "btrfs", "ext4"])
def test_shared_bytes_are_measured_from_the_filesystem(fs, kind):
    """FIEMAP agrees with the counters: what the chain shared maps to the source's disk
    blocks; a write to the copy unshares exactly its block; other offsets share nothing."""
    src, dst = fs[kind] / "source.bin", fs[kind] / "measured.bin"
    length = SOURCE_BYTES - 5000
    stats = copy_into(CopyChain(), src, dst, [(5000, 5000, length)])
    src_fd, dst_fd = os.open(src, os.O_RDONLY), os.open(dst, os.O_RDWR)
    try:
        measured = shared_bytes(src_fd, 5000, dst_fd, 5000, length)
        # The range ends at the source's end, and copy_file_range may share that partial
        # last block too (the kernel may clone up to EOF); the counters call it copied.
        assert stats.shared <= measured <= stats.shared + SOURCE_BYTES % 4096
        assert (stats.shared > 0) == (kind != "ext4")
        if stats.shared:
            os.pwrite(dst_fd, b"x", 3 * MiB + 17)
            assert shared_bytes(src_fd, 5000, dst_fd, 5000, length) == measured - 4096
        assert shared_bytes(src_fd, 5000, dst_fd, 5000 + 4096, length - 4096) == 0
        other_fd = os.open(fs["ext4" if kind != "ext4" else "xfs"] / "source.bin", os.O_RDONLY)
        assert shared_bytes(other_fd, 5000, dst_fd, 5000, length) == 0  # another filesystem
        os.close(other_fd)
    finally:
        os.close(src_fd), os.close(dst_fd)
    dst.unlink()


def test_ext4_is_asked_to_share_once_then_copied_as_before(fs, source_bytes):
    """ext4 answers FICLONERANGE with EOPNOTSUPP: the chain remembers that for the pair of
    filesystems and copies every later range in the kernel (by splice), as before."""
    chain = CopyChain()
    src, dst = fs["ext4"] / "source.bin", fs["ext4"] / "out.bin"
    copy_into(chain, src, dst, [(5000, 5000, 8 * MiB)])
    dev = os.stat(fs["ext4"]).st_dev
    assert ("clone", dev, dev) in chain.unusable
    assert copy_into(chain, src, dst, RANGES) == CopyStats(kernel=sum(n for _, _, n in RANGES))


def test_across_filesystems_the_kernel_step_falls_back_to_the_buffer(fs, source_bytes):
    """XFS -> btrfs without the splice step: FICLONERANGE and copy_file_range both fail
    with EXDEV (different filesystems); the bytes go through the buffer, and the chain
    remembers both failures. With it (the default), the pipe copies the range that is not
    page-congruent in the kernel."""
    chain = CopyChain(("clone", "kernel", "buffer"))
    dst = fs["btrfs"] / "from-xfs.bin"
    stats = copy_into(chain, fs["xfs"] / "source.bin", dst, RANGES)
    assert dst.read_bytes() == expected_file(source_bytes, RANGES)
    assert stats == CopyStats(buffered=sum(n for _, _, n in RANGES))
    pair = (os.stat(fs["xfs"]).st_dev, os.stat(fs["btrfs"]).st_dev)
    assert {("clone", *pair), ("kernel", *pair)} <= chain.unusable
    dst.unlink()

    chain = CopyChain()
    stats = copy_into(chain, fs["xfs"] / "source.bin", dst, RANGES)
    assert dst.read_bytes() == expected_file(source_bytes, RANGES)
    unaligned = sum(n for s, d, n in RANGES if (s - d) % 4096)  # congruent ones: the buffer
    assert unaligned == 3000 and chain.moved["splice"] == unaligned
    assert stats == CopyStats(kernel=unaligned, buffered=sum(n for _, _, n in RANGES) - unaligned)
    dst.unlink()


@pytest.mark.parametrize("kind", ["xfs", "ext4"])
@pytest.mark.parametrize("strategies", [STRATEGIES, ("clone", "kernel", "buffer"), ("buffer",)])
def test_a_source_that_ends_early_is_a_format_error(fs, kind, strategies):
    """A range past the source's end (a truncated file) fails on every path, naming it."""
    with pytest.raises(FormatError, match="source.bin: ended 6958 bytes early"):
        src_fd = os.open(fs[kind] / "source.bin", os.O_RDONLY)
        dst_fd = os.open(fs[kind] / "short.bin", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            end = SOURCE_BYTES // 4096 * 4096 + 4096
            CopyChain(strategies).copy(
                src_fd, dst_fd, end - 2 * MiB, end - 2 * MiB, 2 * MiB + 4096, src_name="source.bin"
            )
        finally:
            os.close(src_fd), os.close(dst_fd)


def test_copy_range_adds_to_the_callers_counter(fs, source_bytes):
    stats = CopyStats()
    src_fd = os.open(fs["xfs"] / "source.bin", os.O_RDONLY)
    dst_fd = os.open(fs["xfs"] / "ranged.bin", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        write_all(dst_fd, b"x" * 1000, 0, stats)
        first = copy_range(src_fd, dst_fd, 5000, 5000, 4 * MiB, stats=stats)
        copy_range(src_fd, dst_fd, 3, 1000, 4000, stats=stats)
    finally:
        os.close(src_fd), os.close(dst_fd)
    assert first.shared == 4 * MiB - 4096 and first.written == 4096
    assert stats == CopyStats(shared=4 * MiB - 4096, kernel=4096 + 4000, buffered=1000)
    assert stats.to_json() == {
        "shared_bytes": 4 * MiB - 4096,
        "kernel_bytes": 8096,
        "buffered_bytes": 1000,
        "written_bytes": 9096,
    }


def test_chain_refuses_strategies_it_does_not_know():
    with pytest.raises(ValueError, match="strategies"):
        CopyChain(("clone", "kernel"))  # no buffer step: a copy could fail for good
    with pytest.raises(ValueError, match="strategies"):
        CopyChain(("rsync", "buffer"))


def test_destination_errors_propagate(fs):
    """A read-only destination descriptor: not a reason to fall back, an error to report."""
    src_fd = os.open(fs["xfs"] / "source.bin", os.O_RDONLY)
    try:
        with pytest.raises(OSError) as info:
            CopyChain(("buffer",)).copy(src_fd, src_fd, 0, 0, 4096)
        assert info.value.errno == errno.EBADF
    finally:
        os.close(src_fd)
