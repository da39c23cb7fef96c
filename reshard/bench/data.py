"""Generate the ``.bin`` checkpoint the load benchmark in docs/bench.md runs on.

Random bf16 weights with Mistral-7B's tensor names and shapes, ``layers`` deep, saved with
``torch.save`` as ``pytorch_model-0000i-of-0000n.bin`` shards plus the index and config.json
the way older Hub repos ship them. Each tensor has its own storage, as in a real state dict.

    python -m reshard.bench.data /tmp/reshard-bench-load/mistral-9L-bin --layers 9 --files 2

>>> from reshard.demo import mistral_tensors
>>> len(mistral_tensors(9))
84
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from reshard.demo import MISTRAL_7B_CONFIG, group_into_files, mistral_tensors
from reshard.formats.index import index_json
from reshard.units import dtype_nbytes, numel


def make_mistral_bin_checkpoint(folder: Path, layers: int = 9, files: int = 2, seed: int = 0) -> Path:
    """Write a Mistral-shaped random bf16 checkpoint as ``.bin`` shards; returns the folder.

    Memory peaks at one shard's tensors (torch.save needs them all at once).
    """
    import torch

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = mistral_tensors(layers)
    sizes = [dtype_nbytes("BF16", shape) for _, shape in tensors]
    groups = group_into_files(tensors, sizes, files)
    gen = torch.Generator().manual_seed(seed)
    weight_map = {}
    for i, group in enumerate(groups, start=1):
        name = f"pytorch_model-{i:05d}-of-{len(groups):05d}.bin"
        state = {n: (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16) for n, shape in group}
        torch.save(state, folder / name)
        del state
        weight_map.update({n: name for n, _ in group})
    (folder / "pytorch_model.bin.index.json").write_text(
        index_json(weight_map, sum(sizes), sum(numel(s) for _, s in tensors))
    )
    config = dict(MISTRAL_7B_CONFIG, num_hidden_layers=layers, torch_dtype="bfloat16")
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return folder


def demo_bin_source(root: Path) -> Path:
    """The demo checkpoint (``reshard.demo``: Mistral-7B's names and shapes, 4 layers) as
    its original repo ships it, two large ``torch.save`` shards; generated on first use
    in ``root``. This is the "before" of a plain ``reshard bench``.

    >>> demo_bin_source.__name__
    'demo_bin_source'
    """
    from reshard.demo import DEMO_LAYERS

    folder = Path(root) / f"Mistral-7B-shaped-{DEMO_LAYERS}-layers-bin"
    if not (folder / "pytorch_model.bin.index.json").exists():  # the index is written last
        make_mistral_bin_checkpoint(folder, layers=DEMO_LAYERS, files=2)
    return folder


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--layers", type=int, default=9)
    parser.add_argument("--files", type=int, default=2)
    args = parser.parse_args(argv)
    make_mistral_bin_checkpoint(args.folder, args.layers, args.files)


if __name__ == "__main__":
    main()
