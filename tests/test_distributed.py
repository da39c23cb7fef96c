"""reshard under torchrun (ranks and simulated nodes) and ``--workers N``: real torchrun
subprocesses on gloo, real checkpoints on disk, compared byte for byte with what a single
process writes (issue 13).

Nodes are simulated as two torchrun launches with ``--nnodes 2`` meeting through a c10d
rendezvous on 127.0.0.1. Faults are real too: a worker paused at a precise run event
(``tests/pausing.py``) is killed with SIGKILL, or the source is truncated under it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import random_tensors, run_cli, tree_checksums, write_safetensors
from pausing import wait_stopped
from training_fixtures import CHECKPOINTS, training_checkpoints  # noqa: F401 (fixture)

TESTS = Path(__file__).resolve().parent
PAUSING = TESTS / "pausing.py"
LAUNCH_TIMEOUT = 180
SHARD = "64KiB"  # six equal shards of the safetensors source (two tensors each)


def torchrun_env(**extra: str) -> dict[str, str]:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "TORCH_DEVICE_BACKEND_AUTOLOAD": "0",
        "PYTHONWARNINGS": "ignore",
        **extra,
    }
    env.pop("RESHARD_DEBUG", None)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_commands(topology: str, program: list[str]) -> list[list[str]]:
    """The torchrun command lines of one job: ``ranks`` is one launch of 2 processes,
    ``nodes`` two launches (simulated nodes) of 1 process each, ``single`` no torchrun."""
    run = [sys.executable, "-m", "torch.distributed.run"]
    if topology == "single":
        return [[sys.executable, *program]]
    if topology == "ranks":
        return [[*run, "--standalone", "--nproc-per-node", "2", *program]]
    endpoint = f"127.0.0.1:{free_port()}"
    node = [*run, "--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d"]
    node += ["--rdzv-endpoint", endpoint, "--rdzv-id", f"reshard-{os.getpid()}-{time.monotonic_ns()}"]
    return [[*node, *program], [*node, *program]]


def reshard_program(*args: str) -> list[str]:
    return ["-m", "reshard", "split", *args]


def start(topology: str, program: list[str], env: dict | None = None) -> list[subprocess.Popen]:
    return [
        subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env or torchrun_env(),
            start_new_session=True,
        )
        for cmd in launch_commands(topology, program)
    ]


def finish(procs: list[subprocess.Popen], timeout: float = LAUNCH_TIMEOUT) -> list[tuple[int, str, str]]:
    """(exit status, stdout, stderr) of every launch; a launch still running after
    ``timeout`` seconds is a hang: kill its process group and fail."""
    results = []
    for proc in procs:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for p in procs:
                with contextlib.suppress(ProcessLookupError):  # a launch that has ended
                    os.killpg(p.pid, signal.SIGKILL)
            ended = "".join(
                f"\n--- launch {i} (exit {code}):\n{err[-3000:]}" for i, (code, _, err) in enumerate(results)
            )
            _, err = proc.communicate()
            raise AssertionError(
                f"torchrun launch {len(results)} still running after {timeout}s: {proc.args}{ended}"
                f"\n--- launch {len(results)} (killed):\n{err[-3000:]}"
            ) from None
        results.append((proc.returncode, out, err))
    return results


def torchrun(topology: str, *args: str, env: dict | None = None) -> list[tuple[int, str, str]]:
    return finish(start(topology, reshard_program(*args), env))


def error_lines(results) -> list[str]:
    return [line for _, _, err in results for line in err.splitlines() if line.startswith("error: ")]


def assert_ok(results) -> None:
    for code, _, err in results:
        assert code == 0, err[-3000:]


def leftovers(out: Path) -> list[str]:
    """Anything reshard leaves beside ``out``: the output, its temporary folder, its lock."""
    return sorted(
        p.name
        for p in out.parent.iterdir()
        if p.name.lstrip(".").startswith(out.name) and "stdout" not in p.name
    )


def descendants(pids: list[int]) -> list[int]:
    """Every live process below ``pids`` (torchrun agents spawn the workers)."""
    parent_of = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parent_of[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier = [], set(pids)
    while frontier:
        children = {pid for pid, ppid in parent_of.items() if ppid in frontier}
        found += sorted(children)
        frontier = children
    return found


def stopped_worker(procs: list[subprocess.Popen], timeout: float = 120) -> int:
    """The pid of the worker that paused itself (state T)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for pid in descendants([p.pid for p in procs]):
            try:
                state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if state in ("T", "t"):
                wait_stopped(pid)
                return pid
        if all(p.poll() is not None for p in procs):
            raise AssertionError(f"the job ended before pausing: {finish(procs)}")
        time.sleep(0.05)
    raise AssertionError("no worker paused")


