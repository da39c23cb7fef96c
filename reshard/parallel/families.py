"""The family tables: for every architecture reshard knows, where its layers are and how
each tensor is cut for tensor and expert parallelism (the kinds are defined in
``reshard.parallel.arch``). This is the source of truth for ``plan``, ``split --tp`` and
``--expert-parallel``; ``tp_plan.json`` records each cut, so ``merge`` never needs it.

Names are the on-disk names transformers 5 writes (``../shared/FORMATS.md``), plus the
published layouts that differ (gpt-oss MXFP4 ``*_blocks``/``*_scales``, the
``language_model.model.*`` names of multimodal Gemma 3 checkpoints saved before
transformers 5).

Any other model type falls back to transformers' own ``base_model_tp_plan``, read from
its config class without weights (``colwise`` -> column, ``rowwise`` -> row).

>>> family_for({"model_type": "qwen2"}).name
'qwen2'
>>> family_for({"model_type": "phi3"}).split_of("model.layers.3.self_attn.qkv_proj.weight")
'qkv'
>>> family_for({"model_type": "mixtral"}).split_of("model.layers.0.block_sparse_moe.experts.7.w2.weight")
'expert_row'
>>> mistral = {"model_type": "mistral", "num_hidden_layers": 2, "sliding_window": 4096}
>>> family_for(mistral).layer_types(mistral, 2)  # Mistral v0.1: every layer has the window
['sliding_attention', 'sliding_attention']
"""

from __future__ import annotations

import functools
import logging
import re

from reshard.errors import UsageError
from reshard.parallel.arch import (
    COLUMN,
    EXPERT_BIAS,
    EXPERT_COLUMN,
    EXPERT_ROW,
    FULL_ATTENTION,
    GATE_UP,
    KV_HEADS,
    Q_HEADS,
    QKV,
    REFUSED,
    REPLICATED,
    ROW,
    SLIDING_ATTENTION,
    VOCAB,
    Family,
    Rule,
)

log = logging.getLogger(__name__)


def _attention(q=Q_HEADS) -> tuple[Rule, ...]:
    """q/k/v/o projections with optional biases (Qwen2, gpt-oss have q/k/v biases)."""
    return (
        Rule(r"\.self_attn\.q_proj\.(weight|bias)$", q),
        Rule(r"\.self_attn\.[kv]_proj\.(weight|bias)$", KV_HEADS),
        Rule(r"\.self_attn\.o_proj\.weight$", ROW),
        Rule(r"\.self_attn\.o_proj\.bias$", REPLICATED),
    )


# A dense gated MLP (also DeepSeek's first dense layers and Qwen3-MoE's mlp_only_layers).
_MLP = (
    Rule(r"\.mlp\.(gate|up)_proj\.(weight|bias)$", COLUMN),
    Rule(r"\.mlp\.down_proj\.weight$", ROW),
    Rule(r"\.mlp\.down_proj\.bias$", REPLICATED),
)
# Embedding, head, every norm (input/post-attention/pre- and post-feedforward, q_norm,
# k_norm, MLA's q_a/kv_a layernorms, the final norm), rotary buffers.
_ENDS = (
    Rule(r"(^|\.)embed_tokens\.weight$", VOCAB),
    Rule(r"(^|\.)lm_head\.weight$", VOCAB),
    Rule(r"norm\.weight$", REPLICATED),
    Rule(r"\.rotary_emb\.inv_freq$", REPLICATED),
)


def _standard(name: str, *rules: Rule, **kwargs) -> Family:
    return Family(
        name=name,
        layers_module="model.layers",
        first_modules=("model.embed_tokens",),
        last_modules=("model.norm", "lm_head"),
        extra_first_modules=("model.rotary_emb",),
        rules=(*rules, *_ENDS),
        **kwargs,
    )


def _every_layer_if_window(config: dict) -> list[str]:
    """Mistral v0.1, Mixtral, Phi-3: one ``sliding_window`` for every layer (or none)."""
    kind = SLIDING_ATTENTION if config.get("sliding_window") else FULL_ATTENTION
    return [kind] * int(config.get("num_hidden_layers", 0))


