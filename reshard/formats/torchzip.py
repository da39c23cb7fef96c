"""The containers ``torch.save`` writes, read without torch: the zip format (torch >= 1.6)
and the legacy stream format (``_use_new_zipfile_serialization=False``).

Both are parsed here into an object tree whose tensors are ``LazyTensor`` descriptors:
where each tensor's storage lies in the file (absolute byte offset, bytes available), its
element offset, shape and strides. No tensor data is read. The pickle goes through
``reshard.formats.unpickle`` (an allow-list interpreter), never through ``pickle``.

In the zip format each storage is an ``<archive>/data/<key>`` entry stored uncompressed,
so a contiguous tensor is a plain byte range of the ``.bin`` file: the writer copies it
in the kernel.

>>> import io, torch  # doctest: +SKIP
>>> torch.save({"w": torch.zeros(2, 3)}, "w.bin")  # doctest: +SKIP
>>> read_torch_file(Path("w.bin"))["w"].shape  # doctest: +SKIP
(2, 3)
"""

from __future__ import annotations

import os
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reshard.errors import FormatError, ReshardError, UnsafePickleError
from reshard.formats.unpickle import (
    MAX_PICKLE_BYTES,
    STORAGE_TYPES,
    TENSOR_REBUILDERS,
    TORCH_DTYPES,
    Global,
    Reader,
    default_call,
    run_pickle,
)

ZIP_MAGIC = b"PK\x03\x04"
LEGACY_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
_LOCAL_HEADER = struct.Struct("<4s5H3I2H")  # the 30 fixed bytes of a zip local file header


@dataclass(frozen=True, eq=False)
class StorageRef:
    """A storage as the pickle names it: key, dtype of its elements, element count claimed."""

    key: str
    dtype: str
    numel: int


@dataclass(frozen=True, eq=False)
class Storage:
    """A storage located in the file: ``nbytes`` bytes at absolute ``data_offset``."""

    key: str
    data_offset: int
    nbytes: int


@dataclass(frozen=True, eq=False)
class LazyTensor:
    """A tensor as the pickle rebuilds it, not loaded: a view into a storage.

    ``offset`` and ``strides`` are in elements of ``dtype``."""

    storage: StorageRef
    dtype: str
    offset: int
    shape: tuple[int, ...]
    strides: tuple[int, ...]


@dataclass(frozen=True)
class TorchFile:
    """A parsed ``torch.save`` file: its object tree and where each storage key lies."""

    path: Path
    obj: Any
    storages: dict[str, Storage]
    format: str  # "zip" or "legacy"


def read_torch_file(path: Path, allow: frozenset[tuple[str, str]] = frozenset()) -> TorchFile:
    """Parse a ``torch.save`` file (zip or legacy) without running any of its code.

    ``allow``: extra classes the caller's format expects in the pickle (e.g.
    ``unpickle.DEEPSPEED_GLOBALS``), kept as inert ``unpickle.Record``s.

    Raises:
        UnsafePickleError: the pickle names a global outside the allow-list.
        FormatError: not a torch file, damaged, compressed storages, big-endian data.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
            size = os.fstat(f.fileno()).st_size
            if magic == ZIP_MAGIC:
                return _read_zip(path, f, size, allow)
            if magic[:1] == b"\x80":
                f.seek(0)
                return _read_legacy(path, f, size, allow)
    except ReshardError:
        raise
    except (OSError, EOFError) as e:
        raise FormatError(f"{path}: cannot be read ({e}); the file is damaged or unreadable") from e
    if magic[:4] == b"\x00\x00\x00\x00" or size >= 262 and _is_tar(path):
        raise FormatError(
            f"{path}: a torch checkpoint from before torch 0.4 (tar format); "
            "re-save it with a recent torch.save"
        )
    raise FormatError(
        f"{path}: not a PyTorch checkpoint (neither a torch.save zip nor a pickle); "
        "check the file or re-download it"
    )


def _is_tar(path: Path) -> bool:
    with open(path, "rb") as f:
        f.seek(257)
        return f.read(5) == b"ustar"


def read_torch_range(path: Path, offset: int, length: int) -> TorchFile:
    """Parse a ``torch.save`` zip stored at ``[offset, offset + length)`` of a larger file
    (each item of a DCP ``.distcp`` file is one), without running any of its code. Storage
    offsets in the result are absolute offsets in ``path``.

    Raises:
        FormatError: the range is not inside the file, or is not a torch.save zip.
        UnsafePickleError: the item's pickle names a global outside the allow-list.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if offset < 0 or length < len(ZIP_MAGIC) or offset + length > size:
                raise FormatError(
                    f"{path}: an item at bytes {offset}-{offset + length} is not "
                    f"inside the file ({size} bytes); the file is truncated or "
                    "does not belong to this checkpoint"
                )
            window = _Window(f, offset, length)
            if window.read(4) != ZIP_MAGIC:
                raise FormatError(
                    f"{path}: no torch.save item at byte {offset}; the file is "
                    "damaged or does not belong to this checkpoint"
                )
            window.seek(0)
            parsed = _read_zip(path, window, length)
    except ReshardError:
        raise
    except (OSError, EOFError) as e:
        raise FormatError(f"{path}: cannot be read ({e}); the file is damaged or unreadable") from e
    storages = {key: Storage(s.key, s.data_offset + offset, s.nbytes) for key, s in parsed.storages.items()}
    return TorchFile(path, parsed.obj, storages, "zip")


