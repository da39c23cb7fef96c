"""Publish a resharded folder to the Hugging Face Hub.

Order: check the options -> find a token -> verify the folder (refuse with the reason) ->
build the upload set (the model's files, plus a generated model card when the folder has
no README.md) -> create the repo (exist_ok) -> upload the set in one commit (or pull
request) with ``HfApi.upload_folder``. The user's folder is never written to.

``split --push-to`` calls ``preflight_push`` before the split writes anything, so a bad
repo id, conflicting options or a missing or rejected login fail in seconds, not after it.

Resuming: huggingface_hub asks the Hub what it already has before sending bytes (the
``preupload`` answer carries each file's remote oid; the LFS batch answer has no upload
action for objects the Hub stores), so re-running an interrupted push sends only what is
missing, and re-running a finished one sends nothing and makes no commit.

Example (needs a model on disk, so it is not run as a doctest)::

    from reshard.hub.push import push_folder
    push_folder("./Mistral-7B-v0.1-resharded", "me/Mistral-7B-v0.1-2GB").url
    # -> 'https://huggingface.co/me/Mistral-7B-v0.1-2GB/commit/...'
"""

from __future__ import annotations

import contextlib
import fnmatch
import glob
import logging
import os
import shlex
import tempfile
from dataclasses import dataclass
from pathlib import Path

from reshard.errors import HubError, ReshardError, UsageError, VerifyError
from reshard.hub.access import is_network_error, pick_error, resolve_token, to_hub_error
from reshard.hub.resolve import EXTRA_FILE_PATTERNS

log = logging.getLogger(__name__)

# What a model repo carries: the weights plus the small non-weight files (config,
# generation config, tokenizer files, chat templates, custom code, licence, model card).
MODEL_FILE_PATTERNS = (*EXTRA_FILE_PATTERNS, "*.safetensors")


@dataclass(frozen=True)
class PushResult:
    """What a push did: where it went and which files it sent (or found already there)."""

    repo_id: str
    url: str
    commit: str
    pr_url: str | None
    revision: str
    files: tuple[str, ...]
    card_written: bool
    changed: bool = True  # False: the Hub already had every file, no commit was made

    def to_json(self) -> dict:
        return {
            "repo_id": self.repo_id,
            "url": self.url,
            "commit": self.commit,
            "pr_url": self.pr_url,
            "revision": self.revision,
            "files": list(self.files),
            "card_written": self.card_written,
            "changed": self.changed,
        }


def model_files(folder: Path) -> list[str]:
    """The files of ``folder`` that belong on the Hub, in a stable order.

    Weights are exactly the files the index (or the single ``model.safetensors``) names;
    other files must match MODEL_FILE_PATTERNS. Hidden files (``.x.reshard-tmp``, locks),
    sub-folders, other frameworks' weights and anything else are left out.

    Raises:
        VerifyError: the folder does not verify.
    """
    from reshard.run.verify import read_output
    from reshard.tensors import natural_key

    weights = {t.file.name for t in read_output(folder).values()}
    names = []
    for path in sorted(Path(folder).iterdir(), key=lambda p: natural_key(p.name)):
        name = path.name
        if name.startswith(".") or not path.is_file():
            continue
        if name.endswith(".safetensors"):
            if name in weights:
                names.append(name)
        elif any(fnmatch.fnmatch(name, pattern) for pattern in MODEL_FILE_PATTERNS):
            names.append(name)
    return names


STRAY_WEIGHTS = "a .safetensors file the checkpoint does not list"


def refuse_stray_weights(folder: Path) -> None:
    """Refuse a folder holding a ``.safetensors`` file that its index (or, without one, the
    single ``model.safetensors``) does not account for. Leaving it out of the upload would
    publish a checkpoint the folder's owner may not mean: a stray shard usually comes from
    another run or another model, so the owner decides, not push.

    Raises:
        VerifyError: naming the first stray file.
    """
    from reshard.formats.index import read_index
    from reshard.tensors import natural_key
    from reshard.writers.safetensors import INDEX_FILE_NAME, SINGLE_FILE_NAME

    folder = Path(folder)
    index = folder / INDEX_FILE_NAME
    if index.is_file():
        listed = set(read_index(index).values())
    elif (folder / SINGLE_FILE_NAME).is_file():
        listed = {SINGLE_FILE_NAME}
    else:
        return  # verify says what is missing
    for path in sorted(folder.glob("*.safetensors"), key=lambda p: natural_key(p.name)):
        if path.name not in listed and path.is_file():
            raise VerifyError(
                f"not pushing: {path} is {STRAY_WEIGHTS} (no index entry names "
                "it); move it out of the folder or delete it, then push again"
            )