def assert_all_gone(procs: list[subprocess.Popen], timeout: float = 30) -> None:
    """No process of the launches' sessions is left (nothing hangs, nothing orphaned)."""
    sessions = {p.pid for p in procs}
    deadline = time.monotonic() + timeout
    while True:
        left = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                except OSError:
                    continue
                if int(fields[3]) in sessions and fields[0] != "Z":  # session id
                    left.append(int(entry.name))
        if not left:
            return
        assert time.monotonic() < deadline, f"processes left running: {left}"
        time.sleep(0.1)


# -- sources (built once per session) ---------------------------------------------------


@pytest.fixture(scope="session")
def sources(tmp_path_factory) -> dict[str, Path]:
    """A safetensors file (12 equal fp32 tensors: six 64KB shards) and a PyTorch .bin
    written by torch.save, including a transposed view (a strided tensor)."""
    import torch

    root = tmp_path_factory.mktemp("dist-sources")
    tensors = random_tensors(0, {f"model.layers.{i}.w": ((64, 128), "float32") for i in range(12)})
    st = root / "st"
    st.mkdir()
    write_safetensors(st / "model.safetensors", tensors)
    (st / "config.json").write_text('{"model_type": "test", "torch_dtype": "float32"}\n')
    binary = root / "bin"
    binary.mkdir()
    state = {name: torch.from_numpy(array) for name, array in tensors.items()}
    state["model.layers.0.w_t"] = state["model.layers.0.w"].t()  # a strided view of a storage
    torch.save(state, binary / "pytorch_model.bin")
    return {"safetensors": st, "bin": binary}


@pytest.fixture(scope="session")
def zero3(training_checkpoints) -> Path:  # noqa: F811 (the fixture above)
    return training_checkpoints / CHECKPOINTS["zero3"]


CASES = {  # name -> (source, extra options)
    "safetensors": ("safetensors", ()),
    "bin": ("bin", ()),
    "bf16": ("safetensors", ("--dtype", "bf16")),
    "zero3": ("zero3", ()),
}


def case_source(name: str, sources, request) -> Path:
    kind = CASES[name][0]
    return request.getfixturevalue("zero3") if kind == "zero3" else sources[kind]


@pytest.fixture(scope="session")
def references(tmp_path_factory, sources, request):
    """Single-process outputs of every case, made on first use."""
    made: dict[str, dict[str, str]] = {}
    root = tmp_path_factory.mktemp("dist-references")

    def reference(name: str) -> dict[str, str]:
        if name not in made:
            _, extra = CASES[name]
            out = root / name
            shard = SHARD if name != "zero3" else "20KB"
            done = run_cli(
                "split",
                str(case_source(name, sources, request)),
                "-o",
                str(out),
                "--max-shard",
                shard,
                "-q",
                *extra,
            )
            assert done.returncode == 0, done.stderr
            made[name] = tree_checksums(out)
            assert len([f for f in made[name] if "-of-" in f]) >= 3, made[name]  # really sharded
        return made[name]

    return reference


# -- byte-identical to one process ------------------------------------------------------


