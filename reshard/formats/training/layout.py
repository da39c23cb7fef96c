"""What the training-checkpoint readers share: placing saved pieces into whole tensors,
cleaning up parameter names, and the model folder (config, tokenizer) beside the state.

A training stack saves each parameter in pieces: ZeRO as runs of a flat fp32 vector per
rank, DCP as one block per rank and mesh coordinate. A piece is always a contiguous run
of bytes in one file; where it lands in the whole tensor is what ``block_extents`` works
out: a dim-0 block is one contiguous range of the tensor, a block cut on inner dims is a
strided extent (rows of the block, a full tensor row apart).

>>> [(e.offset, e.length, e.dest, e.rows, e.dest_stride) for e in
...  block_extents(Path("r1"), 1000, 4, full=(101, 33), offsets=(51, 17), sizes=(50, 16))]
[(1000, 64, 6800, 50, 132)]
>>> clean_name("_orig_mod.model.layers.0._checkpoint_wrapped_module.mlp.up_proj.weight")
'model.layers.0.mlp.up_proj.weight'
"""

from __future__ import annotations

import fnmatch
import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from reshard.errors import FormatError, SourceError
from reshard.tensors import Extent, TensorInfo
from reshard.transfer.sources import FileSource
from reshard.units import dtype_itemsize, numel

log = logging.getLogger(__name__)

# Name components wrappers insert: torch.compile (``_orig_mod``), FSDP1 and activation
# checkpointing wrappers; a leading ``module.`` is DDP's / DeepSpeed's engine wrapper.
WRAPPER_COMPONENTS = frozenset({"_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module"})
LEADING_WRAPPERS = ("module.",)
# Files of a training checkpoint folder that are not part of the model.
TRAINING_ONLY_FILES = frozenset(
    {"trainer_state.json", "zero_to_fp32.py", "zero_to_torch.py", "latest", "training_args.bin"}
)
# What a model folder needs beside the weights (reshard.hub.resolve copies the same).
MODEL_FILE_PATTERNS = (
    "config.json",
    "generation_config.json",
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.*",
    "merges.txt",
    "*.model",
    "*.tiktoken",
    "chat_template.*",
    "preprocessor_config.json",
    "processor_config.json",
)


def make_tensor(
    name: str, dtype: str, shape: tuple[int, ...], extents: Iterable[Extent], src_dtype: str | None = None
) -> TensorInfo:
    """A tensor stored as ``src_dtype`` (or ``dtype``) in ``extents``, written as ``dtype``."""
    from reshard.units import dtype_nbytes

    shape = tuple(shape)
    if src_dtype == dtype:
        src_dtype = None
    return TensorInfo(name, dtype, shape, tuple(extents), dtype_nbytes(dtype, shape), src_dtype)


def extent(
    path: Path,
    offset: int,
    length: int,
    dest: int = 0,
    rows: int = 1,
    src_stride: int | None = None,
    dest_stride: int | None = None,
) -> Extent:
    """An extent over a local file."""
    return Extent(FileSource(Path(path)), offset, length, dest, rows, src_stride, dest_stride)