def check_repo_id(repo_id: str) -> None:
    """Refuse a repo id the Hub would reject, before any request.

    >>> check_repo_id("me/model-2GB")
    >>> check_repo_id("me/bad name")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    reshard.errors.UsageError: 'me/bad name': not a valid Hub repo id...
    """
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise UsageError(
            f"{repo_id!r}: not a valid Hub repo id; use namespace/name with letters, "
            "digits, '-', '_' and '.' (at most 96 characters)"
        ) from e


def check_push_options(
    repo_id: str, *, revision: str | None = None, create_pr: bool = False, revision_flag: str = "--revision"
) -> None:
    """Refuse a bad repo id or conflicting options, before any request. ``revision_flag``
    is how the calling command spells the branch option (``split`` says ``--push-revision``).

    >>> check_push_options("me/m", revision="dev", create_pr=True, revision_flag="--push-revision")
    Traceback (most recent call last):
    ...
    reshard.errors.UsageError: --create-pr opens a pull request against main; drop --push-revision dev or drop --create-pr

    Raises:
        UsageError: an invalid repo id, or ``--create-pr`` with a branch other than main.
    """
    check_repo_id(repo_id)
    if create_pr and revision not in (None, "main"):
        raise UsageError(
            f"--create-pr opens a pull request against main; drop {revision_flag} "
            f"{shlex.quote(revision)} or drop --create-pr"
        )


def preflight_push(
    repo_id: str, *, revision: str | None = None, create_pr: bool = False, token: str | None = None
) -> str:
    """``split --push-to``: what can be checked before the split writes a byte, with split's
    flag names: repo id syntax, ``--create-pr`` vs ``--push-revision``, a token, and that
    the Hub accepts it (one ``whoami`` request). Returns the token to push with.

    Raises:
        UsageError: bad repo id or conflicting options.
        HubError: not logged in, the token is rejected, or the Hub cannot be reached.
    """
    from huggingface_hub import HfApi

    check_push_options(repo_id, revision=revision, create_pr=create_pr, revision_flag="--push-revision")
    token = resolve_token(token)
    try:
        HfApi().whoami(token=token)
    except Exception as e:
        error = to_hub_error(e, repo_id)
        if is_network_error(e):
            error = HubError(
                f"{repo_id}: cannot reach the Hub to check the login "
                f"({type(pick_error(e)).__name__}); check the network (and "
                "HF_ENDPOINT), then run the same command again"
            )
        raise type(error)(f"{error} (checked before splitting: nothing was written)") from e
    return token


def push_folder(
    folder: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    create_pr: bool = False,
    commit_message: str | None = None,
    token: str | None = None,
) -> PushResult:
    """Verify ``folder`` and upload its model files to ``repo_id``.

    Args:
        folder: a folder written by ``reshard split`` (any verifying safetensors folder works).
        repo_id: ``namespace/name``; created when missing.
        private: create the repo private (ignored when it exists).
        revision: the branch to commit to (created from main when missing).
        create_pr: open a pull request against main instead of committing.
        commit_message: defaults to "Upload <n> files with reshard <version>".
        token: defaults to HF_TOKEN / the stored login; never logged.

    Raises:
        HubError: not logged in, bad token, no write access, network down, Hub errors.
        VerifyError: the folder does not verify (nothing is uploaded).
        UsageError: --create-pr together with a --revision other than main.
    """
    from reshard import __version__
    from reshard.hub.card import CARD_NAME, card_text
    from reshard.run.verify import verify_folder

    folder = Path(folder).expanduser()
    check_push_options(repo_id, revision=revision, create_pr=create_pr)
    token = resolve_token(token)
    refuse_stray_weights(folder)
    try:
        verify_folder(folder)
    except VerifyError as e:
        raise VerifyError(f"not pushing: {e}; fix or re-run reshard split") from e
    card = card_text(folder, repo_id)
    files = model_files(folder)  # the folder's own README.md included: it matches *.md
    if card is not None:
        files = sorted([*files, CARD_NAME], key=_natural)
    message = commit_message or f"Upload {len(files)} files with reshard {__version__}"
    with upload_set(folder, files, card) as staged:
        info, before = _upload(
            staged,
            repo_id,
            files,
            private=private,
            revision=revision,
            create_pr=create_pr,
            message=message,
            token=token,
        )
    pr_url = getattr(info, "pr_url", None)
    return PushResult(
        repo_id,
        pr_url or info.commit_url,
        info.oid,
        pr_url,
        "main" if create_pr or not revision else revision,
        tuple(files),
        card is not None,
        changed=bool(pr_url) or info.oid != before,
    )


def _natural(name: str) -> tuple:
    from reshard.tensors import natural_key

    return natural_key(name)


