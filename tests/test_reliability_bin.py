"""Resume after kill -9 with a PyTorch .bin source: strided views and a dtype conversion
go through the same byte-for-byte check of kept shards as plain copies."""

from __future__ import annotations

import pytest
from conftest import tree_checksums
from test_reliability import assert_clean, cli, kill9, start_paused, tmp_of

ARGS = ["--max-shard", "12300", "-q", "--dtype", "bf16"]


@pytest.fixture(scope="module")
def bin_source(tmp_path_factory):
    import torch

    g = torch.Generator().manual_seed(3)
    state = {f"layers.{i}.w": torch.randn(48, 64, generator=g) for i in range(4)}
    state["layers.1.w"] = torch.randn(64, 48, generator=g).t()  # a strided view
    state["norm"] = torch.ones(64, dtype=torch.float16)
    folder = tmp_path_factory.mktemp("bin") / "src"
    folder.mkdir()
    torch.save(state, folder / "pytorch_model.bin")
    return folder


def test_kill9_and_resume_with_bin_source(bin_source, tmp_path):
    before = tree_checksums(bin_source)
    ref = tmp_path / "ref"
    done = cli("split", str(bin_source), "-o", str(ref), *ARGS)
    assert done.returncode == 0, done.stderr
    reference = tree_checksums(ref)
    shards = sorted(n for n in reference if n.endswith(".safetensors"))
    assert len(shards) == 3  # two 6 KiB bf16 tensors per 12.3 kB shard, then the norm

    out = tmp_path / "out"
    kill9(start_paused(f"after:{shards[1]}", "split", str(bin_source), "-o", str(out), *ARGS))
    assert not out.exists() and tmp_of(out).is_dir()
    done = cli("split", str(bin_source), "-o", str(out), *ARGS, "--resume")
    assert done.returncode == 0, done.stderr
    assert "kept 2 of 3 shards" in done.stderr
    assert_clean(out, reference)
    assert tree_checksums(bin_source) == before
