"""`reshard plan` on the published config.json of the models people serve, each with a
header-only checkpoint (tests/published.py), against numbers worked out by hand here:
KV cache (sliding windows, MLA, replicated KV heads), weights per GPU (fused qkv, biases,
FP8 block scales, MXFP4 experts, expert parallelism, a tied head on both end stages),
total and active parameters, the fewest GPUs for a budget, and the refusals.

Also: the header generator matches what transformers saves, the family table agrees
with transformers' own tensor-parallel plans, and the per-layer attention kinds and
tied-embedding defaults agree with transformers' config classes."""

from __future__ import annotations

import json
import re

import pytest
from conftest import run_cli
from published import checkpoint_tensors, header_only_checkpoint, load_config
from tiny_families import FAMILIES, SMALL, build_tiny_models

from reshard.formats.registry import load_checkpoint
from reshard.hub.resolve import resolve_local
from reshard.parallel.arch import (
    COLUMN,
    EXPERT_COLUMN,
    EXPERT_ROW,
    GATE_UP,
    KV_HEADS,
    Q_HEADS,
    QKV,
    REPLICATED,
    ROW,
    VOCAB,
)
from reshard.parallel.families import FAMILIES as TABLES
from reshard.parallel.families import family_for

PUBLISHED = (
    "Llama-3.1-70B",
    "Qwen2.5-7B",
    "gemma-2-9b",
    "Mixtral-8x7B-v0.1",
    "Mistral-7B-v0.1",
    "Phi-3-mini-4k-instruct",
    "DeepSeek-V3",
    "gpt-oss-20b",
)
GB = 10**9


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    root = tmp_path_factory.mktemp("published")
    return {name: header_only_checkpoint(root / name, load_config(name)) for name in PUBLISHED}


def plan(folder, *args, code: int = 0) -> dict:
    result = run_cli("plan", str(folder), "--json", *args)
    assert result.returncode == code, result.stderr
    return json.loads(result.stdout) if code == 0 else result.stderr


def refusal(folder, *args) -> str:
    result = run_cli("plan", str(folder), *args)
    assert result.returncode == 2, result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    return lines[0]


def same_on_every_gpu(data: dict, key: str) -> int:
    values = {g[key] for g in data["per_gpu"]}
    assert len(values) == 1, values
    return values.pop()


