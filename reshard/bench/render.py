"""rich tables for ``reshard bench``: before, after and their ratio per loader and figure.

Only the CLI calls this; ``--json`` bypasses it.

>>> format_stat({"median": 1.5, "min": 1.0, "max": 2.0, "n": 3}, "s")
'1.50 s (1.00-2.00)'
>>> format_stat(None, "B")
'n/a'
"""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from reshard.units import format_size

_BYTE_SCALES = (("TB", 10**12), ("GB", 10**9), ("MB", 10**6), ("KB", 10**3))


def _scale(value: float, unit: str) -> tuple[float, str]:
    if unit == "s":
        return 1.0, "s"
    for name, scale in _BYTE_SCALES:
        if abs(value) >= scale:
            return float(scale), name
    return 1.0, "B"


def format_stat(stat: dict | None, unit: str) -> str:
    """Median, then (min-max) in the same unit when there are several trials."""
    if not stat:
        return "n/a"
    scale, name = _scale(stat["median"], unit)
    digits = 2 if unit == "s" else 1
    text = f"{stat['median'] / scale:.{digits}f} {name}"
    if stat["n"] > 1:
        text += f" ({stat['min'] / scale:.{digits}f}-{stat['max'] / scale:.{digits}f})"
    return text


def side_line(label: str, side: dict) -> str:
    files = side["files"]
    return (
        f"{label}: {side['spec']} ({side['format']}, {len(files)} file"
        f"{'s' if len(files) != 1 else ''}, {format_size(side['weight_bytes'])})"
    )


def render_bench(data: dict, console: Console | None = None) -> None:
    """Print the comparison held in ``BenchResult.to_json()``."""
    console = console or Console()
    settings = data["settings"]
    console.print(side_line("before", data["before"]))
    console.print(side_line("after ", data["after"]))
    console.print(
        f"{settings['repeats']} repeat(s) per figure, each trial a fresh process on "
        f"{settings['device']}; median (min-max); ratio = after / before"
    )
    for cache in settings["caches"]:
        table = Table(title=f"{cache} page cache", title_justify="left", padding=(0, 1))
        for column, right in (
            ("loader", False),
            ("figure", False),
            ("before", True),
            ("after", True),
            ("ratio", True),
            ("verdict", False),
        ):
            table.add_column(column, justify="right" if right else "left")
        previous = None
        for row in data["summary"]:
            if row["cache"] != cache:
                continue
            ratio = "n/a" if row["ratio"] is None else f"{row['ratio']:.2f}x"
            if previous is not None and row["loader"] != previous:
                table.add_section()
            name, previous = ("" if row["loader"] == previous else row["loader"]), row["loader"]
            table.add_row(
                name,
                row["label"],
                format_stat(row["before"], row["unit"]),
                format_stat(row["after"], row["unit"]),
                ratio,
                row["verdict"],
            )
        console.print(table)
    for what, why in data["skipped"].items():
        console.print(f"not run: {what}: {why}")
    for note in data["notes"]:
        console.print(f"note: {note}")
