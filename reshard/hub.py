"""Everything that talks to the Hugging Face Hub goes through huggingface_hub; this module
turns its exceptions into one-line ``HubError``s that say what to do.

>>> str(to_hub_error(ValueError("boom"), "me/model"))
'me/model: Hub request failed: boom'
"""

from __future__ import annotations

from reshard.errors import HubError


def to_hub_error(error: Exception, repo_id: str, revision: str | None = None) -> HubError:
    """Map a huggingface_hub / network exception to a ``HubError`` with the fix in it.

    GatedRepoError is a RepositoryNotFoundError subclass, so it is checked first.
    """
    from huggingface_hub import errors as hf

    rev = f" at revision {revision!r}" if revision else ""
    if isinstance(error, hf.GatedRepoError):
        return HubError(f"{repo_id}: the repo is gated; accept its terms on the Hub page, then log "
                        "in with `hf auth login` or pass --token")
    if isinstance(error, hf.RepositoryNotFoundError):
        return HubError(f"{repo_id}: repository not found (or private): check the repo id, or log "
                        "in with `hf auth login` / pass --token if it is private")
    if isinstance(error, hf.RevisionNotFoundError):
        return HubError(f"{repo_id}: revision {revision!r} does not exist; pass an existing "
                        "branch, tag or commit with --revision")
    if isinstance(error, (hf.RemoteEntryNotFoundError, hf.EntryNotFoundError)):
        return HubError(f"{repo_id}{rev}: a file it lists is missing on the Hub: {error}")
    if isinstance(error, hf.LocalEntryNotFoundError):
        return HubError(f"{repo_id}{rev}: not in the local cache and the Hub cannot be reached "
                        "(offline?); download it once online or unset HF_HUB_OFFLINE")
    if isinstance(error, hf.OfflineModeIsEnabled):
        return HubError(f"{repo_id}: HF_HUB_OFFLINE is set; unset it to reach the Hub")
    status = getattr(getattr(error, "response", None), "status_code", None)
    if status == 401:
        return HubError(f"{repo_id}: the token was rejected (401); log in again with "
                        "`hf auth login` or pass a valid --token")
    if status == 403:
        return HubError(f"{repo_id}: no write access with this token (403); use a token with "
                        "write permission for this namespace")
    if isinstance(error, (ConnectionError, TimeoutError, OSError)) or "Connect" in type(error).__name__:
        return HubError(f"{repo_id}: cannot reach the Hub ({type(error).__name__}); check the "
                        "network or set HF_HUB_OFFLINE=1 to use the local cache")
    return HubError(f"{repo_id}: Hub request failed: {error}")
