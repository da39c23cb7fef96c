"""Read and write the index JSON of a sharded checkpoint (``*.index.json``).

>>> import json, tempfile, pathlib
>>> p = pathlib.Path(tempfile.mkdtemp()) / "model.safetensors.index.json"
>>> _ = p.write_text(json.dumps({"metadata": {}, "weight_map": {"w": "a.safetensors"}}))
>>> read_index(p)
{'w': 'a.safetensors'}
"""

from __future__ import annotations

import json
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
        raise FormatError(f"{path}: the index has no \"weight_map\" object; regenerate it")
    for name, file_name in weight_map.items():
        if not isinstance(file_name, str):
            raise FormatError(f"{path}: tensor {name!r} maps to {file_name!r}, not a file name")
        check_plain_file_name(path, file_name)
    return dict(weight_map)


def check_plain_file_name(index_path: Path, file_name: str) -> None:
    """Refuse index entries that would read outside the checkpoint folder."""
    posix, windows = PurePosixPath(file_name), PureWindowsPath(file_name)
    if (not file_name or posix.is_absolute() or windows.is_absolute() or windows.drive
            or ".." in posix.parts or ".." in windows.parts or len(posix.parts) != 1
            or len(windows.parts) != 1):
        raise FormatError(f"{index_path}: file name {file_name!r} must be a plain name inside the "
                          "checkpoint folder (no '..', no absolute path, no sub-folder)")


def index_json(weight_map: dict[str, str], total_size: int, total_parameters: int) -> str:
    """The index text transformers writes: sorted keys, indent 2, trailing newline.

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
    index = {
        "metadata": {"total_parameters": total_parameters, "total_size": total_size},
        "weight_map": weight_map,
    }
    return json.dumps(index, indent=2, sort_keys=True) + "\n"