def _qwen_layers(config: dict) -> list[str]:
    """Qwen2/3: a window only with ``use_sliding_window``, from ``max_window_layers`` on."""
    layers = int(config.get("num_hidden_layers", 0))
    if not config.get("use_sliding_window") or not config.get("sliding_window"):
        return [FULL_ATTENTION] * layers
    start = int(config.get("max_window_layers", 28))
    return [SLIDING_ATTENTION if i >= start else FULL_ATTENTION for i in range(layers)]


def _qwen_moe_layers(config: dict) -> list[str]:
    """Qwen3-MoE applies ``sliding_window`` (with ``use_sliding_window``) to every layer."""
    window = config.get("sliding_window") if config.get("use_sliding_window") else None
    return _every_layer_if_window({**config, "sliding_window": window})


def _alternating(pattern: int):
    """Every ``pattern``-th layer full attention, the others sliding (Gemma 2: 2, Gemma 3: 6)."""

    def layer_types(config: dict) -> list[str]:
        every = int(config.get("sliding_window_pattern", config.get("_sliding_window_pattern", pattern)))
        return [
            SLIDING_ATTENTION if (i + 1) % every else FULL_ATTENTION
            for i in range(int(config.get("num_hidden_layers", 0)))
        ]

    return layer_types


LLAMA = _standard("llama", *_attention(), *_MLP)
MISTRAL = _standard("mistral", *_attention(), *_MLP, default_layer_types=_every_layer_if_window)
QWEN2 = _standard("qwen2", *_attention(), *_MLP, default_layer_types=_qwen_layers)
QWEN3 = _standard("qwen3", *_attention(), *_MLP, default_layer_types=_qwen_layers)
GEMMA2 = _standard("gemma2", *_attention(), *_MLP, default_layer_types=_alternating(2), tie_default=True)
GEMMA3_TEXT = _standard(
    "gemma3_text", *_attention(), *_MLP, default_layer_types=_alternating(6), tie_default=True
)
PHI3 = _standard(
    "phi3",
    Rule(r"\.self_attn\.qkv_proj\.weight$", QKV),
    Rule(r"\.self_attn\.o_proj\.weight$", ROW),
    Rule(r"\.mlp\.gate_up_proj\.weight$", GATE_UP),
    Rule(r"\.mlp\.down_proj\.weight$", ROW),
    default_layer_types=_every_layer_if_window,
)
MIXTRAL = _standard(
    "mixtral",
    *_attention(),
    Rule(r"\.block_sparse_moe\.gate\.weight$", REPLICATED),  # the router
    Rule(r"\.block_sparse_moe\.experts\.\d+\.w[13]\.weight$", EXPERT_COLUMN),  # gate, up
    Rule(r"\.block_sparse_moe\.experts\.\d+\.w2\.weight$", EXPERT_ROW),  # down
    default_layer_types=_every_layer_if_window,
)
QWEN3_MOE = _standard(
    "qwen3_moe",
    *_attention(),
    Rule(r"\.mlp\.gate\.weight$", REPLICATED),
    Rule(r"\.mlp\.experts\.\d+\.(gate|up)_proj\.weight$", EXPERT_COLUMN),
    Rule(r"\.mlp\.experts\.\d+\.down_proj\.weight$", EXPERT_ROW),
    *_MLP,
    default_layer_types=_qwen_moe_layers,
)
DEEPSEEK_V3 = _standard(
    "deepseek_v3",
    # MLA: the low-rank down-projections and their norms are small and needed whole.
    Rule(r"\.self_attn\.(q_a_proj|kv_a_proj_with_mqa)\.weight$", REPLICATED),
    Rule(r"\.self_attn\.(q_proj|q_b_proj|kv_b_proj)\.weight$", Q_HEADS),
    Rule(r"\.self_attn\.o_proj\.weight$", ROW),
    Rule(r"\.mlp\.gate\.(weight|e_score_correction_bias)$", REPLICATED),
    Rule(r"\.mlp\.experts\.\d+\.(gate|up)_proj\.weight$", EXPERT_COLUMN),
    Rule(r"\.mlp\.experts\.\d+\.down_proj\.weight$", EXPERT_ROW),
    Rule(r"\.mlp\.shared_experts\.(gate|up)_proj\.weight$", COLUMN),
    Rule(r"\.mlp\.shared_experts\.down_proj\.weight$", ROW),
    *_MLP,
    mla=True,
)
GPT_OSS = _standard(
    "gpt_oss",
    *_attention(),
    Rule(r"\.self_attn\.sinks$", Q_HEADS),  # one learned logit per attention head
    Rule(r"\.mlp\.router\.(weight|bias)$", REPLICATED),
    # Fused experts, [E, hidden, 2 x inter] with gate/up interleaved along the last dim
    # (a contiguous cut keeps pairs together), and the published MXFP4 layout
    # [E, 2 x inter, hidden / 32, 16] (blocks) and [E, 2 x inter, hidden / 32] (scales).
    Rule(r"\.mlp\.experts\.gate_up_proj$", EXPERT_COLUMN, dim=2, unit=2),
    Rule(r"\.mlp\.experts\.gate_up_proj_(bias|blocks|scales)$", EXPERT_COLUMN, dim=1, unit=2),
    Rule(r"\.mlp\.experts\.down_proj$", EXPERT_ROW, dim=1),
    Rule(r"\.mlp\.experts\.down_proj_(blocks|scales)$", EXPERT_ROW, dim=2),
    Rule(r"\.mlp\.experts\.down_proj_bias$", EXPERT_BIAS),
    default_layer_types=_alternating(2),
)
# Multimodal Gemma 3: the language model is Gemma 3 text; the vision tower and projector
# are small and replicated on every rank (first pipeline stage).
GEMMA3 = Family(
    name="gemma3",
    layers_module="model.language_model.layers",
    first_modules=("model.language_model.embed_tokens", "model.vision_tower", "model.multi_modal_projector"),
    last_modules=("model.language_model.norm", "lm_head"),
    extra_first_modules=("model.language_model.rotary_emb",),
    rules=(Rule(r"(^|\.)(vision_tower|multi_modal_projector)\.", REPLICATED), *_attention(), *_MLP, *_ENDS),
    text_config="text_config",
    default_layer_types=_alternating(6),
    tie_default=True,
    renames=(
        ("language_model.model.", "model.language_model."),
        ("language_model.lm_head.", "lm_head."),
        ("vision_tower.", "model.vision_tower."),
        ("multi_modal_projector.", "model.multi_modal_projector."),
    ),
)

