"""Read GGUF files (one, or gguf-split's set) as descriptors, for ``inspect`` and verify.

Parsing is llama.cpp's own ``gguf.GGUFReader``; it maps the file and reads the header
only, so no tensor data are loaded. Tensor dtypes are GGML type names (``Q8_0``,
``F32``) and shapes are in row-major order (GGUF stores them innermost first).
"""

from __future__ import annotations

import re
from pathlib import Path

from reshard.errors import FormatError, VerifyError
from reshard.tensors import Checkpoint, Extent, TensorInfo, natural_key
from reshard.transfer.sources import FileSource

SPLIT_NAME = re.compile(r"^(?P<stem>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")
SHOWN_KEYS = (
    "general.architecture",
    "general.name",
    "general.file_type",
    "tokenizer.ggml.model",
    "split.count",
)


def is_gguf_source(spec: str) -> bool:
    """A ``.gguf`` file, or a folder holding ``.gguf`` files and no safetensors/.bin."""
    path = Path(spec).expanduser()
    if path.is_file():
        return path.suffix == ".gguf"
    if path.is_dir():
        names = [p.name for p in path.iterdir()]
        return any(n.endswith(".gguf") for n in names) and not any(
            n.endswith((".safetensors", ".bin")) for n in names
        )
    return False


def _field_value(field):
    value = field.contents()
    return value


def read_gguf_file(path: Path) -> tuple[list[TensorInfo], dict]:
    """The tensors and KV fields (name -> python value; arrays as their length) of one file."""
    import gguf

    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, OSError, IndexError, KeyError) as e:
        raise FormatError(f"{path}: not a valid GGUF file ({e}); re-run reshard split") from e
    check_tensor_placement(path, reader)
    fields: dict = {}
    for name, field in reader.fields.items():
        if name.startswith("GGUF."):
            continue
        if field.types and field.types[0] == gguf.GGUFValueType.ARRAY:
            fields[name] = f"[{len(field.data)} items]"
        else:
            fields[name] = _field_value(field)
    tensors = []
    for t in reader.tensors:
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        # quantized types have no safetensors element size: one extent of the file bytes
        tensors.append(
            TensorInfo(
                t.name,
                t.tensor_type.name,
                shape,
                (Extent(FileSource(Path(path)), int(t.data_offset), int(t.n_bytes)),),
                int(t.n_bytes),
            )
        )
    del reader
    return tensors, fields


def check_tensor_placement(path: Path, reader) -> None:
    """Each tensor's data start on the file's alignment, lie inside the file and overlap
    no other tensor's (``GGUFReader`` computes the sizes from type and shape but checks
    none of this)."""
    size = Path(path).stat().st_size
    spans = sorted((int(t.data_offset), int(t.n_bytes), t.name) for t in reader.tensors)
    end_of_previous, previous = int(reader.data_offset), None
    for offset, nbytes, name in spans:
        if (offset - int(reader.data_offset)) % int(reader.alignment):
            raise FormatError(
                f"{path}: tensor {name!r} starts at byte {offset}, not on the file's "
                f"{reader.alignment}-byte alignment; re-run reshard split"
            )
        if offset < end_of_previous:
            raise FormatError(f"{path}: tensors {previous!r} and {name!r} overlap; re-run reshard split")
        if offset + nbytes > size:
            raise FormatError(
                f"{path}: tensor {name!r} ends at byte {offset + nbytes}, past the end of the "
                f"file ({size} bytes): the file is truncated; re-run reshard split"
            )
        end_of_previous, previous = offset + nbytes, name


def read_gguf_folder(folder: Path) -> Checkpoint:
    """Every tensor of a folder of GGUF files (one file, or one gguf-split set), checking
    the split keys: each file's ``split.no`` is its number, ``split.count`` the number of
    files, ``split.tensors.count`` the tensors found."""
    folder = Path(folder)
    if folder.is_file():
        files = [folder]
    else:
        if not folder.is_dir():
            raise VerifyError(f"{folder}: not a folder; pass the folder reshard split wrote")
        files = sorted(folder.glob("*.gguf"), key=lambda p: natural_key(p.name))
    if not files:
        raise VerifyError(f"{folder}: holds no .gguf file")
    tensors: list[TensorInfo] = []
    first_fields: dict = {}
    splits = [SPLIT_NAME.match(p.name) for p in files]
    if len(files) > 1 and not all(splits):
        raise VerifyError(f"{folder}: holds several .gguf files that are not one gguf-split set")
    if len(files) > 1:
        stems = {(m["stem"], int(m["count"])) for m in splits if m}
        if len(stems) > 1:
            raise VerifyError(f"{folder}: holds .gguf files of more than one gguf-split set")
        stem, count = stems.pop()
        present = {int(m["no"]) for m in splits if m}
        missing = [n for n in range(1, count + 1) if n not in present]
        from gguf.gguf_writer import SHARD_NAME_FORMAT

        if missing or count != len(files):
            raise VerifyError(
                f"{folder}: gguf-split set {stem!r} of {count} files lacks "
                f"{SHARD_NAME_FORMAT.format(stem, (missing or [count])[0], count)}; re-run reshard split"
            )
    for k, path in enumerate(files):
        found, fields = read_gguf_file(path)
        if k == 0:
            first_fields = fields
        if len(files) > 1:
            if fields.get("split.no") != k or fields.get("split.count") != len(files):
                raise VerifyError(
                    f"{path}: split.no/split.count say {fields.get('split.no')}/"
                    f"{fields.get('split.count')}, expected {k}/{len(files)}"
                )
        tensors.extend(found)
    if "general.architecture" not in first_fields:
        raise VerifyError(f"{files[0]}: no general.architecture key; llama.cpp cannot load it")
    if len(files) > 1 and first_fields.get("split.tensors.count") != len(tensors):
        raise VerifyError(
            f"{files[0]}: split.tensors.count is {first_fields.get('split.tensors.count')} "
            f"but the files hold {len(tensors)} tensors"
        )
    names = [t.name for t in tensors]
    if len(set(names)) != len(names):
        raise VerifyError(f"{folder}: a tensor name appears twice")
    metadata = {k: str(first_fields[k]) for k in SHOWN_KEYS if k in first_fields}
    return Checkpoint(tuple(tensors), tuple(files), metadata=metadata, format="gguf")


def gguf_fields(path: Path) -> dict:
    """The KV fields of one GGUF file (arrays as their length)."""
    return read_gguf_file(Path(path))[1]
