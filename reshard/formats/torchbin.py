"""Read PyTorch ``.bin``/``.pt``/``.pth`` sources into the same ``TensorInfo`` descriptors the
safetensors reader yields, safely (no pickle code runs) and without reading tensor data.

- ``read_bin_file(path)``: one file -> its tensors (the entry point fuzzers call).
- ``load_bin_checkpoint(source, key)``: a whole source (single file or shards + index),
  with nested training checkpoints unwrapped (``--key``) and tied aliases dropped the
  way transformers does.

Contiguous tensors become plain byte ranges of the ``.bin`` (copied in the kernel);
non-contiguous views keep their ``strides`` and are gathered by ``reshard.transfer.strided``.

>>> read_bin_file(Path("no-such.bin"))  # doctest: +ELLIPSIS
Traceback (most recent call last):
...
reshard.errors.FormatError: no-such.bin: cannot be read...
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from reshard.errors import FormatError, UsageError
from reshard.formats.torchzip import LazyTensor, Storage, TorchFile, read_torch_file
from reshard.formats.unpickle import Opaque
from reshard.tensors import Checkpoint, TensorInfo, add_unique, natural_key
from reshard.units import DTYPE_SIZES, numel

log = logging.getLogger(__name__)

# Where training loops put the weights, most specific first.
STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model", "module", "net", "network", "weights", "params")
# An expanded (stride-0) view may be larger than its storage, up to this or 16x the storage.
MAX_EXPANDED_BYTES = 1 << 30
# Tied aliases transformers drops at save and re-ties at load when config.tie_word_embeddings
# is true: alias -> the names it is tied to (one small table, by architecture family).
TIED_ALIASES = {
    "lm_head.weight": (
        "model.embed_tokens.weight",
        "transformer.wte.weight",
        "gpt_neox.embed_in.weight",
        "model.decoder.embed_tokens.weight",
        "transformer.word_embeddings.weight",
        "model.embed_in.weight",
    ),
}


@dataclass
class BinFile:
    """One file's tensors (natural order) and what was not taken from it, with reasons.

    ``storage_of`` maps each tensor name to its storage key, for tied-weight detection."""

    path: Path
    tensors: list[TensorInfo]
    dropped: dict[str, str] = field(default_factory=dict)
    storage_of: dict[str, str] = field(default_factory=dict)


def read_bin_file(path: Path, key: str | None = None) -> list[TensorInfo]:
    """Describe every tensor of one ``torch.save`` file, in natural order.

    Raises:
        UnsafePickleError: the pickle asks for code outside the allow-list (nothing runs).
        FormatError: anything malformed (never another exception type for bad bytes).
        UsageError: ``key`` names no entry.
    """
    return read_bin(Path(path), key).tensors


def read_bin(path: Path, key: str | None = None) -> BinFile:
    """Like ``read_bin_file``, keeping dropped entries and storage identities."""
    parsed = read_torch_file(path)
    state, dropped = select_state_dict(parsed.obj, key, path)
    out = BinFile(path, [], dropped)
    for name, value in state.items():
        out.tensors.append(_describe(name, value, parsed, path))
        out.storage_of[name] = value.storage.key
    out.tensors.sort(key=lambda t: natural_key(t.name))
    return out


def select_state_dict(obj: Any, key: str | None, path: Path) -> tuple[dict[str, LazyTensor], dict[str, str]]:
    """Find the name -> tensor mapping in a (possibly nested) checkpoint.

    A flat state dict is used as is. A training checkpoint (``{"model": sd, "optimizer":
    ...}``) is unwrapped through ``key`` or, without it, the one entry that is a state dict
    (preferring ``STATE_DICT_KEYS``); everything else is reported as dropped.

    Raises:
        UsageError: ``key`` not found. FormatError: no tensors, or several candidates.
    """
    if not isinstance(obj, dict):
        raise FormatError(f"{path}: holds a {_kind(obj)}, not a state dict of tensors")
    dropped: dict[str, str] = {}
    if key is not None:
        chosen = _follow_key(obj, key, path)
        top = key if key in obj else key.split(".")[0]
        dropped.update({str(k): "not selected by --key" for k in obj if k != top})
    else:
        candidates = [k for k, v in obj.items() if isinstance(v, dict) and _has_tensors(v)]
        if not candidates:
            chosen = obj
        else:
            preferred = [k for k in STATE_DICT_KEYS if k in candidates]
            pick = preferred[0] if preferred else candidates[0] if len(candidates) == 1 else None
            if pick is None:
                names = ", ".join(str(c) for c in candidates[:6])
                raise FormatError(
                    f"{path}: a training checkpoint with several state dicts ({names}); "
                    "pass --key NAME to choose the weights"
                )
            chosen = obj[pick]
            dropped.update(
                {
                    str(k): f"nested entry, not the weights (took {pick!r}; choose another with --key)"
                    for k in obj
                    if k != pick
                }
            )
            log.info("%s: using the nested state dict %r", path, pick)
    state: dict[str, LazyTensor] = {}
    for name, value in chosen.items():
        if isinstance(value, LazyTensor) and isinstance(name, str):
            state[name] = value
        else:
            dropped[str(name)] = f"not a tensor ({_kind(value)})"
    if not state:
        where = f" under --key {key!r}" if key else ""
        raise FormatError(
            f"{path}: holds no tensors{where}; nothing to reshard" + ("" if key else _entries_hint(obj))
        )
    return state, dropped


def _follow_key(obj: dict, key: str, path: Path) -> dict:
    node: Any = obj
    if key in obj:
        node = obj[key]
    else:
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                raise UsageError(
                    f"{path}: --key {key!r} names no entry; the file has: "
                    + ", ".join(str(k) for k in list(obj)[:10])
                )
            node = node[part]
    if not isinstance(node, dict):
        raise UsageError(f"{path}: --key {key!r} is a {_kind(node)}, not a state dict")
    return node


def _has_tensors(d: dict) -> bool:
    return any(isinstance(v, LazyTensor) for v in d.values())


def _entries_hint(obj: dict) -> str:
    names = [str(k) for k in list(obj)[:10]]
    return f" (entries: {', '.join(names)}; pass --key NAME if the weights are nested)" if names else ""


def _kind(value: Any) -> str:
    if isinstance(value, LazyTensor):
        return "tensor"
    if isinstance(value, Opaque):
        return value.qualname
    return type(value).__name__


def _describe(name: str, t: LazyTensor, parsed: TorchFile, path: Path) -> TensorInfo:
    """Turn a view into a storage into a ``TensorInfo`` with absolute offsets, checking it
    stays inside the storage bytes that are really in the file."""
    storage: Storage = parsed.storages[t.storage.key]
    itemsize = DTYPE_SIZES.get(t.dtype)
    if itemsize is None:
        raise FormatError(
            f"{path}: tensor {name!r} has dtype {t.dtype or '?'}, which safetensors "
            "cannot store; convert it in PyTorch first"
        )
    count = numel(t.shape)
    nbytes = count * itemsize
    if count:
        last = t.offset + sum((n - 1) * s for n, s in zip(t.shape, t.strides))
        if (last + 1) * itemsize > storage.nbytes:
            raise FormatError(
                f"{path}: tensor {name!r} reaches past its storage ({storage.nbytes} "
                "bytes); the file is damaged"
            )
        # Only zero strides (expand) make a view bigger than its storage; a huge one is a
        # damaged or hostile shape, not weights: refuse it rather than write terabytes.
        if nbytes > max(16 * storage.nbytes, MAX_EXPANDED_BYTES):
            raise FormatError(
                f"{path}: tensor {name!r} is an expanded view of {nbytes} bytes over a "
                f"{storage.nbytes}-byte storage; save tensor.contiguous() instead"
            )
    from reshard.transfer.strided import contiguous_block

    contiguous = count == 0 or contiguous_block(t.shape, t.strides)[0] == 0
    return TensorInfo.from_file(
        name,
        t.dtype,
        t.shape,
        path,
        storage.data_offset + t.offset * itemsize,
        nbytes,
        strides=None if contiguous else t.strides,
    )


def load_bin_checkpoint(source, key: str | None = None) -> Checkpoint:
    """Describe every tensor of a ``.bin`` source (single file or shards + index).

    Tied aliases that transformers re-ties at load are dropped (listed in ``dropped``);
    other names sharing a storage are kept and written as independent copies.

    Raises:
        FormatError, UnsafePickleError, UsageError: see ``read_bin_file``; also a tensor in
            two files or an index naming a tensor no file has.
    """
    tensors: dict[str, TensorInfo] = {}
    dropped: dict[str, str] = {}
    tie = tie_word_embeddings(source)
    for path in source.weight_files:
        part = read_bin(path, key)
        for name, reason in part.dropped.items():
            dropped.setdefault(name if len(source.weight_files) == 1 else f"{path.name}:{name}", reason)
        aliases = tied_aliases(part, tie)
        dropped.update(aliases)
        for t in part.tensors:
            if t.name in aliases:
                continue
            add_unique(tensors, t, path)
    if source.index_file is not None:
        from reshard.formats.index import check_against_index

        check_against_index(
            source.index_file,
            tensors,
            dropped,
            getattr(source, "unindexed_files", ()),
            lambda p: [t.name for t in read_bin(p, key).tensors],
        )
    ordered = tuple(sorted(tensors.values(), key=lambda t: natural_key(t.name)))
    return Checkpoint(ordered, tuple(source.weight_files), {}, tuple(source.extra_files), "bin", dropped)


def tie_word_embeddings(source) -> bool:
    """True when the source's config.json says ``tie_word_embeddings: true`` (explicitly:
    otherwise both names are written, which is always safe)."""
    path = Path(source.root) / "config.json"
    for extra in getattr(source, "extra_files", ()):
        if Path(extra).name == "config.json":
            path = Path(extra)
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not isinstance(config, dict):
        return False
    text = config.get("text_config")
    value = config.get("tie_word_embeddings")
    if value is None and isinstance(text, dict):
        value = text.get("tie_word_embeddings")
    return value is True


def tied_aliases(part: BinFile, tie: bool) -> dict[str, str]:
    """Names to drop because transformers re-ties them: an alias that views exactly the
    same bytes as its tie target, when ``tie`` is set. Other sharing is kept (copies)."""
    by_name = {t.name: t for t in part.tensors}
    out: dict[str, str] = {}
    for alias, targets in TIED_ALIASES.items():
        a = by_name.get(alias)
        for target in targets:
            b = by_name.get(target)
            if a is None or b is None or part.storage_of[alias] != part.storage_of[target]:
                continue
            same_view = (a.offset, a.shape, a.strides, a.dtype) == (b.offset, b.shape, b.strides, b.dtype)
            if tie and same_view:
                out[alias] = (
                    f"tied to {target} (config.tie_word_embeddings is true; transformers re-ties it at load)"
                )
            else:
                log.info(
                    "%s: %s shares storage with %s; writing independent copies", part.path, alias, target
                )
            break
    return out
