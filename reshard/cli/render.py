"""rich rendering of results for people; ``--json`` bypasses all of this."""

from __future__ import annotations

import errno
import sys

from rich.console import Console
from rich.table import Table

from reshard.units import format_size

# Width for output that is not a terminal: rich would wrap at 80 columns and split one
# fact over two lines, which breaks grep; tables still take only the width they need.
UNWRAPPED_WIDTH = 100_000


class PipeAwareConsole(Console):
    """rich's Console, except that a closed pipe is left to the CLI: rich's own handling
    exits with status 1, which reads as a failure; the CLI ends with the shell's SIGPIPE
    status instead (``reshard.cli.app``)."""

    def on_broken_pipe(self) -> None:
        self.quiet = True  # nothing more to write: the reader is gone
        raise BrokenPipeError(errno.EPIPE, "the reader of the output went away")


def make_console(stderr: bool = False) -> Console:
    """A console for stdout (or stderr): the terminal's width on a terminal, else no
    wrapping, so every summary line stays one line in a pipe or a file."""
    stream = sys.stderr if stderr else sys.stdout
    if stream.isatty():
        return PipeAwareConsole(stderr=stderr)
    return PipeAwareConsole(stderr=stderr, width=UNWRAPPED_WIDTH)


def shard_table(title: str | None, shards: list[dict]) -> Table:
    """One row per shard (``file``, ``tensors`` count, ``size`` in tensor bytes), as both
    ``split`` and ``inspect`` show them."""
    table = Table(title=title, title_justify="left")
    table.add_column("file")
    table.add_column("tensors", justify="right")
    table.add_column("size", justify="right")
    for shard in shards:
        table.add_row(shard["file"], str(shard["tensors"]), format_size(shard["size"]))
    return table


def render_split(result, console: Console | None = None) -> None:
    """Shard table plus a one-line summary of a ``SplitResult``."""
    console = console or make_console()
    data = result.to_json()
    # The title is a line of its own, not the table's: rich wraps a title to the table's
    # width, which would split a long output path.
    console.print("plan (dry run: nothing written)" if result.dry_run else f"wrote {result.output}")
    console.print(shard_table(None, data["shards"]))
    console.print(
        f"{len(data['shards'])} shard(s), {format_size(data['total_size'])} of tensors, "
        f"{data['total_parameters']:,} parameters, limit {format_size(data['max_shard_size'])}"
    )
    if data.get("disk") and data["disk"]["shared"]:
        disk = data["disk"]
        console.print(
            f"{format_size(disk['shared'])} shared with the source (reflink), "
            f"{format_size(disk['written'])} written"
        )
    for name, why in data["dropped"].items():
        console.print(f"dropped {name}: {why}")
    for line in skipped_lines(data.get("skipped", {})):
        console.print(line)


def skipped_lines(skipped: dict) -> list[str]:
    """``skipped optimizer state: 3.70 GB in 438 tensors`` for what a source held besides
    weights and was not read."""
    return [
        f"skipped {what}: {format_size(v['size'])} in {v['tensors']} tensors" for what, v in skipped.items()
    ]


def render_inspect(summary: dict, console: Console | None = None) -> None:
    """Tables for ``reshard inspect``."""
    console = console or make_console()
    console.print(
        f"[bold]{summary['source']}[/bold] ({summary['format']}): {summary['tensors']} tensors, "
        f"{summary['parameters']:,} parameters, {format_size(summary['total_size'])}"
    )
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
    console.print(
        f"largest tensor: {largest['name']} {largest['dtype']}{largest['shape']} "
        f"({format_size(largest['size'])})"
    )
    console.print(shard_table("current shards", summary["shards"]))
    for name, why in summary.get("dropped", {}).items():
        console.print(f"not written: {name}: {why}")
