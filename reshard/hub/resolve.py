"""Resolve a source spec (local folder, single file, or Hub repo id) to local files.

Hub access lives here and only here: downloads go through huggingface_hub's cache, so
``HF_HOME`` and ``HF_HUB_OFFLINE`` are honoured and a second run downloads nothing.

>>> resolve_source("./no/such/dir")  # doctest: +ELLIPSIS
Traceback (most recent call last):
...
reshard.errors.SourceError: no such file or folder './no/such/dir' (and not a Hub repo id...

A spec that could be either (``nonexist``, ``org/name``) and is not on disk goes to the
Hub, whose first request is made without retries: when the Hub cannot be reached the
answer comes at once and names the path first ("no such file or folder 'nonexist'; if
you meant a Hub repo, it could not be reached").
"""

from __future__ import annotations

import fnmatch
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from reshard.errors import FormatError, HubError, SourceError
from reshard.formats.index import read_index

log = logging.getLogger(__name__)

SAFETENSORS_SUFFIXES = (".safetensors",)
BIN_SUFFIXES = (".bin", ".pt", ".pth")
# Other frameworks' weights: never copied as "extra files" and never read.
OTHER_WEIGHT_SUFFIXES = (".ckpt", ".gguf", ".msgpack", ".h5", ".onnx", ".npz", ".pdparams")
# Small non-weight files a complete model folder needs (config, tokenizer, generation config).
EXTRA_FILE_PATTERNS = (
    "*.json",
    "*.model",
    "*.txt",
    "*.tiktoken",
    "*.py",
    "*.jinja",
    "LICENSE*",
    "*.md",
    "*.yaml",
    "*.vocab",
)
# The source's model card describes the source; `reshard push` writes one for the result.
NOT_COPIED = {"README.md", ".gitattributes"}
_REPO_ID_RE = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")


@dataclass(frozen=True)
class ResolvedSource:
    """Local files of a source, ready for a reader.

    Attributes:
        spec: what the user typed.
        root: the folder the files are in (a Hub snapshot folder for repo ids).
        format: the reader to use (``"safetensors"``, ``"bin"``, or a folder format
            registered in ``reshard.formats.registry`` such as a training checkpoint).
        weight_files: weight files in source order (empty for folder formats, whose
            reader finds its own files).
        index_file: the index naming them, if any.
        unindexed_files: weight files beside the index that it does not name (the reader
            refuses them if they hold tensors: nothing is dropped silently).
        extra_files: non-weight files to copy to the output.
        repo_id, revision: set for Hub sources (revision is the resolved commit).
    """

    spec: str
    root: Path
    format: str
    weight_files: tuple[Path, ...]
    index_file: Path | None = None
    extra_files: tuple[Path, ...] = ()
    repo_id: str | None = None
    revision: str | None = None
    unindexed_files: tuple[Path, ...] = ()

    @property
    def name(self) -> str:
        """Short name for default output folders: ``Mistral-7B-v0.1`` for a repo id, the
        folder's name for a folder or for a file inside one."""
        if self.repo_id:
            return self.repo_id.split("/")[-1]
        path = Path(self.spec).expanduser()
        return (path.parent if path.is_file() else path).resolve().name


def resolve_source(spec: str, revision: str | None = None, token: str | None = None) -> ResolvedSource:
    """Turn a local path or Hub repo id into local files.

    Raises:
        SourceError: nothing at that path and not a repo id, or no weights found.
        HubError: the Hub refused (unknown repo, gated, bad revision, offline miss).
        FormatError: an index naming a missing file.
    """
    path = Path(spec).expanduser()
    if path.exists():
        return resolve_local(path, spec)
    if could_be_repo_id(spec):
        return resolve_hub(spec, revision=revision, token=token)
    raise SourceError(
        f"no such file or folder {spec!r} (and not a Hub repo id, which looks like org/name); check the path"
    )


def could_be_repo_id(spec: str) -> bool:
    """True when ``spec`` is shaped like a Hub repo id (``org/name`` or a bare ``name``).

    >>> could_be_repo_id("mistralai/Mistral-7B-v0.1"), could_be_repo_id("./model")
    (True, False)
    """
    return bool(_REPO_ID_RE.match(spec)) and not spec.startswith((".", "/", "~"))


