"""``verify --against SOURCE`` for quantized output: structure, and every block
dequantizes within its bound.

The expected tensors are rebuilt from the source exactly as ``split --quantize`` builds
them (GGUF names and permutation, FP8 pairs); each quantized tensor is then read band by
band from the output and from the source (as float32), dequantized, and every element
checked against its block's bound:

* Q8_0: ``|x - q*d| <= d * (1/2 + 127 * 2^-11) + 127 * 2^-25`` with ``d`` the block's
  stored f16 scale (half a step, plus the f16 rounding of ``d`` times the largest code);
* Q4_0: ``|x - q*d| <= |d| * (1 + 15 * 2^-11) + 8 * 2^-25`` (the largest element sits
  exactly on a code; the clip at 15 can cost a whole step on the other side);
* FP8: ``|x - q*s| <= max(2^-4 |x|, 2^-10 s)`` (half an e4m3 ulp), and the stored
  ``weight_scale_inv`` equals block absmax / 448 of the source.

Non-quantized tensors (norms, F16/BF16 casts, embeddings kept in FP8 output) are compared
byte for byte, as for any split.
"""

from __future__ import annotations

from pathlib import Path

from reshard.errors import VerifyError
from reshard.run.verify import VerifyReport, check_same_tensors, compare_tensor_bytes
from reshard.tensors import Checkpoint, TensorInfo, natural_key
from reshard.transfer.ranges import read_exact
from reshard.transfer.sources import SourceReader

BAND = 4 * 1024 * 1024


def _bound(kind: str, scales):
    # the absolute term covers a scale that is an f16 subnormal (spacing 2^-24)
    if kind == "Q8_0":
        return scales * (0.5 + 127 * 2.0**-11) + 127 * 2.0**-25
    return scales * (1.0 + 15 * 2.0**-11) + 8 * 2.0**-25


def check_gguf_tensor(written: TensorInfo, expected: TensorInfo, reader: SourceReader) -> int:
    """Check every block of one GGUF tensor; return the bytes checked."""
    import torch

    from reshard.quant.ggml import DEQUANTIZERS, block_scales
    from reshard.quant.stream import iter_float_bands

    kind = expected.quant.kind
    cols = expected.shape[-1] if len(expected.shape) == 2 else 1
    row_bytes = written.nbytes // expected.shape[0]
    fd = reader.fd(written.source)
    for first, band in iter_float_bands(expected, reader, BAND):
        raw = read_exact(fd, written.offset + first * row_bytes, band.shape[0] * row_bytes, str(written.file))
        q = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
        got = DEQUANTIZERS[kind](q, cols)
        err = (got - band).abs().reshape(-1, 32).amax(dim=1)
        bound = _bound(kind, block_scales(q, kind))
        bad = torch.nonzero(err > bound)
        if len(bad):
            b = int(bad[0])
            raise VerifyError(
                f"{written.file}: tensor {written.name!r} block {b + first * cols // 32} "
                f"dequantizes {float(err[b]):.3g} away from the source, over its bound "
                f"{float(bound[b]):.3g}; re-run reshard split"
            )
    return written.nbytes


