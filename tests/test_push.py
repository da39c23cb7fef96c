"""`reshard push` and `split --push-to` end to end against tests/hubserver.py: the real CLI in a
subprocess (huggingface_hub reads HF_ENDPOINT & co. at import), the real huggingface_hub
upload code, and assertions on the bytes the server stored."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import yaml
from conftest import write_safetensors
from hubserver import HubServer

TOKEN = "hf_pushTestToken1234567890secret"
OTHER = "hf_otherUsersToken0987654321secret"


def run(
    hub: HubServer, tmp_path, *args: str, token: str | None = TOKEN, debug: bool = False, **extra_env: str
) -> subprocess.CompletedProcess:
    """The reshard CLI as a subprocess talking only to ``hub``."""
    env = {**os.environ, **hub.env(str(tmp_path / "hf-home"), token), **extra_env}
    env.pop("RESHARD_DEBUG", None)
    if debug:
        env["RESHARD_DEBUG"] = "1"
    return subprocess.run(
        [sys.executable, "-m", "reshard.cli", *args], capture_output=True, text=True, env=env, timeout=120
    )


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


@pytest.fixture
def hub():
    with HubServer(tokens={TOKEN: "me", OTHER: "other"}) as server:
        yield server


@pytest.fixture
def folder(tmp_path):
    """A split output with 3 shards, config and tokenizer files, plus junk that must stay home."""
    from reshard.split import split_checkpoint

    rng = np.random.default_rng(0)
    src = tmp_path / "src"
    src.mkdir()
    write_safetensors(
        src / "model.safetensors",
        {f"model.layers.{i}.w": rng.standard_normal((40, 50)).astype("float32") for i in range(6)},
    )
    (src / "config.json").write_text('{"model_type": "llama"}')
    (src / "tokenizer.json").write_text('{"version": "1.0"}')
    (src / "generation_config.json").write_text('{"do_sample": false}')
    out = tmp_path / "out"
    split_checkpoint(str(src), out, max_shard_size=20_000)
    # Junk: a leftover temp file, a hidden lock, an editor backup, a sub-folder, a log.
    (out / ".model-00001-of-00003.safetensors.reshard-tmp").write_bytes(b"partial")
    (out / ".lock").write_text("")
    (out / "train.log").write_text("loss 1.0")
    (out / "config.json~").write_text("{}")
    (out / "checkpoint-100").mkdir()
    (out / "checkpoint-100" / "optimizer.pt").write_bytes(b"x" * 100)
    return out


MODEL_FILES = {
    "README.md",
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "model.safetensors.index.json",
    "model-00001-of-00003.safetensors",
    "model-00002-of-00003.safetensors",
    "model-00003-of-00003.safetensors",
}


def test_push_creates_repo_and_stores_byte_identical_files(hub, folder, tmp_path):
    proc = run(hub, tmp_path, "push", str(folder), "me/tiny-20KB", "--private")
    assert proc.returncode == 0, proc.stderr
    stored = hub.files("me/tiny-20KB")
    assert set(stored) == MODEL_FILES | {".gitattributes"}  # no temp, hidden or stray files
    for name in MODEL_FILES - {"README.md"}:
        assert stored[name] == (folder / name).read_bytes(), name
    assert stored["README.md"].startswith(b"---\n")  # the generated card...
    assert not (folder / "README.md").exists()  # ...which was never written into the folder
    assert hub.state.repos["me/tiny-20KB"].private
    commit = hub.state.repos["me/tiny-20KB"].refs["main"]
    assert (
        proc.stdout.strip()
        == f"pushed 8 files to me/tiny-20KB (main): {hub.endpoint}/me/tiny-20KB/commit/{commit}"
    )
    # Shards went through LFS, each sent exactly once, with the bytes of the local file.
    puts = hub.requests("PUT")
    assert sorted(p.path.rsplit("/", 1)[1] for p in puts) == sorted(
        hashlib.sha256((folder / f"model-0000{i}-of-00003.safetensors").read_bytes()).hexdigest()
        for i in (1, 2, 3)
    )


def test_model_card_has_valid_front_matter_and_a_shard_table(hub, folder, tmp_path):
    proc = run(hub, tmp_path, "push", str(folder), "me/card", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["card_written"] is True
    card = hub.files("me/card")["README.md"].decode()
    _, front, body = card.split("---\n", 2)
    meta = yaml.safe_load(front)
    assert meta["library_name"] == "transformers" and "reshard" in meta["tags"]
    assert "base_model" not in meta  # a local source has no Hub parent to name
    assert "| Max shard size | 20.00 KB (20,000 bytes of tensor data) |" in body
    assert "| dtype | F32 (unchanged) |" in body
    for i, size in ((1, 16000), (2, 16000), (3, 16000)):
        assert f"| `model-0000{i}-of-00003.safetensors` | 2 | {size / 1000:.2f} KB |" in body
    assert 'from_pretrained("me/card")' in body
    assert str(tmp_path) not in card  # no local path leaks into a published card


def test_an_existing_readme_is_kept_as_is(hub, folder, tmp_path):
    (folder / "README.md").write_text("---\nlicense: mit\n---\n# mine\n")
    proc = run(hub, tmp_path, "push", str(folder), "me/own-card", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["card_written"] is False
    assert hub.files("me/own-card")["README.md"] == b"---\nlicense: mit\n---\n# mine\n"


def test_rerun_uploads_nothing_and_makes_no_commit(hub, folder, tmp_path):
    assert run(hub, tmp_path, "push", str(folder), "me/again").returncode == 0
    commit = hub.state.repos["me/again"].refs["main"]
    before = len(hub.requests())
    proc = run(hub, tmp_path, "push", str(folder), "me/again", "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["changed"] is False and result["commit"] == commit
    rerun = hub.requests()[before:]
    assert not [r for r in rerun if r.method == "PUT" or "/commit/" in r.path]
    assert hub.state.repos["me/again"].refs["main"] == commit
    assert proc.stderr == ""  # "nothing changed" is success, not a warning


def test_interrupted_upload_resumes_without_resending(hub, folder, tmp_path):
    shard2 = hashlib.sha256((folder / "model-00002-of-00003.safetensors").read_bytes()).hexdigest()
    hub.state.fail_put_oids.add(shard2)  # the connection "drops" on shard 2
    proc = run(hub, tmp_path, "push", str(folder), "me/resume")
    one_error_line(proc)
    assert "model-00001-of-00003.safetensors" not in hub.files("me/resume")  # nothing committed
    assert len(hub.state.lfs) == 2  # ...but shards 1 and 3 reached storage
    hub.state.fail_put_oids.clear()
    hub.state.fail_commits = 1  # and then the commit itself fails once
    before = len(hub.requests())
    one_error_line(run(hub, tmp_path, "push", str(folder), "me/resume"))
    assert [r.path for r in hub.requests("PUT")[-1:]] == [f"/lfs-upload/{shard2}"]
    assert len([r for r in hub.requests()[before:] if r.method == "PUT"]) == 1  # only shard 2
    before = len(hub.requests())
    proc = run(hub, tmp_path, "push", str(folder), "me/resume")
    assert proc.returncode == 0, proc.stderr
    assert not [r for r in hub.requests()[before:] if r.method == "PUT"]  # all there already
    stored = hub.files("me/resume")
    assert all(stored[n] == (folder / n).read_bytes() for n in MODEL_FILES - {"README.md"})


def test_create_pr_opens_a_pull_request_and_leaves_main_alone(hub, folder, tmp_path):
    proc = run(
        hub,
        tmp_path,
        "push",
        str(folder),
        "me/pr",
        "--create-pr",
        "--json",
        "--commit-message",
        "Reshard to 20KB",
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["pr_url"] == f"{hub.endpoint}/me/pr/discussions/1" == result["url"]
    repo = hub.state.repos["me/pr"]
    assert "refs/pr/1" in repo.refs
    assert set(hub.files("me/pr", "refs/pr/1")) == MODEL_FILES | {".gitattributes"}
    assert set(hub.files("me/pr")) == {".gitattributes"}
    assert repo.commit_messages[repo.refs["refs/pr/1"]] == "Reshard to 20KB"


def test_revision_commits_to_a_new_branch(hub, folder, tmp_path):
    proc = run(hub, tmp_path, "push", str(folder), "me/branchy", "--revision", "20KB")
    assert proc.returncode == 0, proc.stderr
    assert "(20KB)" in proc.stdout
    assert set(hub.files("me/branchy", "20KB")) == MODEL_FILES | {".gitattributes"}
    assert set(hub.files("me/branchy")) == {".gitattributes"}


def test_create_pr_with_another_revision_is_a_usage_error(hub, folder, tmp_path):
    proc = run(hub, tmp_path, "push", str(folder), "me/x", "--create-pr", "--revision", "dev")
    assert proc.returncode == 2 and "--create-pr" in one_error_line(proc)
    assert hub.requests() == []


def test_a_folder_that_fails_verification_is_refused_before_any_request(hub, folder, tmp_path):
    (folder / "model-00002-of-00003.safetensors").unlink()
    proc = run(hub, tmp_path, "push", str(folder), "me/broken")
    line = one_error_line(proc)
    assert "not pushing" in line and "model-00002-of-00003.safetensors" in line
    assert hub.requests() == [] and "me/broken" not in hub.state.repos
    assert not (folder / "README.md").exists()


def test_wrong_token_gives_one_line_401_error(hub, folder, tmp_path):
    proc = run(hub, tmp_path, "push", str(folder), "me/x", token="hf_wrongWrongWrong")
    line = one_error_line(proc)
    assert "401" in line and "hf auth login" in line
    assert "hf_wrongWrongWrong" not in proc.stdout + proc.stderr


def test_not_logged_in(hub, folder, tmp_path):
    line = one_error_line(run(hub, tmp_path, "push", str(folder), "me/x", token=None))
    assert "not logged in" in line and "hf auth login" in line and "HF_TOKEN" in line


def test_no_write_access_to_namespace_or_repo(hub, folder, tmp_path):
    line = one_error_line(run(hub, tmp_path, "push", str(folder), "someone/x"))
    assert "403" in line and "'someone'" in line and "cannot create" in line
    hub.add_repo("other/existing", {"config.json": b"{}"})
    line = one_error_line(run(hub, tmp_path, "push", str(folder), "other/existing"))
    assert "no write access" in line and "403" in line
    assert set(hub.files("other/existing")) == {"config.json"}


def test_network_down_is_one_line(folder, tmp_path):
    with HubServer() as dead:
        pass  # shut down: its port now refuses connections
    line = one_error_line(run(dead, tmp_path, "push", str(folder), "me/x"))
    assert "cannot reach the Hub" in line and "again" in line


def test_token_never_appears_in_output_even_with_debug_tracebacks(hub, folder, tmp_path):
    ok = run(hub, tmp_path, "push", str(folder), "me/debug", "--token", TOKEN, debug=True)
    assert ok.returncode == 0, ok.stderr
    assert "DEBUG" in ok.stderr  # debug logging really was on
    hub.add_repo("other/locked", {"config.json": b"{}"})
    failed = run(hub, tmp_path, "push", str(folder), "other/locked", debug=True)
    assert failed.returncode != 0 and "Traceback" in failed.stderr
    for proc in (ok, failed):
        assert TOKEN not in proc.stdout + proc.stderr
        assert TOKEN[3:20] not in proc.stdout + proc.stderr


def test_split_push_to_publishes_after_a_verified_split(hub, tmp_path):
    rng = np.random.default_rng(1)
    src = tmp_path / "src"
    src.mkdir()
    write_safetensors(
        src / "model.safetensors",
        {f"w{i}": rng.standard_normal((30, 30)).astype("float32") for i in range(4)},
    )
    out = tmp_path / "out"
    proc = run(
        hub,
        tmp_path,
        "split",
        str(src),
        "-o",
        str(out),
        "--max-shard",
        "8KB",
        "--json",
        "--push-to",
        "me/split-push",
        "--create-pr",
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert len(result["shards"]) == 2 and result["push"]["pr_url"].endswith("/discussions/1")
    stored = hub.files("me/split-push", "refs/pr/1")
    for path in out.iterdir():
        assert stored[path.name] == path.read_bytes()


def test_split_push_to_failure_keeps_the_folder_and_says_how_to_retry(hub, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    write_safetensors(src / "model.safetensors", {"w": np.ones((4, 4), "float32")})
    out = tmp_path / "my out"
    # The login is fine (checked before the split); creating a repo in someone else's
    # namespace is what fails, after the split.
    proc = run(
        hub,
        tmp_path,
        "split",
        str(src),
        "-o",
        str(out),
        "--push-to",
        "someone/x",
        "--commit-message",
        "2 shards",
    )
    line = one_error_line(proc)
    assert "403" in line and f"reshard push '{out}' someone/x --commit-message '2 shards'" in line
    assert (out / "model.safetensors").exists()


def test_push_to_with_dry_run_is_refused(hub, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    write_safetensors(src / "model.safetensors", {"w": np.ones((4, 4), "float32")})
    proc = run(hub, tmp_path, "split", str(src), "--dry-run", "--push-to", "me/x")
    assert proc.returncode == 2 and "--dry-run" in one_error_line(proc)
    assert hub.requests() == []


def test_invalid_repo_id_is_refused_before_any_request(hub, folder, tmp_path):
    proc = run(hub, tmp_path, "push", str(folder), "me/bad name")
    assert proc.returncode == 2 and "not a valid Hub repo id" in one_error_line(proc)
    assert hub.requests() == []
