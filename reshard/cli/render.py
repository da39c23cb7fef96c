"""rich rendering of results for people; ``--json`` bypasses all of this."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from reshard.units import format_size


def shard_table(title: str, shards: list[dict]) -> Table:
    """One row per shard (``file``, ``tensors`` count, ``size`` in tensor bytes), as both
    ``split`` and ``inspect`` show them."""
    table = Table(title=title, title_justify="left")
    table.add_column("file")
    table.add_column("tensors", justify="right")
    table.add_column("size", justify="right")
    for shard in shards:
        table.add_row(shard["file"], str(shard["tensors"]), format_size(shard["size"]))
    return table


def render_split(result) -> None:
    """Shard table plus a one-line summary of a ``SplitResult``."""
    console = Console()
    data = result.to_json()
    title = "plan (dry run: nothing written)" if result.dry_run else f"wrote {result.output}"
    console.print(shard_table(title, data["shards"]))
    console.print(f"{len(data['shards'])} shard(s), {format_size(data['total_size'])} of tensors, "
                  f"{data['total_parameters']:,} parameters, limit {format_size(data['max_shard_size'])}")
    for name, why in data["dropped"].items():
        console.print(f"dropped {name}: {why}")
    for line in skipped_lines(data.get("skipped", {})):
        console.print(line)


def skipped_lines(skipped: dict) -> list[str]:
    """``skipped optimizer state: 3.70 GB in 438 tensors`` for what a source held besides
    weights and was not read."""
    return [f"skipped {what}: {format_size(v['size'])} in {v['tensors']} tensors"
            for what, v in skipped.items()]


def render_inspect(summary: dict) -> None:
    """Tables for ``reshard inspect``."""
    console = Console()
    console.print(f"[bold]{summary['source']}[/bold] ({summary['format']}): {summary['tensors']} tensors, "
                  f"{summary['parameters']:,} parameters, {format_size(summary['total_size'])}")
    for fact, value in summary.get("facts", {}).items():
        if value is not None:
            console.print(f"{fact}: {value}")
    for line in skipped_lines(summary.get("skipped", {})):
        console.print(line)
    dtypes = Table(title="by dtype", title_justify="left")
    dtypes.add_column("dtype")
    dtypes.add_column("parameters", justify="right")
    dtypes.add_column("bytes", justify="right")
    for dtype, params in summary["parameters_by_dtype"].items():
        dtypes.add_row(dtype, f"{params:,}", format_size(summary["bytes_by_dtype"][dtype]))
    console.print(dtypes)
    largest = summary["largest_tensor"]
    console.print(f"largest tensor: {largest['name']} {largest['dtype']}{largest['shape']} "
                  f"({format_size(largest['size'])})")
    console.print(shard_table("current shards", summary["shards"]))
    for name, why in summary.get("dropped", {}).items():
        console.print(f"not written: {name}: {why}")
