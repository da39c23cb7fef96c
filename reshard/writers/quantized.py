"""``split --quantize``: turn a checkpoint's descriptors into a quantized output's, and
pick the output format (GGUF for q8_0/q4_0/f16/bf16/f32, safetensors FP8 for fp8).

>>> from reshard.quant import QUANT_NAMES
>>> "fp8" in QUANT_NAMES and "q8_0" in QUANT_NAMES
True
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from reshard.quant import GGUF_TYPES, parse_quant
from reshard.tensors import Checkpoint

if TYPE_CHECKING:
    from reshard.writers.base import ShardFormat


@dataclass
class QuantizedOutput:
    """What the split job needs: the rewritten checkpoint, the format (None: safetensors),
    config.json keys to set, warnings, and the figures ``--json`` reports."""

    checkpoint: Checkpoint
    fmt: ShardFormat | None
    config_updates: dict = field(default_factory=dict)
    warnings: tuple[str, ...] = ()
    summary: dict = field(default_factory=dict)


def prepare_quantized(checkpoint: Checkpoint, quantize: str, name: str) -> QuantizedOutput:
    """Describe ``checkpoint`` as written with ``--quantize quantize``.

    Raises:
        UsageError: an unknown quant name, or a model type GGUF cannot express.
    """
    if quantize == "gguf":  # --format gguf alone: the matrices' stored float type
        stored = max(checkpoint.tensors, key=lambda t: t.nbytes).stored_dtype
        quantize = stored.lower() if stored in ("F16", "BF16", "F32") else "f16"
    quant = parse_quant(quantize)
    before = sum(t.stored_nbytes for t in checkpoint.tensors)
    if quant == "fp8":
        from reshard.writers.fp8 import QUANTIZATION_CONFIG, fp8_checkpoint

        out = fp8_checkpoint(checkpoint)
        return QuantizedOutput(
            out,
            None,
            {"quantization_config": dict(QUANTIZATION_CONFIG)},
            summary=_summary("fp8", before, out),
        )
    from reshard.writers.gguf import GGUFFormat, build_kv, gguf_checkpoint

    out, config = gguf_checkpoint(checkpoint, quant)
    qtype = GGUF_TYPES[quant]
    embed = next((t for t in out.tensors if t.name == "token_embd.weight"), None)
    n_vocab = int(config.get("vocab_size") or (embed.shape[0] if embed else 0))
    folder = next((Path(p).parent for p in checkpoint.extra_files if Path(p).name == "config.json"), None)
    kv, warnings = build_kv(config, qtype, name, folder, n_vocab)
    return QuantizedOutput(
        out, GGUFFormat(name, qtype, kv), {}, tuple(warnings), _summary(qtype, before, out)
    )


def _summary(kind: str, before: int, out: Checkpoint) -> dict:
    after = sum(t.nbytes for t in out.tensors)
    return {
        "type": kind,
        "bytes_before": before,
        "bytes_after": after,
        "quantized_tensors": sum(1 for t in out.tensors if t.quant is not None),
    }


def quantize_option(
    quantize: str | None, out_format: str | None, dtype: str | None, tp: int | None, pp: int | None
) -> str:
    """The ``--quantize`` value from the CLI's ``--quantize``/``--format``/``--dtype``.

    >>> quantize_option(None, "gguf", "bf16", None, None), quantize_option("Q8_0", None, None, None, None)
    ('bf16', 'q8_0')

    Raises:
        UsageError: an unknown name or format, or a combination reshard refuses.
    """
    from reshard.errors import UsageError
    from reshard.units import parse_dtype

    if tp is not None or pp is not None:
        raise UsageError(
            "--quantize/--format gguf cannot be combined with --tp/--pp yet; "
            "quantize the merged checkpoint instead"
        )
    if out_format is not None and out_format.lower() not in ("gguf", "safetensors"):
        raise UsageError(f"unknown --format {out_format!r}: use gguf or safetensors")
    fmt = out_format.lower() if out_format else None
    if quantize is None:
        if fmt != "gguf":
            raise UsageError("--format safetensors is the default; pass --quantize fp8 for FP8")
        return parse_dtype(dtype).lower() if dtype else "gguf"
    quant = parse_quant(quantize)
    if dtype:
        raise UsageError("--dtype does not combine with --quantize; drop one")
    if fmt == "gguf" and quant == "fp8":
        raise UsageError("fp8 output is safetensors; drop --format gguf")
    if fmt == "safetensors" and quant != "fp8":
        raise UsageError(f"--quantize {quant} writes GGUF; drop --format safetensors")
    return quant