# model_type (config.json) -> family.
FAMILIES: dict[str, Family] = {
    "llama": LLAMA,
    "mistral": MISTRAL,
    "qwen2": QWEN2,
    "qwen3": QWEN3,
    "qwen3_moe": QWEN3_MOE,
    "mixtral": MIXTRAL,
    "gemma2": GEMMA2,
    "gemma3_text": GEMMA3_TEXT,
    "gemma3": GEMMA3,
    "phi3": PHI3,
    "deepseek_v3": DEEPSEEK_V3,
    "gpt_oss": GPT_OSS,
}

# transformers' tensor-parallel styles that are plain column/row cuts of a weight.
_COLUMN_STYLES = {"colwise", "colwise_rep", "colwise_gather_output"}
_ROW_STYLES = {"rowwise", "rowwise_rep", "rowwise_split_input"}
_REPLICATED_STYLES = {"replicate", "replicated_with_grad_allreduce"}


def family_for(config: dict) -> Family:
    """The family of a model from its config.json: a table above, else a family built
    from transformers' ``base_model_tp_plan`` for that model type.

    Raises:
        UsageError: the model type has no table and no usable transformers plan.
    """
    model_type = config.get("model_type")
    family = FAMILIES.get(str(model_type))
    if family is not None:
        return family
    experts = [
        k
        for k in ("num_local_experts", "num_experts", "n_routed_experts")
        if isinstance(config.get(k), int) and config[k] > 1
    ]
    if experts:
        known = ", ".join(sorted(FAMILIES))
        raise UsageError(
            f"config.json: model_type {model_type!r} is a mixture of experts "
            f"({experts[0]} = {config[experts[0]]}) with no parallelism table "
            f"(supported: {known}); transformers' plan names its fused runtime "
            "experts, not the checkpoint's: add a table to reshard/parallel/families.py"
        )
    return _fallback_family(str(model_type))


