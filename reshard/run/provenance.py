"""Provenance that a run records in its output (read back by ``push`` for the model card).

Where the provenance lives: in the ``metadata`` object of ``model.safetensors.index.json``
when the output is sharded, else in the ``__metadata__`` of the single ``model.safetensors``.
That is the one place that describes the checkpoint as a whole; shard headers keep the
source's metadata unchanged. Values are strings (safetensors metadata allows nothing else),
the source is named only when it is a Hub repo (id and commit), and nothing
time-dependent is recorded, so output stays byte-for-byte deterministic.

>>> sorted(provenance_keys("org/m", "abc123", 2 * 10**9, "BF16", hub=True))  # doctest: +NORMALIZE_WHITESPACE
['reshard_dtype', 'reshard_max_shard_size', 'reshard_revision', 'reshard_source',
 'reshard_source_type', 'reshard_version']
"""

from __future__ import annotations

PREFIX = "reshard_"


def provenance_keys(
    source_name: str | None, revision: str | None, max_shard_size: int, dtype: str | None, hub: bool = False
) -> dict[str, str]:
    """The ``reshard_*`` keys split records.

    Args:
        source_name: the repo id of a Hub source (None for a local one).
        revision: the resolved commit of a Hub source.
        max_shard_size: the shard limit in bytes.
        dtype: the dtype tensors were converted to (``"BF16"``), or None when unchanged.
        hub: whether ``source_name`` is a Hub repo id.
    """
    from reshard import __version__

    keys = {
        f"{PREFIX}source_type": "hub" if hub else "local",
        f"{PREFIX}max_shard_size": str(int(max_shard_size)),
        f"{PREFIX}version": __version__,
    }
    if source_name:
        keys[f"{PREFIX}source"] = source_name
    if revision:
        keys[f"{PREFIX}revision"] = revision
    if dtype:
        keys[f"{PREFIX}dtype"] = dtype
    return keys


def source_provenance(source, spec: str, max_shard_size: int, dtype: str | None) -> dict[str, str]:
    """Provenance for a resolved source (``reshard.hub.resolve.ResolvedSource``).

    A Hub source is named by repo id and commit. A local source is not named at all: a
    path (even a folder name) would leak the user's layout into a published model and make
    the output depend on where the source lives rather than on its tensors.
    """
    if source is not None and source.repo_id:
        return provenance_keys(source.repo_id, source.revision, max_shard_size, dtype, hub=True)
    return provenance_keys(None, None, max_shard_size, dtype)


def shard_metadata(
    source_metadata: dict[str, str], provenance: dict[str, str], sharded: bool
) -> dict[str, str]:
    """The ``__metadata__`` for written shards: the source's (minus stale ``reshard_*`` keys
    from an earlier split), ``format: pt``, and the provenance when there is no index."""
    metadata = {k: v for k, v in source_metadata.items() if not k.startswith(PREFIX)}
    metadata["format"] = "pt"
    if not sharded:
        metadata.update(provenance)
    return metadata