def resolve_local(
    path: Path, spec: str | None = None, repo_id: str | None = None, revision: str | None = None
) -> ResolvedSource:
    """Pick the weight files of a local folder or file (safetensors preferred over .bin)."""
    spec = spec or str(path)
    if path.is_file():
        return _resolve_file(path, spec)
    files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
    from reshard.formats.registry import detect_folder

    folder_reader = detect_folder(path)  # a training checkpoint and friends
    if folder_reader is not None:
        return ResolvedSource(
            spec, path, folder_reader.name, (), None, _extra_files(files), repo_id, revision
        )
    for fmt, suffixes in (("safetensors", SAFETENSORS_SUFFIXES), ("bin", BIN_SUFFIXES)):
        indexes = [p for p in files if any(p.name.endswith(s + ".index.json") for s in suffixes)]
        if indexes:
            index = _pick_index(path, indexes, fmt)
            weights = _files_named_by_index(index)
            stray = tuple(
                p
                for p in files
                if p.name.endswith(suffixes) and p not in weights and not _is_training_state(p)
            )
            return ResolvedSource(
                spec, path, fmt, weights, index, _extra_files(files), repo_id, revision, unindexed_files=stray
            )
        weights = tuple(p for p in files if p.name.endswith(suffixes) and not _is_training_state(p))
        if weights:
            return ResolvedSource(spec, path, fmt, weights, None, _extra_files(files), repo_id, revision)
    raise SourceError(
        f"{spec}: no *.safetensors or *.bin weights in this folder; point reshard at "
        "the folder that holds the model's weight files"
    )


def _resolve_file(path: Path, spec: str) -> ResolvedSource:
    """One weight file or one index: its folder's config and tokenizer files come along.
    An index given as the source means "exactly the files it names"."""
    name = path.name
    siblings = sorted(p for p in path.parent.iterdir() if p.is_file() and not p.name.startswith("."))
    extra = _extra_files([p for p in siblings if p != path])
    if name.endswith(".index.json"):
        fmt = "bin" if any(name.endswith(s + ".index.json") for s in BIN_SUFFIXES) else "safetensors"
        return ResolvedSource(spec, path.parent, fmt, _files_named_by_index(path), path, extra)
    if name.endswith(SAFETENSORS_SUFFIXES):
        return ResolvedSource(spec, path.parent, "safetensors", (path,), None, extra)
    if name.endswith(BIN_SUFFIXES):
        return ResolvedSource(spec, path.parent, "bin", (path,), None, extra)
    raise SourceError(
        f"{spec}: not a checkpoint file; expected .safetensors, .bin, .pt, .pth or an *.index.json"
    )


def _pick_index(folder: Path, indexes: list[Path], fmt: str) -> Path:
    preferred = {"safetensors": "model.safetensors.index.json", "bin": "pytorch_model.bin.index.json"}
    for p in indexes:
        if p.name == preferred[fmt]:
            return p
    if len(indexes) == 1:
        return indexes[0]
    raise SourceError(
        f"{folder}: several index files ({', '.join(p.name for p in indexes)}); "
        "pass the one to use as the source"
    )


def _files_named_by_index(index: Path) -> tuple[Path, ...]:
    names: list[str] = []
    for file_name in read_index(index).values():
        if file_name not in names:
            names.append(file_name)
    if not names:
        raise FormatError(f"{index}: the index names no tensors; the checkpoint is empty")
    for file_name in names:
        if not (index.parent / file_name).is_file():
            raise FormatError(
                f"{index}: names {file_name}, which is missing from {index.parent}; "
                "download it or regenerate the index"
            )
    return tuple(index.parent / n for n in sorted(names, key=_natural))


def _natural(name: str) -> tuple:
    from reshard.tensors import natural_key

    return natural_key(name)


def _is_training_state(path: Path) -> bool:
    # training_args.bin, optimizer.pt, scheduler.pt and friends sit beside the weights.
    return path.stem in {
        "training_args",
        "optimizer",
        "scheduler",
        "rng_state",
        "scaler",
    } or path.stem.startswith("rng_state")


