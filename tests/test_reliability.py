"""Crash safety, resume, determinism, locking and resource failures of `reshard split`,
with real subprocesses killed with SIGKILL at named points (tests/pausing.py makes the
process SIGSTOP itself there, so the kill lands deterministically).

The shared source has two files; with --max-shard 70000 the plan is three shards of four
16 KiB tensors, and shard 2 takes its tensors from both source files (two copy runs), so
``mid:`` pauses with that shard genuinely half written.
"""

from __future__ import annotations

import ctypes
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import random_tensors, tree_checksums, write_safetensors
from pausing import pausing_command

from reshard.errors import LockedError
from reshard.run.lock import lock_path_for, output_lock

SHARDS = [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
ARGS = ["--max-shard", "70000", "-q"]


def make_source(folder: Path) -> Path:
    """Two safetensors files plus index and config: 12 float32 tensors of 16 KiB."""
    folder.mkdir(parents=True)
    specs = {f"model.layers.{i}.w{j}": ((64, 64), "float32") for i in range(6) for j in range(2)}
    tensors = random_tensors(7, specs)
    files = {1: {}, 2: {}}
    for name, array in tensors.items():
        files[1 if int(name.split(".")[2]) < 3 else 2][name] = array
    weight_map = {}
    for number, part in files.items():
        file_name = f"model-0000{number}-of-00002.safetensors"
        write_safetensors(folder / file_name, part)
        weight_map.update(dict.fromkeys(part, file_name))
    index = {"metadata": {"total_size": 12 * 16384}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    (folder / "config.json").write_text(json.dumps({"model_type": "toy", "hidden_size": 64}))
    return folder


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    return make_source(tmp_path_factory.mktemp("rel") / "src")


@pytest.fixture(scope="module")
def reference(source, tmp_path_factory) -> dict[str, str]:
    """Checksums of an uninterrupted run's output."""
    out = tmp_path_factory.mktemp("rel-ref") / "out"
    done = cli("split", str(source), "-o", str(out), *ARGS)
    assert done.returncode == 0, done.stderr
    sums = tree_checksums(out)
    assert sorted(sums) == ["config.json", *SHARDS, "model.safetensors.index.json"]
    return sums


@pytest.fixture(autouse=True)
def source_untouched(source):
    """Every test leaves the shared source byte-identical (it is only ever opened read-only)."""
    before = tree_checksums(source)
    yield
    assert tree_checksums(source) == before


def env(**extra: str) -> dict:
    full = {**os.environ, "HF_HUB_DISABLE_TELEMETRY": "1", **extra}
    full.pop("RESHARD_DEBUG", None)
    full.update(extra)
    return full


def cli(*args: str, preexec_fn=None, **extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "reshard.cli", *args],
        capture_output=True,
        text=True,
        env=env(**extra),
        timeout=120,
        preexec_fn=preexec_fn,
    )


def start_paused(point: str, *args: str) -> subprocess.Popen:
    """Start `reshard <args>` and return once it has stopped itself at ``point``."""
    proc = subprocess.Popen(
        pausing_command(point, *args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env()
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"exited before {point}: {proc.communicate()}")
        if process_state(proc.pid) == "T":
            return proc
        time.sleep(0.02)
    proc.kill()
    raise AssertionError(f"never reached pause point {point}")


def process_state(pid: int) -> str:
    text = Path(f"/proc/{pid}/stat").read_text()
    return text[text.rindex(")") + 2]


def kill9(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    proc.stdout.close()
    proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL


def tmp_of(out: Path) -> Path:
    return out.parent / f".{out.name}.reshard-tmp"


def assert_clean(out: Path, reference: dict[str, str]) -> None:
    assert tree_checksums(out) == reference
    assert not tmp_of(out).exists()
    assert not lock_path_for(out).exists()
    assert not any(p.name.endswith(".reshard-old") for p in out.parent.iterdir())


# ---------------------------------------------------------------------------- determinism


def test_two_runs_are_byte_identical_and_checksums_reported(source, reference, tmp_path):
    outs = [tmp_path / "a", tmp_path / "b"]
    reports = []
    for out in outs:
        done = cli("split", str(source), "-o", str(out), *ARGS, "--checksum", "--json")
        assert done.returncode == 0, done.stderr
        reports.append(json.loads(done.stdout)["sha256"])
    assert tree_checksums(outs[0]) == tree_checksums(outs[1]) == reference
    # --json's sha256 map names every output file with its real digest.
    assert reports[0] == reports[1] == reference
    # Without --json, --checksum prints lines `sha256sum -c` accepts.
    out = tmp_path / "c"
    done = cli("split", str(source), "-o", str(out), *ARGS, "--checksum")
    assert done.returncode == 0, done.stderr
    check = subprocess.run(
        ["sha256sum", "-c", "-"], input=done.stdout, cwd=out, text=True, capture_output=True
    )
    assert check.returncode == 0 and check.stdout.count(": OK") == len(reference)


def test_conversion_is_deterministic_too(source, tmp_path):
    sums = []
    for name in ("a", "b"):
        done = cli("split", str(source), "-o", str(tmp_path / name), *ARGS, "--dtype", "bf16")
        assert done.returncode == 0, done.stderr
        sums.append(tree_checksums(tmp_path / name))
    assert sums[0] == sums[1]
    assert len(sums[0]) == 4  # 12 tensors of 8 KiB in bf16: two shards + index + config


# ----------------------------------------------------------------------- kill -9, resume

KILL_POINTS = {
    # point: shards a --resume keeps
    f"after:{SHARDS[0]}": 1,
    f"mid:{SHARDS[1]}": 1,
    "index": 3,
    "publish": 3,
}


@pytest.mark.parametrize("point", list(KILL_POINTS))
@pytest.mark.parametrize("resume", [True, False], ids=["resume", "fresh"])
def test_kill9_then_rerun(source, reference, tmp_path, point, resume):
    out = tmp_path / "out"
    kill9(start_paused(point, "split", str(source), "-o", str(out), *ARGS))
    tmp = tmp_of(out)
    assert not out.exists()  # the target never appears half made
    assert tmp.is_dir()
    if point.startswith("mid:"):
        partial = tmp / SHARDS[1]
        assert 0 < partial.stat().st_size < (tmp / SHARDS[0]).stat().st_size
    stamps = {n: (tmp / n).stat().st_mtime_ns for n in SHARDS if (tmp / n).exists()}

    done = cli("split", str(source), "-o", str(out), *ARGS, *(["--resume"] if resume else []))
    assert done.returncode == 0, done.stderr
    warnings = [line for line in done.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1, done.stderr
    if resume:
        kept = KILL_POINTS[point]
        assert f"resuming from {tmp}: kept {kept} of 3 shards" in warnings[0]
        # Kept shards were not rewritten (the same files were renamed into place); the
        # others were written by the rerun, which started well after the kill.
        for name in SHARDS[:kept]:
            assert (out / name).stat().st_mtime_ns == stamps[name]
        for name in SHARDS[kept:]:
            assert (out / name).stat().st_mtime_ns != stamps.get(name)
    else:
        assert f"removed the leftover temporary folder {tmp}" in warnings[0]
        assert "--resume" in warnings[0]
    assert_clean(out, reference)


def test_kill9_while_publishing_over_an_existing_output_leaves_it_as_it_was(source, reference, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("previous contents\n")
    before = tree_checksums(out)
    kill9(start_paused("publish", "split", str(source), "-o", str(out), *ARGS, "--overwrite"))
    assert tree_checksums(out) == before
    done = cli("split", str(source), "-o", str(out), *ARGS, "--overwrite", "--resume")
    assert done.returncode == 0, done.stderr
    assert "kept 3 of 3" in done.stderr
    assert_clean(out, reference)


def test_resume_rejects_a_damaged_shard_and_a_changed_source(source, reference, tmp_path):
    out = tmp_path / "out"
    kill9(start_paused(f"after:{SHARDS[1]}", "split", str(source), "-o", str(out), *ARGS))
    shard = tmp_of(out) / SHARDS[0]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF  # one flipped bit in the last tensor, size unchanged
    shard.write_bytes(bytes(data))
    done = cli("split", str(source), "-o", str(out), *ARGS, "--resume")
    assert done.returncode == 0, done.stderr
    assert "kept 1 of 3" in done.stderr  # shard 2 kept, the damaged shard 1 rewritten
    assert_clean(out, reference)

    # A source file touched since the interruption: nothing may be kept.
    src = tmp_path / "src"
    shutil.copytree(source, src)
    out2 = tmp_path / "out2"
    kill9(start_paused(f"after:{SHARDS[1]}", "split", str(src), "-o", str(out2), *ARGS))
    os.utime(src / "model-00002-of-00002.safetensors", ns=(1, 1))
    done = cli("split", str(src), "-o", str(out2), *ARGS, "--resume")
    assert done.returncode == 0, done.stderr
    assert "another source, other options or another plan" in done.stderr
    assert_clean(out2, reference)


# ------------------------------------------------------------------------ concurrent runs


def test_second_concurrent_run_refuses_and_first_completes(source, reference, tmp_path):
    out = tmp_path / "out"
    first = start_paused(f"after:{SHARDS[0]}", "split", str(source), "-o", str(out), *ARGS)
    try:
        second = cli("split", str(source), "-o", str(out), *ARGS, "--resume")
        assert second.returncode == 1
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ")
        assert f"another reshard run (pid {first.pid}) is writing this output" in lines[0]
        assert (tmp_of(out) / SHARDS[0]).is_file()  # the refused run touched nothing
        first.send_signal(signal.SIGCONT)
        _, stderr = first.communicate(timeout=60)
        assert first.returncode == 0, stderr
    finally:
        if first.poll() is None:
            first.kill()
            first.communicate()
    assert_clean(out, reference)


def test_output_lock_in_process(tmp_path):
    out = tmp_path / "o"
    with output_lock(out):
        with pytest.raises(LockedError, match=f"pid {os.getpid()}"):
            with output_lock(out):
                pass
    with output_lock(out):  # released, and reusable
        pass
    assert not lock_path_for(out).exists()


# --------------------------------------------------------------------- resource failures


def one_error_line(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 1, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    return lines[0]


def assert_nothing_left(parent: Path, *keep: str) -> None:
    assert sorted(p.name for p in parent.iterdir()) == sorted(keep)


def test_disk_full_gives_one_line_and_leaves_nothing(source, tmp_path):
    def limit_file_size():
        # Writes past 40 kB fail with EFBIG (Python ignores SIGXFSZ), as on a full disk.
        resource.setrlimit(resource.RLIMIT_FSIZE, (40_000, 40_000))

    parent = tmp_path / "p"
    parent.mkdir()
    done = cli("split", str(source), "-o", str(parent / "out"), *ARGS, preexec_fn=limit_file_size)
    line = one_error_line(done)
    assert "disk full" in line and str(parent / "out") in line
    assert_nothing_left(parent)


def _without_root_overrides():
    """As root, permissions are not enforced; drop the capabilities that bypass them
    (CAP_DAC_OVERRIDE=1, CAP_DAC_READ_SEARCH=2) from the child's bounding set."""
    if os.geteuid() != 0:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2):
        if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def test_permission_denied_and_read_only_source(source, reference, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(source, src)
    parent = tmp_path / "locked"
    parent.mkdir()
    for p in src.iterdir():
        p.chmod(0o444)
    src.chmod(0o555)
    parent.chmod(0o555)
    try:
        done = cli("split", str(src), "-o", str(parent / "out"), *ARGS, preexec_fn=_without_root_overrides)
        line = one_error_line(done)
        assert "permission denied" in line and str(parent) in line
        assert_nothing_left(parent)
        # The read-only source is all a split needs: it is never opened for writing.
        out = tmp_path / "out"
        done = cli("split", str(src), "-o", str(out), *ARGS, preexec_fn=_without_root_overrides)
        assert done.returncode == 0, done.stderr
        assert_clean(out, reference)
    finally:
        parent.chmod(0o755)
        src.chmod(0o755)


def test_output_on_another_filesystem(source, reference):
    # /dev/shm is tmpfs: copy_file_range from the source's disk fails with EXDEV there
    # (or is emulated), and the fallback must give the same bytes.
    shm = Path(tempfile.mkdtemp(prefix="reshard-test-", dir="/dev/shm"))
    try:
        assert os.stat(shm).st_dev != os.stat(source).st_dev
        out = shm / "out"
        done = cli("split", str(source), "-o", str(out), *ARGS)
        assert done.returncode == 0, done.stderr
        assert_clean(out, reference)
    finally:
        shutil.rmtree(shm)


@pytest.mark.parametrize("change", ["grow", "shrink"])
def test_source_changing_size_while_read(source, tmp_path, change):
    src = tmp_path / "src"
    shutil.copytree(source, src)
    parent = tmp_path / "p"
    parent.mkdir()
    proc = start_paused(f"mid:{SHARDS[1]}", "split", str(src), "-o", str(parent / "out"), *ARGS)
    victim = src / "model-00002-of-00002.safetensors"  # read next, for the rest of shard 2
    size = victim.stat().st_size
    with open(victim, "r+b") as f:
        if change == "grow":
            f.seek(0, 2)
            f.write(b"\0" * 4096)
        else:
            f.truncate(size // 10)  # cuts into the bytes still to be copied
    proc.send_signal(signal.SIGCONT)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 1, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and str(victim) in errors[0]
    expected = "changed size while being read" if change == "grow" else "ended"
    assert expected in errors[0], errors[0]
    assert_nothing_left(parent)
