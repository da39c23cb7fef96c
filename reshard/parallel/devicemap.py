"""A pipeline plan as the ``device_map`` that transformers and accelerate accept.

``AutoModelForCausalLM.from_pretrained(folder, device_map=json.load(open(FILE)))`` puts
each module on the GPU its stage was given; accelerate moves hidden states between GPUs.

>>> from reshard.parallel.families import LLAMA
>>> from reshard.parallel.pipeline import plan_pipeline
>>> sizes = [("model.embed_tokens.weight", 8), ("model.layers.0.w", 4),
...          ("model.layers.1.w", 4), ("model.norm.weight", 1), ("lm_head.weight", 8)]
>>> device_map(plan_pipeline(sizes, LLAMA, 2), LLAMA)
{'model.embed_tokens': 0, 'model.rotary_emb': 0, 'model.layers.0': 0, 'model.layers.1': 1, 'model.norm': 1, 'lm_head': 1}
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

from reshard.parallel.arch import Family
from reshard.parallel.pipeline import PipelinePlan


def device_map(
    plan: PipelinePlan,
    family: Family,
    devices: Sequence[int | str] | None = None,
    tied_embeddings: bool = False,
) -> dict[str, int | str]:
    """Module path -> device for every module of the model.

    Args:
        plan: the pipeline plan (stage ``i`` goes to ``devices[i]``).
        family: where the layers, embedding and head live.
        devices: one device per stage (default: GPU indices 0..N-1; ``"cpu"`` in tests).
        tied_embeddings: the head shares the embedding's weight. transformers keeps one
            tensor for both, and accelerate re-ties them to it after dispatch, so the head
            must sit on the embedding's device (accelerate moves the hidden states back
            there for it). A serving engine's pipeline instead keeps a copy on the last
            stage, which is what ``reshard plan``'s table counts; see ``tied_head_note``.
    """
    devices = list(devices) if devices is not None else list(range(len(plan.stages)))
    first, last = devices[0], devices[len(plan.stages) - 1]
    result: dict[str, int | str] = {}
    for module in (*family.first_modules, *family.extra_first_modules):
        result[module] = first
    for stage in plan.stages:
        for layer in stage.layers:
            result[family.layer_module(layer)] = devices[stage.index]
    for module in family.last_modules:
        result[module] = first if tied_embeddings and module == family.last_modules[-1] else last
    # Tensors outside the family's known modules still need a device: their own module.
    for stage in plan.stages:
        for name in stage.names:
            name = family.module_name(name)
            if not any(name.startswith(m + ".") for m in result):
                result[name.rsplit(".", 1)[0]] = devices[stage.index]
    return result


def tied_head_note(plan: PipelinePlan) -> str | None:
    """What differs between the plan's table and the device map for a tied head."""
    last = plan.stages[-1]
    if not last.tied_head:
        return None
    from reshard.units import format_size

    return (
        f"tied head: the device map puts lm_head with the embedding on GPU 0 (transformers "
        f"shares one tensor); with it, GPU {last.index} needs {format_size(last.tied_head)} "
        "less than the table, which counts the copy a serving engine keeps there"
    )


def write_device_map(path: Path, mapping: dict[str, int | str]) -> None:
    """Write the map as JSON (written whole, then renamed, so a reader never sees half)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(mapping, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)