class _Window:
    """A read-only file object over ``[start, start + length)`` of an open file, so that
    ``zipfile`` sees one archive stored inside a larger file."""

    def __init__(self, f, start: int, length: int) -> None:
        self.f, self.start, self.length, self.pos = f, start, length, 0

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self.pos, 2: self.length}[whence]
        self.pos = max(0, min(self.length, base + offset))
        return self.pos

    def tell(self) -> int:
        return self.pos

    def read(self, n: int = -1) -> bytes:
        n = self.length - self.pos if n is None or n < 0 else min(n, self.length - self.pos)
        self.f.seek(self.start + self.pos)
        data = self.f.read(n)
        self.pos += len(data)
        return data

    def seekable(self) -> bool:
        return True


def _read_zip(path: Path, f, size: int, allow: frozenset[tuple[str, str]] = frozenset()) -> TorchFile:
    try:
        archive = zipfile.ZipFile(f)
        infos = {i.filename: i for i in archive.infolist()}
    except ReshardError:
        raise
    except Exception as e:  # zipfile raises BadZipFile, ValueError, struct.error, ...
        raise FormatError(
            f"{path}: damaged zip ({type(e).__name__}: {str(e)[:80]}); re-download the file"
        ) from e
    pickles = [n for n in infos if n.endswith("data.pkl") and n.count("/") == 1]
    if len(pickles) != 1:
        raise FormatError(f"{path}: a zip but not a torch.save archive (no single <name>/data.pkl)")
    prefix = pickles[0][: -len("data.pkl")]
    order = infos.get(prefix + "byteorder")
    if order is not None and _read_entry(path, f, order, size, 16).strip() != b"little":
        raise FormatError(
            f"{path}: saved on a big-endian machine; load and re-save it on a little-endian one"
        )
    data = _read_entry(path, f, infos[pickles[0]], size, MAX_PICKLE_BYTES)
    refs: dict[str, StorageRef] = {}
    obj = run_pickle(
        Reader(data, name=str(path)), lambda pid: _storage_ref(pid, refs, path, 5), _rebuild, str(path), allow
    )
    storages = {}
    for key in refs:
        info = infos.get(f"{prefix}data/{key}")
        if info is None:
            raise FormatError(
                f"{path}: the pickle names storage {key!r}, which the archive lacks; "
                "the file is truncated or damaged"
            )
        if info.compress_type != zipfile.ZIP_STORED:
            raise FormatError(
                f"{path}: storage {key!r} is compressed; reshard streams uncompressed "
                "storages only: re-save with torch.save (it never compresses)"
            )
        storages[key] = Storage(key, _entry_data_offset(path, f, info, size), info.file_size)
    return TorchFile(path, obj, storages, "zip")


