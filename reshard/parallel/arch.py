"""Model-specific knowledge for parallelism: one small table per architecture family.

Each family says where its layers are (for pipeline stages), which modules go with the
first and last stage, and how every weight splits for tensor parallelism:

- ``column``: split along dim 0 (output features, "column-parallel" in Megatron's
  terms, since ``y = x @ W.T`` splits the columns of ``W.T``). Each rank produces a slice
  of the output; no communication needed.
- ``row``: split along dim 1 (input features, "row-parallel"). Each rank consumes the
  slice the column-parallel layer before it produced and yields a partial sum; an
  all-reduce adds them.
- ``vocab``: split along dim 0 by vocabulary rows (embedding and output head).
- ``replicated``: every rank holds the whole tensor (norms, row-parallel biases, which
  are added once after the all-reduce).

Adding a family is a few lines: a ``Family`` entry with its rules, then its model types
in ``FAMILIES``.

>>> fam = family_for({"model_type": "mistral"})
>>> fam.split_of("model.layers.0.self_attn.o_proj.weight")
'row'
>>> fam.layer_of("model.layers.12.mlp.up_proj.weight"), fam.layer_of("lm_head.weight")
(12, None)
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from reshard.errors import UsageError

COLUMN, ROW, VOCAB, REPLICATED = "column", "row", "vocab", "replicated"
# The dimension each kind splits; replicated tensors are not split.
SPLIT_DIM = {COLUMN: 0, ROW: 1, VOCAB: 0, REPLICATED: None}


@dataclass(frozen=True)
class Family:
    """How one architecture family is laid out and split.

    Attributes:
        name: family name, as recorded in ``tp_plan.json``.
        layers_module: the module list holding the layers (``model.layers``).
        first_modules: non-layer modules that belong to the first pipeline stage.
        last_modules: modules that belong to the last stage (final norm, output head).
        extra_first_modules: modules with no weights in the checkpoint that a device map
            must still place (rotary embedding buffers).
        rules: ``(regex, kind)`` pairs, first match wins, searched in tensor names.
    """

    name: str
    layers_module: str
    first_modules: tuple[str, ...]
    last_modules: tuple[str, ...]
    extra_first_modules: tuple[str, ...]
    rules: tuple[tuple[str, str], ...]

    def layer_of(self, name: str) -> int | None:
        """Layer number of a tensor, or ``None`` for embedding/head/final norm."""
        match = re.match(re.escape(self.layers_module) + r"\.(\d+)\.", name)
        return int(match.group(1)) if match else None

    def layer_module(self, layer: int) -> str:
        """Module path of one layer, for device maps: ``model.layers.3``."""
        return f"{self.layers_module}.{layer}"

    def is_last(self, name: str) -> bool:
        """True for tensors that go with the last pipeline stage."""
        return any(name == m or name.startswith(m + ".") for m in self.last_modules)

    def split_of(self, name: str) -> str:
        """The split kind of a tensor.

        Raises:
            UsageError: no rule matches (the table needs a line for it).
        """
        for pattern, kind in self.rules:
            if re.search(pattern, name):
                return kind
        raise UsageError(f"tensor {name!r} has no tensor-parallel rule for the {self.name} family; "
                         "add one to reshard/parallel/arch.py")


LLAMA = Family(
    name="llama",
    layers_module="model.layers",
    first_modules=("model.embed_tokens",),
    last_modules=("model.norm", "lm_head"),
    extra_first_modules=("model.rotary_emb",),
    rules=(
        (r"\.self_attn\.[qkv]_proj\.(weight|bias)$", COLUMN),
        (r"\.self_attn\.o_proj\.weight$", ROW),
        (r"\.self_attn\.o_proj\.bias$", REPLICATED),
        (r"\.mlp\.(gate|up)_proj\.(weight|bias)$", COLUMN),
        (r"\.mlp\.down_proj\.weight$", ROW),
        (r"\.mlp\.down_proj\.bias$", REPLICATED),
        (r"^model\.embed_tokens\.weight$", VOCAB),
        (r"^lm_head\.weight$", VOCAB),
        (r"norm\.weight$", REPLICATED),
        (r"\.rotary_emb\.inv_freq$", REPLICATED),
    ),
)

# model_type (config.json) -> family. Mistral is Llama's layout with sliding-window attention.
FAMILIES: dict[str, Family] = {"llama": LLAMA, "mistral": LLAMA}


def family_for(config: dict) -> Family:
    """The family of a model from its config.json.

    Raises:
        UsageError: the model type has no table yet.
    """
    model_type = config.get("model_type")
    family = FAMILIES.get(str(model_type))
    if family is None:
        known = ", ".join(sorted(FAMILIES))
        raise UsageError(f"config.json: model_type {model_type!r} has no parallelism table "
                         f"(supported: {known}); add one to reshard/parallel/arch.py")
    return family
