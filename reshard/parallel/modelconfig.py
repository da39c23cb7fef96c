"""The numbers of a model's config.json that parallel plans and memory estimates need.

>>> s = ModelShape.from_config({"model_type": "llama", "num_hidden_layers": 32,
...     "hidden_size": 4096, "num_attention_heads": 32, "num_key_value_heads": 8,
...     "intermediate_size": 14336, "vocab_size": 32000})
>>> s.head_dim, s.kv_heads, s.experts
(128, 8, 0)
>>> g = ModelShape.from_config({"model_type": "gemma2", "num_hidden_layers": 4,
...     "hidden_size": 3584, "num_attention_heads": 16, "num_key_value_heads": 8,
...     "head_dim": 256, "intermediate_size": 14336, "vocab_size": 256000, "sliding_window": 4096})
>>> g.head_dim, g.window_of(0), g.window_of(1)  # head_dim from config; even layers slide
(256, 4096, None)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from reshard.errors import SourceError, UsageError
from reshard.parallel.arch import SLIDING_ATTENTION

# config.json keys for the routed-expert count, in the families' spellings.
_EXPERT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts")


@dataclass(frozen=True)
class ModelShape:
    """Layer count, widths and attention/expert layout of a decoder-only transformer.

    Attributes:
        layers: ``num_hidden_layers``.
        hidden: ``hidden_size``.
        heads: ``num_attention_heads``.
        kv_heads: ``num_key_value_heads`` (defaults to ``heads``: no grouped-query attention).
        head_dim: ``head_dim`` when the config has it, else ``hidden / heads``.
        intermediate: ``intermediate_size`` (dense MLP width; Mixtral's and gpt-oss's
            expert width).
        vocab: ``vocab_size``.
        layer_types: ``full_attention``/``sliding_attention`` per layer (empty: all full).
        sliding_window: tokens a sliding-attention layer keeps.
        kv_lora_rank, qk_rope_head_dim: MLA (DeepSeek) latent and rotary widths, else 0.
        experts: routed experts per MoE layer (0: dense model).
        experts_per_token: experts each token is routed to (top-k).
        expert_intermediate: width of one routed expert.
        shared_intermediate: width of the shared experts of a layer (DeepSeek), else 0.
        dense_intermediate: width of the dense MLP layers of an MoE model that has some
            (DeepSeek's first layers), else 0.
    """

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    layer_types: tuple[str, ...] = ()
    sliding_window: int | None = None
    kv_lora_rank: int = 0
    qk_rope_head_dim: int = 0
    experts: int = 0
    experts_per_token: int = 0
    expert_intermediate: int = 0
    shared_intermediate: int = 0
    dense_intermediate: int = 0

    @property
    def mla(self) -> bool:
        return self.kv_lora_rank > 0

    def window_of(self, layer: int) -> int | None:
        """Tokens layer ``layer`` keeps in its KV cache beyond which it never looks
        (``None``: the whole context)."""
        if self.layer_types and self.layer_types[layer] == SLIDING_ATTENTION:
            return self.sliding_window
        return None

    @property
    def mlp_width(self) -> int:
        """The widest MLP a token goes through in one layer: the dense width, or top-k
        routed experts plus the shared experts."""
        if not self.experts:
            return self.intermediate
        routed = self.experts_per_token * self.expert_intermediate + self.shared_intermediate
        return max(routed, self.dense_intermediate)

    @classmethod
    def from_config(cls, config: dict, where: str = "config.json", family=None) -> ModelShape:
        """Read the numbers, naming the missing key when one is absent. A multimodal
        config's numbers come from its text part (``text_config``).

        Raises:
            UsageError: a key is missing or not a positive integer.
        """
        if family is None:
            from reshard.parallel.families import family_for

            family = family_for(config)
        text = family.model_config(config)

        def need(key: str, default: int | None = None, source: dict = text) -> int:
            value = source.get(key, default)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise UsageError(
                    f"{where}: {key} is {value!r}; a positive integer is needed to plan across GPUs"
                )
            return value

        def optional(key: str) -> int:
            value = text.get(key)
            return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0

        heads = need("num_attention_heads")
        hidden = need("hidden_size")
        layers = need("num_hidden_layers")
        head_dim = optional("head_dim") or hidden // heads
        window = optional("sliding_window") or None
        layer_types = tuple(family.layer_types(config, layers))
        if SLIDING_ATTENTION not in layer_types:
            window = None  # Qwen2.5 lists a window it does not use (use_sliding_window false)
        experts = next((optional(k) for k in _EXPERT_KEYS if optional(k)), 0)
        expert_inter = optional("moe_intermediate_size") or need("intermediate_size")
        dense_layers = optional("first_k_dense_replace") or bool(text.get("mlp_only_layers"))
        return cls(
            layers=layers,
            hidden=hidden,
            heads=heads,
            kv_heads=need("num_key_value_heads", heads),
            head_dim=head_dim,
            intermediate=need("intermediate_size"),
            vocab=need("vocab_size"),
            layer_types=layer_types if window else (),
            sliding_window=window,
            kv_lora_rank=optional("kv_lora_rank") if family.mla else 0,
            qk_rope_head_dim=optional("qk_rope_head_dim") if family.mla else 0,
            experts=experts,
            experts_per_token=(optional("num_experts_per_tok") or optional("experts_per_token"))
            if experts
            else 0,
            expert_intermediate=expert_inter if experts else 0,
            shared_intermediate=optional("n_shared_experts") * expert_inter if experts else 0,
            dense_intermediate=need("intermediate_size") if experts and dense_layers else 0,
        )

    def to_json(self) -> dict:
        """The ``model`` object of ``reshard plan --json``."""
        out = {
            "layers": self.layers,
            "hidden_size": self.hidden,
            "attention_heads": self.heads,
            "kv_heads": self.kv_heads,
            "head_dim": self.head_dim,
            "intermediate_size": self.intermediate,
            "vocab_size": self.vocab,
        }
        if self.sliding_window:
            out["sliding_window"] = self.sliding_window
            out["sliding_layers"] = sum(t == SLIDING_ATTENTION for t in self.layer_types)
        if self.mla:
            out["kv_lora_rank"], out["qk_rope_head_dim"] = self.kv_lora_rank, self.qk_rope_head_dim
        if self.experts:
            out["experts"], out["experts_per_token"] = self.experts, self.experts_per_token
            out["expert_intermediate_size"] = self.expert_intermediate
        return out


def read_config(path: Path) -> dict:
    """Load a config.json.

    Raises:
        SourceError: the file is missing or not a JSON object.
    """
    try:
        config = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise SourceError(
            f"{path}: no config.json beside the weights; planning across GPUs "
            "needs the model's config.json (layers, heads, widths)"
        ) from e
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SourceError(f"{path}: cannot read config.json: {e}") from e
    if not isinstance(config, dict):
        raise SourceError(f"{path}: config.json is not a JSON object")
    return config
