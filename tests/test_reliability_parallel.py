"""kill -9 and ``--resume`` for ``split --tp``, ``split --pp`` and ``merge``, as for ``split``:
they run through the same pipeline (reshard/run/pipeline.py), so a kill at any point
leaves the target untouched, and the rerun (with or without ``--resume``) writes exactly
the bytes an uninterrupted run writes (the golden hashes of tests/test_golden.py).
"""

from __future__ import annotations

import json
import signal
import subprocess

import pytest
from conftest import run_cli, tree_checksums
from pausing import pausing_command, wait_stopped
from test_golden import GOLDEN, make_sources

JOBS = {
    # job: (arguments after SOURCE, a shard to kill in the middle of, one to kill after)
    "tp2": (
        ["--tp", "2", "--max-shard", "30000"],
        "rank-1/model-00002-of-00009.safetensors",
        "rank-0/model-00009-of-00009.safetensors",
    ),
    "pp2": (
        ["--pp", "2", "--max-shard", "30000"],
        "stage-1/model-00003-of-00007.safetensors",
        "stage-0/model-00004-of-00007.safetensors",
    ),
    "merge-tp2": (
        ["--max-shard", "40000"],
        "model-00005-of-00012.safetensors",
        "model-00002-of-00012.safetensors",
    ),
    "merge-pp2": (
        ["--max-shard", "40000"],
        "model-00007-of-00012.safetensors",
        "model-00003-of-00012.safetensors",
    ),
}


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """The golden sources, plus the tp2 and pp2 outputs that merge reads."""
    root = tmp_path_factory.mktemp("parallel-reliability")
    st, _ = make_sources(root)
    for job in ("tp2", "pp2"):
        done = run_cli("split", str(st), *JOBS[job][0], "-o", str(root / job), "-q")
        assert done.returncode == 0, done.stderr
    return {"tp2": st, "pp2": st, "merge-tp2": root / "tp2", "merge-pp2": root / "pp2"}


def command(job: str, source, out) -> list[str]:
    verb = "merge" if job.startswith("merge") else "split"
    return [verb, str(source), *JOBS[job][0], "-o", str(out), "-q"]


@pytest.mark.parametrize("resume", [True, False], ids=["resume", "fresh"])
@pytest.mark.parametrize("where", ["mid", "after", "publish"])
@pytest.mark.parametrize("job", list(JOBS))
def test_kill9_then_rerun_gives_the_golden_bytes(sources, tmp_path, job, where, resume):
    out = tmp_path / "out"
    args = command(job, sources[job], out)
    point = {"mid": f"mid:{JOBS[job][1]}", "after": f"after:{JOBS[job][2]}", "publish": "publish"}[where]
    proc = subprocess.Popen(
        pausing_command(point, *args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    wait_stopped(proc.pid)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    tmp = tmp_path / ".out.reshard-tmp"
    assert not out.exists() and tmp.is_dir()

    done = run_cli(*args, *(["--resume"] if resume else []))
    assert done.returncode == 0, done.stderr
    warnings = [line for line in done.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1, done.stderr
    if resume:
        assert f"resuming from {tmp}: kept" in warnings[0]
    else:
        assert f"removed the leftover temporary folder {tmp}" in warnings[0]
    assert not tmp.exists()
    assert tree_checksums(out) == json.loads(GOLDEN.read_text())[job]
