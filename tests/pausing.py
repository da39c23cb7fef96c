"""Run the reshard CLI so that it stops itself (SIGSTOP) at a named point of a run, so a
test can kill -9 it there deterministically, change the source, or let it go on.

Points: ``mid:<shard file>`` (header and the first bytes of that shard written),
``after:<shard file>`` (shard written and journaled), ``index`` (all shards written,
before the index), ``publish`` (all verified, before the rename).

The pausing is done by a ``Progress`` (reshard's run events, ``reshard.run.events``)
wrapped around the CLI's own: production code has no test hook, it only reports events.

Usage: ``python tests/pausing.py POINT reshard-args...``; ``pausing_command`` builds it.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path


def pausing_command(point: str, *args: str) -> list[str]:
    """The argv of a reshard CLI process that stops itself at ``point``."""
    return [sys.executable, str(Path(__file__).resolve()), point, *args]


def wait_stopped(pid: int, timeout: float = 60) -> None:
    """Wait until process ``pid`` is in state T (stopped)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            state = "?"
        if state in ("T", "t"):
            return
        if state in ("Z", "X", "?"):
            raise AssertionError(f"process {pid} exited before pausing")
        time.sleep(0.02)
    raise AssertionError(f"process {pid} did not pause within {timeout}s")


def pausing_progress(point: str, inner):
    """A ``Progress`` that forwards to ``inner`` and SIGSTOPs this process at ``point``."""
    from reshard.run.events import Progress

    class Pausing(Progress):
        def __init__(self) -> None:
            self.shard, self.shards, self.written, self.done = None, 0, 0, False

        def pause(self, here: str) -> None:
            if here == point and not self.done:
                self.done = True
                os.kill(os.getpid(), signal.SIGSTOP)

        def begin(self, total: int, shards: int) -> None:
            self.shards = shards
            inner.begin(total, shards)

        def start_shard(self, number: int, count: int, file_name: str, size: int) -> None:
            self.shard = file_name
            inner.start_shard(number, count, file_name, size)

        def advance(self, nbytes: int) -> None:
            inner.advance(nbytes)
            self.pause(f"mid:{self.shard}")

        def end_shard(self) -> None:
            inner.end_shard()

        def shard_written(self, file_name: str) -> None:
            inner.shard_written(file_name)
            self.pause(f"after:{file_name}")
            self.written += 1
            if self.written == self.shards:  # nothing but the index and extra files left
                self.pause("index")

        def before_publish(self) -> None:
            inner.before_publish()
            self.pause("publish")

        def close(self) -> None:
            inner.close()

    return Pausing()


def main() -> None:
    point, args = sys.argv[1], sys.argv[2:]
    # A test run started in the background by a script (`make test &`) ignores SIGINT, and
    # its children inherit that, so Python would not install its Ctrl-C handler here; the
    # tests send SIGINT on purpose, as a terminal would.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    import reshard.cli.progress as progress_module

    make_progress = progress_module.make_progress
    progress_module.make_progress = lambda quiet: pausing_progress(point, make_progress(quiet))
    from reshard.cli import main as cli_main

    sys.argv = ["reshard", *args]
    cli_main()


if __name__ == "__main__":
    main()
