"""Ctrl-C and SIGTERM in the middle of a shard, on a real `reshard` process: one line, exit
130 or 143, the lock released, the temporary folder kept, and `--resume` finishes the run
byte-identical to an uninterrupted one.

The split stops itself at a named point (tests/pausing.py); the test queues the signal
and lets it continue, so the signal lands mid-shard every time.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest
from conftest import random_tensors, run_cli, tree_checksums, write_safetensors
from pausing import pausing_command, wait_stopped

SIGNALS = [(signal.SIGINT, 130, "SIGINT"), (signal.SIGTERM, 143, "SIGTERM")]


@pytest.fixture
def source(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    write_safetensors(
        src / "model.safetensors",
        random_tensors(3, {f"layers.{i}.w": ((64, 64), "float32") for i in range(8)}),
    )
    return src


def interrupt_at(point: str, signum: int, args: list[str], env: dict | None = None, then=None):
    """Run ``reshard args``, stop it at ``point``, deliver ``signum`` (then call ``then``, if
    given, while the process handles it); returns (code, stderr)."""
    proc = subprocess.Popen(
        pausing_command(point, *args),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
    )
    try:
        wait_stopped(proc.pid)
        os.kill(proc.pid, signum)
        os.kill(proc.pid, signal.SIGCONT)
        if then is not None:
            then()
        _, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    return proc.returncode, stderr


@pytest.mark.parametrize("signum,code,name", SIGNALS)
def test_signal_mid_shard_keeps_the_temporary_folder_for_resume(source, tmp_path, signum, code, name):
    before = tree_checksums(source)
    out = tmp_path / "out"
    args = ["split", str(source), "-o", str(out), "--max-shard", "40000", "-q"]
    rc, stderr = interrupt_at("mid:model-00002-of-00004.safetensors", signum, args)
    tmp = tmp_path / ".out.reshard-tmp"
    assert rc == code, stderr
    assert stderr.strip().splitlines() == [
        f"error: interrupted by {name}; 1 of 4 shards are finished in {tmp}: "
        "run the same command with --resume to continue"
    ]
    assert not out.exists()
    assert (tmp / "model-00001-of-00004.safetensors").is_file()
    assert not (tmp_path / ".out.reshard-lock").exists()  # released (and removed)
    assert tree_checksums(source) == before

    resumed = run_cli(*args, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "kept 1 of 4 shards" in resumed.stderr
    fresh = run_cli("split", str(source), "-o", str(tmp_path / "fresh"), "--max-shard", "40000", "-q")
    assert fresh.returncode == 0
    assert tree_checksums(out) == tree_checksums(tmp_path / "fresh")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fresh", "out", "src"]


def test_sigterm_while_streaming_from_the_hub(tmp_path):
    """The streaming workers are threads: SIGTERM still ends the run in one line, with the
    shards of the first (verified) file kept.

    The server holds the second file's last range half-way until the signal is sent, so
    that file cannot be finished first however slow the machine is, and the run stops
    itself once the second shard is journaled: which it must be during the stall (shards
    are journaled as their fsync ends, not only when the next chunk arrives). (A bandwidth
    cap alone raced the first shards' fsync: on a busy disk the whole download could end
    before the third shard was announced, and a pause at its first bytes never came.)"""
    from hubserver import HubServer

    files = {}
    for f in range(2):
        path = tmp_path / f"model-{f + 1:05d}-of-00002.safetensors"
        specs = {f"layers.{i}.w": ((512, 1024), "float32") for i in range(4 * f, 4 * f + 4)}
        write_safetensors(path, random_tensors(f, specs))
        files[path.name] = path.read_bytes()
    with HubServer() as hub:
        hub.add_repo("acme/sig", files)
        # From the file's second chunk on (reshard.hub.stream.CHUNK): the header reads that
        # come before the run are not held.
        hub.state.inject("hold", "model-00002-of-00002.safetensors", times=1000, min_start=8 * 1024 * 1024)
        out = tmp_path / "out"
        args = ["split", "acme/sig", "--no-cache", "-o", str(out), "--max-shard", "4200000", "-q"]
        env = hub.env(str(tmp_path / "hf"))
        rc, stderr = interrupt_at(
            "after:model-00002-of-00004.safetensors", signal.SIGTERM, args, env, then=hub.state.release
        )
    assert rc == 143, stderr
    assert stderr.strip().splitlines() == [
        f"error: interrupted by SIGTERM; 2 of 4 shards are finished in {tmp_path / '.out.reshard-tmp'}: "
        "run the same command with --resume to continue"
    ]
    assert (tmp_path / ".out.reshard-tmp" / "model-00002-of-00004.safetensors").is_file()
    assert not (tmp_path / ".out.reshard-lock").exists()
    assert not out.exists()


def test_sigterm_before_any_run_is_one_line(tmp_path):
    """A command stopped before it writes anything: one line, 143, no folder."""
    from hubserver import HubServer

    with HubServer() as hub:
        hub.state.inject("503", "model.safetensors", times=1000)
        hub.add_repo("acme/slow", {"model.safetensors": b"\0" * 64})
        proc = subprocess.Popen(
            pausing_command("never", "split", "acme/slow", "--no-cache", "-o", str(tmp_path / "out"), "-q"),
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, **hub.env(str(tmp_path / "hf"))},
        )
        try:
            deadline = time.monotonic() + 30  # until the header request is being retried
            while not hub.requests("GET", "model.safetensors") and time.monotonic() < deadline:
                time.sleep(0.05)
            assert hub.requests("GET", "model.safetensors"), "the split never asked for the header"
            os.kill(proc.pid, signal.SIGTERM)
            _, stderr = proc.communicate(timeout=60)
        finally:
            proc.kill()
    assert proc.returncode == 143
    assert stderr.strip().splitlines() == ["error: interrupted by SIGTERM before anything was published"]
    assert not [p.name for p in tmp_path.iterdir() if "out" in p.name]  # no output, temp folder or lock
