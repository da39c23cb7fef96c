"""Byte ranges of Hub files over HTTP, through huggingface_hub's session and backoff.

``fetch_range`` reads one range of one file into a buffer. huggingface_hub's
``http_stream_backoff`` (its shared ``get_session()`` client, its headers, its handling of
429 ``Retry-After`` and 5xx) retries a request that fails before the body starts; what it
cannot do is continue a body that breaks off half-way (a dropped connection, a reset, a
read timeout), so that is done here: the bytes already received are kept and the rest is
asked for with a narrower ``Range``, a bounded number of times with exponential backoff.
The final failure is one ``HubError`` naming the file and saying that ``--resume``
continues.

Stopping: ``fetch_range`` checks ``cancel`` (a ``threading.Event``) between blocks, so
the workers of an interrupted run stop within one block.

>>> backoff_delays(4, base=0.5, cap=3.0)
[0.5, 1.0, 2.0, 3.0]
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

from reshard.errors import HubError
from reshard.transfer.sources import HubRangeSource

log = logging.getLogger(__name__)

# Tries of one range whose body breaks off, and the wait before each retry.
BODY_RETRIES = 6
BACKOFF_BASE_S = 0.5
BACKOFF_CAP_S = 8.0
# Retries of a request that fails before its body (huggingface_hub's backoff).
REQUEST_RETRIES = 5
# A connection that sends nothing for this long is treated as dropped.
READ_TIMEOUT_S = 60.0


class Cancelled(Exception):
    """The run is stopping; the range was abandoned."""


@dataclass(frozen=True)
class HubAccess:
    """What every request needs: the endpoint's headers (token, user agent) once."""

    headers: dict[str, str]

    @classmethod
    def create(cls, token: str | None) -> HubAccess:
        from huggingface_hub.utils import build_hf_headers

        return cls(dict(build_hf_headers(token=token)))

    def url(self, source: HubRangeSource) -> str:
        from huggingface_hub import hf_hub_url

        return hf_hub_url(source.repo_id, source.filename, revision=source.revision)


def backoff_delays(count: int, base: float = BACKOFF_BASE_S, cap: float = BACKOFF_CAP_S) -> list[float]:
    """The waits before each retry: doubling from ``base``, at most ``cap``."""
    return [min(cap, base * 2**k) for k in range(count)]


def fetch_range(
    access: HubAccess,
    source: HubRangeSource,
    offset: int,
    length: int,
    cancel: threading.Event | None = None,
    into: bytearray | None = None,
) -> memoryview:
    """Exactly ``length`` bytes of ``source`` from ``offset``, in ``into`` (reused by the
    caller, so memory is its buffers; at least ``length`` bytes) or a new buffer.

    Raises:
        HubError: the Hub refused (401, 404, ...), or the range kept failing after the
            retries (the message names the file and the last error).
        Cancelled: ``cancel`` was set.
    """
    buffer = memoryview(into if into is not None else bytearray(length))[:length]
    if len(buffer) < length:
        raise ValueError(f"a buffer of {len(buffer)} bytes cannot hold {length}")
    got = 0
    delays = backoff_delays(BODY_RETRIES)
    failures = 0
    while got < length:
        if cancel is not None and cancel.is_set():
            raise Cancelled()
        try:
            got = _read_into(access, source, offset, buffer, got, cancel)
            if got < length:
                raise _ShortBody(f"the server sent {got} of {length} bytes")
        except (Cancelled, HubError):
            raise
        except Exception as e:
            if isinstance(e, _BodyBroke):
                got = e.got  # keep what arrived; ask for the rest
            # A refusal (HTTP status), or what huggingface_hub already retried, is final.
            if _has_status(e) or not _retryable(e) or _cannot_connect(e):
                raise _final_error(e, source) from e
            if failures >= len(delays):
                raise HubError(
                    f"{source.repo_id}/{source.filename}: the download of bytes {offset + got}-"
                    f"{offset + length - 1} failed {failures + 1} times (last: {_describe(e)}); "
                    "check the network and run the same command with --resume to continue"
                ) from e
            log.info("%s: %s; retrying in %.1fs", source.key, _describe(e), delays[failures])
            _sleep(delays[failures], cancel)
            failures += 1
    return buffer


class _ShortBody(Exception):
    """The body ended (cleanly) before the range did."""