def block_extents(
    path: Path,
    data_offset: int,
    itemsize: int,
    full: tuple[int, ...],
    offsets: tuple[int, ...],
    sizes: tuple[int, ...],
) -> list[Extent]:
    """Where a saved block lands in the whole tensor.

    The block ``[offsets, offsets + sizes)`` of a tensor of shape ``full`` is stored
    contiguously (C order) at ``data_offset`` of ``path``. Its innermost dimension that
    is not whole, ``k``, makes rows of ``sizes[k] * prod(full[k+1:])`` elements; the rows
    a full tensor row apart form one strided extent per index of the dims before ``k - 1``.

    >>> [(e.dest, e.length) for e in block_extents(Path("r0"), 0, 4, (5, 3), (3, 0), (2, 3))]
    [(36, 24)]
    >>> len(block_extents(Path("r0"), 0, 4, (3, 7, 10), (0, 4, 5), (3, 3, 5)))  # 3-D, dims 1+2 cut
    3
    """
    if len(full) != len(offsets) or len(full) != len(sizes):
        raise FormatError(f"{path}: a block with {len(sizes)} dims for a {len(full)}-dim tensor")
    if any(o < 0 or s < 0 or o + s > f for o, s, f in zip(offsets, sizes, full)):
        raise FormatError(
            f"{path}: a block at {list(offsets)} of size {list(sizes)} lies outside "
            f"its tensor of shape {list(full)}; the checkpoint metadata is inconsistent"
        )
    if not full:
        return [extent(path, data_offset, itemsize)]
    if 0 in sizes:
        return []
    partial = [d for d in range(len(full)) if sizes[d] != full[d]]
    k = partial[-1] if partial else -1
    if k <= 0:  # whole rows: one contiguous range
        dest = (offsets[0] * numel(full[1:]) if k == 0 else 0) * itemsize
        return [extent(path, data_offset, numel(sizes) * itemsize, dest)]
    inner = numel(full[k + 1 :])
    row = sizes[k] * inner * itemsize
    width = full[k] * inner * itemsize
    out = []
    outer_shape = sizes[: k - 1]
    for flat in range(numel(outer_shape)):
        local = _unravel(flat, outer_shape)
        src_index = local + (0,) * (len(full) - len(local))
        dest_index = tuple(o + i for o, i in zip(offsets, local)) + tuple(offsets[k - 1 : k + 1])
        dest_index += (0,) * (len(full) - len(dest_index))
        out.append(
            extent(
                path,
                data_offset + _ravel(src_index, sizes) * itemsize,
                row,
                _ravel(dest_index, full) * itemsize,
                rows=sizes[k - 1],
                src_stride=row,
                dest_stride=width,
            )
        )
    return out


def flat_extents(pieces: Iterable[tuple[Path, int, int, int]], itemsize: int) -> list[Extent]:
    """Contiguous runs ``(path, byte offset, element count, first element)`` of a flattened
    tensor (ZeRO partitions) as extents."""
    return [
        extent(path, offset, count * itemsize, first * itemsize)
        for path, offset, count, first in pieces
        if count
    ]


def _unravel(flat: int, shape: tuple[int, ...]) -> tuple[int, ...]:
    out = []
    for n in reversed(shape):
        out.append(flat % n)
        flat //= n
    return tuple(reversed(out))


def _ravel(index: tuple[int, ...], shape: tuple[int, ...]) -> int:
    flat = 0
    for i, n in zip(index, shape):
        flat = flat * n + i
    return flat


def clean_name(name: str) -> str:
    """Drop wrapper components (``_orig_mod.``, ``_fsdp_wrapped_module.``,
    ``_checkpoint_wrapped_module.``) and a leading ``module.``."""
    for prefix in LEADING_WRAPPERS:
        while name.startswith(prefix):
            name = name[len(prefix) :]
    parts = [p for p in name.split(".") if p not in WRAPPER_COMPONENTS]
    return ".".join(parts)


def clean_names(names: Iterable[str], where: Path) -> dict[str, str]:
    """``clean_name`` for every name, refusing two names that become one."""
    out: dict[str, str] = {}
    seen: dict[str, str] = {}
    for name in names:
        clean = clean_name(name)
        if clean in seen:
            raise FormatError(
                f"{where}: {seen[clean]!r} and {name!r} are both {clean!r} without "
                "their wrapper prefixes; the checkpoint holds the weights twice"
            )
        seen[clean] = name
        out[name] = clean
    return out


def itemsize_of(dtype: str, where: str) -> int:
    try:
        return dtype_itemsize(dtype)
    except Exception as e:
        raise FormatError(f"{where}: dtype {dtype or '?'} has no safetensors equivalent") from e


@dataclass(frozen=True)
class ModelFolder:
    """The model files (config.json, tokenizer, ...) to copy beside the weights."""

    files: tuple[Path, ...]
    config: dict | None
    origin: str | None  # the folder or repo id they come from

    @property
    def tie_word_embeddings(self) -> bool:
        """True when the config says so explicitly (also under ``text_config``)."""
        config = self.config or {}
        value = config.get("tie_word_embeddings")
        text = config.get("text_config")
        if value is None and isinstance(text, dict):
            value = text.get("tie_word_embeddings")
        return value is True


def model_files_in(folder: Path) -> tuple[Path, ...]:
    """Config and tokenizer files of a folder, without the trainer's own files."""
    if not folder.is_dir():
        return ()
    return tuple(
        sorted(
            p
            for p in folder.iterdir()
            if p.is_file()
            and p.name not in TRAINING_ONLY_FILES
            and any(fnmatch.fnmatch(p.name, pat) for pat in MODEL_FILE_PATTERNS)
        )
    )


