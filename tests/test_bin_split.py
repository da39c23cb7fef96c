"""PyTorch .bin sources end to end: real torch.save shards in, `reshard split` as a real
subprocess, transformers loads the output with the same logits as the .bin original."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import TINY_MISTRAL, logits_of, read_json, run_cli

torch = pytest.importorskip("torch")


def tiny_state_dict(seed: int, **overrides):
    """A tiny random Mistral's config and its state dict (tied tensors share storage)."""
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(seed)
    config = MistralConfig(**{**TINY_MISTRAL, **overrides})
    model = MistralForCausalLM(config).eval()
    return config, model.state_dict()


def save_bin_shards(folder: Path, config, state: dict, shards: int = 2) -> Path:
    """Write ``pytorch_model-0000i-of-0000N.bin`` shards with torch.save + the index +
    config.json, as transformers 4 used to. Embeddings and lm_head go in the first shard,
    so tied names keep sharing one storage inside that file."""
    folder.mkdir(parents=True, exist_ok=True)
    names = sorted(state, key=lambda n: (not n.startswith(("model.embed", "lm_head")), n))
    groups = [names[i::shards] for i in range(shards)]
    groups[0] = [n for n in names if n.startswith(("model.embed", "lm_head"))] + [
        n for n in groups[0] if not n.startswith(("model.embed", "lm_head"))
    ]
    groups[1:] = [[n for n in g if not n.startswith(("model.embed", "lm_head"))] for g in groups[1:]]
    weight_map = {}
    for i, group in enumerate(groups, start=1):
        file_name = f"pytorch_model-{i:05d}-of-{shards:05d}.bin"
        torch.save({n: state[n] for n in group}, folder / file_name)
        weight_map.update({n: file_name for n in group})
    total = sum(t.numel() * t.element_size() for t in state.values())
    (folder / "pytorch_model.bin.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map})
    )
    config.save_pretrained(folder)
    return folder


