"""Check an output folder: the index and the files agree, every header is valid, and
(optionally) every tensor's bytes equal the source's.

>>> verify_folder(Path("/no/such/folder"))  # doctest: +ELLIPSIS
Traceback (most recent call last):
...
reshard.errors.VerifyError: /no/such/folder: not a folder...
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from reshard.errors import FormatError, VerifyError
from reshard.tensors import Checkpoint, TensorInfo, natural_key
from reshard.transfer.ranges import read_exact
from reshard.transfer.sources import SourceReader
from reshard.writers.base import ShardFormat
from reshard.writers.safetensors import SAFETENSORS

COMPARE_CHUNK = 8 * 1024 * 1024


@dataclass(frozen=True)
class VerifyReport:
    """What was checked: files, tensor count, tensor bytes, and bytes compared to a source."""

    folder: Path
    files: tuple[str, ...]
    tensors: int
    total_size: int
    compared_bytes: int = 0

    def to_json(self) -> dict:
        return {
            "folder": str(self.folder),
            "files": list(self.files),
            "tensors": self.tensors,
            "total_size": self.total_size,
            "compared_bytes": self.compared_bytes,
            "ok": True,
        }


def read_output(folder: Path, fmt: ShardFormat = SAFETENSORS) -> dict[str, TensorInfo]:
    """Read a written folder's tensors through its format, checking index and headers agree.

    Raises:
        VerifyError: missing files, names in the wrong file, stray shards, wrong total_size.
        FormatError: a header that is not valid.
    """
    return fmt.read_back(Path(folder))


def check_same_tensors(
    written: dict[str, TensorInfo], expected: tuple[TensorInfo, ...], folder: Path
) -> None:
    """Names, dtypes and shapes of the written tensors equal the expected ones."""
    expected_names = {t.name for t in expected}
    missing = expected_names - written.keys()
    extra = written.keys() - expected_names
    if missing or extra:
        name = sorted(missing or extra, key=natural_key)[0]
        what = "is missing" if missing else "is not in the source"
        raise VerifyError(
            f"{folder}: tensor {name!r} {what} ({len(missing)} missing, {len(extra)} unexpected)"
        )
    for t in expected:
        w = written[t.name]
        if (w.dtype, w.shape) != (t.dtype, t.shape):
            raise VerifyError(
                f"{w.file}: tensor {t.name!r} is {w.dtype}{list(w.shape)}, expected {t.dtype}{list(t.shape)}"
            )


def verify_folder(
    folder: Path, against: Checkpoint | None = None, fmt: ShardFormat = SAFETENSORS
) -> VerifyReport:
    """Verify a folder; with ``against``, also compare every tensor's bytes to the source's.

    When the folder's dtype differs from the source's (``split --dtype``), the source is
    converted the same way before comparing.
    """
    if fmt is SAFETENSORS and _is_gguf_folder(folder):
        return verify_gguf_folder(Path(folder), against)
    written = read_output(folder, fmt)
    compared = 0
    if against is not None:
        from reshard.formats.registry import convert_checkpoint

        expected = against.tensors
        for t in expected:
            w = written.get(t.name)
            if w is not None and w.dtype != t.dtype and t.stored_dtype != w.dtype:
                expected = convert_checkpoint(against, w.dtype).tensors
                break
        check_same_tensors(written, expected, Path(folder))
        with SourceReader() as reader:
            for t in expected:
                compared += compare_tensor_bytes(written[t.name], t, reader)
    files = tuple(sorted({t.file.name for t in written.values() if t.file}, key=natural_key))
    return VerifyReport(Path(folder), files, len(written), sum(t.nbytes for t in written.values()), compared)


def _is_gguf_folder(folder: Path) -> bool:
    from reshard.formats.gguf import is_gguf_source

    return is_gguf_source(str(folder))


def verify_gguf_folder(folder: Path, against: Checkpoint | None = None) -> VerifyReport:
    """A GGUF output (one file or a gguf-split set): every header parses, the split keys
    and file names agree, tensors lie aligned inside their files; with ``against``, every
    block dequantizes within its bound (``reshard.quant.check``)."""
    from reshard.formats.gguf import read_gguf_folder

    if against is not None:
        from reshard.quant.check import verify_quantized_folder

        report = verify_quantized_folder(folder, against)
        assert report is not None
        return report
    ck = read_gguf_folder(folder)
    files = tuple(
        sorted(
            {t.file.name for t in ck.tensors if t.file} | {p.name for p in ck.weight_files}, key=natural_key
        )
    )
    return VerifyReport(folder, files, len(ck.tensors), sum(t.nbytes for t in ck.tensors))


def compare_tensor_bytes(written: TensorInfo, source: TensorInfo, reader: SourceReader) -> int:
    """Compare one tensor chunk by chunk; return the bytes compared.

    Raises:
        VerifyError: naming the tensor and the first differing byte offset.
    """
    from reshard.transfer.cast import iter_tensor_bytes

    out_fd = reader.fd(written.extents[0].source)
    if source.is_plain_copy:
        return _compare_plain(written, source, out_fd, reader.fd(source.extents[0].source))
    position = 0
    for chunk in iter_tensor_bytes(source, reader):
        got = read_exact(out_fd, written.offset + position, len(chunk), str(written.file))
        if got != chunk:
            raise VerifyError(_mismatch(written, source, position, got, chunk))
        position += len(chunk)
    if position != written.nbytes:
        raise VerifyError(
            f"{written.file}: tensor {written.name!r} has {written.nbytes} bytes, the source gives {position}"
        )
    return position


def _compare_plain(written: TensorInfo, source: TensorInfo, out_fd: int, src_fd: int) -> int:
    if written.nbytes != source.nbytes:
        raise VerifyError(
            f"{written.file}: tensor {written.name!r} has {written.nbytes} bytes, "
            f"the source has {source.nbytes}"
        )
    for start in range(0, source.nbytes, COMPARE_CHUNK):
        n = min(COMPARE_CHUNK, source.nbytes - start)
        got = read_exact(out_fd, written.offset + start, n, str(written.file))
        want = read_exact(src_fd, source.offset + start, n, str(source.file))
        if got != want:
            raise VerifyError(_mismatch(written, source, start, got, want))
    return source.nbytes


def _mismatch(written: TensorInfo, source: TensorInfo, base: int, got: bytes, want: bytes) -> str:
    first = (
        next(i for i, (a, b) in enumerate(zip(got, want)) if a != b)
        if len(got) == len(want)
        else min(len(got), len(want))
    )
    return (
        f"{written.file}: tensor {written.name!r} differs from {source.source.key if source.source else 'the source'} at byte "
        f"{base + first}; re-run reshard split"
    )


__all__ = [
    "VerifyReport",
    "read_output",
    "verify_folder",
    "check_same_tensors",
    "compare_tensor_bytes",
    "FormatError",
]
