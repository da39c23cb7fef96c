"""Issue 18, the Hub side of what a new user hits, against tests/hubserver.py with the real
CLI in subprocesses: inspect of a repo id reads headers only (item 2), a mistyped path is
not retried as a repo id (3), split --push-to checks its push options before writing
(4), huggingface_hub's bars stay off unless a person watches a terminal (6), a failed push
leaves no model card behind (7), and a stray .safetensors is refused as push.md says (8)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO_ROOT, write_safetensors
from hubserver import HubServer

TOKEN = "hf_newUserTestToken_0123456789abcdef"


def run(hub, tmp_path, *args, token=TOKEN, bars_allowed=False, **extra_env):
    """The CLI as a subprocess talking only to ``hub``. ``bars_allowed`` leaves
    HF_HUB_DISABLE_PROGRESS_BARS unset (hub.env() sets it), so only reshard can turn
    huggingface_hub's bars off."""
    env = {**os.environ, **hub.env(str(tmp_path / "hf-home"), token), **extra_env}
    env.pop("RESHARD_DEBUG", None)
    if bars_allowed:
        env.pop("HF_HUB_DISABLE_PROGRESS_BARS", None)
    return subprocess.run(
        [sys.executable, "-m", "reshard.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=180,
        cwd=tmp_path,
    )


def one_error_line(proc, code=1) -> str:
    assert proc.returncode == code, (proc.returncode, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


@pytest.fixture(scope="module")
def upstream(tmp_path_factory):
    """A 3-shard safetensors repo as the Hub ships one; every shard is 1 MB, ten times what
    huggingface_hub asks for to read a header (100 kB)."""
    folder = tmp_path_factory.mktemp("newuser-upstream")
    rng = np.random.default_rng(7)
    tensors = {f"model.layers.{i}.w": rng.standard_normal((512, 256)).astype("float32") for i in range(6)}
    weight_map = {}
    for k in range(3):
        name = f"model-0000{k + 1}-of-00003.safetensors"
        part = {n: tensors[n] for n in list(tensors)[2 * k : 2 * k + 2]}
        write_safetensors(folder / name, part)
        weight_map.update({n: name for n in part})
    files = {p.name: p.read_bytes() for p in folder.iterdir()}
    index = {"metadata": {"total_size": sum(t.nbytes for t in tensors.values())}, "weight_map": weight_map}
    files["model.safetensors.index.json"] = json.dumps(index).encode()
    files["config.json"] = b'{"model_type": "llama"}'
    return files, tensors, weight_map


@pytest.fixture
def hub(upstream):
    with HubServer(tokens={TOKEN: "me"}) as server:
        server.add_repo("org/tiny", upstream[0])
        yield server


@pytest.fixture
def dead_hub():
    with HubServer() as server:
        pass  # shut down: its port now refuses connections
    return server


def weight_gets(hub):
    return [
        r for r in hub.requests("GET") if "/resolve/" in r.path and r.path.endswith((".safetensors", ".bin"))
    ]


def small_source(folder: Path) -> Path:
    folder.mkdir()
    rng = np.random.default_rng(3)
    write_safetensors(
        folder / "model.safetensors",
        {f"w{i}": rng.standard_normal((30, 30)).astype("float32") for i in range(4)},
    )
    (folder / "config.json").write_text('{"model_type": "llama"}')
    return folder


# -- item 2: inspect ORG/NAME reads headers only ----------------------------------------------


def test_inspect_repo_id_reads_only_headers_by_range_requests(hub, upstream, tmp_path):
    files, tensors, weight_map = upstream
    proc = run(hub, tmp_path, "inspect", "org/tiny", "--json")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["tensors"] == 6 and summary["total_size"] == sum(t.nbytes for t in tensors.values())
    assert [(s["file"], s["tensors"], s["size"]) for s in summary["shards"]] == [
        (f"model-0000{k}-of-00003.safetensors", 2, 2 * 512 * 256 * 4) for k in (1, 2, 3)
    ]
    gets = weight_gets(hub)
    assert {r.path.rsplit("/", 1)[1] for r in gets} == set(weight_map.values())
    for r in gets:  # only header prefixes: nothing close to a whole shard came down
        assert r.range is not None and r.status == 206, r
        assert r.sent_bytes <= len(files[r.path.rsplit("/", 1)[1]]) // 10 + 1
    cached = [p for p in (tmp_path / "hf-home").rglob("*.safetensors")]
    assert cached == []  # no weight file in the download cache either
    human = run(hub, tmp_path, "inspect", "org/tiny")
    assert human.returncode == 0, human.stderr
    assert "org/tiny (safetensors): 6 tensors, 786,432 parameters" in human.stdout
    assert "model-00003-of-00003.safetensors" in human.stdout


def test_inspect_of_a_repo_without_safetensors_index_downloads_and_says_so(hub, tmp_path):
    import torch

    path = tmp_path / "pytorch_model.bin"
    torch.save({"a.weight": torch.ones(3, 4)}, path)
    hub.add_repo("org/old", {"pytorch_model.bin": path.read_bytes(), "config.json": b"{}"})
    proc = run(hub, tmp_path, "inspect", "org/old", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["parameters"] == 12
    assert (
        proc.stderr.startswith("warning: org/old has no model.safetensors") and "downloading" in proc.stderr
    )


# -- item 3: a mistyped path is said to be one, at once ----------------------------------------

EXPECTED_UNREACHABLE = (
    "error: no such file or folder 'nonexist'; if you meant a Hub repo, it "
    "could not be reached (ConnectError: check the network and HF_ENDPOINT, "
    "or set HF_HUB_OFFLINE=1 to use the local cache)"
)


@pytest.mark.parametrize(
    "args",
    [
        ["inspect", "nonexist"],
        ["split", "nonexist"],
        ["split", "nonexist", "--dry-run"],
        ["plan", "nonexist"],
    ],
)
def test_missing_path_with_unreachable_hub_is_one_line_without_retries(dead_hub, tmp_path, args):
    proc = run(dead_hub, tmp_path, *args)
    assert one_error_line(proc) == EXPECTED_UNREACHABLE
    assert "Retry" not in proc.stderr


def test_missing_path_reaching_the_hub_says_neither_exists(hub, tmp_path):
    line = one_error_line(run(hub, tmp_path, "inspect", "org/nonexist"))
    assert line.startswith("error: org/nonexist: unknown repo id") and "no such local file or folder" in line


def test_path_shaped_spec_never_goes_to_the_hub(hub, tmp_path):
    line = one_error_line(run(hub, tmp_path, "split", "./models/nonexist", "--dry-run"))
    assert line.startswith("error: no such file or folder './models/nonexist'")
    assert hub.requests() == []


# -- item 4: split --push-to checks before writing ----------------------------------------------


@pytest.mark.parametrize(
    "extra,token,code,expected",
    [
        (["--push-to", "me/bad name"], TOKEN, 2, "not a valid Hub repo id"),
        (
            ["--push-to", "me/x", "--create-pr", "--push-revision", "dev"],
            TOKEN,
            2,
            "drop --push-revision dev or drop --create-pr",
        ),
        (["--push-to", "me/x"], None, 1, "not logged in"),
        (["--push-to", "me/x"], "hf_rejectedToken_000000000000", 1, "the token was rejected (401)"),
    ],
)
def test_push_options_are_checked_before_any_byte_is_written(hub, tmp_path, extra, token, code, expected):
    src = small_source(tmp_path / "src")
    out = tmp_path / "out"
    proc = run(hub, tmp_path, "split", str(src), "-o", str(out), *extra, token=token)
    line = one_error_line(proc, code)
    assert expected in line, line
    assert "drop --revision" not in line  # split's own flag names
    assert not out.exists() and [p.name for p in tmp_path.iterdir() if p.name != "hf-home"] == ["src"]
    assert "me/x" not in hub.state.repos
    assert all(r.path == "/api/whoami-v2" for r in hub.requests())  # at most the login check
    if token and token != TOKEN:
        assert "nothing was written" in line


# -- item 6: huggingface_hub's own bars ---------------------------------------------------------

BAR_MARKS = ("Fetching", "Parse safetensors", "it/s]", "%|", "B/s]")


def test_hub_progress_bars_stay_off_with_quiet_json_and_no_terminal(hub, tmp_path):
    procs = [
        run(hub, tmp_path, "split", "org/tiny", "-o", str(tmp_path / "a"), "-q", bars_allowed=True),
        run(hub, tmp_path, "split", "org/tiny", "--dry-run", "--json", bars_allowed=True),
        # Neither -q nor --json: stderr is a pipe here, not a terminal.
        run(
            hub,
            tmp_path,
            "split",
            "org/tiny",
            "-o",
            str(tmp_path / "b"),
            bars_allowed=True,
            HF_HOME=str(tmp_path / "fresh-cache"),
        ),
        run(hub, tmp_path, "push", str(tmp_path / "a"), "me/bars", "--json", bars_allowed=True),
        run(
            hub,
            tmp_path,
            "split",
            "org/tiny",
            "-o",
            str(tmp_path / "c"),
            "-q",
            "--push-to",
            "me/bars2",
            bars_allowed=True,
            HF_HOME=str(tmp_path / "third-cache"),
        ),
    ]
    for proc in procs:
        assert proc.returncode == 0, proc.stderr
        for mark in BAR_MARKS:
            assert mark not in proc.stderr, (proc.args, proc.stderr)
    assert "me/bars" in hub.state.repos and "me/bars2" in hub.state.repos


# -- item 7: a failed push leaves no card behind ------------------------------------------------


def test_failed_push_leaves_no_card_and_the_next_push_renders_it_for_its_repo(hub, tmp_path):
    src = small_source(tmp_path / "src")
    out = tmp_path / "out"
    proc = run(hub, tmp_path, "split", str(src), "-o", str(out), "-q", "--push-to", "someone/typo")
    assert "403" in one_error_line(proc)
    assert (out / "model.safetensors").exists() and not (out / "README.md").exists()
    before = sorted(p.name for p in out.iterdir())
    proc = run(hub, tmp_path, "push", str(out), "me/right", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["card_written"] is True
    card = hub.files("me/right")["README.md"].decode()
    assert "# right" in card and 'from_pretrained("me/right")' in card and "typo" not in card
    assert sorted(p.name for p in out.iterdir()) == before  # push writes nothing into the folder


# -- item 8: a stray .safetensors is refused, as push.md says -----------------------------------


def documented_stray_message() -> str:
    """The message push.md's error table gives for a stray .safetensors."""
    rows = [
        line
        for line in (REPO_ROOT / "docs" / "push.md").read_text().splitlines()
        if line.startswith("|") and "stray" in line
    ]
    assert len(rows) == 1, rows
    return re.findall(r"`([^`]+)`", rows[0])[0]


@pytest.mark.parametrize("sharded", [True, False])
def test_stray_safetensors_is_refused_as_documented(hub, tmp_path, sharded):
    from reshard.split import split_checkpoint

    src = small_source(tmp_path / "src")
    out = tmp_path / "out"
    split_checkpoint(str(src), out, max_shard_size=8000 if sharded else 10**9)
    assert (out / "model.safetensors.index.json").exists() == sharded
    write_safetensors(out / "extra.safetensors", {"x": np.zeros((2, 2), "float32")})
    line = one_error_line(run(hub, tmp_path, "push", str(out), "me/stray"))
    assert "extra.safetensors" in line and documented_stray_message() in line, line
    assert hub.requests() == [] and "me/stray" not in hub.state.repos