# ---- Llama-3.1-70B: 64 heads, 8 KV heads; 16 GPUs replicate each KV head twice ----------
def llama70b_rank_bytes(n: int) -> int:
    h, inter, vocab, b = 8192, 28672, 128256, 2
    q_rows = 64 // n * 128
    kv_rows = max(1, 8 // n) * 128  # one replicated KV head per rank beyond 8 GPUs
    layer = b * (q_rows * h + 2 * kv_rows * h + h * q_rows + 3 * (inter // n) * h + 2 * h)
    return 80 * layer + 2 * b * (vocab // n) * h + b * h


def test_llama_70b_on_16_gpus_replicates_kv_heads(published):
    data = plan(published["Llama-3.1-70B"], "--gpus", "16", "--strategy", "tensor", "--context", "8192")
    assert same_on_every_gpu(data, "weights") == llama70b_rank_bytes(16) == 8_989_458_432
    # 1 KV head of 128 per rank, K and V, bf16, 80 layers, 8192 tokens.
    assert same_on_every_gpu(data, "kv_cache") == 2 * 1 * 128 * 2 * 80 * 8192 == 335_544_320
    assert data["parameters"] == {"total": 70_553_706_496, "active": 70_553_706_496}
    assert refusal(published["Llama-3.1-70B"], "--gpus", "3", "--strategy", "tensor") == (
        "error: config.json: 64 attention heads do not divide by 3 GPUs; tensor parallelism "
        "needs a degree in [1, 2, 4, 8, 16, 32, 64]"
    )


def test_llama_70b_fewest_gpus_for_a_budget(published):
    # By hand: weights + KV (8 KV heads / n, 4096 tokens) + activations + 1 GB headroom.
    def total(n):
        kv = 2 * max(1, 8 // n) * 128 * 2 * 80 * 4096
        act = 4096 * 2 * (2 * 8192 + 3 * 28672 // n)
        return llama70b_rank_bytes(n) + kv + act

    fewest = next(n for n in (1, 2, 4, 8, 16) if total(n) + GB <= 40 * GB)
    assert fewest == 4 and total(2) + GB > 40 * GB
    data = plan(published["Llama-3.1-70B"], "--gpus", "8", "--strategy", "tensor", "--gpu-memory", "40GB")
    assert (data["fits"], data["min_gpus"], data["headroom"]) == (True, 4, GB)


# ---- Qwen2.5-7B: q/k/v biases split with their weights; 28 heads / 4 KV heads ----------
def test_qwen25_7b_biases_and_refusals(published):
    h, inter, vocab, b, n = 3584, 18944, 152064, 2, 4
    q, kv = 28 // n * 128, 4 // n * 128
    layer = b * (q * h + q + 2 * (kv * h + kv) + h * q + 3 * (inter // n) * h + 2 * h)
    data = plan(published["Qwen2.5-7B"], "--gpus", "4", "--strategy", "tensor")
    assert same_on_every_gpu(data, "weights") == 28 * layer + 2 * b * (vocab // n) * h + b * h
    assert same_on_every_gpu(data, "kv_cache") == 2 * 1 * 128 * 2 * 28 * 4096
    assert "sliding_window" not in data["model"]  # use_sliding_window is false
    assert refusal(published["Qwen2.5-7B"], "--gpus", "7", "--strategy", "tensor") == (
        "error: config.json: 28 attention heads and 4 KV heads: 7 GPUs can neither split the "
        "4 KV heads nor replicate them evenly; tensor parallelism needs a degree in [1, 2, 4, 28]"
    )
    assert "tensor 'lm_head.weight': dim 0 of shape [152064, 3584] (152064) does not divide" in refusal(
        published["Qwen2.5-7B"], "--gpus", "28", "--strategy", "tensor"
    )


# ---- Gemma-2-9B: every other layer slides over 4096 tokens; tied head on both ends -------
def test_gemma2_9b_sliding_layers_and_tied_head(published):
    h, inter, vocab, b = 3584, 14336, 256000, 4  # stored in float32
    layer = b * (4096 * h + 2 * 2048 * h + h * 4096 + 3 * inter * h + 4 * h)
    embed = b * vocab * h
    data = plan(published["gemma-2-9b"], "--gpus", "2", "--context", "8192")
    assert data["dtype"] == "F32" and data["model"]["sliding_layers"] == 21
    stages = data["per_gpu"]
    assert [g["layers"] for g in stages] == [list(range(21)), list(range(21, 42))]
    # The tied head is a copy of the embedding on the last stage: counted on both ends.
    assert [g["weights"] for g in stages] == [embed + 21 * layer, 21 * layer + b * h + embed]
    assert "tied" in stages[1]["holds"]
    per_token = 2 * 8 * 256 * b
    # Layers 0, 2, ... slide (4096 tokens); stage 0 has 11 of them, stage 1 has 10.
    assert stages[0]["kv_cache"] == (11 * 4096 + 10 * 8192) * per_token
    assert stages[1]["kv_cache"] == (10 * 4096 + 11 * 8192) * per_token
    bf16 = plan(published["gemma-2-9b"], "--gpus", "2", "--context", "8192", "--dtype", "bf16")
    assert [g["weights"] for g in bf16["per_gpu"]] == [w // 2 for w in (g["weights"] for g in stages)]


# ---- Mixtral-8x7B: experts split inside, or placed whole ------------------------------
def test_mixtral_parameters_and_expert_parallel(published):
    h, inter, vocab = 4096, 14336, 32000
    attn = 2 * h * h + 2 * 1024 * h
    expert = 3 * inter * h
    total = 32 * (attn + 8 * expert + 8 * h + 2 * h) + 2 * vocab * h + h
    active = total - 32 * 6 * expert
    tp = plan(published["Mixtral-8x7B-v0.1"], "--gpus", "8", "--strategy", "tensor")
    assert tp["parameters"] == {"total": total, "active": active}
    assert (total, active) == (46_702_792_704, 12_879_925_248)  # the published 46.7B / 12.9B
    ep = plan(published["Mixtral-8x7B-v0.1"], "--gpus", "8", "--strategy", "tensor", "--expert-parallel")
    # 8 GPUs: 1/8 of every expert, or one whole expert, weigh the same; attention is split.
    rank = 2 * (32 * (attn // 8 + expert + 8 * h + 2 * h) + 2 * (vocab // 8) * h + h)
    assert same_on_every_gpu(tp, "weights") == same_on_every_gpu(ep, "weights") == rank
    assert ep["per_gpu"][3]["holds"].endswith("experts 3-3")
    ep2 = plan(published["Mixtral-8x7B-v0.1"], "--gpus", "2", "--strategy", "tensor", "--expert-parallel")
    assert same_on_every_gpu(ep2, "weights") == 2 * (
        32 * (attn // 2 + 4 * expert + 8 * h + 2 * h) + 2 * (vocab // 2) * h + h
    )
    assert refusal(
        published["Mixtral-8x7B-v0.1"], "--gpus", "16", "--strategy", "tensor", "--expert-parallel"
    ) == (
        "error: config.json: 8 experts do not divide by 16 GPUs; --expert-parallel needs a "
        "degree in [1, 2, 4, 8]"
    )
    assert "--expert-parallel needs --strategy tensor" in refusal(
        published["Mixtral-8x7B-v0.1"], "--gpus", "2", "--expert-parallel"
    )
    assert "--expert-parallel needs a mixture-of-experts model" in refusal(
        published["Llama-3.1-70B"], "--gpus", "2", "--strategy", "tensor", "--expert-parallel"
    )


# ---- Mistral-7B-v0.1: a 4096-token window on every layer ------------------------------
def test_mistral_v01_window_bounds_the_cache_at_32k(published):
    data = plan(published["Mistral-7B-v0.1"], "--gpus", "2", "--context", "32768")
    # 16 layers per stage x 4096 tokens (not 32768) x K and V x 8 heads x 128 x 2 bytes.
    assert [g["kv_cache"] for g in data["per_gpu"]] == [16 * 4096 * 2 * 8 * 128 * 2] * 2
    assert data["per_gpu"][0]["kv_cache"] == 268_435_456  # not 2.15 GB


# ---- Phi-3-mini: fused qkv_proj and gate_up_proj, per rank [Q_r|K_r|V_r] and [G_r|U_r] --
def test_phi3_mini_fused_projections(published):
    h, inter, vocab, b, n = 3072, 8192, 32064, 2, 2
    qkv_rows = (32 + 32 + 32) // n * 96
    layer = b * (qkv_rows * h + h * (32 // n * 96) + 2 * (inter // n) * h + h * (inter // n) + 2 * h)
    data = plan(published["Phi-3-mini-4k-instruct"], "--gpus", "2", "--strategy", "tensor")
    assert same_on_every_gpu(data, "weights") == 32 * layer + 2 * b * (vocab // n) * h + b * h
    # transformers applies Phi-3-mini's 2047-token sliding_window on every layer.
    assert same_on_every_gpu(data, "kv_cache") == 32 * 2047 * 2 * 16 * 96 * 2


# ---- DeepSeek-V3: MLA latent cache on every rank; FP8 weights with block scales --------
def deepseek_rank_bytes(n: int, ep: bool = False) -> int:
    h, vocab = 7168, 129280

    def fp8(rows, cols):  # an FP8 weight and its float32 scales, one per 128 x 128 block
        return rows * cols + 4 * -(-rows // 128) * -(-cols // 128)

    attn = (
        fp8(1536, h)
        + 2 * 1536
        + fp8(24576 // n, 1536)
        + fp8(576, h)
        + 2 * 512
        + fp8(32768 // n, 512)
        + fp8(h, 16384 // n)
        + 2 * 2 * h
    )
    dense = 2 * fp8(18432 // n, h) + fp8(h, 18432 // n)
    expert_split = 2 * fp8(2048 // n, h) + fp8(h, 2048 // n)
    expert_whole = 2 * fp8(2048, h) + fp8(h, 2048)
    routed = 256 // n * expert_whole if ep else 256 * expert_split
    moe = 2 * 256 * h + 4 * 256 + routed + expert_split  # router, bias, experts, shared
    return 61 * attn + 3 * dense + 58 * moe + 2 * 2 * (vocab // n) * h + 2 * h


def test_deepseek_v3_mla_cache_and_fp8_weights(published):
    tp8 = plan(published["DeepSeek-V3"], "--gpus", "8", "--strategy", "tensor")
    assert same_on_every_gpu(tp8, "weights") == deepseek_rank_bytes(8)
    # (kv_lora_rank + qk_rope_head_dim) x bf16 per token per layer, whole on every rank.
    assert same_on_every_gpu(tp8, "kv_cache") == 61 * 4096 * (512 + 64) * 2 == 287_834_112
    assert tp8["dtype"] == "BF16"  # FP8 weights; cache and activations in bf16
    ep8 = plan(published["DeepSeek-V3"], "--gpus", "8", "--strategy", "tensor", "--expert-parallel")
    assert same_on_every_gpu(ep8, "weights") == deepseek_rank_bytes(8, ep=True)
    assert same_on_every_gpu(ep8, "kv_cache") == 287_834_112
    total, active = tp8["parameters"]["total"], tp8["parameters"]["active"]
    assert abs(total / 671e9 - 1) < 0.001 and abs(active / 37.5e9 - 1) < 0.01  # 671B / 37B
    assert refusal(published["DeepSeek-V3"], "--gpus", "32", "--strategy", "tensor") == (
        "error: tensor 'model.layers.0.mlp.down_proj.weight_scale_inv': a 1/32 slice of dim 1 "
        "of its weight [7168, 18432] is 576, not a whole number of its 128-wide scale blocks; "
        "choose another degree"
    )


# ---- gpt-oss-20b: MXFP4 experts, sinks, alternating 128-token windows -------------------
def test_gpt_oss_20b_mxfp4_experts(published):
    h, vocab, e = 2880, 201088, 32
    attn = 2 * (4096 * h + 4096 + 2 * (512 * h + 512) + h * 4096 + h + 64 + 2 * h)
    router = 2 * (e * h + e)
    experts = e * (
        5760 * 90 * 16
        + 5760 * 90
        + 2 * 5760  # gate_up: blocks, scales, bias
        + 2880 * 90 * 16
        + 2880 * 90
        + 2 * h
    )  # down
    whole = 24 * (attn + router + experts) + 2 * 2 * vocab * h + 2 * h
    one = plan(published["gpt-oss-20b"], "--gpus", "1", "--strategy", "tensor")
    assert same_on_every_gpu(one, "weights") == whole
    assert one["parameters"]["total"] == 20_914_757_184  # OpenAI: 20.91B
    ep = plan(published["gpt-oss-20b"], "--gpus", "4", "--strategy", "tensor", "--expert-parallel")
    # Attention split 4 ways (sinks by head), experts 8 per rank, routers whole.
    rank_attn = 2 * (1024 * h + 1024 + 2 * (128 * h + 128) + h * 1024 + h + 16 + 2 * h)
    assert same_on_every_gpu(ep, "weights") == (
        24 * (rank_attn + router + experts // 4) + 2 * 2 * (vocab // 4) * h + 2 * h
    )
    # 12 sliding layers keep 128 tokens, 12 full ones 4096; 2 KV heads of 64 per rank.
    assert same_on_every_gpu(ep, "kv_cache") == (12 * 128 + 12 * 4096) * 2 * 2 * 64 * 2
    assert refusal(published["gpt-oss-20b"], "--gpus", "4", "--strategy", "tensor") == (
        "error: tensor 'model.layers.0.mlp.experts.down_proj_blocks': dim 2 of shape "
        "[32, 2880, 90, 16] (90) does not divide into 4 pieces; choose another degree or use "
        "--expert-parallel"
    )


# ---- the header generator and the table, against transformers itself ---------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_models(tmp_path_factory.mktemp("tiny"))


@pytest.mark.parametrize("model_type", list(FAMILIES))
def test_header_generator_matches_what_transformers_saves(tiny, model_type):
    folder = tiny[model_type][0]
    saved = {(t.name, t.dtype, tuple(t.shape)) for t in load_checkpoint(resolve_local(folder)).tensors}
    config = json.loads((folder / "config.json").read_text())
    assert set(checkpoint_tensors({**config, "torch_dtype": "float32"}, "transformers")) == saved


# transformers' styles -> the kinds that cut the same dim of the same weight.
COLUMN_KINDS = {COLUMN, Q_HEADS, KV_HEADS, QKV, GATE_UP, EXPERT_COLUMN, VOCAB}
ROW_KINDS = {ROW, EXPERT_ROW}


def runtime_module(name: str) -> str:
    """transformers' runtime module path of an on-disk tensor (fused MoE experts)."""
    name = name.replace(".block_sparse_moe.", ".mlp.")
    name = re.sub(r"\.experts\.\d+\.(w1|w3|gate_proj|up_proj)\.weight$", ".experts.gate_up_proj", name)
    name = re.sub(r"\.experts\.\d+\.(w2|down_proj)\.weight$", ".experts.down_proj", name)
    return re.sub(r"\.(weight|bias)$", "", name)


@pytest.mark.parametrize("model_type", list(FAMILIES))
def test_table_agrees_with_transformers_tp_plans(tiny, model_type):
    from transformers import AutoConfig, AutoModelForCausalLM

    config_class = type(AutoConfig.for_model(model_type, **{**SMALL, **FAMILIES[model_type]}))
    model_class = AutoModelForCausalLM._model_mapping[config_class]
    tp_plan = {
        **{f"model.{k}": v for k, v in (config_class.base_model_tp_plan or {}).items()},
        **(getattr(model_class, "_tp_plan", None) or {}),
    }
    family = family_for(json.loads((tiny[model_type][0] / "config.json").read_text()))
    assert (model_type in TABLES) == (family is TABLES.get(model_type))  # granite: the fallback
    checked = 0
    for t in load_checkpoint(resolve_local(tiny[model_type][0])).tensors:
        module = runtime_module(t.name)
        style = next(
            (
                s
                for k, s in tp_plan.items()
                if re.fullmatch(k.replace(".", r"\.").replace("*", r"\d+"), module)
            ),
            None,
        )
        if style is None:
            continue
        kind = family.split_of(t.name)
        if t.name.endswith(".bias") and style.startswith("rowwise"):
            assert kind == REPLICATED, t.name  # added once after the all-reduce
        elif style.startswith(("colwise", "packed_colwise", "embedding_rowwise")):
            assert kind in COLUMN_KINDS, (t.name, style, kind)
        elif style.startswith("rowwise"):
            assert kind in ROW_KINDS, (t.name, style, kind)
        elif style.startswith("replicated"):
            assert kind == REPLICATED, (t.name, style, kind)
        else:
            continue
        checked += 1
    # gpt-oss's plan names only its embedding (plus the head's); the others cover layers.
    assert checked >= (2 if model_type == "gpt_oss" else 8), (model_type, checked)


@pytest.mark.parametrize(
    "name",
    [
        "gemma-2-9b",
        "Qwen2.5-7B",
        "gpt-oss-20b",
        "Mistral-7B-v0.1",
        "Phi-3-mini-4k-instruct",
        "Mixtral-8x7B-v0.1",
    ],
)
def test_layer_types_and_tie_defaults_agree_with_transformers(name):
    from transformers import AutoConfig

    config = load_config(name)
    hf = AutoConfig.for_model(**config)
    family = family_for(config)
    ours = family.layer_types(config, config["num_hidden_layers"])
    window = getattr(hf, "sliding_window", None)
    theirs = getattr(hf, "layer_types", None) or (
        ["sliding_attention" if window else "full_attention"] * config["num_hidden_layers"]
    )
    assert ours == list(theirs)
    assert family.tie_default == type(hf).tie_word_embeddings


# ---- multimodal Gemma 3: the text part is cut as gemma3_text, the vision tower replicated --
def test_multimodal_gemma3_plan_and_device_map(tmp_path):
    import torch
    from conftest import read_json
    from transformers import AutoModelForImageTextToText, Gemma3Config

    text = dict(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        sliding_window=4,
        sliding_window_pattern=2,
        query_pre_attn_scalar=8,
    )
    vision = dict(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=28,
        patch_size=14,
    )
    config = Gemma3Config(
        text_config=text,
        vision_config=vision,
        mm_tokens_per_image=4,
        image_token_index=100,
        boi_token_index=101,
        eoi_token_index=102,
    )
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(config).eval()
    folder = tmp_path / "gemma3"
    model.save_pretrained(folder)
    tensors = load_checkpoint(resolve_local(folder)).tensors
    assert any(t.name.startswith("language_model.model.layers.") for t in tensors)  # saved names
    vision_bytes = sum(t.nbytes for t in tensors if not t.name.startswith("language_model."))
    assert vision_bytes > 0
    text_cut = sum(
        t.nbytes
        for t in tensors
        if re.search(r"(_proj\.weight|embed_tokens\.weight)$", t.name)
        and t.name.startswith("language_model.")
    )
    text_whole = sum(t.nbytes for t in tensors if t.name.startswith("language_model.")) - text_cut
    data = plan(folder, "--gpus", "2", "--strategy", "tensor")
    assert data["family"] == "gemma3" and data["model"]["layers"] == 2
    assert same_on_every_gpu(data, "weights") == vision_bytes + text_whole + text_cut // 2
    # 1 KV head of 8 per rank, layer 0 slides over 4 tokens, layer 1 sees all 4096.
    assert same_on_every_gpu(data, "kv_cache") == (4 + 4096) * 2 * 1 * 8 * 4
    map_file = tmp_path / "map.json"
    stages = plan(folder, "--gpus", "2", "--device-map", str(map_file))["per_gpu"]
    assert [g["layers"] for g in stages] == [[0], [1]]
    mapping = read_json(map_file)
    assert mapping["model.vision_tower"] == mapping["model.language_model.embed_tokens"] == 0
    assert mapping["model.language_model.layers.1"] == 1 and mapping["lm_head"] == 0  # tied
    split_map = {m: "cpu" if d == 0 else "disk" for m, d in mapping.items()}
    loaded = AutoModelForImageTextToText.from_pretrained(
        folder, device_map=split_map, offload_folder=str(tmp_path / "offload")
    ).eval()
    ids = torch.arange(1, 13).unsqueeze(0)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)


def test_fallback_refuses_packed_styles_and_unknown_mixtures_of_experts(tmp_path):
    from reshard.errors import UsageError
    from reshard.parallel.families import family_from_tp_plan
    from reshard.parallel.modelconfig import ModelShape
    from reshard.parallel.tensor import cut_tensor
    from reshard.tensors import TensorInfo

    family = family_from_tp_plan(
        "fancy", {"layers.*.self_attn.qkv": "packed_colwise", "layers.*.mlp.down_proj": "rowwise"}
    )
    shape = ModelShape(layers=1, hidden=8, heads=2, kv_heads=2, head_dim=4, intermediate=8, vocab=8)
    qkv = TensorInfo("model.layers.0.self_attn.qkv.weight", "F32", (24, 8), (), 768)
    with pytest.raises(
        UsageError,
        match=re.escape(
            "tensor 'model.layers.0.self_attn.qkv.weight': transformers' plan for fancy cuts "
            "layers.*.self_attn.qkv as 'packed_colwise', a packed or unknown style"
        ),
    ):
        cut_tensor(qkv, family, shape, 2)
    assert cut_tensor(qkv, family, shape, 1).dim is None  # one rank: nothing to cut
    folder = header_only_checkpoint(
        tmp_path / "moe",
        {**SMALL, "model_type": "qwen2_moe", "num_experts": 4, "torch_dtype": "float32"},
        layout="transformers",
    )
    assert "is a mixture of experts (num_experts = 4) with no parallelism table" in refusal(
        folder, "--gpus", "2"
    )
