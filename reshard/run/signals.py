"""Ctrl-C and SIGTERM end a run the same way: one line, a distinct exit code, the lock
released, and the temporary folder kept for ``--resume``.

Python turns SIGINT into ``KeyboardInterrupt`` but dies silently on SIGTERM (what SLURM,
``docker stop`` and ``kill`` send), skipping every ``finally``: the lock file stays and
nothing says why the run ended. ``signals_as_interrupts`` makes SIGTERM raise
``Terminated``, a ``KeyboardInterrupt``, so both signals unwind through the same cleanup.
The run pipeline wraps either one in ``RunInterrupted`` when it keeps its temporary folder;
the CLI prints ``interrupt_message`` and exits with ``128 + signal number`` (130, 143), as
a shell reports a process killed by that signal.

>>> interrupt_exit_code(Terminated()), interrupt_exit_code(KeyboardInterrupt())
(143, 130)
>>> interrupt_message(RunInterrupted(Terminated(), Path("/d/.out.reshard-tmp"), 2, 5))
'interrupted by SIGTERM; 2 of 5 shards are finished in /d/.out.reshard-tmp: run the same command with --resume to continue'
>>> interrupt_message(KeyboardInterrupt())
'interrupted by SIGINT before anything was published'
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived (raised in the main thread by the handler installed below)."""

    signum = signal.SIGTERM


class RunInterrupted(KeyboardInterrupt):
    """A run stopped by a signal, with its temporary folder kept for ``--resume``.

    Attributes:
        signum: the signal (SIGINT or SIGTERM).
        folder: the temporary folder that was kept.
        done, total: finished shards and all shards of the run.
    """

    def __init__(self, cause: BaseException, folder: Path, done: int, total: int) -> None:
        super().__init__(str(folder))
        self.signum = signal_of(cause)
        self.folder, self.done, self.total = folder, done, total


def signal_of(error: BaseException) -> int:
    """The signal behind an interrupt: SIGTERM for ``Terminated``, else SIGINT."""
    return int(getattr(error, "signum", signal.SIGINT))


def interrupt_exit_code(error: BaseException) -> int:
    """``128 + signal``: 130 for Ctrl-C, 143 for SIGTERM."""
    return 128 + signal_of(error)


def interrupt_message(error: BaseException) -> str:
    """The one line the CLI prints for an interrupt."""
    name = signal.Signals(signal_of(error)).name
    if isinstance(error, RunInterrupted):
        return (
            f"interrupted by {name}; {error.done} of {error.total} shards are finished in "
            f"{error.folder}: run the same command with --resume to continue"
        )
    return f"interrupted by {name} before anything was published"


@contextmanager
def signals_as_interrupts() -> Iterator[None]:
    """Within the block, SIGTERM raises ``Terminated`` in the main thread (once: a second
    SIGTERM during the cleanup is ignored, so the cleanup finishes). Outside the main
    thread (signals cannot be handled there) it does nothing.

    >>> with signals_as_interrupts():
    ...     signal.getsignal(signal.SIGTERM).__name__
    '_raise_terminated'
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def _raise_terminated(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
