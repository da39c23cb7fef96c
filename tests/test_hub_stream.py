"""`reshard split REPO --no-cache` against the project's Hub server (tests/hubserver.py):
range requests into the shards, the published sha256 checked, faults survived, --resume.

The repo is laid out as Hub repos are: three safetensors files cut in state-dict order
(each file's data in the reference writer's alphabetical order), an index, config and
tokenizer files. Every run is the real CLI in a subprocess; huggingface_hub talks to the
server on 127.0.0.1 only.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli, tree_checksums, write_safetensors
from hubserver import HubServer
from pausing import pausing_command, wait_stopped

REPO = "acme/streamed"
LAYERS = 12
FILES = 3
MAX_SHARD = "8500000"  # two layers per shard: 6 shards, two per source file
MIB = 1024 * 1024


def _layer(rng, i: int) -> dict[str, np.ndarray]:
    return {
        f"model.layers.{i}.mlp.weight": rng.standard_normal((1024, 1024)).astype("float32"),
        f"model.layers.{i}.norm.weight": rng.standard_normal((1024,)).astype("float32"),
    }


@pytest.fixture(scope="session")
def repo_files(tmp_path_factory) -> dict[str, Path]:
    """The repo's files on disk, generated once per session (~50 MB)."""
    folder = tmp_path_factory.mktemp("streamed-repo")
    rng = np.random.default_rng(14)
    per_file = LAYERS // FILES
    weight_map = {}
    for f in range(FILES):
        name = f"model-{f + 1:05d}-of-{FILES:05d}.safetensors"
        tensors = {}
        for i in range(f * per_file, (f + 1) * per_file):
            tensors.update(_layer(rng, i))
        write_safetensors(folder / name, tensors)
        weight_map.update({t: name for t in tensors})
    total = sum((folder / n).stat().st_size for n in set(weight_map.values()))
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
    )
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "torch_dtype": "float32"}))
    (folder / "tokenizer.json").write_text(json.dumps({"version": "1.0"}))
    return {p.name: p for p in sorted(folder.iterdir())}


@pytest.fixture
def hub(repo_files):
    with HubServer() as server:
        server.add_repo(REPO, {name: path.read_bytes() for name, path in repo_files.items()})
        yield server


@pytest.fixture(scope="session")
def cached_output(repo_files, tmp_path_factory) -> dict[str, str]:
    """Checksums of the cached path's output (snapshot_download, then split)."""
    tmp = tmp_path_factory.mktemp("cached")
    with HubServer() as server:
        server.add_repo(REPO, {name: path.read_bytes() for name, path in repo_files.items()})
        proc = run_cli(
            "split", REPO, "-o", str(tmp / "out"), "--max-shard", MAX_SHARD, "-q",
            env=server.env(str(tmp / "hf")),
        )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "--no-cache" not in proc.stderr  # the disk is large enough: the cached path ran
    return tree_checksums(tmp / "out")


def weight_blobs(hf_home: Path) -> list[Path]:
    """Files of 1 MiB or more in the Hub cache (the weights; small files are far below)."""
    return [p for p in hf_home.rglob("*") if p.is_file() and not p.is_symlink() and p.stat().st_size >= MIB]


def split_streamed(hub, tmp_path: Path, *extra: str, name: str = "out"):
    return run_cli(
        "split", REPO, "--no-cache", "-o", str(tmp_path / name), "--max-shard", MAX_SHARD, "-q", *extra,
        env=hub.env(str(tmp_path / "hf")),
    )  # fmt: skip


def test_streamed_output_is_byte_identical_and_the_cache_holds_no_weights(hub, cached_output, tmp_path):
    proc = split_streamed(hub, tmp_path, "--connections", "4")
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "out"
    assert tree_checksums(out) == cached_output
    assert len(list(out.glob("model-*-of-00006.safetensors"))) == 6
    assert (out / "config.json").is_file() and (out / "tokenizer.json").is_file()
    assert weight_blobs(tmp_path / "hf") == []  # only config, tokenizer, index were cached
    # Weights came by range requests, each file read once (headers aside).
    for name in [f"model-{i:05d}-of-00003.safetensors" for i in (1, 2, 3)]:
        size = (hub.files(REPO)[name]).__len__()
        ranged = [r for r in hub.requests("GET", name) if r.range]
        assert all(r.status == 206 for r in ranged)
        assert size <= hub.state.sent_bytes(name) <= size + 256 * 1024
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