@functools.cache
def _fallback_family(model_type: str) -> Family:
    tp_plan = _transformers_tp_plan(model_type)
    if not tp_plan:
        known = ", ".join(sorted(FAMILIES))
        raise UsageError(
            f"config.json: model_type {model_type!r} has no parallelism table "
            f"(supported: {known}) and transformers has no tensor-parallel plan "
            "for it; add one to reshard/parallel/families.py"
        )
    return family_from_tp_plan(model_type, tp_plan)


def _transformers_tp_plan(model_type: str) -> dict[str, str] | None:
    """``base_model_tp_plan`` of the model type's config class (no weights, no network)."""
    try:
        from transformers import AutoConfig
    except ImportError:
        return None
    try:
        config_class = type(AutoConfig.for_model(model_type))
    except (ValueError, KeyError):
        return None
    return dict(getattr(config_class, "base_model_tp_plan", None) or {})


def family_from_tp_plan(model_type: str, tp_plan: dict[str, str]) -> Family:
    """A family from a transformers plan such as ``{"layers.*.self_attn.q_proj": "colwise"}``
    (module paths under the base model, ``*`` for the layer number).

    ``colwise`` styles become column cuts (by KV heads for ``k_proj``/``v_proj``, by heads
    for ``q_proj``), ``rowwise`` styles row cuts with a replicated bias, ``embedding_rowwise``
    a vocabulary cut; ``embed_tokens`` and ``lm_head`` are vocabulary cuts in any case and
    other modules are replicated. A tensor under a packed or unknown
    style is refused when it is cut (its rule names it).

    >>> fam = family_from_tp_plan("olmo2", {"layers.*.self_attn.k_proj": "colwise",
    ...                                      "layers.*.mlp.down_proj": "rowwise"})
    >>> fam.split_of("model.layers.0.self_attn.k_proj.weight"), fam.split_of("model.layers.0.mlp.down_proj.bias")
    ('kv_heads', 'replicated')
    >>> fam.split_of("model.norm.weight")
    'replicated'
    """
    rules: list[Rule] = []
    for module, style in tp_plan.items():
        path = r"\.".join(r"\d+" if part == "*" else re.escape(part) for part in module.split("."))
        anchored = rf"(^|\.){path}\."
        leaf = module.rsplit(".", 1)[-1]
        if style in _COLUMN_STYLES:
            kind = Q_HEADS if leaf == "q_proj" else KV_HEADS if leaf in ("k_proj", "v_proj") else COLUMN
            rules.append(Rule(anchored + r"(weight|bias)$", kind))
        elif style in _ROW_STYLES:
            rules.append(Rule(anchored + r"weight$", ROW))
            rules.append(Rule(anchored + r"bias$", REPLICATED))
        elif style == "embedding_rowwise":
            rules.append(Rule(anchored + r"weight$", VOCAB))
        elif style in _REPLICATED_STYLES:
            rules.append(Rule(anchored, REPLICATED))
        else:
            rules.append(
                Rule(
                    anchored,
                    REFUSED,
                    reason=(
                        f"transformers' plan for {model_type} cuts {module} as {style!r}, a packed or "
                        "unknown style reshard does not cut; add a table for it to "
                        "reshard/parallel/families.py"
                    ),
                )
            )
    # The embedding and head vocab-parallel, as serving engines and the tables above cut
    # them (transformers' plans often leave the embedding whole); everything else whole.
    rules += [Rule(r"(^|\.)(embed_tokens|lm_head)\.weight$", VOCAB), Rule(r".", REPLICATED)]
    log.info("model_type %r: tensor-parallel rules from transformers' base_model_tp_plan", model_type)
    return Family(
        name=model_type,
        layers_module="model.layers",
        first_modules=("model.embed_tokens",),
        last_modules=("model.norm", "lm_head"),
        extra_first_modules=("model.rotary_emb",),
        rules=tuple(rules),
    )
