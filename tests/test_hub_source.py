"""Hub sources, fully offline: a hand-built huggingface_hub cache and HF_HUB_OFFLINE=1,
with the real CLI in a subprocess (huggingface_hub reads its env vars at import)."""

import hashlib
import os
import shutil

import torch
from conftest import logits_of, run_cli
from safetensors.numpy import load_file

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def build_cache(hf_home, repo_id, files: dict, commit=COMMIT, ref="main"):
    """Lay out models--org--name/{blobs,snapshots/<commit>,refs/<ref>} as huggingface_hub does."""
    repo_dir = hf_home / "hub" / ("models--" + repo_id.replace("/", "--"))
    (repo_dir / "blobs").mkdir(parents=True, exist_ok=True)
    snap = repo_dir / "snapshots" / commit
    snap.mkdir(parents=True, exist_ok=True)
    for name, source in files.items():
        data = source.read_bytes()
        blob = repo_dir / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        os.symlink(os.path.relpath(blob, snap), snap / name)
    (repo_dir / "refs").mkdir(exist_ok=True)
    (repo_dir / "refs" / ref).write_text(commit)
    return snap


def sharded_tiny(tiny_mistral_dir, tmp_path):
    """The tiny Mistral re-sharded into several files, the way a Hub repo ships it."""
    from reshard.split import split_checkpoint

    folder = tmp_path / "upstream"
    split_checkpoint(str(tiny_mistral_dir), folder, max_shard_size=60_000)
    return {p.name: p for p in folder.iterdir()}


def offline_env(hf_home):
    return {"HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}


def test_split_from_offline_hub_cache(tiny_mistral_dir, tiny_mistral_logits, tmp_path):
    files = sharded_tiny(tiny_mistral_dir, tmp_path)
    assert len([f for f in files if f.endswith(".safetensors")]) > 2
    hf_home = tmp_path / "hf"
    build_cache(hf_home, "acme/tiny-mistral", files)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    proc = run_cli(
        "split", "acme/tiny-mistral", "--max-shard", "200KB", "-q", env=offline_env(hf_home), cwd=cwd
    )
    assert proc.returncode == 0, proc.stderr
    out = cwd / "tiny-mistral-resharded"
    assert (out / "config.json").exists() and (out / "model.safetensors.index.json").exists()
    assert not any(p.is_symlink() for p in out.iterdir())  # real files, not links into the cache
    assert torch.equal(logits_of(out), tiny_mistral_logits)


def test_offline_revision_by_commit_and_prefers_safetensors(tiny_mistral_dir, tmp_path):
    files = sharded_tiny(tiny_mistral_dir, tmp_path)
    bin_file = tmp_path / "pytorch_model.bin"
    bin_file.write_bytes(b"not a real pickle: must never be read when safetensors exist")
    hf_home = tmp_path / "hf"
    build_cache(hf_home, "acme/both", {**files, "pytorch_model.bin": bin_file})
    out = tmp_path / "out"
    proc = run_cli(
        "split", "acme/both", "--revision", COMMIT, "-o", str(out), "--json", env=offline_env(hf_home)
    )
    assert proc.returncode == 0, proc.stderr
    names = set()
    for p in out.glob("*.safetensors"):
        names.update(load_file(p))
    assert names == set(load_file(tiny_mistral_dir / "model.safetensors"))


def test_incomplete_cache_names_the_missing_shard(tiny_mistral_dir, tmp_path):
    files = sharded_tiny(tiny_mistral_dir, tmp_path)
    missing = sorted(f for f in files if f.startswith("model-"))[-1]
    del files[missing]
    hf_home = tmp_path / "hf"
    build_cache(hf_home, "acme/partial", files)
    out = tmp_path / "out"
    proc = run_cli("split", "acme/partial", "-o", str(out), env=offline_env(hf_home))
    assert proc.returncode == 1
    assert missing in proc.stderr and "missing" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not out.exists()


def test_unknown_revision_offline(tiny_mistral_dir, tmp_path):
    hf_home = tmp_path / "hf"
    build_cache(hf_home, "acme/tiny", sharded_tiny(tiny_mistral_dir, tmp_path))
    proc = run_cli(
        "split", "acme/tiny", "--revision", "v9", "-o", str(tmp_path / "o"), env=offline_env(hf_home)
    )
    assert proc.returncode == 1 and proc.stderr.startswith("error: acme/tiny:")
    assert not (tmp_path / "o").exists()
    shutil.rmtree(hf_home)