@contextlib.contextmanager
def upload_set(folder: Path, files: list[str], card: str | None):
    """A temporary folder holding symlinks to ``files`` of ``folder`` and, when given, the
    generated model card: what ``upload_folder`` sends. The card lives only here, so a
    failed push leaves nothing in ``folder`` and the next push renders it afresh for the
    repo it then targets. Links, not copies: shards stay where they are (huggingface_hub
    follows the links when it hashes and uploads).
    """
    from reshard.hub.card import CARD_NAME

    with tempfile.TemporaryDirectory(prefix="reshard-push-") as tmp:
        staged = Path(tmp)
        for name in files:
            if name == CARD_NAME and card is not None:
                (staged / name).write_text(card, encoding="utf-8")
            else:
                os.symlink((folder / name).absolute(), staged / name)
        yield staged


def _upload(
    folder: Path,
    repo_id: str,
    files: list[str],
    *,
    private: bool,
    revision: str | None,
    create_pr: bool,
    message: str,
    token: str,
):
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    step = "creating the repo"
    try:
        _create_repo(api, repo_id, private)
        # A new branch starts from main; "refs/pr/N" pushes more commits to an open PR.
        if revision and revision != "main" and not create_pr and not revision.startswith("refs/"):
            step = f"creating branch {revision!r}"
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        step = "reading the current commit"
        before = api.repo_info(repo_id, revision=None if create_pr else revision).sha
        step = "uploading"
        log.info("uploading %d files from %s to %s", len(files), folder, repo_id)
        with _quiet_no_change_warning():
            info = api.upload_folder(
                repo_id=repo_id,
                folder_path=folder,
                allow_patterns=[glob.escape(f) for f in files],
                revision=revision,
                create_pr=create_pr,
                commit_message=message,
            )
        return info, before
    except ReshardError:
        raise
    except Exception as e:  # huggingface_hub raises many types; one line each
        log.debug("push failed while %s", step, exc_info=True)
        raise to_hub_error(e, repo_id, revision, upload=True) from e


class _DropNoChange(logging.Filter):
    """A rerun that finds everything uploaded is success, not a warning: PushResult.changed
    says so and the CLI prints one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "No files have been modified" not in record.getMessage()


@contextlib.contextmanager
def _quiet_no_change_warning():
    logger = logging.getLogger("huggingface_hub.hf_api")
    drop = _DropNoChange()
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


def _create_repo(api, repo_id: str, private: bool) -> None:
    from huggingface_hub import errors as hf

    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
    except hf.HfHubHTTPError as e:
        status = getattr(e.response, "status_code", None)
        if status == 403:  # create refused and the repo is not visible: a namespace problem
            namespace = repo_id.split("/")[0] if "/" in repo_id else "your user"
            raise HubError(
                f"{repo_id}: cannot create it: this token has no write access to "
                f"namespace {namespace!r} (403); check the repo id, or use a token "
                "with write permission there"
            ) from e
        raise


def push_after_split(folder: Path, repo_id: str, **options) -> PushResult:
    """``split --push-to``: push a just-written folder; on failure say how to retry, since
    the folder itself is complete and verified.

    Raises:
        ReshardError: the push failed (same type as ``push_folder``'s, with the retry hint).
    """
    try:
        return push_folder(folder, repo_id, **options)
    except ReshardError as e:
        raise type(e)(
            f"{e} (the resharded folder {folder} is complete; retry the upload with "
            f"`{retry_command(folder, repo_id, **options)}`)"
        ) from e


def retry_command(
    folder: Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    create_pr: bool = False,
    commit_message: str | None = None,
    token: str | None = None,
) -> str:
    """The ``reshard push`` command that repeats a push, shell-quoted (the token is left
    out: it is found again the same way).

    >>> retry_command(Path("my out"), "me/m", revision="2GB", commit_message="2 GB shards")
    "reshard push 'my out' me/m --revision 2GB --commit-message '2 GB shards'"
    """
    args = ["reshard", "push", str(folder), repo_id]
    if private:
        args.append("--private")
    if revision:
        args += ["--revision", revision]
    if create_pr:
        args.append("--create-pr")
    if commit_message:
        args += ["--commit-message", commit_message]
    return shlex.join(args)


def describe(result: PushResult) -> str:
    """One line for the terminal.

    >>> describe(PushResult("me/m", "https://hf.co/me/m/commit/abc", "abc", None, "main", ("a",), False))
    'pushed 1 files to me/m (main): https://hf.co/me/m/commit/abc'
    """
    if not result.changed:
        return f"{result.repo_id} ({result.revision}) already has these {len(result.files)} files; nothing uploaded: {result.url}"
    if result.pr_url:
        return f"opened a pull request on {result.repo_id} with {len(result.files)} files: {result.pr_url}"
    return f"pushed {len(result.files)} files to {result.repo_id} ({result.revision}): {result.url}"