def _extra_files(files: list[Path]) -> tuple[Path, ...]:
    weight_suffixes = SAFETENSORS_SUFFIXES + BIN_SUFFIXES + OTHER_WEIGHT_SUFFIXES
    return tuple(
        p
        for p in files
        if p.name not in NOT_COPIED
        and not p.name.endswith(weight_suffixes)
        and not p.name.endswith(".index.json")
        and any(fnmatch.fnmatch(p.name, pat) for pat in EXTRA_FILE_PATTERNS)
    )


def resolve_hub(repo_id: str, revision: str | None = None, token: str | None = None) -> ResolvedSource:
    """Download (or find in the cache) the weight files and small files of a Hub repo."""
    from huggingface_hub import constants, snapshot_download

    try:
        if constants.HF_HUB_OFFLINE:
            folder = Path(snapshot_download(repo_id, revision=revision, token=token, local_files_only=True))
        else:
            patterns = _hub_patterns(repo_id, probe_hub(repo_id, revision, token), revision, token)
            folder = Path(snapshot_download(repo_id, revision=revision, token=token, allow_patterns=patterns))
    except Exception as e:  # huggingface_hub raises many types; map them to one line
        if isinstance(e, (SourceError, FormatError, HubError)):
            raise
        raise _hub_source_error(e, repo_id, revision) from e
    # Offline, snapshot_download neither filters nor reports missing files: the index
    # check in resolve_local is what catches an incomplete cache.
    return resolve_local(folder, repo_id, repo_id=repo_id, revision=folder.name)


def probe_hub(repo_id: str, revision: str | None = None, token: str | None = None) -> list[str]:
    """The repo's file names, from one request that is never retried (``model_info``), so
    a Hub that cannot be reached is reported at once rather than after huggingface_hub's
    backoff (about 23 s of "Retrying in Ns" on its listing and download calls).

    Raises:
        SourceError: the Hub cannot be reached, or there is no such repo.
        HubError: any other refusal (gated, bad revision, server error).
    """
    from huggingface_hub import HfApi

    try:
        info = HfApi().model_info(repo_id, revision=revision, token=token)
    except Exception as e:
        raise _hub_source_error(e, repo_id, revision) from e
    return [s.rfilename for s in getattr(info, "siblings", None) or ()]


def _hub_source_error(error: Exception, repo_id: str, revision: str | None) -> Exception:
    """A spec that reached the Hub is also a path that does not exist: when the Hub cannot
    answer, say so about the path first (the likelier mistake is a mistyped path)."""
    from huggingface_hub import errors as hf

    from reshard.hub.access import is_network_error, pick_error, to_hub_error

    if isinstance(error, hf.RepositoryNotFoundError) and not isinstance(error, hf.GatedRepoError):
        return SourceError(
            f"{repo_id}: unknown repo id (not on the Hub, or private: log in with "
            "`hf auth login` or pass --token), and no such local file or folder"
        )
    if isinstance(error, (hf.LocalEntryNotFoundError, hf.OfflineModeIsEnabled)):
        if _in_hub_cache(repo_id):  # the repo was downloaded once, not this revision or file
            what = f"revision {revision!r}" if revision else "this snapshot"
            return SourceError(
                f"{repo_id}: {what} is not in the local Hub cache and "
                "HF_HUB_OFFLINE is set; download it once online or unset HF_HUB_OFFLINE"
            )
        return SourceError(
            f"no such file or folder {repo_id!r}; if you meant a Hub repo, it is "
            "not in the local cache and HF_HUB_OFFLINE is set (download it once "
            "online, or unset HF_HUB_OFFLINE)"
        )
    if is_network_error(error):
        return SourceError(
            f"no such file or folder {repo_id!r}; if you meant a Hub repo, it could "
            f"not be reached ({type(pick_error(error)).__name__}: check the "
            "network and HF_ENDPOINT, or set HF_HUB_OFFLINE=1 to use the local cache)"
        )
    return to_hub_error(error, repo_id, revision)


def _in_hub_cache(repo_id: str) -> bool:
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    return (Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo_id, repo_type="model")).is_dir()


