"""Progress bars for the CLI: one overall bar in bytes plus "shard i/n", on stderr."""

from __future__ import annotations

import sys

from reshard.run.events import Progress


class TqdmProgress(Progress):
    """Draws an overall bytes bar and a per-shard bar with tqdm."""

    def __init__(self) -> None:
        self.overall = None
        self.shard = None

    def _bar(self, **kwargs):
        from tqdm import tqdm

        return tqdm(
            unit="B", unit_scale=True, unit_divisor=1000, file=sys.stderr, dynamic_ncols=True, **kwargs
        )

    def begin(self, total: int, shards: int) -> None:
        self.overall = self._bar(total=total, desc="total", position=0)

    def start_shard(self, number: int, count: int, file_name: str, size: int) -> None:
        self.shard = self._bar(total=size, desc=f"shard {number}/{count}", position=1, leave=False)

    def advance(self, nbytes: int) -> None:
        if self.overall is not None:
            self.overall.update(nbytes)
        if self.shard is not None:
            self.shard.update(nbytes)

    def end_shard(self) -> None:
        if self.shard is not None:
            self.shard.close()
            self.shard = None

    def close(self) -> None:
        self.end_shard()
        if self.overall is not None:
            self.overall.close()


def make_progress(quiet: bool) -> Progress:
    """Bars only for an interactive terminal, and never with --quiet or --json."""
    if quiet or not sys.stderr.isatty():
        return Progress()
    return TqdmProgress()
