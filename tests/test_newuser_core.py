"""Issue 18's items in the core: nothing lost silently when an index and its files
disagree (1), a single-file source keeps its folder's files (5), a dry run into a
non-empty -o (10), and verify of a folder with a stray .safetensors (16). Real CLI
subprocesses on real files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import random_tensors, read_json, run_cli, write_safetensors


def qwen2_shaped(folder: Path) -> tuple[Path, dict]:
    """27 tensors in three files (an embedding file, 2 layers, head + norm) plus an index,
    config and tokenizer files, like a Qwen2 checkpoint."""
    folder.mkdir(parents=True)
    specs = {"model.embed_tokens.weight": ((64, 16), "float32")}
    for i in range(2):
        for part in ("q_proj", "k_proj", "v_proj", "o_proj"):
            specs[f"model.layers.{i}.self_attn.{part}.weight"] = ((16, 16), "float32")
        for part in ("q_proj", "k_proj", "v_proj"):
            specs[f"model.layers.{i}.self_attn.{part}.bias"] = ((16,), "float32")
        for part in ("gate_proj", "up_proj", "down_proj"):
            specs[f"model.layers.{i}.mlp.{part}.weight"] = ((16, 16), "float32")
        for part in ("input_layernorm", "post_attention_layernorm"):
            specs[f"model.layers.{i}.{part}.weight"] = ((16,), "float32")
    specs["model.norm.weight"] = ((16,), "float32")
    specs["lm_head.weight"] = ((64, 16), "float32")
    assert len(specs) == 27
    tensors = random_tensors(5, specs)
    groups = {
        "model-00001-of-00003.safetensors": [n for n in tensors if ".layers.0." in n or "embed" in n],
        "model-00002-of-00003.safetensors": [n for n in tensors if ".layers.1." in n],
        "model-00003-of-00003.safetensors": ["model.norm.weight", "lm_head.weight"],
    }
    weight_map = {}
    for file_name, names in groups.items():
        write_safetensors(folder / file_name, {n: tensors[n] for n in names})
        weight_map.update(dict.fromkeys(names, file_name))
    (folder / "config.json").write_text(json.dumps({"model_type": "qwen2", "hidden_size": 16}))
    (folder / "tokenizer.json").write_text("{}")
    return folder, weight_map


def write_index(folder: Path, weight_map: dict) -> None:
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map})
    )


def test_an_index_that_omits_a_whole_file_is_refused_naming_it(tmp_path):
    """Was: 13 of 27 tensors written, exit 0, no warning (issue 18, item 1)."""
    src, weight_map = qwen2_shaped(tmp_path / "src")
    write_index(src, {n: f for n, f in weight_map.items() if f != "model-00002-of-00003.safetensors"})
    done = run_cli("split", str(src), "-o", str(tmp_path / "out"), "--json")
    assert done.returncode == 1
    assert (
        "model-00002-of-00003.safetensors: holds 12 tensor(s) but model.safetensors.index.json "
        "does not list this file" in done.stderr
    )
    assert len(done.stderr.strip().splitlines()) == 1
    assert json.loads(done.stdout)["ok"] is False
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_the_index_itself_as_source_reads_exactly_the_files_it_names(tmp_path):
    src, weight_map = qwen2_shaped(tmp_path / "src")
    kept = {n: f for n, f in weight_map.items() if f != "model-00002-of-00003.safetensors"}
    write_index(src, kept)
    done = run_cli("split", str(src / "model.safetensors.index.json"), "-o", str(tmp_path / "out"), "--json")
    assert done.returncode == 0, done.stderr
    written = {}
    for shard in (tmp_path / "out").glob("*.safetensors"):
        from safetensors import safe_open

        with safe_open(str(shard), "np") as f:
            written.update(dict.fromkeys(f.keys()))
    assert sorted(written) == sorted(kept)


def test_a_tensor_the_index_omits_in_a_listed_file_is_refused_too(tmp_path):
    """The same rule for a tensor missing from the index inside a listed file (it used to
    be kept with only a log line, absent from --json's warnings)."""
    src, weight_map = qwen2_shaped(tmp_path / "src")
    del weight_map["model.layers.1.mlp.up_proj.weight"]
    write_index(src, weight_map)
    done = run_cli("split", str(src), "-o", str(tmp_path / "out"))
    assert done.returncode == 1
    assert (
        "model-00002-of-00003.safetensors: holds 1 tensor(s) that model.safetensors.index.json "
        "does not name (first: 'model.layers.1.mlp.up_proj.weight')"
    ) in done.stderr
    assert not (tmp_path / "out").exists()


def test_an_index_and_files_that_agree_split_every_tensor(tmp_path):
    src, weight_map = qwen2_shaped(tmp_path / "src")
    write_index(src, weight_map)
    done = run_cli("split", str(src), "-o", str(tmp_path / "out"), "--max-shard", "5KB", "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert sum(s["tensors"] for s in report["shards"]) == 27 and report["warnings"] == []


@pytest.mark.parametrize("spec", ["model-00001-of-00003.safetensors", "model.safetensors.index.json"])
def test_a_single_file_source_keeps_its_folder_files_and_name(tmp_path, spec):
    """Issue 18, item 5: config.json and tokenizer files come along, and the default
    output is named after the folder, not `model-resharded`."""
    src, weight_map = qwen2_shaped(tmp_path / "qwen-mini")
    write_index(src, weight_map)
    work = tmp_path / "work"
    work.mkdir()
    done = run_cli("split", str(src / spec), "-q", cwd=work)
    assert done.returncode == 0, done.stderr
    assert [p.name for p in work.iterdir()] == ["qwen-mini-resharded"]
    out = work / "qwen-mini-resharded"
    assert read_json(out / "config.json") == read_json(src / "config.json")
    assert (out / "tokenizer.json").read_text() == "{}"
    assert not (out / "model.safetensors.index.json").exists() or spec.endswith(".json")


def test_dry_run_into_a_non_empty_output_is_allowed(tmp_path):
    """Issue 18, item 10: a dry run writes nothing, so an existing -o is no obstacle (and
    is left exactly as it was)."""
    src, weight_map = qwen2_shaped(tmp_path / "src")
    write_index(src, weight_map)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    done = run_cli("split", str(src), "-o", str(out), "--dry-run", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["dry_run"] is True
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    real = run_cli("split", str(src), "-o", str(out))
    assert real.returncode == 1 and "exists and is not empty" in real.stderr


def test_verify_refuses_a_stray_safetensors_beside_a_single_file(tmp_path):
    """Issue 18, item 16: split refuses such a folder as a source; verify must not pass
    it, and says why in a sentence."""
    folder = tmp_path / "m"
    folder.mkdir()
    write_safetensors(folder / "model.safetensors", random_tensors(1, {"w": ((4, 4), "float32")}))
    write_safetensors(folder / "extra.safetensors", random_tensors(2, {"v": ((4,), "float32")}))
    done = run_cli("verify", str(folder))
    assert done.returncode == 1
    assert "extra.safetensors: a second .safetensors file beside model.safetensors" in done.stderr
    (folder / "extra.safetensors").unlink()
    assert run_cli("verify", str(folder)).returncode == 0


def test_verify_names_a_tensor_the_index_does_not_name_in_a_sentence(tmp_path):
    src, weight_map = qwen2_shaped(tmp_path / "src")
    write_index(src, weight_map)
    out = tmp_path / "out"
    assert run_cli("split", str(src), "-o", str(out), "--max-shard", "4KB", "-q").returncode == 0
    index = read_json(out / "model.safetensors.index.json")
    del index["weight_map"]["model.norm.weight"]
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    done = run_cli("verify", str(out))
    assert done.returncode == 1
    assert "holds tensor 'model.norm.weight', which model.safetensors.index.json does not name" in done.stderr
    assert "None" not in done.stderr
