"""Read and write the index JSON of a sharded checkpoint (``*.index.json``).

>>> import json, tempfile, pathlib
>>> p = pathlib.Path(tempfile.mkdtemp()) / "model.safetensors.index.json"
>>> _ = p.write_text(json.dumps({"metadata": {}, "weight_map": {"w": "a.safetensors"}}))
>>> read_index(p)
{'w': 'a.safetensors'}
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path, PurePosixPath, PureWindowsPath

from reshard.errors import FormatError


def read_index(path: Path) -> dict[str, str]:
    """Return the ``weight_map`` of an index file after checking its shape and file names.

    Raises:
        FormatError: not JSON, no ``weight_map``, non-string entries, or a file name that
            is absolute or climbs out of the folder with ``..``.
    """
    try:
        obj = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise FormatError(f"{path}: cannot read the index: {e}; re-download or regenerate it") from e
    weight_map = obj.get("weight_map") if isinstance(obj, dict) else None
    if not isinstance(weight_map, dict):
        raise FormatError(f'{path}: the index has no "weight_map" object; regenerate it')
    for name, file_name in weight_map.items():
        if not isinstance(file_name, str):
            raise FormatError(f"{path}: tensor {name!r} maps to {file_name!r}, not a file name")
        check_plain_file_name(path, file_name)
    return dict(weight_map)


def check_plain_file_name(index_path: Path, file_name: str) -> None:
    """Refuse index entries that would read outside the checkpoint folder."""
    posix, windows = PurePosixPath(file_name), PureWindowsPath(file_name)
    if (
        not file_name
        or posix.is_absolute()
        or windows.is_absolute()
        or windows.drive
        or ".." in posix.parts
        or ".." in windows.parts
        or len(posix.parts) != 1
        or len(windows.parts) != 1
    ):
        raise FormatError(
            f"{index_path}: file name {file_name!r} must be a plain name inside the "
            "checkpoint folder (no '..', no absolute path, no sub-folder)"
        )


def index_json(
    weight_map: dict[str, str], total_size: int, total_parameters: int, metadata: dict[str, str] | None = None
) -> str:
    """The index text transformers writes: sorted keys, indent 2, trailing newline;
    ``metadata`` adds keys (reshard's provenance) beside the totals.

    >>> print(index_json({"b": "f2", "a": "f1"}, 8, 2), end="")
    {
      "metadata": {
        "total_parameters": 2,
        "total_size": 8
      },
      "weight_map": {
        "a": "f1",
        "b": "f2"
      }
    }
    """
    extra = {k: v for k, v in (metadata or {}).items() if k not in ("total_size", "total_parameters")}
    index = {
        "metadata": {**extra, "total_parameters": total_parameters, "total_size": total_size},
        "weight_map": weight_map,
    }
    return json.dumps(index, indent=2, sort_keys=True) + "\n"


def check_against_index(
    index_file: Path,
    tensors: dict,
    dropped: dict[str, str],
    unindexed_files: tuple[Path, ...] = (),
    names_in: Callable[[Path], list[str]] | None = None,
) -> None:
    """The one rule for an index and its files: they must agree on every tensor.

    A tensor the index names must be in the file it names (or be a dropped tied alias),
    and every tensor of the folder's weight files must be named by the index: one in a
    listed file that the index omits, or in a weight file the index does not list at
    all, is refused rather than silently dropped or silently added.

    Raises:
        FormatError: naming the file, how many tensors disagree, and what to do.
    """
    weight_map = read_index(index_file)
    for name, file_name in weight_map.items():
        found = tensors.get(name)
        if found is None:
            if name in dropped:
                continue
            raise FormatError(
                f"{index_file}: names tensor {name!r} in {file_name}, but that file "
                "lacks it; regenerate the index or re-download the shard"
            )
        if found.file is not None and found.file.name != file_name:
            raise FormatError(
                f"{index_file}: maps tensor {name!r} to {file_name}, but it is in "
                f"{found.file.name}; regenerate the index"
            )
    missing: dict[Path, list[str]] = {}
    for name, t in tensors.items():
        if name not in weight_map and t.file is not None:
            missing.setdefault(t.file, []).append(name)
    for path, names in missing.items():
        raise FormatError(
            f"{path}: holds {len(names)} tensor(s) that {index_file.name} does not name "
            f"(first: {sorted(names)[0]!r}); regenerate the index so nothing is lost"
        )
    for path in unindexed_files:
        count = len(names_in(path)) if names_in is not None else 0
        if count:
            raise FormatError(
                f"{path}: holds {count} tensor(s) but {index_file.name} does not list "
                "this file; remove it if it is stale, regenerate the index, or pass "
                f"{index_file.name} itself as SOURCE to read only the files it names"
            )
