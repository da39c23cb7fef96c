"""FP8 block-128 output: transformers loads it on CPU (dequantizing) and agrees with the
source; verify checks the scales and every block's bound."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import run_cli
from tests.quant_models import PROMPTS, cosine, hf_logits, make_tiny_llama


@pytest.fixture(scope="session")
def bf16_llama(tmp_path_factory) -> Path:
    # intermediate 200: not a multiple of 128, so edge blocks are partial
    return make_tiny_llama(
        tmp_path_factory.mktemp("tiny-llama-bf16") / "tiny", dtype="bfloat16", intermediate_size=200, std=0.05
    )


@pytest.fixture(scope="session")
def fp8_dir(bf16_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("fp8") / "tiny-fp8"
    proc = run_cli(
        "split", str(bf16_llama), "-o", str(out), "--quantize", "fp8", "--json", "--max-shard", "60KB"
    )
    assert proc.returncode == 0, proc.stderr
    return out, json.loads(proc.stdout)


def test_transformers_loads_fp8_on_cpu(fp8_dir, bf16_llama):
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, result = fp8_dir
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"] == {
        "quant_method": "fp8",
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "weight_block_size": [128, 128],
    }
    assert (out / "model.safetensors.index.json").exists() and len(result["shards"]) > 1
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    with safe_open(out / index["model.layers.0.mlp.down_proj.weight"], "pt") as f:
        assert f.get_tensor("model.layers.0.mlp.down_proj.weight").dtype == torch.float8_e4m3fn
    with safe_open(out / index["model.layers.0.mlp.down_proj.weight_scale_inv"], "pt") as f:
        s = f.get_tensor("model.layers.0.mlp.down_proj.weight_scale_inv")
        assert s.dtype == torch.float32 and tuple(s.shape) == (1, 2)
    with safe_open(out / index["model.embed_tokens.weight"], "pt") as f:
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.bfloat16
    assert "lm_head.weight_scale_inv" not in index
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    ref = AutoModelForCausalLM.from_pretrained(bf16_llama).eval()
    tok = AutoTokenizer.from_pretrained(bf16_llama)
    for prompt in PROMPTS:
        ids = tok(prompt, add_special_tokens=False)["input_ids"]
        assert cosine(hf_logits(model, ids), hf_logits(ref, ids)) >= 0.995
    q = result["quantize"]
    assert q["type"] == "fp8" and q["bytes_after"] < q["bytes_before"]


def test_verify_against_fp8(fp8_dir, bf16_llama, tmp_path):
    out, _ = fp8_dir
    proc = run_cli("verify", str(out), "--against", str(bf16_llama), "--json")
    assert proc.returncode == 0, proc.stderr
    import shutil

    from safetensors import safe_open

    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    index = json.loads((bad / "model.safetensors.index.json").read_text())["weight_map"]
    name = "model.layers.1.self_attn.o_proj.weight_scale_inv"
    from reshard.formats.safetensors import read_header

    t = next(t for t in read_header(bad / index[name]).tensors if t.name == name)
    with open(t.file, "r+b") as f:
        f.seek(t.offset)
        f.write(bytes(4))
    del safe_open
    proc = run_cli("verify", str(bad), "--against", str(bf16_llama))
    assert proc.returncode != 0 and name in proc.stderr


def test_streamed_quantization_does_not_depend_on_chunk_size(bf16_llama):
    """Bands of a few rows give the same bytes as one band of the whole tensor."""
    from reshard.formats.registry import load_checkpoint
    from reshard.hub.resolve import resolve_source
    from reshard.transfer.cast import iter_tensor_bytes
    from reshard.transfer.sources import SourceReader
    from reshard.writers.fp8 import fp8_checkpoint
    from reshard.writers.gguf import gguf_checkpoint

    ck = load_checkpoint(resolve_source(str(bf16_llama)))
    g, _ = gguf_checkpoint(ck, "q8_0")
    picked = [t for t in fp8_checkpoint(ck).tensors if t.quant is not None][:4]
    picked += [t for t in g.tensors if t.quant is not None and "attn_q" in t.name][:1]
    with SourceReader() as reader:
        for t in picked:
            small = b"".join(bytes(c) for c in iter_tensor_bytes(t, reader, 64))
            whole = b"".join(bytes(c) for c in iter_tensor_bytes(t, reader, 1 << 26))
            assert small == whole and len(small) == t.nbytes