@pytest.mark.parametrize("topology", ["ranks", "nodes"])
def test_torchrun_output_is_byte_identical_to_one_process(topology, sources, references, request, tmp_path):
    """Every case (safetensors, .bin, ZeRO-3, --dtype bf16) in one torchrun job
    (tests/dist_jobs.py runs them one after another in each worker)."""
    import json

    jobs = []
    for case, (_, extra) in CASES.items():
        shard = SHARD if case != "zero3" else "20KB"
        src = str(case_source(case, sources, request))
        jobs.append(["split", src, "-o", str(tmp_path / case), "--max-shard", shard, "--json", *extra])
    manifest = tmp_path / "jobs.json"
    manifest.write_text(json.dumps(jobs))
    results = finish(start(topology, [str(TESTS / "dist_jobs.py"), str(manifest)]))
    assert_ok(results)
    stderr = "".join(err for _, _, err in results)
    assert stderr.count("rank 1: wrote") == len(CASES), stderr
    for case in CASES:
        out = tmp_path / case
        assert tree_checksums(out) == references(case), case
        assert leftovers(out) == [case]
        # --json comes from rank 0 only, with every rank's share: disjoint, covering every shard
        assert (tmp_path / f"{case}.rank-1.stdout").read_text() == ""
        doc = json.loads((tmp_path / f"{case}.rank-0.stdout").read_text())
        ranks = doc["ranks"]
        assert [r["rank"] for r in ranks] == [0, 1]
        assert sorted(s for r in ranks for s in r["shards"]) == sorted(s["file"] for s in doc["shards"])
        assert all(r["shards"] for r in ranks)  # both ranks did work
        sizes = {s["file"]: s["size"] for s in doc["shards"]}
        for r in ranks:
            assert r["bytes"] == sum(sizes[s] for s in r["shards"])


def test_workers_output_equals_one_worker(sources, references, tmp_path):
    for name in ("safetensors", "bin", "bf16"):
        kind, extra = CASES[name]
        out = tmp_path / name
        done = run_cli(
            "split", str(sources[kind]), "-o", str(out), "--max-shard", SHARD, "--workers", "2", "-q", *extra
        )
        assert done.returncode == 0, done.stderr
        assert tree_checksums(out) == references(name)


# -- faults -------------------------------------------------------------------------------