def test_faults_are_survived(hub, cached_output, tmp_path):
    hub.state.inject("cut", "model-00002-of-00003.safetensors", times=2, min_start=8 * MIB)
    hub.state.inject("503", "model-00001-of-00003.safetensors", times=3, min_start=8 * MIB)
    hub.state.inject("429", "model-00003-of-00003.safetensors", times=1, min_start=1)
    proc = split_streamed(hub, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert tree_checksums(tmp_path / "out") == cached_output
    assert [f.times for f in hub.state.faults] == [0, 0, 0]  # every fault was hit
    statuses = [r.status for r in hub.requests("GET", ".safetensors")]
    assert statuses.count(503) == 3 and statuses.count(429) == 1
    assert proc.stderr.strip() == ""  # retries are not the user's business


def test_a_corrupted_byte_is_caught_and_nothing_is_published(hub, tmp_path):
    hub.state.corrupt(REPO, "model-00002-of-00003.safetensors", 5 * MIB + 3)
    proc = split_streamed(hub, tmp_path)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(
        f"error: {REPO}/model-00002-of-00003.safetensors: the bytes downloaded do not match"
    )
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


def test_a_fault_that_does_not_stop_ends_in_one_line(hub, tmp_path):
    hub.state.inject("503", "model-00001-of-00003.safetensors", times=100, min_start=1)
    proc = split_streamed(hub, tmp_path)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "model-00001-of-00003.safetensors" in lines[0] and "(503)" in lines[0]
    assert "--resume" in lines[0]


def test_kill_then_resume_fetches_only_the_missing_shards(hub, cached_output, tmp_path):
    env = {**os.environ, **hub.env(str(tmp_path / "hf"))}
    args = ["split", REPO, "--no-cache", "-o", str(tmp_path / "out"), "--max-shard", MAX_SHARD, "-q"]
    proc = subprocess.Popen(pausing_command("after:model-00002-of-00006.safetensors", *args), env=env)
    try:
        wait_stopped(proc.pid)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    tmp = tmp_path / ".out.reshard-tmp"
    assert (tmp / "model-00001-of-00006.safetensors").is_file()
    before = {n: hub.state.sent_bytes(n) for n in hub.files(REPO) if n.endswith(".safetensors")}
    resumed = split_streamed(hub, tmp_path, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "kept 2 of 6 shards" in resumed.stderr
    assert tree_checksums(tmp_path / "out") == cached_output
    fetched = {n: hub.state.sent_bytes(n) - before[n] for n in before}
    # File 1 feeds only the two kept shards: only its header is read again.
    assert fetched["model-00001-of-00003.safetensors"] <= 256 * 1024
    for name in ("model-00002-of-00003.safetensors", "model-00003-of-00003.safetensors"):
        assert fetched[name] >= len(hub.files(REPO)[name])


def test_no_cache_is_refused_where_it_cannot_work(hub, repo_files, tmp_path):
    local = run_cli("split", str(repo_files["config.json"].parent), "--no-cache", "-o", str(tmp_path / "o"))
    assert local.returncode == 2 and "--no-cache streams Hub repos" in local.stderr
    cast = split_streamed(hub, tmp_path, "--dtype", "bf16")
    assert cast.returncode == 2 and "--no-cache copies tensors as stored" in cast.stderr
    offline = run_cli(
        "split", REPO, "--no-cache", "-o", str(tmp_path / "o"),
        env={**hub.env(str(tmp_path / "hf")), "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert offline.returncode == 2 and "HF_HUB_OFFLINE" in offline.stderr
    bad = split_streamed(hub, tmp_path, "--connections", "0")
    assert bad.returncode == 2 and "--connections must be between 1 and 64" in bad.stderr


def test_streamed_shards_load_with_safetensors(hub, repo_files, tmp_path):
    from safetensors.numpy import load_file

    assert split_streamed(hub, tmp_path).returncode == 0
    got = {}
    for p in sorted((tmp_path / "out").glob("*.safetensors")):
        got.update(load_file(p))
    want = {}
    for name, path in repo_files.items():
        if name.endswith(".safetensors"):
            want.update(load_file(path))
    assert got.keys() == want.keys()
    assert all(np.array_equal(got[k], want[k]) for k in want)


@pytest.mark.xdist_group("loopfs")  # one worker mounts at a time
def test_streams_by_default_when_cache_and_output_do_not_fit(hub, cached_output, tmp_path):
    """On a 90 MB disk the 50 MB repo cannot be cached and then copied: split streams on
    its own, says so in one line, and the disk ends holding the output alone."""
    from loopfs import mounted, require_loop_mounts, used_bytes

    require_loop_mounts()
    with mounted("ext4", tmp_path / "fs", "90M") as disk:
        empty = used_bytes(disk)
        proc = run_cli(
            "split", REPO, "-o", str(disk / "out"), "--max-shard", MAX_SHARD, "-q",
            env=hub.env(str(disk / "hf")),
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("warning: the Hub cache plus the output need")
        assert lines[0].endswith("straight into the shards instead (--no-cache)")
        assert tree_checksums(disk / "out") == cached_output
        assert weight_blobs(disk / "hf") == []
        output = sum(p.stat().st_size for p in (disk / "out").iterdir())
        assert used_bytes(disk) - empty < output + 4 * MIB  # the output, plus metadata
