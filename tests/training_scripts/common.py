"""What every fixture generator shares: the model, a few real training steps, and a
clean exit under torchrun.

The tiny model has every feature the readers must get right: tied embeddings, a frozen
parameter, and sizes that neither 2 nor 4 ranks divide (a vocabulary of 101 rows, a
hidden size of 33), so FSDP2 chunks are uneven and ZeRO-3 pads the last rank.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

# Model sizes by name: "tiny" for the tests, "blocks" (below), "bench" (~506M parameters) and "bench2x"
# (~978M) for bench/bench_training.py. The bench models do not tie their embeddings:
# DeepSpeed's zero_to_fp32.py --safe_serialization, the peer measured, fails on tied ones
# ("Some tensors share memory").
SIZES = {
    "tiny": dict(
        vocab_size=101,
        hidden_size=33,
        intermediate_size=41,
        num_hidden_layers=2,
        num_attention_heads=3,
        num_key_value_heads=1,
        head_dim=8,
    ),
    # Tensors of whole 4 KiB blocks (fp32), ~26M parameters: tests/test_reflink.py's ZeRO-2
    # checkpoint, whose flat partitions XFS can share.
    "blocks": dict(
        vocab_size=4096,
        hidden_size=1024,
        intermediate_size=2048,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=128,
    ),
    "bench": dict(
        vocab_size=32000,
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=28,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=64,
    ),
    "bench2x": dict(
        vocab_size=32000,
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=58,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=64,
    ),
}
FROZEN = "model.layers.0.post_attention_layernorm.weight"


def tiny_config(size: str = "tiny"):
    from transformers import LlamaConfig

    return LlamaConfig(
        **SIZES[size], max_position_embeddings=64, tie_word_embeddings=size == "tiny", rms_norm_eps=1e-5
    )


def build_model(size: str = "tiny", seed: int = 0, freeze: bool = True):
    """The model every rank builds identically (same seed), with ``FROZEN`` frozen."""
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_config(size))
    if freeze:
        model.get_parameter(FROZEN).requires_grad_(False)
    return model


def batch(step: int, vocab: int, rank: int = 0, length: int = 16):
    import torch

    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randint(0, vocab, (2, length), generator=g)


def write_model_folder(folder: Path, size: str, step: int) -> None:
    """What HF Trainer writes beside the training state: config.json, trainer_state.json."""
    folder.mkdir(parents=True, exist_ok=True)
    tiny_config(size).save_pretrained(folder)
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}) + "\n")


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def finish() -> None:
    """A last barrier, then exit without gloo's teardown (which sometimes aborts after the
    files are complete)."""
    import sys

    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
