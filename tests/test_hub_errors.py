"""reshard.hub.access.to_hub_error with the real exception objects huggingface_hub raises: each is
produced by huggingface_hub's own hf_raise_for_status from an HTTP response shaped like the
Hub's (status, X-Error-Code, X-Error-Message), or by httpx2 itself for network failures."""

from __future__ import annotations

import httpx2
import pytest
from huggingface_hub import errors as hf
from huggingface_hub.utils import hf_raise_for_status

from reshard.errors import HubError
from reshard.hub.access import resolve_token, to_hub_error

HUB = "https://huggingface.co"
SECRET = "hf_thisMustNeverBePrinted42"


def raised(
    status: int, url: str, code: str | None = None, message: str | None = None, method: str = "GET"
) -> Exception:
    """The exception huggingface_hub raises for this response."""
    headers = {}
    if code:
        headers["X-Error-Code"] = code
    if message:
        headers["X-Error-Message"] = message
    request = httpx2.Request(method, url, headers={"authorization": f"Bearer {SECRET}"})
    response = httpx2.Response(status, headers=headers, json={"error": message or "x"}, request=request)
    with pytest.raises(Exception) as info:
        hf_raise_for_status(response)
    return info.value


CASES = [
    # (exception, expected type from huggingface_hub, words the message must contain)
    (
        lambda: raised(
            401,
            f"{HUB}/api/repos/create",
            message="Invalid credentials in Authorization header",
            method="POST",
        ),
        hf.HfHubHTTPError,
        ["401", "token was rejected", "hf auth login"],
    ),
    (
        lambda: raised(
            403,
            f"{HUB}/api/models/org/m/preupload/main",
            message="You don't have write access",
            method="POST",
        ),
        hf.HfHubHTTPError,
        ["403", "no write access", "write permission"],
    ),
    (
        lambda: raised(404, f"{HUB}/api/models/org/m", code="RepoNotFound"),
        hf.RepositoryNotFoundError,
        ["repository not found", "check the repo id"],
    ),
    # The Hub answers 401 (not 404) for a private or missing repo without a token.
    (
        lambda: raised(401, f"{HUB}/api/models/org/m", message="Repository not found"),
        hf.RepositoryNotFoundError,
        ["repository not found", "hf auth login"],
    ),
    (
        lambda: raised(403, f"{HUB}/org/m/resolve/main/config.json", code="GatedRepo"),
        hf.GatedRepoError,
        ["gated", "accept its terms"],
    ),
    (
        lambda: raised(404, f"{HUB}/api/models/org/m/revision/nope", code="RevisionNotFound"),
        hf.RevisionNotFoundError,
        ["revision 'nope' does not exist", "--revision"],
    ),
    (
        lambda: raised(
            404, f"{HUB}/org/m/resolve/main/x.safetensors", code="EntryNotFound", message="Entry not found"
        ),
        hf.RemoteEntryNotFoundError,
        ["missing on the Hub"],
    ),
    (
        lambda: raised(500, f"{HUB}/api/models/org/m/commit/main", method="POST", message="oops"),
        hf.HfHubHTTPError,
        ["server error (500)", "again"],
    ),
    (lambda: raised(429, f"{HUB}/api/models/org/m"), hf.HfHubHTTPError, ["rate limited", "429"]),
    (
        lambda: hf.LocalEntryNotFoundError("not cached"),
        hf.LocalEntryNotFoundError,
        ["local cache", "HF_HUB_OFFLINE"],
    ),
    (lambda: hf.OfflineModeIsEnabled("offline"), hf.OfflineModeIsEnabled, ["HF_HUB_OFFLINE is set"]),
    (
        lambda: httpx2.ConnectError("[Errno 111] Connection refused"),
        httpx2.ConnectError,
        ["cannot reach the Hub", "ConnectError"],
    ),
    (lambda: httpx2.ReadTimeout("timed out"), httpx2.ReadTimeout, ["cannot reach the Hub"]),
]


@pytest.mark.parametrize("make, expected_type, words", CASES)
def test_each_hub_failure_maps_to_one_line_with_the_fix(make, expected_type, words):
    error = make()
    assert type(error) is expected_type  # really the exception huggingface_hub raises
    mapped = to_hub_error(error, "org/m", "nope")
    message = str(mapped)
    assert isinstance(mapped, HubError) and mapped.exit_code == 1
    assert "\n" not in message and message.startswith("org/m")
    for word in words:
        assert word in message, (word, message)
    assert SECRET not in message


def test_gated_is_reported_as_gated_not_as_missing():
    # GatedRepoError subclasses RepositoryNotFoundError: the order of the checks matters.
    error = raised(403, f"{HUB}/org/m/resolve/main/config.json", code="GatedRepo")
    assert isinstance(error, hf.RepositoryNotFoundError)
    assert "gated" in str(to_hub_error(error, "org/m"))
    assert "not found" not in str(to_hub_error(error, "org/m"))


def test_the_http_error_inside_an_upload_wrapper_is_the_one_reported():
    # huggingface_hub wraps LFS upload failures: RuntimeError("Error while uploading ...") from e.
    inner = raised(403, f"{HUB}/api/models/org/m/preupload/main", message="Forbidden", method="POST")
    try:
        try:
            raise inner
        except hf.HfHubHTTPError as e:
            raise RuntimeError("Error while uploading 'model.safetensors' to the Hub.") from e
    except RuntimeError as outer:
        message = str(to_hub_error(outer, "org/m", upload=True))
    assert "403" in message and "no write access" in message


def test_network_hint_differs_for_uploads():
    down = httpx2.ConnectError("refused")
    assert "HF_HUB_OFFLINE=1" in str(to_hub_error(down, "org/m"))
    assert "again" in str(to_hub_error(down, "org/m", upload=True))
    assert "HF_HUB_OFFLINE" not in str(to_hub_error(down, "org/m", upload=True))


def test_unknown_errors_keep_only_their_first_line():
    message = str(to_hub_error(ValueError("first line\nsecond line"), "org/m"))
    assert message == "org/m: Hub request failed: first line"


def test_resolve_token_prefers_the_argument_then_env_then_says_log_in(monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "stored_tokens"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    assert resolve_token("hf_given") == "hf_given"
    with pytest.raises(HubError, match="not logged in.*hf auth login"):
        resolve_token(None)
    (tmp_path / "token").write_text("hf_stored\n")
    assert resolve_token(None) == "hf_stored"
    monkeypatch.setenv("HF_TOKEN", "hf_env")
    assert resolve_token(None) == "hf_env"
