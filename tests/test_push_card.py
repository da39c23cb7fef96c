"""Provenance recorded by split, and the model card built from it (no network)."""

from __future__ import annotations

import json

import numpy as np
import yaml
from conftest import tree_checksums, write_safetensors

from reshard.formats.safetensors import read_header
from reshard.hub.card import card_text, read_provenance, render_card
from reshard.hub.push import model_files
from reshard.split import split_checkpoint


def make_source(folder, seed=0, metadata=None):
    rng = np.random.default_rng(seed)
    folder.mkdir()
    write_safetensors(
        folder / "model.safetensors",
        {f"w{i}": rng.standard_normal((20, 25)).astype("float32") for i in range(4)},
        metadata,
    )
    (folder / "config.json").write_text('{"model_type": "llama"}')
    return folder


def test_sharded_output_records_provenance_in_the_index_only(tmp_path):
    src = make_source(tmp_path / "src", metadata={"format": "pt", "origin": "x"})
    out = tmp_path / "out"
    split_checkpoint(str(src), out, max_shard_size=4000)
    meta = json.loads((out / "model.safetensors.index.json").read_text())["metadata"]
    assert {k: v for k, v in meta.items() if k.startswith("reshard_")} == {
        "reshard_source_type": "local",
        "reshard_max_shard_size": "4000",
        "reshard_version": "0.1.0",
    }
    for shard in out.glob("*.safetensors"):  # shard headers keep the source's metadata as is
        assert read_header(shard).metadata == {"format": "pt", "origin": "x"}
    assert read_provenance(out)["reshard_max_shard_size"] == "4000"


def test_single_file_output_records_provenance_in_its_header(tmp_path):
    src = make_source(tmp_path / "src")
    out = tmp_path / "out"
    split_checkpoint(str(src), out, max_shard_size=10**9, dtype="BF16")
    meta = read_header(out / "model.safetensors").metadata
    assert meta["format"] == "pt" and meta["reshard_dtype"] == "BF16"
    assert meta["reshard_max_shard_size"] == "1000000000"
    assert read_provenance(out) == {k: v for k, v in meta.items() if k.startswith("reshard_")}


def test_output_does_not_depend_on_the_source_folder_name_or_location(tmp_path):
    a = make_source(tmp_path / "one")
    (tmp_path / "deeper").mkdir()
    b = make_source(tmp_path / "deeper" / "other-name")
    split_checkpoint(str(a), tmp_path / "out-a", max_shard_size=4000)
    split_checkpoint(str(b), tmp_path / "out-b", max_shard_size=4000)
    assert tree_checksums(tmp_path / "out-a") == tree_checksums(tmp_path / "out-b")
    index = (tmp_path / "out-a" / "model.safetensors.index.json").read_text()
    assert str(tmp_path) not in index and "one" not in index


def test_resharding_a_resharded_folder_replaces_stale_provenance(tmp_path):
    src = make_source(tmp_path / "src")
    first = tmp_path / "first"
    split_checkpoint(str(src), first, max_shard_size=10**9)  # single file: keys in the header
    second = tmp_path / "second"
    split_checkpoint(str(first), second, max_shard_size=4000)
    for shard in second.glob("*.safetensors"):
        assert not any(k.startswith("reshard_") for k in read_header(shard).metadata)
    assert read_provenance(second)["reshard_max_shard_size"] == "4000"


def test_card_front_matter_is_valid_yaml_and_names_the_hub_parent(tmp_path):
    provenance = {
        "reshard_source": "org/model-v1.5",
        "reshard_source_type": "hub",
        "reshard_revision": "a" * 40,
        "reshard_max_shard_size": "2000000000",
        "reshard_dtype": "BF16",
        "reshard_version": "0.1.0",
    }
    card = render_card(
        provenance,
        [
            ("model-00001-of-00002.safetensors", 1_500_000_000, 10),
            ("model-00002-of-00002.safetensors", 900_000_000, 7),
        ],
        {"F32"},
        "me/model-2GB",
    )
    assert card.startswith("---\n")
    meta = yaml.safe_load(card.split("---\n")[1])
    assert meta == {
        "base_model": "org/model-v1.5",
        "library_name": "transformers",
        "tags": ["safetensors", "reshard"],
    }
    assert "# model-2GB" in card
    assert "| dtype | BF16 (converted) |" in card
    assert f"| Source revision | `{'a' * 40}` |" in card
    assert "| **total** | 17 | 2.40 GB |" in card


def test_card_for_a_folder_reshard_did_not_write(tmp_path):
    folder = tmp_path / "plain"
    folder.mkdir()
    write_safetensors(folder / "model.safetensors", {"w": np.zeros((2, 2), "float32")})
    text = card_text(folder)
    assert "provenance not recorded" in text and "base_model" not in text
    assert not (folder / "README.md").exists()  # rendered for the upload, never written here
    (folder / "README.md").write_text("mine")
    assert card_text(folder) is None  # a folder's own README.md is what gets published


def test_model_files_leaves_out_temp_hidden_stray_and_nested_files(tmp_path):
    src = make_source(tmp_path / "src")
    out = tmp_path / "out"
    split_checkpoint(str(src), out, max_shard_size=4000)
    (out / ".model-00001-of-00002.safetensors.reshard-tmp").write_bytes(b"x")
    (out / "notes.log").write_text("x")
    (out / "sub").mkdir()
    (out / "sub" / "config.json").write_text("{}")
    (out / "tokenizer.model").write_bytes(b"spm")
    assert model_files(out) == [
        "config.json",
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "model.safetensors.index.json",
        "tokenizer.model",
    ]
