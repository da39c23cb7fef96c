"""The few numbers of a model's config.json that parallel plans and memory estimates need.

>>> s = ModelShape.from_config({"num_hidden_layers": 32, "hidden_size": 4096,
...     "num_attention_heads": 32, "num_key_value_heads": 8, "intermediate_size": 14336,
...     "vocab_size": 32000})
>>> s.head_dim, s.kv_heads
(128, 8)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from reshard.errors import SourceError, UsageError


@dataclass(frozen=True)
class ModelShape:
    """Layer count and widths of a decoder-only transformer.

    Attributes:
        layers: ``num_hidden_layers``.
        hidden: ``hidden_size``.
        heads: ``num_attention_heads``.
        kv_heads: ``num_key_value_heads`` (defaults to ``heads``: no grouped-query attention).
        head_dim: ``head_dim`` when the config has it, else ``hidden / heads``.
        intermediate: ``intermediate_size`` (MLP width).
        vocab: ``vocab_size``.
    """

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int

    @classmethod
    def from_config(cls, config: dict, where: str = "config.json") -> "ModelShape":
        """Read the numbers, naming the missing key when one is absent.

        Raises:
            UsageError: a key is missing or not a positive integer.
        """
        def need(key: str, default: int | None = None) -> int:
            value = config.get(key, default)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise UsageError(f"{where}: {key} is {value!r}; a positive integer is needed to "
                                 "plan across GPUs")
            return value

        heads = need("num_attention_heads")
        hidden = need("hidden_size")
        head_dim = config.get("head_dim") or hidden // heads
        return cls(layers=need("num_hidden_layers"), hidden=hidden, heads=heads,
                   kv_heads=need("num_key_value_heads", heads), head_dim=int(head_dim),
                   intermediate=need("intermediate_size"), vocab=need("vocab_size"))


def read_config(path: Path) -> dict:
    """Load a config.json.

    Raises:
        SourceError: the file is missing or not a JSON object.
    """
    try:
        config = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise SourceError(f"{path}: no config.json beside the weights; planning across GPUs "
                          "needs the model's config.json (layers, heads, widths)") from e
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SourceError(f"{path}: cannot read config.json: {e}") from e
    if not isinstance(config, dict):
        raise SourceError(f"{path}: config.json is not a JSON object")
    return config
