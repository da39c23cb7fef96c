"""Tiny random models of every family reshard has a table for, made by transformers from
config (no download): 2 layers, 4 heads, 2 KV heads (so 4 ranks replicate them), 4
experts for the mixtures of experts, windows shorter than the test prompt."""

from __future__ import annotations

from pathlib import Path

SMALL = dict(
    vocab_size=128,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    tie_word_embeddings=False,
    max_position_embeddings=64,
)
WINDOW = dict(sliding_window=4)  # shorter than the prompt, so the windows matter
# model_type -> config overrides. MoE: 4 experts (N = 4 places one per rank), top-2.
FAMILIES = {
    "llama": {},
    "mistral": WINDOW,
    "qwen2": dict(use_sliding_window=True, max_window_layers=1, **WINDOW),  # q/k/v biases
    "qwen3": {},  # q_norm / k_norm
    "gemma2": dict(query_pre_attn_scalar=8, tie_word_embeddings=True, **WINDOW),
    "gemma3_text": dict(
        query_pre_attn_scalar=8, sliding_window_pattern=2, tie_word_embeddings=True, **WINDOW
    ),
    "phi3": {},  # fused qkv_proj and gate_up_proj
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "qwen3_moe": dict(
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        mlp_only_layers=[1],
        norm_topk_prob=True,
    ),
    "deepseek_v3": dict(
        n_routed_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        n_shared_experts=4,
        first_k_dense_replace=1,
        n_group=2,
        topk_group=1,
        q_lora_rank=16,
        kv_lora_rank=16,
        qk_rope_head_dim=4,
        qk_nope_head_dim=8,
        v_head_dim=8,
        num_key_value_heads=4,
        head_dim=4,
    ),  # transformers: head_dim is the rotary width
    # No table: its cuts come from transformers' base_model_tp_plan (the fallback).
    "granite": dict(
        embedding_multiplier=2.0, residual_multiplier=0.5, attention_multiplier=0.2, logits_scaling=4.0
    ),
    "gpt_oss": dict(
        num_local_experts=4, num_experts_per_tok=2, experts_per_token=2, intermediate_size=32, **WINDOW
    ),  # sinks, biases, fused 3-D experts
}
MOE = ("mixtral", "qwen3_moe", "deepseek_v3", "gpt_oss")
IDS = [[(7 * i + 3 * j + 1) % 128 for j in range(12)] for i in range(2)]


def build_tiny_models(root: Path) -> dict[str, tuple[Path, torch.Tensor]]:
    """Every family's tiny model saved by ``save_pretrained`` under ``root``, with the
    logits of ``IDS`` from the unsplit model (fp32, eager attention)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    models = {}
    for seed, model_type in enumerate(FAMILIES):
        config = AutoConfig.for_model(model_type, **{**SMALL, **FAMILIES[model_type]})
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
        with torch.no_grad():  # random init leaves some tensors at 0 or 1: perturb them all
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.1)
        folder = root / model_type
        model.save_pretrained(folder)
        with torch.no_grad():
            models[model_type] = (folder, model(torch.tensor(IDS)).logits)
    return models
