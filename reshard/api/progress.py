"""Progress for scripts and notebooks: a callback, your own ``Progress``, or a tqdm or rich bar.

The job functions that write (``reshard.split``, ``reshard.merge``) take ``progress=``:

- ``None``: nothing is reported;
- a ``Progress`` (``reshard.run.events``): its methods receive every run event, and
  ``close()`` exactly once at the end, also after an error;
- any callable ``fn(done, total)``: called with the tensor bytes written so far and the
  total after every chunk;
- ``TqdmProgress()`` or ``RichProgress()``: bars drawn by tqdm (``tqdm.auto``: widgets in
  Jupyter) or by rich.

>>> seen = []
>>> events = as_progress(lambda done, total: seen.append((done, total)))
>>> events.begin(10, 1); events.advance(4); events.advance(6); seen
[(4, 10), (10, 10)]
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Union

from reshard.run.events import ForwardingProgress, Progress

ProgressLike = Union[Progress, Callable[[int, int], Any], None]


class CallbackProgress(Progress):
    """Calls ``callback(done, total)`` (tensor bytes) after every chunk written.

    >>> p = CallbackProgress(print); p.begin(8, 2); p.advance(3)
    3 8
    """

    def __init__(self, callback: Callable[[int, int], Any]) -> None:
        self.callback = callback
        self.total = 0
        self.done = 0

    def begin(self, total: int, shards: int) -> None:
        self.total, self.done = total, 0

    def advance(self, nbytes: int) -> None:
        self.done += nbytes
        self.callback(self.done, self.total)


class ClosedOnce(ForwardingProgress):
    """Forwards every event to ``inner`` and its ``close()`` only once: the run pipeline
    closes its progress, and the API closes it again after jobs that run several writes,
    or none (a dry run).

    >>> class Count(Progress):
    ...     closed = 0
    ...     def close(self): self.closed += 1
    >>> inner = Count(); once = ClosedOnce(inner); once.close(); once.close(); inner.closed
    1
    """

    def __init__(self, inner: Progress) -> None:
        super().__init__(inner)
        self.closed = False

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.inner.close()


def as_progress(progress: ProgressLike) -> ClosedOnce:
    """The ``Progress`` a job reports to, from what a caller passed as ``progress=``.

    Raises:
        TypeError: ``progress`` is neither None, a ``Progress`` nor a callable.
    """
    if progress is None:
        return ClosedOnce(Progress())
    if isinstance(progress, Progress):
        return ClosedOnce(progress)
    if callable(progress):
        return ClosedOnce(CallbackProgress(progress))
    raise TypeError(
        f"progress={progress!r}: pass a reshard.Progress, a callable fn(done, total), "
        "reshard.TqdmProgress() or None"
    )


class TqdmProgress(Progress):
    """An overall bytes bar plus one for the current shard, drawn by tqdm.

    ``tqdm_class`` defaults to ``tqdm.auto.tqdm``: notebook widgets in Jupyter (when
    ipywidgets is installed), text bars elsewhere. ``options`` go to every bar
    (``file=sys.stderr``, ``dynamic_ncols=True``, ``leave=False``, ...).

    >>> import io, tqdm
    >>> out = io.StringIO()
    >>> bars = TqdmProgress(tqdm.tqdm, file=out)
    >>> bars.begin(2000, 1); bars.start_shard(1, 1, "model.safetensors", 2000); bars.advance(2000)
    >>> bars.close(); "total: 100%" in out.getvalue()
    True
    """

    def __init__(self, tqdm_class: Any = None, **options: Any) -> None:
        self.tqdm_class = tqdm_class
        self.options = options
        self.overall: Any = None
        self.shard: Any = None

    def _bar(self, **kwargs: Any) -> Any:
        bar = self.tqdm_class
        if bar is None:
            from tqdm.auto import tqdm

            bar = tqdm
        # The caller's options win over reshard's (leave=, position=, desc=...).
        return bar(**{"unit": "B", "unit_scale": True, "unit_divisor": 1000, **kwargs, **self.options})

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
            self.overall = None


class RichProgress(Progress):
    """The same two bars drawn by rich (``rich.progress``), in a terminal or a notebook.

    >>> import io
    >>> from rich.console import Console
    >>> console = Console(file=io.StringIO(), width=100)
    >>> bars = RichProgress(console=console)
    >>> bars.begin(2000, 1); bars.start_shard(1, 1, "model.safetensors", 2000); bars.advance(2000)
    >>> bars.close(); "total" in console.file.getvalue()
    True
    """

    def __init__(self, console: Any = None, transient: bool = False) -> None:
        self.console = console
        self.transient = transient
        self.bars: Any = None
        self.overall: Any = None
        self.shard: Any = None

    def begin(self, total: int, shards: int) -> None:
        from rich.progress import BarColumn, DownloadColumn, TextColumn, TimeRemainingColumn
        from rich.progress import Progress as Bars

        self.bars = Bars(
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TimeRemainingColumn(),
            console=self.console,
            transient=self.transient,
        )
        self.bars.start()
        self.overall = self.bars.add_task("total", total=total)

    def start_shard(self, number: int, count: int, file_name: str, size: int) -> None:
        if self.bars is not None:
            self.shard = self.bars.add_task(f"shard {number}/{count}", total=size)

    def advance(self, nbytes: int) -> None:
        if self.bars is None:
            return
        self.bars.advance(self.overall, nbytes)
        if self.shard is not None:
            self.bars.advance(self.shard, nbytes)

    def end_shard(self) -> None:
        if self.bars is not None and self.shard is not None:
            self.bars.remove_task(self.shard)
        self.shard = None

    def close(self) -> None:
        self.end_shard()
        if self.bars is not None:
            self.bars.stop()
            self.bars = None
