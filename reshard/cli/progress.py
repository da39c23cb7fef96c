"""Progress bars for the CLI: one overall bar in bytes plus "shard i/n", on stderr.

The bars are the library's tqdm adapter (``reshard.api.progress.TqdmProgress``), the one
docs/python.md shows for scripts and notebooks, drawn with plain tqdm on stderr.
"""

from __future__ import annotations

import sys

from reshard.api.progress import TqdmProgress
from reshard.run.events import Progress


def make_progress(quiet: bool) -> Progress:
    """Bars only for an interactive terminal, and never with --quiet or --json."""
    if quiet or not sys.stderr.isatty():
        return Progress()
    from tqdm import tqdm

    return TqdmProgress(tqdm, file=sys.stderr, dynamic_ncols=True)
