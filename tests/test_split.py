"""`reshard split` end to end on real files: bit-for-bit round trips, what transformers and
huggingface_hub load, the index, headers, JSON output and the CLI as a subprocess."""

import json

import numpy as np
import pytest
import torch
from conftest import logits_of, random_tensors, read_json, run_cli, write_safetensors
from safetensors import safe_open
from safetensors.numpy import load_file
from typer.testing import CliRunner

from reshard.cli.app import app
from reshard.formats.safetensors import read_header
from reshard.plan import plan_shards
from reshard.split import split_checkpoint


def load_all(folder):
    """Every tensor of a folder through the reference reader, keyed by name."""
    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        out.update(load_file(path))
    return out


@pytest.fixture
def mixed_source(tmp_path):
    """Three loose files, mixed dtypes, alphabetical order inside files as the reference
    writer lays them out, extra non-weight files beside them."""
    src = tmp_path / "src"
    src.mkdir()
    specs = {f"model.layers.{i}.{p}": ((16, 32), "float32") for i in range(12) for p in ("a", "b")}
    specs.update(
        {
            "model.embed.weight": ((64, 32), "float16"),
            "model.ids": ((5,), "int64"),
            "model.flag": ((3,), "bool"),
            "model.scalar": ((), "float64"),
        }
    )
    tensors = random_tensors(1, specs)
    names = sorted(tensors)
    for k in range(3):
        write_safetensors(
            src / f"part{k}.safetensors",
            {n: tensors[n] for n in names[k::3]},
            {"format": "pt", "origin": "test"},
        )
    (src / "config.json").write_text('{"model_type": "x"}')
    (src / "tokenizer.json").write_text('{"t": 1}')
    (src / "README.md").write_text("source card")
    return src, tensors


def test_round_trip_is_bit_for_bit(mixed_source, tmp_path):
    src, tensors = mixed_source
    out = tmp_path / "out"
    result = split_checkpoint(str(src), out, max_shard_size=5000)
    assert result.plan.is_sharded and len(result.plan.shards) > 3
    got = load_all(out)
    assert got.keys() == tensors.keys()
    for name, value in tensors.items():
        assert got[name].dtype == value.dtype and got[name].shape == value.shape
        assert got[name].tobytes() == value.tobytes(), name
    # Non-weight files come along; the source's model card and files do not change.
    assert (out / "config.json").read_text() == '{"model_type": "x"}'
    assert (out / "tokenizer.json").exists() and not (out / "README.md").exists()
    assert not list(tmp_path.glob(".*reshard*"))


def test_index_matches_what_transformers_writes(mixed_source, tmp_path):
    src, tensors = mixed_source
    out = tmp_path / "out"
    result = split_checkpoint(str(src), out, max_shard_size=5000)
    index = read_json(out / "model.safetensors.index.json")
    assert index["metadata"]["total_size"] == sum(v.nbytes for v in tensors.values())
    assert index["metadata"]["total_parameters"] == sum(v.size for v in tensors.values())
    assert index["weight_map"] == result.plan.weight_map()
    assert list(index["weight_map"]) == sorted(index["weight_map"])  # sort_keys, like transformers
    for file_name in set(index["weight_map"].values()):
        header = read_header(out / file_name)
        assert header.metadata == {"format": "pt", "origin": "test"}
        assert header.data_start % 8 == 0
        for t in header.tensors:  # every tensor aligned to its element size
            assert (t.offset - header.data_start) % np.dtype(tensors[t.name].dtype).itemsize == 0
        assert sum(t.nbytes for t in header.tensors) <= 5000


def test_natural_order_keeps_layers_together(mixed_source, tmp_path):
    src, _ = mixed_source
    out = tmp_path / "out"
    result = split_checkpoint(str(src), out, max_shard_size=5000)
    order = [n for s in result.plan.shards for n in s.names]
    layers = [int(n.split(".")[2]) for n in order if n.startswith("model.layers.")]
    assert layers == sorted(layers)
    # Each 2-tensor layer of 4096 bytes fits a 5000-byte shard: no layer is split.
    for shard in result.plan.shards:
        ids = {n.split(".")[2] for n in shard.names if n.startswith("model.layers.")}
        for i in ids:
            assert f"model.layers.{i}.a" in shard.names and f"model.layers.{i}.b" in shard.names


def test_single_shard_has_no_index(mixed_source, tmp_path):
    src, tensors = mixed_source
    out = tmp_path / "out"
    split_checkpoint(str(src), out, max_shard_size=10**9)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
    assert load_all(out).keys() == tensors.keys()


