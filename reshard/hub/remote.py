"""A Hub repo described for streaming (``split --no-cache``): its files' sizes and LFS
sha256 at one commit, its safetensors headers read by range requests, and its small files
(config, tokenizer, index) through the normal huggingface_hub cache.

The descriptors are the ones the local reader makes (``formats.safetensors.parse_header``
with the file's published size, and the same index rule), with each tensor's extent moved
onto a ``HubRangeSource`` at the same absolute offset, so the plan, the shard layout and
therefore the output bytes are those of the cached path.

>>> disk_shortfall(cache_missing=140, output=141, cache_free=200, output_free=200, same_disk=True)
81
>>> disk_shortfall(cache_missing=0, output=141, cache_free=10, output_free=200, same_disk=False)
0
"""

from __future__ import annotations

import logging
import os
import shutil
import struct
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

from reshard.errors import FormatError, SourceError
from reshard.hub.fetch import HubAccess, fetch_range
from reshard.hub.resolve import (
    EXTRA_FILE_PATTERNS,
    SAFETENSORS_SUFFIXES,
    ResolvedSource,
    _extra_files,
    _hub_source_error,
)
from reshard.tensors import Checkpoint, Extent, TensorInfo, natural_key
from reshard.transfer.sources import HubRangeSource

log = logging.getLogger(__name__)

# The first request for a header asks for this much: one round trip for most headers.
HEADER_PROBE = 256 * 1024
HEADER_THREADS = 8


class NotStreamableError(SourceError):
    """The repo has no safetensors weights with published sha256 (``--no-cache`` needs both)."""


@dataclass(frozen=True)
class HubRepoFiles:
    """A repo at one commit: every file's size and, for LFS files, sha256."""

    repo_id: str
    commit: str
    sizes: dict[str, int]
    sha256: dict[str, str]

    def weight_names(self) -> tuple[str | None, list[str]]:
        """The safetensors index (or None) and the weight files the cached path would
        download: the index's files, else every top-level ``*.safetensors``."""
        top = [n for n in self.sizes if "/" not in n]
        indexes = sorted(n for n in top if n.endswith(".safetensors.index.json"))
        if indexes:
            preferred = [n for n in indexes if n == "model.safetensors.index.json"] or indexes
            return preferred[0], []
        return None, sorted((n for n in top if n.endswith(SAFETENSORS_SUFFIXES)), key=natural_key)


def repo_files(repo_id: str, revision: str | None, token: str | None) -> HubRepoFiles:
    """One ``model_info`` request with file metadata.

    Raises:
        SourceError, HubError: the repo cannot be reached or read (one line).
    """
    from huggingface_hub import HfApi

    try:
        info = HfApi().model_info(repo_id, revision=revision, token=token, files_metadata=True)
    except Exception as e:
        raise _hub_source_error(e, repo_id, revision) from e
    sizes, digests = {}, {}
    for sibling in info.siblings or ():
        lfs = getattr(sibling, "lfs", None)
        size = sibling.size if sibling.size is not None else (lfs.size if lfs else None)
        if size is not None:
            sizes[sibling.rfilename] = int(size)
        if lfs is not None and getattr(lfs, "sha256", None):
            digests[sibling.rfilename] = lfs.sha256
    return HubRepoFiles(repo_id, str(info.sha), sizes, digests)