def test_plans_that_differ_between_nodes_are_refused(sources, tmp_path):
    out = tmp_path / "out"
    cmds = launch_commands("nodes", [])
    procs = [
        subprocess.Popen(
            [*cmd, *reshard_program(str(sources["safetensors"]), "-o", str(out), "--max-shard", shard)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=torchrun_env(),
            start_new_session=True,
        )
        for cmd, shard in zip(cmds, ["64KB", "128KB"])
    ]
    results = finish(procs)
    assert all(code != 0 for code, _, _ in results)
    errors = error_lines(results)
    assert len(errors) == 2 and all("planned a different job than rank 0" in e for e in errors), errors
    assert leftovers(out) == []


def shard_lines(journal: Path) -> int:
    try:
        return len(journal.read_text().splitlines()) - 1
    except OSError:
        return 0


@pytest.mark.parametrize("failing", [0, 1])
def test_a_rank_hitting_bad_input_fails_every_rank_and_leaves_nothing(failing, sources, tmp_path):
    """The source is truncated under one rank (a file changing while being read): rank 1
    while it writes its first shard (rank 0 has finished its own), or rank 0 just before
    it publishes. That rank fails with the message naming the file, every other rank
    fails with the same message, and nothing is left."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "model.safetensors").write_bytes((sources["safetensors"] / "model.safetensors").read_bytes())
    out = tmp_path / "out"
    point = "publish" if failing == 0 else "mid:model-00002-of-00006.safetensors"
    program = [str(PAUSING), point, "split", str(src), "-o", str(out), "--max-shard", SHARD]
    procs = start("ranks", program, torchrun_env(RESHARD_RANK_TIMEOUT="30"))
    pid = stopped_worker(procs)
    if failing == 1:  # rank 0's three shards are journaled: only rank 1 reads from here on
        deadline = time.monotonic() + 60
        while shard_lines(tmp_path / ".out.reshard-tmp" / ".reshard-journal.rank-0") < 3:
            assert time.monotonic() < deadline, "rank 0 did not write its shards"
            time.sleep(0.05)
    size = (src / "model.safetensors").stat().st_size
    os.truncate(src / "model.safetensors", size // 2)
    os.kill(pid, signal.SIGCONT)
    results = finish(procs)
    assert all(code != 0 for code, _, _ in results)
    errors = error_lines(results)
    assert len(errors) == 2, results
    own = [e for e in errors if "failed:" not in e]
    relayed = [e for e in errors if e.startswith(f"error: rank {failing} failed: ")]
    assert len(own) == 1 and len(relayed) == 1, errors
    assert "model.safetensors" in own[0], own
    assert "changed size while being read" in own[0] or "the file is truncated" in own[0], own
    assert relayed[0].endswith(own[0].removeprefix("error: "))
    assert leftovers(out) == []


@pytest.mark.parametrize("resume_topology", ["single", "ranks"])
def test_kill_9_of_one_node_then_resume_is_byte_identical(resume_topology, sources, references, tmp_path):
    """Node 1's worker is killed with SIGKILL after journaling a shard; node 0's rank
    notices within RESHARD_RANK_TIMEOUT and fails; no output appears; a --resume keeps
    the finished shards and ends byte-identical."""
    src = str(sources["safetensors"])
    out = tmp_path / "out"
    point = "after:model-00002-of-00006.safetensors"
    program = [str(PAUSING), point, "split", src, "-o", str(out), "--max-shard", SHARD]
    procs = start("nodes", program, torchrun_env(RESHARD_RANK_TIMEOUT="5"))
    os.kill(stopped_worker(procs), signal.SIGKILL)
    results = finish(procs, timeout=60)
    assert all(code != 0 for code, _, _ in results), results
    assert_all_gone(procs)
    # Rank 0 reports the dead rank, unless torchrun stopped it first: when the killed
    # worker's agent hosted the rendezvous store, the other agent ends its workers with
    # SIGTERM, which reshard reports as such (and keeps the temporary folder for --resume).
    for line in error_lines(results):
        assert any(why in line for why in ("stopped responding", "lost contact", "interrupted by SIGTERM")), (
            results
        )
    assert not out.exists()
    assert (tmp_path / ".out.reshard-tmp").is_dir()
    resume = ["--max-shard", SHARD, "--resume"]
    if resume_topology == "single":
        done = run_cli("split", src, "-o", str(out), *resume)
        assert done.returncode == 0, done.stderr
        stderr = done.stderr
    else:
        again = torchrun("ranks", src, "-o", str(out), *resume)
        assert_ok(again)
        stderr = "".join(err for _, _, err in again)
    assert "resuming from" in stderr and "kept" in stderr, stderr
    kept = int(stderr.split("kept ")[1].split()[0])
    assert kept >= 1
    assert tree_checksums(out) == references("safetensors")
    assert leftovers(out) == ["out"]


def test_kill_9_with_workers_then_resume_is_byte_identical(sources, references, tmp_path):
    src = str(sources["safetensors"])
    out = tmp_path / "out"
    args = ["split", src, "-o", str(out), "--max-shard", SHARD, "--workers", "2", "--dtype", "bf16"]
    proc = subprocess.Popen(
        [sys.executable, str(PAUSING), "after:model-00002-of-00003.safetensors", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=torchrun_env(),
    )
    wait_stopped(proc.pid)
    proc.kill()
    proc.wait()
    assert not out.exists()
    done = run_cli(*args, "--resume")
    assert done.returncode == 0, done.stderr
    assert "kept" in done.stderr
    assert tree_checksums(out) == references("bf16")


def test_rank_journals_are_merged_for_a_resume(tmp_path):
    """The unit under the resume: journal lines of every rank reach the main journal."""
    from reshard.run.distributed import merge_rank_journals

    (tmp_path / ".reshard-journal").write_text('{"fingerprint":"f","version":2}\n')
    (tmp_path / ".reshard-journal.rank-1").write_text('{"fingerprint":"f"}\n{"shard":"b","size":2}\n')
    (tmp_path / ".reshard-journal.rank-2").write_text('{"fingerprint":"other"}\n{"shard":"c","size":3}\n')
    merge_rank_journals(tmp_path)
    lines = (tmp_path / ".reshard-journal").read_text().splitlines()
    assert lines[1:] == ['{"shard":"b","size":2}']
    assert not list(tmp_path.glob(".reshard-journal.rank-*"))


def test_a_rank_leaving_the_job_ends_its_watcher_first():
    """The exit hook stops the heartbeat thread before the interpreter finalizes (a daemon
    thread inside a store call during torch's teardown may crash the exit), on a real
    c10d TCPStore."""
    from datetime import timedelta

    import torch.distributed as dist

    from reshard.run.distributed import Team

    server = dist.TCPStore("127.0.0.1", 0, 2, True, timedelta(seconds=30), wait_for_workers=False)
    team = Team(0, 1)
    team.store = dist.PrefixStore("reshard/", server)
    team._start_watching()
    deadline = time.monotonic() + 10
    while team.store.add("beat/0", 0) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert team.store.add("beat/0", 0) >= 2, "the watcher never beat"
    assert team._watcher is not None and team._watcher.is_alive()
    team._leave()
    assert not team._watcher.is_alive()
    assert team.failure is None
