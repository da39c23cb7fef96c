"""The safetensors shard format: transformers' file names, header layout and index.

Within a shard, data are laid out in source order so neighbouring tensors form runs that
move with one kernel copy (the header lists tensors in natural order); the header is
padded so the first tensor's data sit at the same offset modulo 4096 as in its source,
which keeps kernel copies page-congruent. Reading a folder back checks the index and
every header agree.

>>> SAFETENSORS.shard_file_name(1, 3), SAFETENSORS.shard_file_name(1, 1)
('model-00001-of-00003.safetensors', 'model.safetensors')
>>> from pathlib import Path
>>> t = TensorInfo.from_file("w", "F32", (2,), Path("src.safetensors"), 4096 + 80, 8)
>>> layout = SAFETENSORS.layout([t], {"format": "pt"})
>>> layout.data_start % 4096, layout.size - layout.data_start
(80, 8)
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

from reshard.errors import VerifyError
from reshard.formats.index import index_json, read_index
from reshard.formats.safetensors import build_header, is_aligned, read_header
from reshard.tensors import Checkpoint, TensorInfo, natural_key
from reshard.units import dtype_itemsize
from reshard.writers.base import ShardLayout

SINGLE_FILE_NAME = "model.safetensors"
INDEX_FILE_NAME = "model.safetensors.index.json"


def shard_file_name(number: int, count: int) -> str:
    """``shard_file_name(1, 3) == 'model-00001-of-00003.safetensors'`` (1-based)."""
    return f"model-{number:05d}-of-{count:05d}.safetensors"


def data_order(tensors: Iterable[TensorInfo]) -> list[TensorInfo]:
    """Order a shard's tensors by source position, so plain copies form long runs,
    unless that would misalign a tensor; then by element size first, as the reference
    writer does, which always aligns."""
    by_source = sorted(
        tensors, key=lambda t: (t.source.key if t.source else "None", t.offset, natural_key(t.name))
    )
    if is_aligned(by_source):
        return by_source
    return sorted(by_source, key=lambda t: -dtype_itemsize(t.dtype))


def shard_header(order: Sequence[TensorInfo], metadata: dict[str, str]) -> bytes:
    """The exact header bytes of a shard whose data are laid out in ``order``.

    The header is padded so that the data start at the offset within a 4 KiB page that
    keeps tensors at their source's page offset: the kernel then copies whole pages, and
    XFS and btrfs can share their blocks with the source instead of copying them. The
    offset is the first plain-copy tensor's, taken from the source file that gives the
    shard the most plain-copy bytes. (When tensor sizes are multiples of 4096, as in
    Mistral or Llama, a shard drawing from two files whose data starts differ modulo 4096
    can keep only one file's tensors congruent; this keeps the bigger part.)
    """
    bytes_from: dict[str, int] = {}
    first_from: dict[str, int] = {}  # source -> data-start page offset of its first tensor
    cursor = 0
    for t in order:
        if t.is_plain_copy and t.source is not None:
            bytes_from[t.source.key] = bytes_from.get(t.source.key, 0) + t.nbytes
            first_from.setdefault(t.source.key, (t.offset - cursor) % 4096)
        cursor += t.nbytes
    first = order[0]
    page_offset = first.offset % 4096 if first.is_plain_copy else None
    if first.is_plain_copy and first.source is not None:  # the rule before, unless another
        key = first.source.key  # source gives more bytes
        page_offset = first_from[max(bytes_from, key=lambda k: (bytes_from[k], k == key))]
    entries = [(t.name, t.dtype, t.shape, t.nbytes) for t in order]
    return build_header(
        metadata,
        entries,
        pad_to=8,
        first_data_page_offset=page_offset,
        key_order=sorted((t.name for t in order), key=natural_key),
    )


def congruent_start(order: Sequence[TensorInfo]) -> int | None:
    """The data-start offset modulo 4096 that puts the most bytes of contiguous pieces at
    their source's offset modulo 4096 (so the kernel copies whole pages, and XFS/btrfs can
    share them), for tensors stitched from several files (a tensor-parallel merge): each
    piece votes with its length. None when no piece is a plain byte range.

    >>> from reshard.tensors import Extent, TensorInfo
    >>> from reshard.transfer.sources import FileSource
    >>> a, b = FileSource(Path("rank-0.safetensors")), FileSource(Path("rank-1.safetensors"))
    >>> halves = (Extent(a, 4096 + 100, 8192, 0), Extent(b, 100, 8192, 8192))
    >>> congruent_start([TensorInfo("w", "U8", (16384,), halves, 16384)])
    100
    """
    votes: dict[int, int] = {}
    cursor = 0
    for t in order:
        if t.quant is None and t.src_dtype is None and t.strides is None:
            for e in t.extents:
                if e.is_contiguous and e.source is not None and e.source.is_local:
                    start = (e.offset - cursor - e.dest) % 4096
                    votes[start] = votes.get(start, 0) + e.nbytes
        cursor += t.nbytes
    return max(votes, key=lambda k: (votes[k], -k)) if votes else None


def plan_order(tensors: Iterable[TensorInfo]) -> list[TensorInfo]:
    """The order given, unless that would misalign a tensor; then widest elements first."""
    order = list(tensors)
    return order if is_aligned(order) else sorted(order, key=lambda t: -dtype_itemsize(t.dtype))


class SafetensorsFormat:
    """``model-0000i-of-0000n.safetensors`` shards plus ``model.safetensors.index.json``,
    or one ``model.safetensors`` with no index.

    ``source_order`` (the default) lays a shard's data out in source order with the
    header padded to the first tensor's page offset, so plain copies form long,
    page-congruent runs. Tensors stitched from several files (a tensor-parallel merge)
    have no single source position: ``source_order=False`` keeps the plan's order
    instead, with no page padding.
    """

    name = "safetensors"
    single_file_name = SINGLE_FILE_NAME
    index_file_name = INDEX_FILE_NAME

    def __init__(self, source_order: bool = True) -> None:
        self.source_order = source_order

    def shard_file_name(self, number: int, count: int) -> str:
        return SINGLE_FILE_NAME if count == 1 else shard_file_name(number, count)

    def layout(self, tensors: Sequence[TensorInfo], metadata: dict[str, str]) -> ShardLayout:
        if self.source_order:
            order = data_order(tensors)
            header = shard_header(order, metadata)
        else:
            order = plan_order(tensors)
            header = build_header(
                metadata,
                [(t.name, t.dtype, t.shape, t.nbytes) for t in order],
                pad_to=8,
                first_data_page_offset=congruent_start(order),
                key_order=sorted((t.name for t in order), key=natural_key),
            )
        placements, cursor = [], len(header)
        for t in order:  # safetensors forbids gaps: each tensor right after the previous one
            placements.append((t, cursor))
            cursor += t.nbytes
        return ShardLayout(header, tuple(placements), cursor)

    def index_text(self, weight_map: dict[str, str], checkpoint: Checkpoint, metadata: dict[str, str]) -> str:
        params = {t.name: t.numel for t in checkpoint.tensors}
        sizes = {t.name: t.nbytes for t in checkpoint.tensors}
        return index_json(
            weight_map, sum(sizes[n] for n in weight_map), sum(params[n] for n in weight_map), metadata
        )

    def read_back(self, folder: Path) -> dict[str, TensorInfo]:
        """Read a written folder's tensors, checking index and headers agree.

        Raises:
            VerifyError: missing files, names in the wrong file, stray shards, wrong total_size.
            FormatError: a header that is not valid safetensors.
        """
        folder = Path(folder)
        if not folder.is_dir():
            raise VerifyError(f"{folder}: not a folder; pass the folder reshard split wrote")
        index_path = folder / INDEX_FILE_NAME
        if not index_path.exists():
            single = folder / SINGLE_FILE_NAME
            if not single.exists():
                raise VerifyError(f"{folder}: neither {INDEX_FILE_NAME} nor {SINGLE_FILE_NAME} is here")
            stray = sorted(p.name for p in folder.glob("*.safetensors") if p.name != SINGLE_FILE_NAME)
            if stray:  # a loader would read model.safetensors alone: the others are not part of it
                raise VerifyError(
                    f"{folder / stray[0]}: a second .safetensors file beside "
                    f"{SINGLE_FILE_NAME} and no index names it; remove it or add an index"
                )
            return {t.name: t for t in read_header(single).tensors}
        weight_map = read_index(index_path)
        tensors: dict[str, TensorInfo] = {}
        for file_name in sorted(set(weight_map.values()), key=natural_key):
            path = folder / file_name
            if not path.is_file():
                raise VerifyError(f"{index_path}: names {file_name}, which is missing")
            for t in read_header(path).tensors:
                listed = weight_map.get(t.name)
                if listed is None:
                    raise VerifyError(
                        f"{path}: holds tensor {t.name!r}, which {INDEX_FILE_NAME} does "
                        "not name; regenerate the index"
                    )
                if listed != file_name:
                    raise VerifyError(
                        f"{path}: holds tensor {t.name!r}, which the index maps to "
                        f"{listed}; regenerate the index"
                    )
                tensors[t.name] = t
        for name, file_name in weight_map.items():
            if name not in tensors:
                raise VerifyError(f"{index_path}: names tensor {name!r} in {file_name}, which lacks it")
        shard_names = set(weight_map.values())
        for path in folder.glob("*.safetensors"):
            if path.name not in shard_names:
                raise VerifyError(f"{path}: a shard the index does not list; remove it")
        _check_total_size(index_path, tensors)
        return tensors


def _check_total_size(index_path: Path, tensors: dict[str, TensorInfo]) -> None:
    metadata = json.loads(index_path.read_text(encoding="utf-8")).get("metadata")
    if not isinstance(metadata, dict):
        raise VerifyError(f'{index_path}: no "metadata" object (transformers requires one)')
    total = sum(t.nbytes for t in tensors.values())
    if metadata.get("total_size") != total:
        raise VerifyError(
            f"{index_path}: metadata.total_size is {metadata.get('total_size')} but the "
            f"shards hold {total} tensor bytes"
        )


SAFETENSORS = SafetensorsFormat()