def _read_entry(path: Path, f, info: zipfile.ZipInfo, size: int, limit: int) -> bytes:
    if info.file_size > limit:
        raise FormatError(
            f"{path}: entry {info.filename} is {info.file_size} bytes, more than a "
            "state dict pickle ever is; not a weights file"
        )
    if info.compress_type == zipfile.ZIP_STORED:
        offset = _entry_data_offset(path, f, info, size)
        f.seek(offset)
        data = f.read(info.file_size)
    else:
        try:
            with zipfile.ZipFile(f).open(info) as entry:
                data = entry.read(limit + 1)
        except Exception as e:
            raise FormatError(
                f"{path}: cannot read entry {info.filename} ({type(e).__name__}); the file is damaged"
            ) from e
    if len(data) != info.file_size:
        raise FormatError(f"{path}: entry {info.filename} is truncated; re-download the file")
    return data


def _entry_data_offset(path: Path, f, info: zipfile.ZipInfo, size: int) -> int:
    """Absolute offset of an entry's bytes: after its local header, name and extra field."""
    # A damaged central directory can claim any offset (even past 2**63: seek would raise).
    if not 0 <= info.header_offset <= size - _LOCAL_HEADER.size:
        raise FormatError(f"{path}: zip entry {info.filename} starts outside the file; the file is damaged")
    f.seek(info.header_offset)
    raw = f.read(_LOCAL_HEADER.size)
    if len(raw) != _LOCAL_HEADER.size or raw[:4] != ZIP_MAGIC:
        raise FormatError(f"{path}: bad zip local header for {info.filename}; the file is damaged")
    fields = _LOCAL_HEADER.unpack(raw)
    offset = info.header_offset + _LOCAL_HEADER.size + fields[-2] + fields[-1]
    if offset + info.file_size > size:
        raise FormatError(
            f"{path}: entry {info.filename} runs past the end of the file; "
            "the file is truncated, re-download it"
        )
    return offset


def _storage_ref(pid: Any, refs: dict[str, StorageRef], path: Path, arity: int) -> StorageRef:
    """Persistent ids: zip ``('storage', type, key, location, numel)``; legacy adds a view."""
    if (
        not isinstance(pid, tuple)
        or len(pid) != arity
        or pid[0] != "storage"
        or not isinstance(pid[1], Global)
        or not isinstance(pid[2], str)
        or not isinstance(pid[4], int)
        or pid[4] < 0
    ):
        if isinstance(pid, tuple) and pid and pid[0] == "module":
            raise UnsafePickleError(
                f"{path}: a pickled nn.Module (its class code would have to "
                "run); save model.state_dict() instead"
            )
        raise FormatError(f"{path}: malformed storage reference in the pickle; the file is damaged")
    if arity == 6 and pid[5] is not None:
        raise FormatError(f"{path}: legacy storage views are not supported; re-save with a recent torch.save")
    dtype = STORAGE_TYPES.get(pid[1].name)
    if dtype is None or pid[1].module not in ("torch", "torch.storage"):
        raise FormatError(f"{path}: unknown storage type {pid[1].qualname}")
    ref = refs.get(pid[2])
    if ref is None:
        ref = refs[pid[2]] = StorageRef(pid[2], dtype, pid[4])
    return ref


def _rebuild(func: Global, args: tuple, where: str) -> Any:
    """Serve the allowed tensor rebuilders with ``LazyTensor`` descriptors."""
    key = (func.module, func.name)
    if key not in TENSOR_REBUILDERS:
        return default_call(func, args, where)
    name = func.name
    if name in ("_rebuild_parameter", "_rebuild_parameter_with_state"):
        return _expect_tensor(args[0] if args else None, where)
    if name == "_rebuild_from_type_v2":  # (func, type, args, state): tensor subclasses
        if len(args) != 4 or not isinstance(args[0], Global) or not isinstance(args[2], tuple):
            raise FormatError(f"{where}: malformed tensor subclass record in the pickle")
        return _expect_tensor(_rebuild(args[0], args[2], where), where)
    if name == "_rebuild_tensor_v3":  # untyped storage + explicit dtype
        if len(args) < 7 or not isinstance(args[6], Global) or args[6].name not in TORCH_DTYPES:
            raise FormatError(f"{where}: malformed tensor record (v3) in the pickle")
        return _lazy_tensor(args[:4], TORCH_DTYPES[args[6].name], where)
    if len(args) < 4:
        raise FormatError(f"{where}: malformed tensor record in the pickle")
    storage = args[0]
    return _lazy_tensor(args[:4], storage.dtype if isinstance(storage, StorageRef) else "", where)