def model_folder(candidates: Iterable[Path], config: str | None = None) -> ModelFolder:
    """The model files from ``config`` (a folder or Hub repo id) when given, else from the
    first candidate folder (the checkpoint folder, then its parents) that has a config.json."""
    if config is not None:
        files, origin = _config_source(config)
        return _with_config(files, origin)
    for folder in candidates:
        files = model_files_in(folder)
        if any(p.name == "config.json" for p in files):
            return _with_config(files, str(folder))
    return ModelFolder((), None, None)


def _with_config(files: tuple[Path, ...], origin: str) -> ModelFolder:
    config = None
    for p in files:
        if p.name == "config.json":
            try:
                config = json.loads(p.read_text(encoding="utf-8"))
            except (OSError, ValueError) as e:
                raise FormatError(f"{p}: not valid JSON ({e}); fix or remove it") from e
    if not isinstance(config, dict):
        raise SourceError(
            f"{origin}: has no config.json; pass --config with a folder or repo id "
            "that has the model's config"
        )
    return ModelFolder(files, config, origin)


def _config_source(spec: str) -> tuple[tuple[Path, ...], str]:
    path = Path(spec).expanduser()
    if path.is_dir():
        return model_files_in(path), str(path)
    if path.is_file() and path.name.endswith(".json"):
        return (path,), str(path)
    return model_files_in(_hub_model_files(spec)), spec


def _hub_model_files(repo_id: str) -> Path:
    """Download (or find in the cache) only the small model files of a Hub repo."""
    from huggingface_hub import constants, snapshot_download

    from reshard.errors import HubError
    from reshard.hub.resolve import _REPO_ID_RE, _hub_source_error

    if not _REPO_ID_RE.match(repo_id):
        raise SourceError(f"--config {repo_id}: no such folder or file, and not a Hub repo id")
    try:
        return Path(
            snapshot_download(
                repo_id,
                allow_patterns=list(MODEL_FILE_PATTERNS),
                local_files_only=bool(constants.HF_HUB_OFFLINE),
            )
        )
    except Exception as e:  # huggingface_hub raises many types; one line for each
        if isinstance(e, (SourceError, FormatError, HubError)):
            raise
        raise _hub_source_error(e, repo_id, None) from e


@dataclass
class TrainingState:
    """What a training-checkpoint reader found: the weights as tensors over extents, and
    what it left out.

    Attributes:
        format: ``"dcp"``, ``"dcp-safetensors"`` or ``"deepspeed"``.
        tensors: the weights, in natural order, named as transformers names them.
        weight_files: every file a weight byte comes from.
        skipped: ``{what: (bytes, tensor count)}`` present but not weights (optimizer state).
        facts: for ``reshard inspect``: ZeRO stage or mesh, world size, step, ...
        dropped: names not written, with the reason (tied aliases).
        warnings: what the user must hear (no config.json, stale rank files).
        model: the config and tokenizer files to copy.
    """

    format: str
    tensors: list
    weight_files: list[Path]
    skipped: dict[str, tuple[int, int]]
    facts: dict[str, object]
    dropped: dict[str, str]
    warnings: list[str]
    model: ModelFolder


def add_skipped(skipped: dict[str, tuple[int, int]], what: str, nbytes: int, count: int = 1) -> None:
    size, n = skipped.get(what, (0, 0))
    skipped[what] = (size + nbytes, n + count)


# Tied aliases transformers re-ties at load when config.tie_word_embeddings is true
# (the same table the .bin reader uses).
def tied_alias_targets() -> dict[str, tuple[str, str, str, str, str, str]]:
    from reshard.formats.torchbin import TIED_ALIASES

    return TIED_ALIASES


def resolve_tied(tensors: dict, shared: dict[str, str], tie: bool, dropped: dict[str, str]) -> None:
    """Apply ``split``'s rule for tied parameters. ``shared`` maps an alias to the name
    holding its bytes (DeepSpeed's ``shared_params``; for DCP, the known tied names when
    both are saved). With ``tie`` (config.tie_word_embeddings) the alias is dropped,
    transformers re-ties it at load; otherwise it is written as its own copy."""
    from dataclasses import replace

    for alias, target in shared.items():
        source = tensors.get(target)
        if source is None:
            continue
        if tie:
            tensors.pop(alias, None)
            dropped[alias] = (
                f"tied to {target} (config.tie_word_embeddings is true; transformers re-ties it at load)"
            )
        elif alias not in tensors:
            tensors[alias] = replace(source, name=alias)