def open_hub_checkpoint(
    repo_id: str, revision: str | None = None, token: str | None = None, files: HubRepoFiles | None = None
) -> tuple[ResolvedSource, Checkpoint]:
    """Describe a Hub repo's safetensors tensors over ``HubRangeSource`` extents.

    Raises:
        NotStreamableError: no safetensors weights, or one without a published sha256.
        FormatError: a header, or the index and the headers, are inconsistent.
    """
    files = files or repo_files(repo_id, revision, token)
    index_name, names = files.weight_names()
    folder = _small_files(files, index_name, token)
    index_path = folder / index_name if index_name else None
    if index_path is not None:
        from reshard.formats.index import read_index

        names = sorted(set(read_index(index_path).values()), key=natural_key)
    if not names:
        raise NotStreamableError(
            f"{repo_id}: no *.safetensors weights at the top of the repo; --no-cache streams "
            "safetensors only: drop --no-cache to download and convert it"
        )
    access = HubAccess.create(token)
    tensors: dict[str, TensorInfo] = {}
    metadata: dict[str, str] = {}
    sources = {name: _range_source(files, name, index_path) for name in names}
    # One round trip per file: read the headers HEADER_THREADS at a time, not one after
    # another (a 30-file repo would wait 30 round trips), and use them in file order.
    with ThreadPoolExecutor(min(HEADER_THREADS, len(names)), thread_name_prefix="reshard-header") as pool:
        headers = pool.map(lambda name: _remote_header(access, sources[name]), names)
        for name, header in zip(names, headers):
            _add_header(repo_id, name, header, tensors, metadata)
    if index_path is not None:
        from reshard.formats.index import check_against_index

        check_against_index(index_path, tensors, {})  # local-style descriptors name the files
    if not tensors:
        raise FormatError(f"{repo_id}: the checkpoint holds no tensors; nothing to reshard")
    remote = [
        replace(t, extents=(Extent(sources[str(t.file)], t.offset, t.extents[0].length),))
        for t in tensors.values()
    ]
    ordered = tuple(sorted(remote, key=lambda t: natural_key(t.name)))
    extra = _extra_files(sorted(p for p in folder.iterdir() if p.is_file())) if folder.is_dir() else ()
    resolved = ResolvedSource(
        repo_id, folder, "safetensors", (), index_path, extra, repo_id=repo_id, revision=files.commit
    )
    return resolved, Checkpoint(ordered, (), metadata, extra, "safetensors")


def _add_header(
    repo_id: str, name: str, header, tensors: dict[str, TensorInfo], metadata: dict[str, str]
) -> None:
    """Add one file's tensors and metadata; a tensor in two files is an error."""
    for key, value in header.metadata.items():
        metadata.setdefault(key, value)
    for t in header.tensors:
        if t.name in tensors:
            raise FormatError(
                f"tensor {t.name!r} is in both {tensors[t.name].file} and {name} of {repo_id}; "
                "the repo is inconsistent"
            )
        tensors[t.name] = t


def _small_files(files: HubRepoFiles, index_name: str | None, token: str | None) -> Path:
    """Config, tokenizer and index through the cache (what the cached path copies)."""
    import fnmatch

    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.file_download import repo_folder_name

    patterns = [*([index_name] if index_name else []), *EXTRA_FILE_PATTERNS]
    if not any(fnmatch.fnmatch(name, pat) for name in files.sizes for pat in patterns):
        # Nothing to fetch (huggingface_hub would warn "No files matched"): the folder
        # the snapshot would be, empty.
        folder = repo_folder_name(repo_id=files.repo_id, repo_type="model")
        return Path(constants.HF_HUB_CACHE) / folder / "snapshots" / files.commit
    try:
        return Path(
            snapshot_download(files.repo_id, revision=files.commit, token=token, allow_patterns=patterns)
        )
    except Exception as e:
        raise _hub_source_error(e, files.repo_id, files.commit) from e


def _range_source(files: HubRepoFiles, name: str, index_path: Path | None) -> HubRangeSource:
    if name not in files.sizes:
        where = index_path.name if index_path else "the repo listing"
        raise FormatError(
            f"{files.repo_id}: {where} names {name}, which is not in the repo at "
            f"{files.commit[:12]}; the repo is incomplete"
        )
    digest = files.sha256.get(name)
    if not digest:
        raise NotStreamableError(
            f"{files.repo_id}/{name}: the Hub publishes no sha256 for it (not an LFS file), "
            "so streamed bytes could not be checked; drop --no-cache"
        )
    return HubRangeSource(files.repo_id, files.commit, name, files.sizes[name], digest)


