"""Everything that talks to the Hugging Face Hub goes through huggingface_hub; this module
turns its exceptions into one-line ``HubError``s that say what to do.

>>> str(to_hub_error(ValueError("boom"), "me/model"))
'me/model: Hub request failed: boom'

Messages never contain the token: they are built from the repo id, the revision, the
HTTP status and the first line of the server's own error text.
"""

from __future__ import annotations

import os
import sys

from reshard.errors import HubError

LOGIN_HINT = "log in with `hf auth login` or set HF_TOKEN (or pass --token)"


def resolve_token(token: str | None) -> str:
    """The token to use: ``token`` if given, else ``HF_TOKEN`` / the stored login.

    Raises:
        HubError: no token anywhere (uploads need one).

    >>> resolve_token("hf_x")
    'hf_x'
    """
    if token:
        return token
    from huggingface_hub import get_token

    found = get_token()
    if not found:
        raise HubError(f"not logged in to the Hugging Face Hub; {LOGIN_HINT}")
    return found


def _chain(error: BaseException):
    """The error, then its causes (``raise ... from``) and contexts, innermost last."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def pick_error(error: Exception) -> Exception:
    """The most telling error in the chain: huggingface_hub's own errors first (a
    ``RuntimeError("Error while uploading ...")`` wraps the HTTP error that matters),
    then network errors."""
    from huggingface_hub import errors as hf

    chain = list(_chain(error))
    for e in chain:
        if isinstance(e, hf.HfHubHTTPError) or isinstance(
            e, (hf.LocalEntryNotFoundError, hf.OfflineModeIsEnabled)
        ):
            return e
    for e in chain:
        if _is_network_error(e):
            return e
    return error


def is_network_error(error: Exception) -> bool:
    """True when ``error`` (or what it wraps) means the Hub could not be reached, as
    opposed to the Hub answering with a refusal.

    >>> is_network_error(ConnectionRefusedError()), is_network_error(ValueError())
    (True, False)
    """
    picked = pick_error(error) if isinstance(error, Exception) else error
    # As to_hub_error reads it: an OSError with no HTTP answer attached is the network.
    return _is_network_error(picked) or (
        isinstance(picked, OSError) and getattr(picked, "response", None) is None
    )


def _is_network_error(error: BaseException) -> bool:
    names = {cls.__name__ for cls in type(error).__mro__}
    # httpx2's ConnectError / TimeoutException / NetworkError are not OSError subclasses.
    return bool(
        names
        & {
            "ConnectError",
            "ConnectTimeout",
            "TimeoutException",
            "NetworkError",
            "RemoteProtocolError",
            "ConnectionError",
            "TimeoutError",
        }
    )


def server_message(error: Exception) -> str:
    """First line of what the server said (``X-Error-Message`` or JSON ``error``), if anything."""
    text = getattr(error, "server_message", None) or ""
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    return lines[0].rstrip(".") if lines else ""


def to_hub_error(
    error: Exception, repo_id: str, revision: str | None = None, *, upload: bool = False
) -> HubError:
    """Map a huggingface_hub / network exception to a ``HubError`` with the fix in it.

    GatedRepoError is a RepositoryNotFoundError subclass, so it is checked first.
    ``upload`` changes the hints that only make sense for downloads (the offline cache).
    """
    from huggingface_hub import errors as hf

    error = pick_error(error)
    rev = f" at revision {revision!r}" if revision else ""
    if isinstance(error, hf.GatedRepoError):
        return HubError(
            f"{repo_id}: the repo is gated; accept its terms on the Hub page, then log "
            "in with `hf auth login` or pass --token"
        )
    if isinstance(error, hf.RepositoryNotFoundError):
        return HubError(
            f"{repo_id}: repository not found (or private): check the repo id, or log "
            "in with `hf auth login` / pass --token if it is private"
        )
    if isinstance(error, hf.RevisionNotFoundError):
        return HubError(
            f"{repo_id}: revision {revision!r} does not exist; pass an existing "
            "branch, tag or commit with --revision"
        )
    # LocalEntryNotFoundError subclasses EntryNotFoundError: check it first.
    if isinstance(error, hf.LocalEntryNotFoundError):
        return HubError(
            f"{repo_id}{rev}: not in the local cache and the Hub cannot be reached "
            "(offline?); download it once online or unset HF_HUB_OFFLINE"
        )
    if isinstance(error, (hf.RemoteEntryNotFoundError, hf.EntryNotFoundError)):
        return HubError(
            f"{repo_id}{rev}: a file it lists is missing on the Hub: "
            f"{server_message(error) or _first_line(error)}"
        )
    if isinstance(error, hf.OfflineModeIsEnabled):
        return HubError(f"{repo_id}: HF_HUB_OFFLINE is set; unset it to reach the Hub")
    status = getattr(getattr(error, "response", None), "status_code", None)
    said = server_message(error)
    said = f" ({said})" if said else ""
    if status == 401:
        return HubError(
            f"{repo_id}: the token was rejected (401){said}; log in again with "
            "`hf auth login` or pass a valid --token"
        )
    if status == 403:
        return HubError(
            f"{repo_id}: no write access with this token (403){said}; use a token with "
            "write permission for this namespace (a fine-grained token needs "
            "'write' on it)"
        )
    if status == 429:
        return HubError(f"{repo_id}: rate limited by the Hub (429); wait a minute and run again")
    if isinstance(status, int) and status >= 500:
        return HubError(
            f"{repo_id}: the Hub had a server error ({status}){said}; run the same "
            "command again (what was uploaded is kept)"
        )
    if isinstance(status, int):
        return HubError(f"{repo_id}: the Hub refused the request ({status}){said}")
    if _is_network_error(error) or isinstance(error, OSError):
        fix = (
            "run the same command again once online (what was uploaded is kept)"
            if upload
            else "set HF_HUB_OFFLINE=1 to use the local cache"
        )
        return HubError(
            f"{repo_id}: cannot reach the Hub ({type(error).__name__}); check the "
            f"network (and HF_ENDPOINT), or {fix}"
        )
    return HubError(f"{repo_id}: Hub request failed: {_first_line(error)}")


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


def quiet_hub_progress() -> None:
    """Silence huggingface_hub's own bars ("Fetching 10 files", "Parse safetensors files",
    uploads) for ``-q``, ``--json`` and a stderr that is not a terminal. huggingface_hub
    reads HF_HUB_DISABLE_PROGRESS_BARS when imported, so setting it is enough (and costs no
    import) until then; once imported, its switch is used."""
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    if "huggingface_hub" in sys.modules:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
