"""Model-specific knowledge for parallelism: what a family table says, and how to read it.

The tables themselves, one small block per architecture family, are in
``reshard.parallel.families``; this module defines their vocabulary. Each rule maps a
tensor name (regex, first match wins) to a *cut kind*, in the terms serving engines use
(Megatron, vLLM, SGLang; weights are ``[out_features, in_features]``, ``y = x @ W.T``):

- ``column``: split along dim 0 (output features). Each rank computes a slice of the
  output; no communication. Its bias splits with it.
- ``row``: split along dim 1 (input features). Each rank consumes the slice the column
  layer before it produced and yields a partial sum; an all-reduce adds them. A
  row-parallel bias is kept whole and added once, after the all-reduce.
- ``vocab``: split along dim 0 by vocabulary rows (embedding and output head).
- ``replicated``: every rank holds the whole tensor (norms, routers, low-rank MLA
  projections, row-parallel biases).
- ``q_heads``: split along dim 0 by attention heads (q_proj, MLA's q_b/kv_b, per-head
  ``sinks``): the head count must divide by the degree.
- ``kv_heads``: split along dim 0 by KV heads; with more ranks than KV heads, each KV
  head is replicated and rank ``r`` holds KV head ``r // (N / kv)``.
- ``qkv``: a fused ``[Q | K | V]`` projection (Phi-3): rank ``r`` holds ``[Q_r | K_r | V_r]``.
- ``gate_up``: a fused ``[gate | up]`` MLP projection (Phi-3): rank ``r`` holds ``[G_r | U_r]``.
- ``expert_column`` / ``expert_row``: routed-expert weights. With ``--tp`` alone they are
  column/row cuts inside every expert; with ``--expert-parallel`` whole experts are
  placed: rank ``r`` holds experts ``[r E/N, (r+1) E/N)``.
- ``expert_bias``: a fused experts' row-parallel bias (gpt-oss ``down_proj_bias``):
  replicated under tensor parallelism, placed with its experts under expert parallelism.

A rule may name the dim explicitly (fused 3-D expert tensors cut along dim 1 or 2).

>>> from reshard.parallel.families import family_for
>>> fam = family_for({"model_type": "mistral"})
>>> fam.rule_for("model.layers.0.self_attn.o_proj.weight").kind
'row'
>>> fam.layer_of("model.layers.12.mlp.up_proj.weight"), fam.layer_of("lm_head.weight")
(12, None)
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

from reshard.errors import UsageError

COLUMN, ROW, VOCAB, REPLICATED = "column", "row", "vocab", "replicated"
Q_HEADS, KV_HEADS, QKV, GATE_UP = "q_heads", "kv_heads", "qkv", "gate_up"
EXPERT_COLUMN, EXPERT_ROW, EXPERT_BIAS = "expert_column", "expert_row", "expert_bias"
REFUSED = "refused"  # a tensor reshard must not cut (its rule says why)
KINDS = (
    COLUMN,
    ROW,
    VOCAB,
    REPLICATED,
    Q_HEADS,
    KV_HEADS,
    QKV,
    GATE_UP,
    EXPERT_COLUMN,
    EXPERT_ROW,
    EXPERT_BIAS,
    REFUSED,
)
# The dimension each kind splits by default; replicated tensors are not split.
SPLIT_DIM = {
    COLUMN: 0,
    ROW: 1,
    VOCAB: 0,
    REPLICATED: None,
    Q_HEADS: 0,
    KV_HEADS: 0,
    QKV: 0,
    GATE_UP: 0,
    EXPERT_COLUMN: 0,
    EXPERT_ROW: 1,
    EXPERT_BIAS: None,
    REFUSED: None,
}

FULL_ATTENTION, SLIDING_ATTENTION = "full_attention", "sliding_attention"
# One numbered expert per tensor (Mixtral, Qwen3-MoE, DeepSeek): its index decides its rank.
EXPERT_INDEX = re.compile(r"\.experts\.(\d+)\.")


@dataclass(frozen=True)
class Rule:
    """One line of a family table: tensors whose name matches ``pattern`` are cut as ``kind``
    (along ``dim`` when given, else the kind's default dim). ``unit`` is the number of
    consecutive elements along that dim that must stay together (2 for gpt-oss's
    interleaved gate/up pairs). ``reason`` says why a ``refused`` tensor cannot be cut."""

    pattern: str
    kind: str
    dim: int | None = None
    unit: int = 1
    reason: str = ""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown cut kind {self.kind!r} in rule {self.pattern!r}")

    @property
    def split_dim(self) -> int | None:
        return self.dim if self.dim is not None else SPLIT_DIM[self.kind]


_NUMBER = re.compile(r"\.\d+(?=\.)")


def _numbers_as_stars(name: str) -> str:
    """``model.layers.3.mlp.experts.7.w1.weight`` -> ``model.layers.*.mlp.experts.*.w1.weight``."""
    return _NUMBER.sub(".*", name)


@dataclass(frozen=True)
class Family:
    """How one architecture family is laid out and cut.

    Attributes:
        name: family name, as recorded in ``tp_plan.json``.
        layers_module: the module list holding the layers (``model.layers``).
        first_modules: non-layer modules that belong to the first pipeline stage.
        last_modules: modules that belong to the last stage (final norm, output head).
        extra_first_modules: modules with no weights in the checkpoint that a device map
            must still place (rotary embedding buffers).
        rules: ``Rule`` lines, first match wins, searched in tensor names.
        text_config: key of the nested text config (multimodal Gemma 3), or ``None``.
        default_layer_types: the family's per-layer attention kinds when config.json has
            no ``layer_types`` (config -> list); ``None``: every layer full attention.
        mla: multi-head latent attention (DeepSeek): the KV cache holds the compressed
            latent, and KV-head counts do not constrain the degree.
        renames: ``(old prefix, new prefix)`` of checkpoints saved with older module
            paths, which transformers renames at load (module paths above are the new ones).
        tie_default: ``tie_word_embeddings`` when config.json omits it (the default of the
            family's transformers config class: true for Gemma).
    """

    name: str
    layers_module: str
    first_modules: tuple[str, ...]
    last_modules: tuple[str, ...]
    extra_first_modules: tuple[str, ...]
    rules: tuple[Rule, ...]
    text_config: str | None = None
    default_layer_types: Callable[[dict], list[str]] | None = None
    mla: bool = False
    renames: tuple[tuple[str, str], ...] = ()
    tie_default: bool = False
    _cache: dict = field(default_factory=dict, compare=False, hash=False, repr=False)

    def module_name(self, name: str) -> str:
        """A tensor name with its module path as transformers loads it."""
        for old, new in self.renames:
            if name.startswith(old):
                return new + name[len(old) :]
        return name

    def layer_of(self, name: str) -> int | None:
        """Layer number of a tensor, or ``None`` for embedding/head/final norm."""
        match = re.match(re.escape(self.layers_module) + r"\.(\d+)\.", self.module_name(name))
        return int(match.group(1)) if match else None

    def layer_module(self, layer: int) -> str:
        """Module path of one layer, for device maps: ``model.layers.3``."""
        return f"{self.layers_module}.{layer}"

    def is_last(self, name: str) -> bool:
        """True for tensors that go with the last pipeline stage."""
        name = self.module_name(name)
        return any(name == m or name.startswith(m + ".") for m in self.last_modules)

    def rule_for(self, name: str) -> Rule:
        """The rule that cuts a tensor (cached per name with its numbers replaced, so a
        256-expert model costs one regex search per distinct tensor kind).

        Raises:
            UsageError: no rule matches (the table needs a line for it).
        """
        key = _numbers_as_stars(name)
        rule = self._cache.get(key)
        if rule is None:
            rule = next((r for r in self.rules if re.search(r.pattern, name)), None)
            if rule is None:
                raise UsageError(
                    f"tensor {name!r} has no tensor-parallel rule for the {self.name} "
                    "family; add one to reshard/parallel/families.py"
                )
            self._cache[key] = rule
        return rule

    def split_of(self, name: str) -> str:
        """The cut kind of a tensor (see the module doc)."""
        return self.rule_for(name).kind

    def model_config(self, config: dict) -> dict:
        """The config holding the language model's numbers (the text part of a multimodal
        config, which inherits ``model_type``-independent keys it lacks)."""
        if self.text_config and isinstance(config.get(self.text_config), dict):
            return config[self.text_config]
        return config

    def tied_embeddings(self, config: dict) -> bool:
        """Whether the output head reuses the embedding matrix."""
        text = self.model_config(config)
        return bool(text.get("tie_word_embeddings", config.get("tie_word_embeddings", self.tie_default)))

    def layer_types(self, config: dict, layers: int) -> list[str]:
        """Attention kind of every layer: config.json's ``layer_types`` when present, else
        the family's rule (Mistral v0.1: ``sliding_window`` on every layer).

        Raises:
            UsageError: ``layer_types`` does not list one known kind per layer.
        """
        text = self.model_config(config)
        kinds = text.get("layer_types")
        if kinds is None:
            kinds = self.default_layer_types(text) if self.default_layer_types else []
            kinds = list(kinds) or [FULL_ATTENTION] * layers
        if (
            not isinstance(kinds, list)
            or len(kinds) != layers
            or any(k not in (FULL_ATTENTION, SLIDING_ATTENTION) for k in kinds)
        ):
            raise UsageError(
                f"config.json: layer_types must list {FULL_ATTENTION!r} or "
                f"{SLIDING_ATTENTION!r} for each of the {layers} layers"
            )
        return kinds


def family_for(config: dict) -> Family:
    """The family of a model from its config.json (see ``reshard.parallel.families``)."""
    from reshard.parallel.families import family_for as lookup

    return lookup(config)