class _BodyBroke(Exception):
    """The connection broke while the body was read; ``got`` bytes are in the buffer."""

    def __init__(self, got: int, cause: Exception) -> None:
        super().__init__(_describe(cause))
        self.got = got


def _read_into(
    access: HubAccess,
    source: HubRangeSource,
    offset: int,
    buffer: memoryview,
    got: int,
    cancel: threading.Event | None,
) -> int:
    """One request for the rest of the range; returns how many bytes are in ``buffer``."""
    import httpx2
    from huggingface_hub.utils import hf_raise_for_status, http_stream_backoff

    start, end = offset + got, offset + len(buffer) - 1
    headers = {**access.headers, "Range": f"bytes={start}-{end}", "Accept-Encoding": "identity"}
    timeout = httpx2.Timeout(READ_TIMEOUT_S, connect=READ_TIMEOUT_S)
    with http_stream_backoff(
        "GET",
        access.url(source),
        headers=headers,
        timeout=timeout,
        max_retries=REQUEST_RETRIES,
        base_wait_time=BACKOFF_BASE_S,
        max_wait_time=BACKOFF_CAP_S,
    ) as response:
        try:
            hf_raise_for_status(response)
        except Exception as e:
            raise _final_error(e, source) from e
        if response.status_code != 206 or not _range_starts_at(response, start):
            raise HubError(
                f"{source.repo_id}/{source.filename}: the server ignored the byte range "
                f"(HTTP {response.status_code}); drop --no-cache to download the file whole"
            )
        view = buffer
        try:
            # The blocks as the connection reads them (64 KiB): a chunk size would make
            # httpx join them into new bytes first, one more copy of every byte.
            for block in response.iter_raw():
                if cancel is not None and cancel.is_set():
                    raise Cancelled()
                n = min(len(block), len(buffer) - got)
                view[got : got + n] = memoryview(block)[:n]
                got += n
                if got == len(buffer):
                    break
        except (httpx2.TransportError, httpx2.StreamError, OSError) as e:
            # Not one of huggingface_hub's retry types: its backoff (a generator around
            # this block) must not retry a response already being read; this loop does.
            raise _BodyBroke(got, e) from e
    return got


def _range_starts_at(response, start: int) -> bool:
    header = response.headers.get("Content-Range", "")
    return header.startswith(f"bytes {start}-")


def _retryable(error: Exception) -> bool:
    """A connection that broke, timed out or ended early; a shared client another thread
    closed (huggingface_hub closes it after a connect error) is one too."""
    import httpx2

    if isinstance(error, (_ShortBody, _BodyBroke, httpx2.TransportError, httpx2.StreamError, OSError)):
        return True
    return isinstance(error, RuntimeError) and "closed" in str(error)


def _has_status(error: Exception) -> bool:
    return getattr(getattr(error, "response", None), "status_code", None) is not None


def _cannot_connect(error: Exception) -> bool:
    import httpx2

    return isinstance(error, (httpx2.ConnectError, httpx2.ConnectTimeout))


def _final_error(error: Exception, source: HubRangeSource) -> HubError:
    from reshard.hub.access import to_hub_error

    where = f"{source.repo_id}/{source.filename}"
    status = getattr(getattr(error, "response", None), "status_code", None)
    if status == 429:
        return HubError(
            f"{where}: rate limited by the Hub (429) after {REQUEST_RETRIES} retries; wait a "
            "minute, then run the same command with --resume to continue"
        )
    if isinstance(status, int) and status >= 500:
        return HubError(
            f"{where}: the Hub kept answering with a server error ({status}) after "
            f"{REQUEST_RETRIES} retries; run the same command with --resume to continue"
        )
    mapped = to_hub_error(error, source.repo_id, source.revision)
    message = str(mapped)
    if message.startswith(source.repo_id + ":"):
        message = f"{source.repo_id}/{source.filename}:" + message[len(source.repo_id) + 1 :]
    if "--resume" not in message:
        message += " (run the same command with --resume to continue)"
    return HubError(message)


def _describe(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text and text[0] else type(error).__name__


def _sleep(seconds: float, cancel: threading.Event | None) -> None:
    if cancel is None:
        time.sleep(seconds)
    elif cancel.wait(seconds):
        raise Cancelled()
