"""The embedded default checkpoint: random weights with Mistral-7B's real tensor names and
shapes, a few layers deep, written without torch and without the network.

``python -m reshard.demo`` (what ``make demo`` runs) generates it, splits it, verifies the
result byte for byte against the source, and prints what happened.

>>> [name for name, _ in mistral_tensors(1)][:2]
['lm_head.weight', 'model.embed_tokens.weight']
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

from reshard.formats.index import index_json
from reshard.formats.safetensors import build_header
from reshard.units import dtype_nbytes

# Mistral-7B-v0.1's config.json, with num_hidden_layers set by the generator.
MISTRAL_7B_CONFIG = {
    "architectures": ["MistralForCausalLM"],
    "attention_dropout": 0.0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "head_dim": 128,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 14336,
    "max_position_embeddings": 32768,
    "model_type": "mistral",
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "rms_norm_eps": 1e-05,
    "rope_theta": 10000.0,
    "sliding_window": 4096,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "vocab_size": 32000,
}
DEMO_LAYERS = 4
_POOL_BYTES = 16 * 1024 * 1024 + 4096


def mistral_tensors(layers: int, config: dict = MISTRAL_7B_CONFIG) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of a Mistral-family model with ``layers`` layers, in the alphabetical
    order the reference safetensors writer uses (so ``layers.10`` precedes ``layers.2``)."""
    hidden, inter, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    head_dim = config.get("head_dim") or hidden // config["num_attention_heads"]
    q_out = config["num_attention_heads"] * head_dim
    kv_out = config["num_key_value_heads"] * head_dim
    shapes = {
        "model.embed_tokens.weight": (vocab, hidden),
        "model.norm.weight": (hidden,),
        "lm_head.weight": (vocab, hidden),
    }
    for i in range(layers):
        p = f"model.layers.{i}"
        shapes.update(
            {
                f"{p}.input_layernorm.weight": (hidden,),
                f"{p}.post_attention_layernorm.weight": (hidden,),
                f"{p}.self_attn.q_proj.weight": (q_out, hidden),
                f"{p}.self_attn.k_proj.weight": (kv_out, hidden),
                f"{p}.self_attn.v_proj.weight": (kv_out, hidden),
                f"{p}.self_attn.o_proj.weight": (hidden, q_out),
                f"{p}.mlp.gate_proj.weight": (inter, hidden),
                f"{p}.mlp.up_proj.weight": (inter, hidden),
                f"{p}.mlp.down_proj.weight": (hidden, inter),
            }
        )
    return sorted(shapes.items())


def _random_pool(dtype: str, seed: int) -> bytes:
    """Random bytes shaped into small finite values (|x| in [2^-7, 2^-5)) so the weights are
    usable numbers, not NaNs; generated once and reused at shifting offsets."""
    import random

    pool = bytearray(random.Random(seed).randbytes(_POOL_BYTES))
    width = {"BF16": 2, "F16": 2, "F32": 4}[dtype]
    # Top byte holds sign + high exponent bits: keep the sign, pin the exponent.
    top = {"BF16": 0x3C, "F16": 0x20, "F32": 0x3C}[dtype]
    table = bytes((b & 0x80) | top | (b & 0x01) for b in range(256))
    pool[width - 1 :: width] = pool[width - 1 :: width].translate(table)
    return bytes(pool)


def write_random_safetensors(
    path: Path, tensors: list[tuple[str, tuple[int, ...]]], dtype: str = "BF16", seed: int = 0
) -> int:
    """Stream a safetensors file of random tensors to ``path``; returns tensor bytes.
    Memory stays at the 16 MiB random pool however large the file is."""
    pool = _random_pool(dtype, seed)
    entries = [(name, dtype, shape, dtype_nbytes(dtype, shape)) for name, shape in tensors]
    header = build_header({"format": "pt"}, entries, pad_to=8)
    total = sum(e[3] for e in entries)
    with open(path, "wb") as f:
        f.write(header)
        written, shift = 0, 0
        while written < total:
            n = min(_POOL_BYTES - 4096, total - written)
            f.write(memoryview(pool)[shift : shift + n])
            written += n
            shift = (shift + 8) % 4096
    return total