def check_fp8_pair(weight: TensorInfo, scale: TensorInfo, expected: TensorInfo, reader: SourceReader) -> int:
    """Check an FP8 weight and its ``weight_scale_inv`` against the source weight."""
    import torch

    from reshard.quant import FP8_BLOCK
    from reshard.quant.fp8 import dequantize_fp8_block, fp8_error_bound, fp8_scales
    from reshard.quant.stream import iter_float_bands

    sfd = reader.fd(scale.source)
    scales = torch.frombuffer(
        bytearray(read_exact(sfd, scale.offset, scale.nbytes, str(scale.file))), dtype=torch.float32
    ).reshape(scale.shape)
    cols = expected.shape[1]
    fd = reader.fd(weight.source)
    for first, band in iter_float_bands(expected, reader, BAND):
        s = scales[first // FP8_BLOCK : first // FP8_BLOCK + -(-band.shape[0] // FP8_BLOCK)]
        if not torch.equal(s, fp8_scales(band)):
            raise VerifyError(
                f"{scale.file}: tensor {scale.name!r} rows {first}.. are not block "
                "absmax / 448 of the source; re-run reshard split"
            )
        raw = read_exact(fd, weight.offset + first * cols, band.shape[0] * cols, str(weight.file))
        q = torch.frombuffer(bytearray(raw), dtype=torch.float8_e4m3fn).reshape(-1, cols)
        err = (dequantize_fp8_block(q, s) - band).abs()
        over = err > fp8_error_bound(band, s)
        if bool(over.any()):
            r, c = (int(v) for v in torch.nonzero(over)[0])
            raise VerifyError(
                f"{weight.file}: tensor {weight.name!r} block "
                f"({(first + r) // FP8_BLOCK}, {c // FP8_BLOCK}) dequantizes outside its "
                "bound; re-run reshard split"
            )
    return weight.nbytes + scale.nbytes


def verify_quantized(folder: Path, expected: Checkpoint, written: dict[str, TensorInfo]) -> VerifyReport:
    """Check ``written`` (read back from ``folder``) against the rebuilt ``expected``."""
    check_same_tensors(written, expected.tensors, Path(folder))
    checked = 0
    by_name = {t.name: t for t in expected.tensors}
    with SourceReader() as reader:
        for t in expected.tensors:
            w = written[t.name]
            if t.quant is None:
                checked += compare_tensor_bytes(w, t, reader)
            elif t.quant.kind in ("Q8_0", "Q4_0"):
                checked += check_gguf_tensor(w, t, reader)
            elif t.quant.kind == "FP8":
                scale_name = t.name + "_scale_inv"
                checked += check_fp8_pair(w, written[scale_name], t, reader)
            elif t.quant.kind == "FP8_SCALE_INV":
                if t.name[: -len("_scale_inv")] not in by_name:
                    raise VerifyError(f"{folder}: {t.name!r} has no weight")
    files = tuple(sorted({t.file.name for t in written.values() if t.file}, key=natural_key))
    return VerifyReport(Path(folder), files, len(written), sum(t.nbytes for t in written.values()), checked)


def verify_quantized_folder(folder: Path, source: Checkpoint) -> VerifyReport | None:
    """Verify a GGUF folder, or a safetensors folder whose config.json says FP8, against
    ``source``; None when ``folder`` is neither (an ordinary split: the caller verifies)."""
    import json

    from reshard.formats.gguf import is_gguf_source, read_gguf_folder

    folder = Path(folder)
    if is_gguf_source(str(folder)):
        from reshard.writers.gguf import gguf_checkpoint

        ck = read_gguf_folder(folder)
        file_type = _gguf_quant(ck)
        expected, _ = gguf_checkpoint(source, file_type)
        return verify_quantized(folder, expected, {t.name: t for t in ck.tensors})
    config = folder / "config.json"
    if config.exists():
        qc = json.loads(config.read_text(encoding="utf-8")).get("quantization_config") or {}
        if qc.get("quant_method") == "fp8":
            from reshard.writers.fp8 import fp8_checkpoint
            from reshard.writers.safetensors import SAFETENSORS

            return verify_quantized(folder, fp8_checkpoint(source), SAFETENSORS.read_back(folder))
    return None


def _gguf_quant(ck: Checkpoint) -> str:
    """The --quantize name a GGUF folder was written with, from its general.file_type."""
    import gguf

    from reshard.writers.gguf import FILE_TYPES

    value = int(ck.metadata.get("general.file_type", "-1"))
    for qtype, member in FILE_TYPES.items():
        if int(getattr(gguf.LlamaFileType, member)) == value:
            return qtype.lower()
    raise VerifyError(f"{ck.weight_files[0]}: general.file_type {value} is not one reshard writes")