def _remote_header(access: HubAccess, source: HubRangeSource):
    """The file's header, validated by the local reader against the published size."""
    from reshard.formats.safetensors import MAX_HEADER_BYTES, parse_header

    where = f"{source.repo_id}/{source.filename}"
    if source.size < 8:
        raise FormatError(f"{where}: {source.size} bytes is too short for a safetensors file")
    head = fetch_range(access, source, 0, min(source.size, HEADER_PROBE))
    (length,) = struct.unpack("<Q", head[:8])
    if length > MAX_HEADER_BYTES or 8 + length > source.size:
        raise FormatError(
            f"{where}: header length {length} is over the 100 MB limit or past the end of the "
            "file; the file is corrupt or not safetensors"
        )
    raw = bytes(head[8 : 8 + length])
    if len(raw) < length:
        raw += bytes(fetch_range(access, source, 8 + len(raw), length - len(raw)))
    # The local reader's checks, with the repo file's name and published size.
    return parse_header(Path(source.filename), raw, source.size)


def disk_shortfall(
    cache_missing: int, output: int, cache_free: int, output_free: int, same_disk: bool
) -> int:
    """Bytes that would be lacking to download ``cache_missing`` bytes into the cache and
    then write ``output`` bytes (0 when both fit)."""
    if same_disk:
        return max(0, cache_missing + output - min(cache_free, output_free))
    return max(0, cache_missing - cache_free) + max(0, output - output_free)


def cache_shortfall(files: HubRepoFiles, output: Path) -> tuple[int, int, int]:
    """(bytes lacking, bytes needed, bytes free) for the cached path of ``files`` into
    ``output``; weight files already in the Hub cache cost nothing more."""
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    index_name, names = files.weight_names()
    if index_name is not None:  # the index's files are its weight files; sizes suffice here
        names = [n for n in files.sizes if n.endswith(SAFETENSORS_SUFFIXES) and "/" not in n]
    blobs = (
        Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=files.repo_id, repo_type="model") / "blobs"
    )
    total = sum(files.sizes.get(n, 0) for n in names)
    missing = sum(
        files.sizes.get(n, 0)
        for n in names
        if not (files.sha256.get(n) and (blobs / files.sha256[n]).exists())
    )
    cache_dir, out_dir = _existing(Path(constants.HF_HUB_CACHE)), _existing(output)
    cache_free, out_free = shutil.disk_usage(cache_dir).free, shutil.disk_usage(out_dir).free
    same = os.stat(cache_dir).st_dev == os.stat(out_dir).st_dev
    return (
        disk_shortfall(missing, total, cache_free, out_free, same),
        missing + total,
        min(cache_free, out_free),
    )


def _existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


@dataclass(frozen=True)
class StreamChoice:
    """A split that streams: the repo's files, and the line that says why (auto mode)."""

    files: HubRepoFiles
    note: str | None = None


def choose_stream(
    spec: str,
    output: Path,
    no_cache: bool | None,
    revision: str | None,
    token: str | None,
    converting: bool,
) -> StreamChoice | None:
    """Whether a split of ``spec`` streams from the Hub: always with ``no_cache=True``
    (refused where it cannot), never with False, and with None (the default) when the
    repo can be streamed and the cache plus the output would not fit in the free space.

    Raises:
        UsageError: ``--no-cache`` for a local path, offline, or with a conversion.
    """
    from reshard.errors import UsageError
    from reshard.hub.resolve import could_be_repo_id, hub_offline, is_local
    from reshard.units import format_size

    if no_cache is False:
        return None
    remote = not is_local(spec) and could_be_repo_id(spec)
    if no_cache:
        if not remote:
            raise UsageError(f"--no-cache streams Hub repos; {spec!r} is a local path: drop --no-cache")
        if hub_offline():
            raise UsageError(
                "--no-cache reads from the Hub but HF_HUB_OFFLINE is set; unset it or drop --no-cache"
            )
        if converting:
            raise UsageError("--no-cache copies tensors as stored; drop --dtype/--quantize or --no-cache")
        return StreamChoice(repo_files(spec, revision, token))
    if not remote or hub_offline() or converting:
        return None
    files = repo_files(spec, revision, token)
    index_name, names = files.weight_names()
    if index_name is None and not names:
        return None  # not a safetensors repo: the cached path converts it
    lacking, needed, free = cache_shortfall(files, output)
    if not lacking:
        return None
    return StreamChoice(
        files,
        f"the Hub cache plus the output need {format_size(needed)} but {format_size(free)} is free; "
        "streamed the weights from the Hub straight into the shards instead (--no-cache)",
    )