def group_into_files(tensors: list, sizes: list[int], files: int) -> list[list]:
    """Cut ``tensors`` (in order) into ``files`` groups of about equal bytes, the way a
    Hub repo's shards are cut.

    >>> group_into_files(["a", "b", "c", "d"], [1, 1, 1, 1], 2)
    [['a', 'b'], ['c', 'd']]
    """
    budget = sum(sizes) / files
    groups: list[list] = [[]]
    acc = 0
    for item, size in zip(tensors, sizes):
        if acc >= budget * len(groups) and len(groups) < files:
            groups.append([])
        groups[-1].append(item)
        acc += size
    return groups


def make_mistral_checkpoint(
    folder: Path, layers: int = DEMO_LAYERS, dtype: str = "BF16", files: int = 2
) -> Path:
    """Write a Mistral-shaped random checkpoint as the Hub repo ships it: ``files``
    safetensors shards plus index, config.json and generation_config.json."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = mistral_tensors(layers)
    sizes = [dtype_nbytes(dtype, shape) for _, shape in tensors]
    groups = group_into_files(tensors, sizes, files)
    weight_map = {}
    for i, group in enumerate(groups, start=1):
        name = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
        write_random_safetensors(folder / name, group, dtype, seed=i)
        weight_map.update({n: name for n, _ in group})
    total_params = sum(_numel(s) for _, s in tensors)
    (folder / "model.safetensors.index.json").write_text(index_json(weight_map, sum(sizes), total_params))
    config = dict(
        MISTRAL_7B_CONFIG,
        num_hidden_layers=layers,
        torch_dtype={"BF16": "bfloat16", "F16": "float16", "F32": "float32"}[dtype],
    )
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (folder / "generation_config.json").write_text(
        json.dumps({"bos_token_id": 1, "eos_token_id": 2}, indent=2) + "\n"
    )
    return folder


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def demo_source(root: Path = Path("demo-out")) -> Path:
    """The embedded default checkpoint, generated on first use."""
    folder = root / f"Mistral-7B-shaped-{DEMO_LAYERS}-layers"
    if not (folder / "model.safetensors.index.json").exists():
        make_mistral_checkpoint(folder)
    return folder


def _run(args: list[str]) -> None:
    print(f"\n$ {shlex.join(args)}", flush=True)
    subprocess.run([sys.executable, "-m", "reshard.cli", *args[1:]], check=True)


def parse_args(argv: list[str] | None = None):
    """``python -m reshard.demo [--dir DIR]``; ``--help`` says what it does and exits.

    >>> parse_args(["--dir", "/tmp/d"]).dir
    PosixPath('/tmp/d')
    """
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m reshard.demo",
        description=f"Generate a random-weight checkpoint with Mistral-7B's tensor names and "
        f"shapes ({DEMO_LAYERS} layers, 2.27 GB, in 2 files) unless it is already "
        "there, then run `reshard inspect` on it, `reshard split --max-shard "
        "500MB` and `reshard verify --against` the source, printing each step. "
        "No network is used. `make demo` runs this.",
    )
    parser.add_argument(
        "--dir",
        type=Path,
        default=Path(os.environ.get("RESHARD_DEMO_DIR", "demo-out")),
        help="folder for the checkpoint and the split (default: $RESHARD_DEMO_DIR "
        "or ./demo-out); delete it afterwards to reclaim the space",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    root = parse_args(argv).dir
    print(
        f"generating a random-weight checkpoint with Mistral-7B's tensor names and shapes "
        f"({DEMO_LAYERS} layers) in {root}/ ...",
        flush=True,
    )
    source = demo_source(root)
    out = root / f"{source.name}-500MB"
    _run(["reshard", "inspect", str(source)])
    _run(["reshard", "split", str(source), "-o", str(out), "--max-shard", "500MB", "--overwrite"])
    _run(["reshard", "verify", str(out), "--against", str(source)])
    print(
        f"\ndone: {out} is a complete model folder (config + shards + index); "
        f"delete {root}/ to reclaim the space."
    )


if __name__ == "__main__":
    main()
