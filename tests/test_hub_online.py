"""The ONLINE Hub source path, end to end against tests/hubserver.py: `reshard split org/name`
(list files, fetch the index, snapshot_download with safetensors preferred over .bin) and
`reshard split org/name --dry-run` (headers by range requests, no weights downloaded), with
the real CLI in a subprocess and assertions on what the server sent."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import yaml
from conftest import write_safetensors
from hubserver import HubServer
from safetensors.numpy import load_file

TOKEN = "hf_onlineTestToken_abcdef123456"


def run(hub, tmp_path, *args, token=TOKEN):
    env = {**os.environ, **hub.env(str(tmp_path / "hf-home"), token)}
    env.pop("RESHARD_DEBUG", None)
    return subprocess.run(
        [sys.executable, "-m", "reshard.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=180,
        cwd=tmp_path,
    )


def one_error_line(proc) -> str:
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


@pytest.fixture(scope="module")
def upstream(tmp_path_factory):
    """A sharded safetensors repo the way the Hub ships one, plus a .bin copy and a card
    that must not be fetched or copied. Each shard is > 100 kB so a header range request
    is a strict prefix of it."""
    folder = tmp_path_factory.mktemp("upstream")
    rng = np.random.default_rng(0)
    tensors = {f"model.layers.{i}.w": rng.standard_normal((128, 256)).astype("float32") for i in range(6)}
    weight_map = {}
    for k in range(3):
        name = f"model-0000{k + 1}-of-00003.safetensors"
        part = {n: tensors[n] for n in list(tensors)[2 * k : 2 * k + 2]}
        write_safetensors(folder / name, part)
        weight_map.update({n: name for n in part})
    index = {"metadata": {"total_size": sum(t.nbytes for t in tensors.values())}, "weight_map": weight_map}
    files = {p.name: p.read_bytes() for p in folder.iterdir()}
    files["model.safetensors.index.json"] = json.dumps(index).encode()
    files["config.json"] = b'{"model_type": "llama"}'
    files["tokenizer.json"] = b'{"version": "1.0"}'
    files["README.md"] = b"---\nlicense: apache-2.0\n---\n# upstream card\n"
    files["pytorch_model.bin"] = b"\0" * 300_000  # never wanted: safetensors are preferred
    return files, tensors


@pytest.fixture
def hub(upstream):
    with HubServer(tokens={TOKEN: "me"}) as server:
        server.add_repo("org/tiny", upstream[0])
        yield server


def weight_gets(hub):
    return [
        r for r in hub.requests("GET") if "/resolve/" in r.path and r.path.endswith((".safetensors", ".bin"))
    ]


def test_split_repo_id_fetches_safetensors_only_and_records_provenance(hub, upstream, tmp_path):
    files, tensors = upstream
    out = tmp_path / "out"
    proc = run(hub, tmp_path, "split", "org/tiny", "-o", str(out), "--max-shard", "300KB", "--json")
    assert proc.returncode == 0, proc.stderr
    assert [s["tensors"] for s in json.loads(proc.stdout)["shards"]] == [2, 2, 2]
    fetched = {r.path.rsplit("/", 1)[1] for r in weight_gets(hub)}
    assert fetched == {f"model-0000{k}-of-00003.safetensors" for k in (1, 2, 3)}  # no .bin
    got = {}
    for path in out.glob("*.safetensors"):
        got.update(load_file(path))
    assert got.keys() == tensors.keys()
    assert all(got[n].tobytes() == tensors[n].tobytes() for n in tensors)
    assert (out / "config.json").read_bytes() == files["config.json"]
    assert not (out / "README.md").exists() and not (out / "pytorch_model.bin").exists()
    meta = json.loads((out / "model.safetensors.index.json").read_text())["metadata"]
    assert meta["reshard_source"] == "org/tiny"
    assert meta["reshard_revision"] == hub.state.repos["org/tiny"].refs["main"]
    # A second split of the same repo is served from the cache: no weight is fetched again.
    before = len(weight_gets(hub))
    assert run(hub, tmp_path, "split", "org/tiny", "-o", str(tmp_path / "again"), "-q").returncode == 0
    assert len(weight_gets(hub)) == before


def test_dry_run_plans_from_headers_without_downloading_weights(hub, upstream, tmp_path):
    proc = run(hub, tmp_path, "split", "org/tiny", "--dry-run", "--max-shard", "300KB", "--json")
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)
    assert plan["dry_run"] is True and plan["total_size"] == sum(t.nbytes for t in upstream[1].values())
    assert [(s["file"], s["tensors"]) for s in plan["shards"]] == [
        (f"model-0000{k}-of-00003.safetensors", 2) for k in (1, 2, 3)
    ]
    gets = weight_gets(hub)
    assert gets, "the headers were read from the server"
    for r in gets:  # only header prefixes, by range request
        assert r.range is not None and r.status == 206
        assert r.sent_bytes < len(upstream[0][r.path.rsplit("/", 1)[1]])
    assert not (tmp_path / "tiny-resharded").exists()


@pytest.mark.parametrize("dry_run", [False, True])
def test_unknown_repo_id_is_one_line(hub, tmp_path, dry_run):
    args = ["split", "org/no-such-model", "-o", str(tmp_path / "out")] + (["--dry-run"] if dry_run else [])
    line = one_error_line(run(hub, tmp_path, *args))
    assert "org/no-such-model: unknown repo id" in line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("dry_run", [False, True])
def test_missing_revision_and_gated_repo_are_one_line(hub, upstream, tmp_path, dry_run):
    flag = ["--dry-run"] if dry_run else []
    line = one_error_line(run(hub, tmp_path, "split", "org/tiny", "--revision", "v9", *flag))
    assert "revision 'v9' does not exist" in line
    hub.add_repo("org/gated", upstream[0], gated=True)
    line = one_error_line(run(hub, tmp_path, "split", "org/gated", *flag, token=None))
    assert "gated" in line and "hf auth login" in line


def test_bin_only_repo_downloads_the_bin(hub, tmp_path):
    import torch

    path = tmp_path / "pytorch_model.bin"
    weights = {"a.weight": torch.arange(12, dtype=torch.float32).reshape(3, 4), "b.bias": torch.ones(5)}
    torch.save(weights, path)
    hub.add_repo("org/old", {"pytorch_model.bin": path.read_bytes(), "config.json": b"{}"})
    out = tmp_path / "out"
    proc = run(hub, tmp_path, "split", "org/old", "-o", str(out), "-q")
    assert proc.returncode == 0, proc.stderr
    got = load_file(out / "model.safetensors")
    assert all(np.array_equal(got[n], weights[n].numpy()) for n in weights)


def test_split_from_the_hub_then_push_names_the_base_model(hub, tmp_path):
    out = tmp_path / "out"
    proc = run(
        hub,
        tmp_path,
        "split",
        "org/tiny",
        "-o",
        str(out),
        "--max-shard",
        "600KB",
        "-q",
        "--push-to",
        "me/tiny-600KB",
    )
    assert proc.returncode == 0, proc.stderr
    card = hub.files("me/tiny-600KB")["README.md"].decode()
    meta = yaml.safe_load(card.split("---\n")[1])
    assert meta["base_model"] == "org/tiny"
    commit = hub.state.repos["org/tiny"].refs["main"]
    assert f"| Source revision | `{commit}` |" in card
    assert "[org/tiny](https://huggingface.co/org/tiny)" in card
