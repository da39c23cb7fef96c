"""Run events: what a run tells the outside world while it works.

The library never prints. A run calls these methods in this order::

    begin(total, shards)
    for each shard: start_shard(...), advance(n)..., end_shard(), shard_written(name)
    before_publish()
    close()            (always, also after an error)

The CLI subclasses ``Progress`` to draw bars; tests subclass it to stop a process at a
precise point; anyone scripting reshard can pass their own.

>>> class Count(Progress):
...     written = 0
...     def advance(self, nbytes): self.written += nbytes
>>> p = Count(); p.advance(10); p.written
10
"""

from __future__ import annotations


class Progress:
    """Receives run events; every method is a no-op here."""

    def begin(self, total: int, shards: int) -> None:
        """Writing starts: ``total`` tensor bytes in ``shards`` files."""

    def start_shard(self, number: int, count: int, file_name: str, size: int) -> None:
        """A shard of ``size`` tensor bytes begins (``file_name`` is relative to the
        output: ``rank-0/model-00001-of-00002.safetensors`` for a tensor-parallel run)."""

    def advance(self, nbytes: int) -> None:
        """``nbytes`` more tensor bytes were written."""

    def end_shard(self) -> None:
        """The current shard's bytes are all written."""

    def shard_written(self, file_name: str) -> None:
        """Shard ``file_name`` is complete and recorded in the journal (a kill from here
        on keeps it for ``--resume``)."""

    def before_publish(self) -> None:
        """Everything is written, synced and verified; the output is renamed next."""

    def close(self) -> None:
        """The run is over, successfully or not (bars are closed here)."""


class ForwardingProgress(Progress):
    """Forwards every event to ``inner``; wrappers override what they change.

    >>> class Count(Progress):
    ...     shards = 0
    ...     def start_shard(self, *args): self.shards += 1
    >>> inner = Count(); ForwardingProgress(inner).start_shard(1, 1, "a", 0); inner.shards
    1
    """

    def __init__(self, inner: Progress) -> None:
        self.inner = inner

    def begin(self, total: int, shards: int) -> None:
        self.inner.begin(total, shards)

    def start_shard(self, number: int, count: int, file_name: str, size: int) -> None:
        self.inner.start_shard(number, count, file_name, size)

    def advance(self, nbytes: int) -> None:
        self.inner.advance(nbytes)

    def end_shard(self) -> None:
        self.inner.end_shard()

    def shard_written(self, file_name: str) -> None:
        self.inner.shard_written(file_name)

    def before_publish(self) -> None:
        self.inner.before_publish()

    def close(self) -> None:
        self.inner.close()


class SharedProgress(ForwardingProgress):
    """Forwards to one sink and ignores nested ``begin``/``close``, for jobs that run
    several writes under one overall bar."""

    def begin(self, total: int, shards: int) -> None:
        pass

    def close(self) -> None:
        pass
