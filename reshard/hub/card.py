"""The model card ``push`` writes from the provenance ``split`` records
(``reshard.run.provenance``).

>>> card = render_card({"reshard_source": "org/m", "reshard_source_type": "hub"},
...                    [("model.safetensors", 10, 2)], {"F32"})
>>> card.splitlines()[:3]
['---', 'base_model: org/m', 'library_name: transformers']
"""

from __future__ import annotations

import json
from pathlib import Path

from reshard.run.provenance import PREFIX
from reshard.writers.safetensors import INDEX_FILE_NAME, SINGLE_FILE_NAME

CARD_NAME = "README.md"


def read_provenance(folder: Path) -> dict[str, str]:
    """The ``reshard_*`` keys of a folder (empty when it was not written by reshard)."""
    from reshard.formats.safetensors import read_header

    folder = Path(folder)
    index = folder / INDEX_FILE_NAME
    if index.exists():
        metadata = json.loads(index.read_text(encoding="utf-8")).get("metadata") or {}
    elif (folder / SINGLE_FILE_NAME).exists():
        metadata = read_header(folder / SINGLE_FILE_NAME).metadata
    else:
        metadata = {}
    return {k: str(v) for k, v in metadata.items() if k.startswith(PREFIX)}


def render_card(
    provenance: dict[str, str],
    shards: list[tuple[str, int, int]],
    dtypes: set[str],
    repo_id: str | None = None,
) -> str:
    """Model card text: YAML front matter, how it was resharded, and a table of shards.

    Args:
        provenance: ``reshard_*`` keys (may be empty for a folder reshard did not write).
        shards: ``(file name, tensor bytes, tensor count)`` per shard.
        dtypes: the dtypes found in the shards.
        repo_id: the repo the card is for (names the title and the loading example).
    """
    from reshard import __version__
    from reshard.units import format_size

    source = provenance.get(f"{PREFIX}source")
    hub = provenance.get(f"{PREFIX}source_type") == "hub"
    front = ["---"]
    if hub and source:
        front.append(
            f"base_model: {json.dumps(source)}" if _needs_quotes(source) else f"base_model: {source}"
        )
    front += ["library_name: transformers", "tags:", "- safetensors", "- reshard", "---", ""]
    title = (
        f"# {repo_id.split('/')[-1]}"
        if repo_id
        else f"# {source.split('/')[-1]} (resharded)"
        if source
        else "# Resharded checkpoint"
    )
    lines = [title, ""]
    if source or provenance:
        where = f"[{source}](https://huggingface.co/{source})" if hub and source else "a local checkpoint"
        lines.append(
            f"This repository holds the weights of {where}, resharded with "
            "[reshard](https://pypi.org/project/reshard/). Tensor bytes are unchanged "
            "unless a dtype conversion is listed below."
        )
    else:
        lines.append("This repository holds a safetensors checkpoint (provenance not recorded).")
    lines += ["", "| | |", "|---|---|"]
    if source:
        lines.append(f"| Source | `{source}` |")
    if provenance.get(f"{PREFIX}revision"):
        lines.append(f"| Source revision | `{provenance[f'{PREFIX}revision']}` |")
    if provenance.get(f"{PREFIX}max_shard_size"):
        limit = int(provenance[f"{PREFIX}max_shard_size"])
        lines.append(f"| Max shard size | {format_size(limit)} ({limit:,} bytes of tensor data) |")
    converted = provenance.get(f"{PREFIX}dtype")
    lines.append(
        f"| dtype | {converted} (converted) |"
        if converted
        else f"| dtype | {', '.join(sorted(dtypes)) or 'n/a'} (unchanged) |"
    )
    lines.append(f"| reshard version | {provenance.get(f'{PREFIX}version', __version__)} |")
    lines += ["", "## Shards", "", "| File | Tensors | Size |", "|---|---:|---:|"]
    for name, size, count in shards:
        lines.append(f"| `{name}` | {count} | {format_size(size)} |")
    total = sum(s for _, s, _ in shards)
    lines += [
        f"| **total** | {sum(c for _, _, c in shards)} | {format_size(total)} |",
        "",
        "Load it as usual:",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM",
        "",
        f"model = AutoModelForCausalLM.from_pretrained({json.dumps(repo_id or '<this repo id>')})",
        "```",
        "",
    ]
    return "\n".join(front + lines)


def _needs_quotes(value: str) -> bool:
    return not all(c.isalnum() or c in "/-_." for c in value)


def card_text(folder: Path, repo_id: str | None = None) -> str | None:
    """The model card to publish with ``folder``, or None when it has its own ``README.md``.

    Nothing is written: ``push`` sends the card from a temporary upload set, so a push that
    fails leaves no card behind naming a repo it never reached. The folder must already
    verify (``reshard.run.verify.read_output``), so its headers are valid.
    """
    from reshard.run.verify import read_output
    from reshard.tensors import natural_key

    folder = Path(folder)
    if (folder / CARD_NAME).exists():
        return None
    tensors = read_output(folder)
    by_file: dict[str, list[int]] = {}
    dtypes = set()
    for t in tensors.values():
        sizes = by_file.setdefault(t.file.name, [])
        sizes.append(t.nbytes)
        dtypes.add(t.dtype)
    shards = [
        (name, sum(sizes), len(sizes))
        for name, sizes in sorted(by_file.items(), key=lambda kv: natural_key(kv[0]))
    ]
    return render_card(read_provenance(folder), shards, dtypes, repo_id)
