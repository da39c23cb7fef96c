"""Ctrl-C in the middle of a shard: one line, exit 130, no output and no temporary folder.

The split stops itself at a named point (tests/pausing.py), the
test queues SIGINT and lets it continue, so the interrupt lands mid-shard every time."""

import os
import signal
import subprocess
import time

from conftest import random_tensors, tree_checksums, write_safetensors
from pausing import pausing_command


def wait_stopped(pid: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(f"/proc/{pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "T":
                return
        time.sleep(0.02)
    raise AssertionError("the split never reached its pause point")


def test_ctrl_c_mid_shard_leaves_nothing(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    write_safetensors(
        src / "model.safetensors",
        random_tensors(3, {f"layers.{i}.w": ((64, 64), "float32") for i in range(8)}),
    )
    before = tree_checksums(src)
    out = tmp_path / "out"
    proc = subprocess.Popen(
        pausing_command(
            "mid:model-00002-of-00004.safetensors",
            "split",
            str(src),
            "-o",
            str(out),
            "--max-shard",
            "40000",
            "-q",
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_stopped(proc.pid)
        assert any(p.name.startswith(".out.reshard-tmp") for p in tmp_path.iterdir())
        os.kill(proc.pid, signal.SIGINT)
        os.kill(proc.pid, signal.SIGCONT)
        _, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130
    assert stderr.strip().splitlines()[-1] == "error: interrupted; nothing was left behind"
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]
    assert tree_checksums(src) == before
