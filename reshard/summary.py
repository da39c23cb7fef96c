"""Summaries of a checkpoint for ``reshard inspect``: counts, dtypes, sizes, current shards.

>>> from pathlib import Path
>>> from reshard.tensors import Checkpoint, TensorInfo
>>> ck = Checkpoint((TensorInfo.from_file("w", "F32", (2, 3), Path("a.safetensors"), 8, 24),), (Path("a.safetensors"),))
>>> summarize(ck)["parameters_by_dtype"]
{'F32': 6}
>>> info = InspectResult.from_checkpoint(ck, "./a.safetensors")
>>> info.parameters, info.largest_tensor["name"], info.to_json()["source"]
(6, 'w', './a.safetensors')
"""

from __future__ import annotations

import copy
from collections import Counter
from dataclasses import dataclass, field

from reshard.tensors import Checkpoint, natural_key


@dataclass(frozen=True)
class InspectResult:
    """What ``reshard inspect`` (``reshard.inspect``) reports about a checkpoint.

    ``to_json()`` is exactly the object ``reshard inspect --json`` prints (without
    ``"ok"``). ``warnings`` are the lines the CLI printed on stderr while inspecting (a
    Hub repo whose headers could not be read remotely); they are not part of the JSON.
    """

    source: str
    format: str
    tensors: int
    parameters: int
    parameters_by_dtype: dict[str, int]
    bytes_by_dtype: dict[str, int]
    total_size: int
    largest_tensor: dict
    shards: list[dict]
    metadata: dict[str, str]
    dropped: dict[str, str]
    skipped: dict[str, dict]
    facts: dict
    warnings: tuple[str, ...] = field(default=())

    @classmethod
    def from_checkpoint(
        cls, checkpoint: Checkpoint, source: str, warnings: tuple[str, ...] = ()
    ) -> InspectResult:
        return cls(source=source, warnings=warnings, **summarize(checkpoint))

    def to_json(self) -> dict:
        data = {
            "format": self.format,
            "tensors": self.tensors,
            "parameters": self.parameters,
            "parameters_by_dtype": self.parameters_by_dtype,
            "bytes_by_dtype": self.bytes_by_dtype,
            "total_size": self.total_size,
            "largest_tensor": self.largest_tensor,
            "shards": self.shards,
            "metadata": self.metadata,
            "dropped": self.dropped,
            "skipped": self.skipped,
            "facts": self.facts,
            "source": self.source,
        }
        return copy.deepcopy(data)  # the caller may edit it; the result stays as it was


def summarize(checkpoint: Checkpoint) -> dict:
    """A JSON-ready summary: tensor count, parameters by dtype, bytes, largest tensor, shards.

    Tensors described from remote headers (``reshard.hub.resolve.remote_checkpoint``) are
    counted under the repo file their ``HubFileSource`` names.
    """
    params: Counter[str] = Counter()
    nbytes: Counter[str] = Counter()
    per_file: dict[str, list[int]] = {}
    for t in checkpoint.tensors:
        params[t.dtype] += t.numel
        nbytes[t.dtype] += t.nbytes
        key = t.file.name if t.file is not None else getattr(t.source, "filename", "(remote)")
        entry = per_file.setdefault(key, [0, 0])
        entry[0] += t.nbytes
        entry[1] += 1
    largest = max(checkpoint.tensors, key=lambda t: t.nbytes)
    return {
        "format": checkpoint.format,
        "tensors": len(checkpoint.tensors),
        "parameters": checkpoint.total_parameters,
        "parameters_by_dtype": dict(sorted(params.items())),
        "bytes_by_dtype": dict(sorted(nbytes.items())),
        "total_size": checkpoint.total_size,
        "largest_tensor": {
            "name": largest.name,
            "dtype": largest.dtype,
            "shape": list(largest.shape),
            "size": largest.nbytes,
        },
        "shards": [
            {"file": name, "size": size, "tensors": count}
            for name, (size, count) in sorted(per_file.items(), key=lambda kv: natural_key(kv[0]))
        ],
        "metadata": dict(checkpoint.metadata),
        "dropped": dict(checkpoint.dropped),
        "skipped": {
            what: {"size": size, "tensors": count} for what, (size, count) in checkpoint.skipped.items()
        },
        "facts": dict(checkpoint.facts),
    }