def _expect_tensor(value: Any, where: str) -> LazyTensor:
    if not isinstance(value, LazyTensor):
        raise FormatError(f"{where}: a parameter record without a tensor; the file is damaged")
    return value


def _lazy_tensor(args: tuple, dtype: str, where: str) -> LazyTensor:
    storage, offset, shape, strides = args
    if not isinstance(storage, StorageRef):
        raise FormatError(f"{where}: a tensor record without a storage; the file is damaged")
    if (
        not _ints(shape)
        or not _ints(strides)
        or len(shape) != len(strides)
        or not isinstance(offset, int)
        or isinstance(offset, bool)
        or offset < 0
    ):
        raise FormatError(f"{where}: a tensor record with a malformed shape, stride or offset")
    if len(shape) > 64:
        raise FormatError(f"{where}: a tensor with {len(shape)} dimensions; the file is damaged")
    return LazyTensor(storage, dtype, offset, tuple(shape), tuple(strides))


def _ints(values: Any) -> bool:
    return isinstance(values, (tuple, list)) and all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values
    )


class _FileReader(Reader):
    """A ``Reader`` over an open file from its current position."""

    def __init__(self, f, size: int, name: str) -> None:
        super().__init__(f, size - f.tell(), name)


def _read_legacy(path: Path, f, size: int, allow: frozenset[tuple[str, str]] = frozenset()) -> TorchFile:
    """The pre-1.6 stream: magic, protocol, sys info, the object, the storage keys, then for
    each key an 8-byte element count and the raw bytes."""
    where = str(path)
    magic = run_pickle(_FileReader(f, size, where), _no_persistent(path), where=where)
    if magic != LEGACY_MAGIC_NUMBER:
        raise FormatError(
            f"{path}: a plain pickle, not a torch.save file; reshard reads only torch.save checkpoints"
        )
    run_pickle(_FileReader(f, size, where), _no_persistent(path), where=where)  # protocol version
    sys_info = run_pickle(_FileReader(f, size, where), _no_persistent(path), where=where)
    if not isinstance(sys_info, dict) or sys_info.get("little_endian") is not True:
        raise FormatError(
            f"{path}: saved on a big-endian machine or damaged; re-save it with a recent torch.save"
        )
    refs: dict[str, StorageRef] = {}
    obj = run_pickle(
        _FileReader(f, size, where), lambda pid: _storage_ref(pid, refs, path, 6), _rebuild, where, allow
    )
    keys = run_pickle(_FileReader(f, size, where), _no_persistent(path), where=where)
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
        raise FormatError(f"{path}: malformed storage key list; the file is damaged")
    from reshard.units import dtype_itemsize

    storages: dict[str, Storage] = {}
    position = f.tell()
    for key in keys:
        ref = refs.get(key)
        if ref is None or ref.dtype == "C128":
            raise FormatError(f"{path}: storage {key!r} is not described by the pickle; damaged file")
        f.seek(position)
        raw = f.read(8)
        if len(raw) != 8:
            raise FormatError(f"{path}: truncated before storage {key!r}; re-download the file")
        nbytes = struct.unpack("<q", raw)[0] * dtype_itemsize(ref.dtype)
        if nbytes < 0 or position + 8 + nbytes > size:
            raise FormatError(f"{path}: storage {key!r} runs past the end of the file; truncated")
        storages[key] = Storage(key, position + 8, nbytes)
        position += 8 + nbytes
    missing = set(refs) - set(storages)
    if missing:
        raise FormatError(f"{path}: storage {sorted(missing)[0]!r} has no data; the file is damaged")
    return TorchFile(path, obj, storages, "legacy")


def _no_persistent(path: Path):
    def refuse(pid: Any) -> Any:
        raise FormatError(f"{path}: unexpected storage reference; not a torch.save file")

    return refuse
