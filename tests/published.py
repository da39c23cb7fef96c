"""Tensor names, dtypes and shapes of a checkpoint from its config.json, for the families
reshard has tables for, and header-only checkpoints built from them (a real safetensors
header over a sparse data section: a 671B model costs a few MB of disk).

``layout="transformers"`` gives what transformers 5's ``save_pretrained`` writes (checked
against real saves in tests/test_families_plan.py); ``layout="published"`` the files on
the Hub where they differ: DeepSeek-V3's FP8 weights with ``weight_scale_inv`` block
scales, gpt-oss's MXFP4 ``*_blocks``/``*_scales`` experts.
"""

from __future__ import annotations

import json
import os
from math import ceil
from pathlib import Path

from reshard.formats.safetensors import build_header
from reshard.units import dtype_nbytes

TORCH_DTYPES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}
CONFIGS = Path(__file__).parent / "data" / "configs"


def load_config(name: str) -> dict:
    return json.loads((CONFIGS / f"{name}.json").read_text())


def checkpoint_tensors(config: dict, layout: str = "published") -> list[tuple[str, str, tuple]]:
    """``(name, dtype, shape)`` of every tensor of the checkpoint ``config`` describes."""
    mt = config["model_type"]
    dtype = TORCH_DTYPES.get(config.get("torch_dtype") or config.get("dtype"), "BF16")
    h, layers, vocab = config["hidden_size"], config["num_hidden_layers"], config["vocab_size"]
    heads = config["num_attention_heads"]
    kv = config.get("num_key_value_heads") or heads
    d = config.get("head_dim") or h // heads
    inter = config["intermediate_size"]
    fp8 = layout == "published" and (config.get("quantization_config") or {}).get("quant_method") == "fp8"
    out: list[tuple[str, str, tuple]] = []

    def add(name, shape, dt=None):
        out.append((name, dt or dtype, tuple(shape)))

    def linear(name, rows, cols):
        if fp8:
            add(f"{name}.weight", (rows, cols), "F8_E4M3")
            add(f"{name}.weight_scale_inv", (ceil(rows / 128), ceil(cols / 128)), "F32")
        else:
            add(f"{name}.weight", (rows, cols))

    def mlp(prefix, width):
        linear(f"{prefix}.gate_proj", width, h)
        linear(f"{prefix}.up_proj", width, h)
        linear(f"{prefix}.down_proj", h, width)

    tied = config.get("tie_word_embeddings", mt in ("gemma2", "gemma3_text"))
    add("model.embed_tokens.weight", (vocab, h))
    add("model.norm.weight", (h,))
    if not tied:
        add("lm_head.weight", (vocab, h))
    for i in range(layers):
        p = f"model.layers.{i}"
        add(f"{p}.input_layernorm.weight", (h,))
        add(f"{p}.post_attention_layernorm.weight", (h,))
        if mt in ("gemma2", "gemma3_text"):
            add(f"{p}.pre_feedforward_layernorm.weight", (h,))
            add(f"{p}.post_feedforward_layernorm.weight", (h,))
        a = f"{p}.self_attn"
        if mt == "deepseek_v3":
            q_lora, kv_lora = config["q_lora_rank"], config["kv_lora_rank"]
            nope, rope, v = config["qk_nope_head_dim"], config["qk_rope_head_dim"], config["v_head_dim"]
            linear(f"{a}.q_a_proj", q_lora, h)
            add(f"{a}.q_a_layernorm.weight", (q_lora,))
            linear(f"{a}.q_b_proj", heads * (nope + rope), q_lora)
            linear(f"{a}.kv_a_proj_with_mqa", kv_lora + rope, h)
            add(f"{a}.kv_a_layernorm.weight", (kv_lora,))
            linear(f"{a}.kv_b_proj", heads * (nope + v), kv_lora)
            linear(f"{a}.o_proj", h, heads * v)
        elif mt == "phi3":
            add(f"{a}.qkv_proj.weight", ((heads + 2 * kv) * d, h))
            add(f"{a}.o_proj.weight", (h, heads * d))
        else:
            add(f"{a}.q_proj.weight", (heads * d, h))
            add(f"{a}.k_proj.weight", (kv * d, h))
            add(f"{a}.v_proj.weight", (kv * d, h))
            add(f"{a}.o_proj.weight", (h, heads * d))
            if mt in ("qwen2", "gpt_oss"):
                for x, n in (("q", heads), ("k", kv), ("v", kv)):
                    add(f"{a}.{x}_proj.bias", (n * d,))
            if mt == "gpt_oss":
                add(f"{a}.o_proj.bias", (h,))
                add(f"{a}.sinks", (heads,))
            if mt in ("qwen3", "qwen3_moe", "gemma3_text"):
                add(f"{a}.q_norm.weight", (d,))
                add(f"{a}.k_norm.weight", (d,))
        m = f"{p}.mlp"
        if mt == "mixtral":
            e_count = config["num_local_experts"]
            add(f"{p}.block_sparse_moe.gate.weight", (e_count, h))
            for e in range(e_count):
                x = f"{p}.block_sparse_moe.experts.{e}"
                add(f"{x}.w1.weight", (inter, h))
                add(f"{x}.w2.weight", (h, inter))
                add(f"{x}.w3.weight", (inter, h))
        elif mt == "qwen3_moe" and i not in (config.get("mlp_only_layers") or []):
            e_count = config.get("num_experts") or config["num_local_experts"]  # transformers 5 name
            add(f"{m}.gate.weight", (e_count, h))
            for e in range(e_count):
                mlp(f"{m}.experts.{e}", config["moe_intermediate_size"])
        elif mt == "deepseek_v3" and i >= config["first_k_dense_replace"]:
            e_count, width = config["n_routed_experts"], config["moe_intermediate_size"]
            add(f"{m}.gate.weight", (e_count, h))
            add(f"{m}.gate.e_score_correction_bias", (e_count,), "F32" if fp8 else None)
            for e in range(e_count):
                mlp(f"{m}.experts.{e}", width)
            mlp(f"{m}.shared_experts", width * config["n_shared_experts"])
        elif mt == "gpt_oss":
            e_count = config["num_local_experts"]
            add(f"{m}.router.weight", (e_count, h))
            add(f"{m}.router.bias", (e_count,))
            add(f"{m}.experts.gate_up_proj_bias", (e_count, 2 * inter))
            add(f"{m}.experts.down_proj_bias", (e_count, h))
            if layout == "published":  # MXFP4: 32 values per block, two per byte
                add(f"{m}.experts.gate_up_proj_blocks", (e_count, 2 * inter, h // 32, 16), "U8")
                add(f"{m}.experts.gate_up_proj_scales", (e_count, 2 * inter, h // 32), "U8")
                add(f"{m}.experts.down_proj_blocks", (e_count, h, inter // 32, 16), "U8")
                add(f"{m}.experts.down_proj_scales", (e_count, h, inter // 32), "U8")
            else:
                add(f"{m}.experts.gate_up_proj", (e_count, h, 2 * inter))
                add(f"{m}.experts.down_proj", (e_count, inter, h))
        elif mt == "phi3":
            add(f"{m}.gate_up_proj.weight", (2 * inter, h))
            add(f"{m}.down_proj.weight", (h, inter))
        else:
            mlp(m, inter)
    return sorted(out)


def header_only_checkpoint(folder: Path, config: dict, layout: str = "published") -> Path:
    """config.json plus a model.safetensors whose header is real and whose data is a hole."""
    folder.mkdir(parents=True, exist_ok=True)
    entries = [(n, dt, s, dtype_nbytes(dt, s)) for n, dt, s in checkpoint_tensors(config, layout)]
    header = build_header({"format": "pt"}, entries, pad_to=8)
    path = folder / "model.safetensors"
    path.write_bytes(header)
    os.truncate(path, len(header) + sum(e[3] for e in entries))
    (folder / "config.json").write_text(json.dumps(config))
    return folder