def test_oversized_tensor_alone_with_warning(tmp_path):
    src = write_safetensors(
        tmp_path / "m.safetensors",
        random_tensors(2, {"a": ((10,), "float32"), "big": ((100,), "float32"), "c": ((10,), "float32")}),
    )
    proc = run_cli("split", str(src), "-o", str(tmp_path / "out"), "--max-shard", "100", "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert [s["tensors"] for s in data["shards"]] == [1, 1, 1]
    assert [s["size"] for s in data["shards"]] == [40, 400, 40]
    assert "'big' is larger than the shard limit" in proc.stderr


def test_json_output_describes_the_shards(mixed_source, tmp_path):
    src, tensors = mixed_source
    out = tmp_path / "out"
    proc = run_cli("split", str(src), "-o", str(out), "--max-shard", "5KB", "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["output"] == str(out)
    assert data["total_size"] == sum(v.nbytes for v in tensors.values())
    assert sum(s["tensors"] for s in data["shards"]) == len(tensors)
    files = sorted(p.name for p in out.glob("*.safetensors"))
    assert sorted(s["file"] for s in data["shards"]) == files
    for s in data["shards"]:
        with safe_open(out / s["file"], "np") as f:
            assert len(list(f.keys())) == s["tensors"]
            assert sum(f.get_tensor(k).nbytes for k in f.keys()) == s["size"]


def test_dry_run_writes_nothing(mixed_source, tmp_path):
    src, _ = mixed_source
    out = tmp_path / "out"
    result = run_cli("split", str(src), "-o", str(out), "--max-shard", "5KB", "--dry-run", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["dry_run"] is True
    assert not out.exists()


def test_default_output_folder_and_max_shard(mixed_source, tmp_path):
    src, _ = mixed_source
    cwd = tmp_path / "work"
    cwd.mkdir()
    proc = run_cli("split", str(src), "--quiet", cwd=cwd)
    assert proc.returncode == 0, proc.stderr
    assert (cwd / "src-resharded" / "model.safetensors").exists()  # 5GB default: one shard


def test_how_the_source_was_sharded_moves_shard_breaks_but_never_adds_a_shard(mixed_source, tmp_path):
    """Shards break at source-file boundaries where that keeps greedy's shard count (so that
    on XFS/btrfs each shard can share its source file's blocks): the three interleaved
    files give other breaks than one file, the same number of shards, the same tensors."""
    src, tensors = mixed_source
    other = tmp_path / "other"
    other.mkdir()
    write_safetensors(other / "all.safetensors", tensors, {"format": "pt", "origin": "test"})
    a, b = tmp_path / "a", tmp_path / "b"
    ra = split_checkpoint(str(src), a, max_shard_size=5000)
    rb = split_checkpoint(str(other), b, max_shard_size=5000)
    assert len(ra.plan.shards) == len(rb.plan.shards)
    assert [n for s in ra.plan.shards for n in s.names] == [n for s in rb.plan.shards for n in s.names]
    assert ra.plan != rb.plan  # interleaved files: some shards end early at a file change
    assert all(s.size <= 5000 for s in ra.plan.shards)
    single_file = plan_shards([(t, tensors[t].nbytes) for s in rb.plan.shards for t in s.names], 5000)
    assert rb.plan == single_file  # one source file: plain greedy packing
    loaded_a, loaded_b = load_all(a), load_all(b)
    assert loaded_a.keys() == loaded_b.keys() == tensors.keys()
    assert all(np.array_equal(loaded_a[n], tensors[n]) for n in tensors)


def test_transformers_loads_the_output_with_identical_logits(tiny_mistral_dir, tiny_mistral_logits, tmp_path):
    out = tmp_path / "out"
    proc = run_cli("split", str(tiny_mistral_dir), "-o", str(out), "--max-shard", "100KB", "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert len(list(out.glob("model-*-of-*.safetensors"))) > 3
    assert torch.equal(logits_of(out), tiny_mistral_logits)


def test_huggingface_hub_load_torch_model_strict(tiny_mistral_dir, tmp_path):
    from huggingface_hub import load_torch_model
    from transformers import AutoConfig, AutoModelForCausalLM

    out = tmp_path / "out"
    split_checkpoint(str(tiny_mistral_dir), out, max_shard_size=50_000)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(out))
    load_torch_model(model, out, strict=True)
    reference = AutoModelForCausalLM.from_pretrained(tiny_mistral_dir)
    for (name, p), (_, q) in zip(model.state_dict().items(), reference.state_dict().items()):
        assert torch.equal(p, q), name


def test_verify_against_source_passes_and_detects_a_flipped_byte(mixed_source, tmp_path):
    src, _ = mixed_source
    out = tmp_path / "out"
    split_checkpoint(str(src), out, max_shard_size=5000)
    ok = run_cli("verify", str(out), "--against", str(src), "--json")
    assert ok.returncode == 0, ok.stderr
    report = json.loads(ok.stdout)
    assert report["ok"] and report["compared_bytes"] == report["total_size"] > 0
    shard = sorted(out.glob("model-*.safetensors"))[1]
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0xFF
    shard.write_bytes(bytes(data))
    bad = run_cli("verify", str(out), "--against", str(src))
    assert bad.returncode == 1
    assert "differs from" in bad.stderr and shard.name in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1


def test_verify_catches_index_disagreement(mixed_source, tmp_path):
    src, _ = mixed_source
    out = tmp_path / "out"
    split_checkpoint(str(src), out, max_shard_size=5000)
    index_path = out / "model.safetensors.index.json"
    index = read_json(index_path)
    files = sorted(set(index["weight_map"].values()))
    shared_file = next(f for f in files if list(index["weight_map"].values()).count(f) > 1)
    name = sorted(n for n, f in index["weight_map"].items() if f == shared_file)[0]
    index["weight_map"][name] = next(f for f in files if f != shared_file)
    index_path.write_text(json.dumps(index))
    proc = run_cli("verify", str(out))
    assert proc.returncode == 1 and "the index maps to" in proc.stderr


def test_inspect_reports_counts_and_shards(mixed_source):
    src, tensors = mixed_source
    result = CliRunner().invoke(app, ["inspect", str(src), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["tensors"] == len(tensors)
    assert data["total_size"] == sum(v.nbytes for v in tensors.values())
    assert data["parameters_by_dtype"]["F32"] == sum(
        v.size for v in tensors.values() if v.dtype == np.float32
    )
    assert data["largest_tensor"]["name"] == "model.embed.weight"
    assert [s["file"] for s in data["shards"]] == [
        "part0.safetensors",
        "part1.safetensors",
        "part2.safetensors",
    ]


def test_cli_runner_split_and_bad_size(mixed_source, tmp_path):
    src, _ = mixed_source
    runner = CliRunner()
    ok = runner.invoke(app, ["split", str(src), "-o", str(tmp_path / "o"), "--max-shard", "8KiB", "-q"])
    assert ok.exit_code == 0, ok.output
    assert (tmp_path / "o" / "model.safetensors.index.json").exists()
    bad = runner.invoke(app, ["split", str(src), "-o", str(tmp_path / "p"), "--max-shard", "lots"])
    assert bad.exit_code == 2
    assert "cannot read size 'lots'" in bad.output and "2GiB" in bad.output
    assert not (tmp_path / "p").exists()


def test_overwrite_replaces_and_refuses_without_flag(mixed_source, tmp_path):
    src, tensors = mixed_source
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("keep me")
    refused = run_cli("split", str(src), "-o", str(out))
    assert refused.returncode == 1 and "--overwrite" in refused.stderr
    assert (out / "old.txt").read_text() == "keep me"
    replaced = run_cli("split", str(src), "-o", str(out), "--overwrite", "-q")
    assert replaced.returncode == 0, replaced.stderr
    assert not (out / "old.txt").exists() and load_all(out).keys() == tensors.keys()


def test_output_inside_source_is_refused(mixed_source):
    src, _ = mixed_source
    for target in (src, src / "sub"):
        proc = run_cli("split", str(src), "-o", str(target))
        assert proc.returncode == 1 and "inside" in proc.stderr
        assert not (src / "sub").exists()


def test_overwrite_of_a_folder_holding_the_source_is_refused(mixed_source, tmp_path):
    src, _ = mixed_source
    proc = run_cli("split", str(src), "-o", str(tmp_path), "--overwrite")
    assert proc.returncode == 1 and "would delete it" in proc.stderr
    assert (src / "part0.safetensors").exists()


def test_single_file_source_and_index_file_source(mixed_source, tmp_path):
    src, tensors = mixed_source
    out = tmp_path / "one"
    split_checkpoint(str(src / "part1.safetensors"), out, max_shard_size=10**9)
    one = load_file(src / "part1.safetensors")
    assert {k: v.tobytes() for k, v in load_all(out).items()} == {k: v.tobytes() for k, v in one.items()}
    # An index file as the source.
    sharded = tmp_path / "sharded"
    split_checkpoint(str(src), sharded, max_shard_size=5000)
    again = tmp_path / "again"
    split_checkpoint(str(sharded / "model.safetensors.index.json"), again, max_shard_size=3000)
    assert {k: v.tobytes() for k, v in load_all(again).items()} == {
        k: v.tobytes() for k, v in tensors.items()
    }