def _hub_patterns(repo_id: str, files: list[str], revision: str | None, token: str | None) -> list[str]:
    """The weight files to fetch (safetensors preferred) plus the small files."""
    from huggingface_hub import hf_hub_download

    for suffixes in (SAFETENSORS_SUFFIXES, BIN_SUFFIXES):
        indexes = [f for f in files if "/" not in f and any(f.endswith(s + ".index.json") for s in suffixes)]
        if indexes:
            preferred = [f for f in indexes if f.startswith(("model.", "pytorch_model."))] or indexes
            local = hf_hub_download(repo_id, preferred[0], revision=revision, token=token)
            weights = sorted(set(read_index(Path(local)).values()))
            return [preferred[0], *weights, *EXTRA_FILE_PATTERNS]
        weights = [f for f in files if "/" not in f and f.endswith(suffixes)]
        if weights:
            return [*weights, *EXTRA_FILE_PATTERNS]
    raise SourceError(f"{repo_id}: the repo has no *.safetensors or *.bin weights at its top level")


def hub_offline() -> bool:
    """True when HF_HUB_OFFLINE is set: Hub sources come from the local cache only."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def is_local(spec: str) -> bool:
    """True when ``spec`` names an existing local file or folder."""
    return Path(spec).expanduser().exists()


class NotSafetensorsRepoError(SourceError):
    """The repo has no ``model.safetensors`` or ``model.safetensors.index.json``, so its
    tensors cannot be described from headers alone."""


def remote_checkpoint(repo_id: str, revision: str | None = None, token: str | None = None):
    """Describe a Hub repo's safetensors tensors from their headers alone (range
    requests through huggingface_hub); no weights are downloaded. Tensors have
    ``HubFileSource`` extents (which name each tensor's file): enough to plan and to
    inspect, not to write.

    Raises:
        NotSafetensorsRepoError: no safetensors model file or index to read headers from.
    """
    from huggingface_hub import HfApi

    from reshard.tensors import Checkpoint, Extent, TensorInfo, natural_key
    from reshard.transfer.sources import HubFileSource
    from reshard.units import DTYPE_SIZES, dtype_nbytes

    if not could_be_repo_id(repo_id):
        raise SourceError(
            f"no such file or folder {repo_id!r} (and not a Hub repo id, which "
            "looks like org/name); check the path"
        )
    probe_hub(repo_id, revision, token)  # fails at once when the Hub cannot be reached
    api = HfApi()
    try:
        meta = api.get_safetensors_metadata(repo_id, revision=revision, token=token)
    except Exception as e:
        # huggingface_hub answers "not a safetensors repo" for an unknown repo or revision
        # too (its file_exists swallows those): ask the repo itself which it is.
        if type(e).__name__ == "NotASafetensorsRepoError":
            try:
                api.repo_info(repo_id, revision=revision, token=token)
            except Exception as probe:
                raise _hub_source_error(probe, repo_id, revision) from e
            raise NotSafetensorsRepoError(
                f"{repo_id}: no model.safetensors or model.safetensors.index.json; "
                "--dry-run reads safetensors headers only: run without --dry-run to download "
                "and convert it"
            ) from e
        raise _hub_source_error(e, repo_id, revision) from e
    tensors = []
    for file_name, file_meta in meta.files_metadata.items():
        for name, info in file_meta.tensors.items():
            if info.dtype not in DTYPE_SIZES:
                raise FormatError(f"{repo_id}/{file_name}: tensor {name!r} has unknown dtype {info.dtype!r}")
            shape = tuple(info.shape)
            nbytes = dtype_nbytes(info.dtype, shape)
            source = HubFileSource(repo_id, revision, file_name)
            extent = Extent(source, info.data_offsets[0], nbytes)  # relative to the data section
            tensors.append(TensorInfo(name, info.dtype, shape, (extent,), nbytes))
    if not tensors:
        raise FormatError(f"{repo_id}: the repo's safetensors files hold no tensors")
    tensors.sort(key=lambda t: natural_key(t.name))
    metadata = next(iter(meta.files_metadata.values())).metadata or {}
    return Checkpoint(tuple(tensors), (), dict(metadata), (), "safetensors")