def split_json(*args: str) -> dict:
    proc = run_cli("split", *args, "--json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_sharded_bin_with_tied_embeddings_gives_same_logits(tmp_path):
    config, state = tiny_state_dict(1, tie_word_embeddings=True)
    assert state["lm_head.weight"].data_ptr() == state["model.embed_tokens.weight"].data_ptr()
    src = save_bin_shards(tmp_path / "src", config, state)
    out = tmp_path / "out"
    result = split_json(str(src), "-o", str(out), "--max-shard", "60KB")

    assert "lm_head.weight" in result["dropped"]
    assert "tie_word_embeddings" in result["dropped"]["lm_head.weight"]
    index = read_json(out / "model.safetensors.index.json")
    assert "lm_head.weight" not in index["weight_map"]
    assert set(index["weight_map"]) == set(state) - {"lm_head.weight"}
    assert len(set(index["weight_map"].values())) == len(result["shards"]) > 1
    assert not list(out.glob("*.bin"))
    assert torch.equal(logits_of(out), logits_of(src))


def test_non_contiguous_views_are_written_as_contiguous_tensors(tmp_path):
    config, state = tiny_state_dict(2)
    # The same values, stored transposed / as a column slice / at a storage offset.
    q = state["model.layers.0.self_attn.q_proj.weight"]
    state["model.layers.0.self_attn.q_proj.weight"] = q.t().contiguous().t()
    gate = state["model.layers.1.mlp.gate_proj.weight"]
    wide = torch.cat([torch.randn(gate.shape[0], 3), gate, torch.randn(gate.shape[0], 5)], dim=1)
    state["model.layers.1.mlp.gate_proj.weight"] = wide[:, 3 : 3 + gate.shape[1]]
    norm = state["model.norm.weight"]
    state["model.norm.weight"] = torch.cat([torch.randn(7), norm])[7:]
    assert not state["model.layers.0.self_attn.q_proj.weight"].is_contiguous()
    assert not state["model.layers.1.mlp.gate_proj.weight"].is_contiguous()
    src = save_bin_shards(tmp_path / "src", config, state)
    out = tmp_path / "out"
    split_json(str(src), "-o", str(out))

    from safetensors.torch import load_file

    written = load_file(out / "model.safetensors")
    for name in (
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.1.mlp.gate_proj.weight",
        "model.norm.weight",
    ):
        assert torch.equal(written[name], state[name]), name
    assert torch.equal(logits_of(out), logits_of(src))
    verify = run_cli("verify", str(out), "--against", str(src))
    assert verify.returncode == 0, verify.stderr


def test_nested_training_checkpoint_with_key(tmp_path):
    config, state = tiny_state_dict(3)
    src = tmp_path / "run"
    src.mkdir()
    optimizer = {
        "state": {0: {"exp_avg": torch.zeros(4), "step": torch.tensor(10.0)}},
        "param_groups": [{"lr": 1e-4, "params": [0]}],
    }
    torch.save(
        {"model": state, "optimizer": optimizer, "epoch": 3, "args": {"lr": 1e-4}}, src / "checkpoint.pt"
    )
    config.save_pretrained(src)
    reference = tmp_path / "reference"
    config.save_pretrained(reference)
    torch.save(state, reference / "pytorch_model.bin")

    out = tmp_path / "out"
    result = split_json(str(src / "checkpoint.pt"), "-o", str(out), "--key", "model")
    assert set(result["dropped"]) == {"optimizer", "epoch", "args"}
    assert result["total_parameters"] == sum(t.numel() for t in state.values())
    (out / "config.json").write_text((src / "config.json").read_text())
    assert torch.equal(logits_of(out), logits_of(reference))

    # Without --key the one nested state dict is found; a wrong key is one clear line.
    auto = split_json(str(src / "checkpoint.pt"), "-o", str(tmp_path / "auto"))
    assert auto["total_parameters"] == result["total_parameters"]
    bad = run_cli("split", str(src / "checkpoint.pt"), "-o", str(tmp_path / "bad"), "--key", "ema")
    assert bad.returncode == 2
    assert bad.stderr.count("\n") == 1 and "--key 'ema'" in bad.stderr and "model" in bad.stderr
    assert not (tmp_path / "bad").exists()
    assert not list(tmp_path.glob(".bad*"))


def test_inspect_and_verify_against_bin(tmp_path):
    config, state = tiny_state_dict(4, tie_word_embeddings=True)
    src = save_bin_shards(tmp_path / "src", config, state)
    proc = run_cli("inspect", str(src), "--json")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["format"] == "bin"
    assert summary["tensors"] == len(state) - 1
    assert summary["parameters"] == sum(t.numel() for n, t in state.items() if n != "lm_head.weight")
    assert [s["file"] for s in summary["shards"]] == [
        "pytorch_model-00001-of-00002.bin",
        "pytorch_model-00002-of-00002.bin",
    ]
    assert "lm_head.weight" in summary["dropped"]

    out = tmp_path / "out"
    split_json(str(src), "-o", str(out), "--dtype", "fp16")
    verify = run_cli("verify", str(out), "--against", str(src), "--json")
    assert verify.returncode == 0, verify.stderr
    report = json.loads(verify.stdout)
    assert report["compared_bytes"] == report["total_size"] == summary["total_size"] // 2
    # A changed byte in the output is caught against the .bin source.
    shard = sorted(out.glob("*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0xFF
    shard.write_bytes(bytes(data))
    bad = run_cli("verify", str(out), "--against", str(src))
    assert bad.returncode != 0 and "differs" in bad.stderr


def test_legacy_non_zip_format_converts(tmp_path):
    config, state = tiny_state_dict(5)
    src = tmp_path / "legacy"
    src.mkdir()
    torch.save(state, src / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    config.save_pretrained(src)
    out = tmp_path / "out"
    split_json(str(src), "-o", str(out))
    assert torch.equal(logits_of(out), logits_of(src))


def test_tied_names_without_tie_config_are_written_twice(tmp_path):
    """Sharing storage is not enough to drop a name: without tie_word_embeddings both are
    written as independent copies, so nothing is lost."""
    config, state = tiny_state_dict(6, tie_word_embeddings=True)
    config.tie_word_embeddings = False
    src = tmp_path / "src"
    src.mkdir()
    torch.save(state, src / "pytorch_model.bin")
    config.save_pretrained(src)
    result = split_json(str(src), "-o", str(tmp_path / "out"))
    assert result["dropped"] == {}
    from safetensors.torch import load_file

    written = load_file(tmp_path / "out" / "model.safetensors")
    assert torch.equal(written["lm_head.weight"], written["model.embed_tokens.weight"])
    assert torch.equal(written["lm_head.weight"], state["lm_head.weight"])


def test_hub_repo_with_only_bin_weights(tmp_path):
    """A Hub repo that ships only sharded .bin files (like mistralai/Mistral-7B-v0.1's
    original layout), read from an offline huggingface_hub cache."""
    from test_hub_source import build_cache, offline_env

    config, state = tiny_state_dict(7, tie_word_embeddings=True)
    src = save_bin_shards(tmp_path / "upstream", config, state)
    hf_home = tmp_path / "hf"
    build_cache(hf_home, "acme/tiny-bin", {p.name: p for p in src.iterdir()})
    out = tmp_path / "out"
    proc = run_cli("split", "acme/tiny-bin", "-o", str(out), "--json", env=offline_env(hf_home))
    assert proc.returncode == 0, proc.stderr
    assert "lm_head.weight" in json.loads(proc.stdout)["dropped"]
    assert torch.equal(logits_of(out), logits_of(src))
