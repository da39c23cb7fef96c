"""Summaries of a checkpoint for ``reshard inspect``: counts, dtypes, sizes, current shards.

>>> from reshard.tensors import Checkpoint, TensorInfo
>>> ck = Checkpoint((TensorInfo.from_file("w", "F32", (2, 3), Path("a.safetensors"), 8, 24),), (Path("a.safetensors"),))
>>> summarize(ck)["parameters_by_dtype"]
{'F32': 6}
"""

from __future__ import annotations

from collections import Counter

from reshard.tensors import Checkpoint, natural_key


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
