"""Run the reshard CLI so that it stops itself (SIGSTOP) at a named point of a run, so a
test can kill -9 it there deterministically, change the source, or let it go on.

Points: ``mid:<shard file>`` (header and first run of that shard written),
``after:<shard file>`` (shard written and journaled), ``index`` (all shards written,
before the index), ``publish`` (all verified, before the rename).

Usage: ``python tests/pausing.py POINT reshard-args...``; ``pausing_command`` builds it.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

PAUSE_ENV = "RESHARD_TEST_PAUSE_AT"


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


def main() -> None:
    point, args = sys.argv[1], sys.argv[2:]
    os.environ[PAUSE_ENV] = point
    from reshard.cli.app import main as cli_main

    sys.argv = ["reshard", *args]
    cli_main()


if __name__ == "__main__":
    main()
