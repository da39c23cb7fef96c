"""A small in-process Hugging Face Hub for offline tests.

It speaks the part of the Hub HTTP protocol that huggingface_hub 2.4.0 uses for uploads
(create repo, validate-yaml, create branch, preupload, LFS batch + PUT, ndjson commit) and
for downloads (model info, tree listing, ``resolve`` with ETag / X-Repo-Commit / Range),
with the Hub's error headers (``X-Error-Code``: RepoNotFound, GatedRepo, RevisionNotFound,
EntryNotFound). State lives in memory so tests can assert on the bytes the server stored
and on every request it received.

Example::

    with HubServer(tokens={"hf_good": "me"}) as hub:
        env = hub.env()          # HF_ENDPOINT etc. for a reshard subprocess
        ... run the CLI ...
        hub.files("me/model")    # {path: bytes} at main

Run the client with ``HF_HUB_DISABLE_XET=1``: xet uploads go to a separate storage service.

For streaming downloads (``split --no-cache``) it also has what a real link does to range
requests, on demand: a bandwidth cap shared by all connections (``state.bandwidth``),
injected faults (``state.inject``: a connection cut half-way through a range, a burst of
503s, a 429 with ``Retry-After``, a range held half-way until the test calls
``state.release()``), and a corrupted byte behind an unchanged published
sha256 (``state.corrupt``). File bodies are sent outside the state lock, so several
ranges really are served at once; large files can be served from disk (``add_repo`` takes
``Path`` values, mapped into memory).
"""

from __future__ import annotations

import base64
import hashlib
import json
import mmap
import re
import socket
import threading
import time
from dataclasses import dataclass, field
from functools import cached_property
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

# Files the Hub's default .gitattributes sends to LFS; anything of 10 MB or more too.
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack", ".onnx", ".model", ".gguf")
LFS_MIN_SIZE = 10 * 1024 * 1024


def git_blob_sha1(data: bytes) -> str:
    """The git blob id the Hub reports for a regular file (and ETag of its resolve URL)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


@dataclass
class StoredFile:
    """One file in one commit: its bytes (or a read-only map of a file on disk) and
    whether the Hub keeps it in LFS."""

    data: bytes | mmap.mmap
    lfs: bool

    @cached_property  # hashing a stored shard on every request would bill the server's time to the client
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @cached_property
    def oid(self) -> str:
        """What preupload answers as ``oid``: sha256 for LFS files, git sha1 otherwise."""
        return self.sha256 if self.lfs else git_blob_sha1(self.data)

    @cached_property
    def blob_id(self) -> str:
        return (
            git_blob_sha1(lfs_pointer(self.sha256, len(self.data))) if self.lfs else git_blob_sha1(self.data)
        )


@dataclass
class Repo:
    repo_id: str
    private: bool = False
    gated: bool = False
    refs: dict[str, str] = field(default_factory=dict)  # branch or refs/pr/N -> commit
    commits: dict[str, dict[str, StoredFile]] = field(default_factory=dict)
    commit_messages: dict[str, str] = field(default_factory=dict)
    pr_count: int = 0


@dataclass
class Fault:
    """Answer the next ``times`` range GETs of a file whose path ends with ``path`` and
    whose range starts at or after ``min_start`` with: ``"cut"`` (half the body, then the
    connection is closed), ``"hold"`` (half the body, then nothing more until
    ``HubState.release()``, so a test knows a download is still under way), ``"503"`` or
    ``"429"`` (with ``Retry-After: 1``)."""

    kind: str
    path: str
    times: int = 1
    min_start: int = 0


@dataclass(frozen=True)
class Logged:
    """One request as the server saw it."""

    method: str
    path: str
    range: str | None
    body_bytes: int
    sent_bytes: int
    status: int


class _RateLimited(Exception):
    """Answer 429 with Retry-After (an injected fault)."""


class HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


class HubState:
    """Everything the fake Hub knows; all access under one lock."""

    def __init__(self, tokens: dict[str, str] | None = None):
        self.tokens = dict(tokens or {})  # token -> user name (write access to that namespace)
        self.repos: dict[str, Repo] = {}
        self.lfs: dict[str, bytes] = {}  # sha256 -> bytes, shared across repos like S3
        self.log: list[Logged] = []
        self.lock = threading.RLock()
        self.fail_commits = 0  # answer the next N commits with a 500
        self.fail_put_oids: set[str] = set()  # refuse LFS PUTs of these sha256 (403, not retried)
        self.endpoint = ""
        self.faults: list[Fault] = []
        self.bandwidth: int | None = None  # bytes/s of file bodies, all connections together
        self._sent_at = 0.0  # the bandwidth cap's clock: when the last byte sent may leave
        self._clock = threading.Lock()
        self.released = threading.Event()  # lets "hold" faults go on

    def release(self) -> None:
        """Let every held range (a ``"hold"`` fault) send the rest of its body."""
        self.released.set()

    def inject(self, kind: str, path: str, times: int = 1, min_start: int = 0) -> Fault:
        """Queue a fault (see ``Fault``) for range requests of ``path``."""
        if kind not in ("cut", "hold", "503", "429"):
            raise ValueError(f"unknown fault {kind!r}")
        with self.lock:
            fault = Fault(kind, path, times, min_start)
            self.faults.append(fault)
            return fault

    def corrupt(self, repo_id: str, path: str, offset: int, revision: str = "main") -> None:
        """Flip one byte of a stored file; the sha256 the Hub publishes stays the old one."""
        with self.lock:
            repo = self.repos[repo_id]
            f = repo.commits[self._resolve(repo, revision)][path]
            published = f.sha256, f.blob_id
            data = bytearray(f.data)
            data[offset] ^= 0xFF
            f.data = bytes(data)
            f.__dict__["sha256"], f.__dict__["blob_id"] = published

    def sent_bytes(self, contains: str = "", method: str = "GET") -> int:
        """Body bytes sent for requests whose path contains ``contains``."""
        return sum(r.sent_bytes for r in self.requests(method, contains))

    def _take_fault(self, path: str, start: int) -> Fault | None:
        with self.lock:
            for fault in self.faults:
                if fault.times > 0 and path.endswith(fault.path) and start >= fault.min_start:
                    fault.times -= 1
                    return fault
        return None

    def _throttle(self, nbytes: int) -> None:
        """Sleep until ``nbytes`` more may leave under the bandwidth cap."""
        if not self.bandwidth:
            return
        with self._clock:
            now = time.monotonic()
            self._sent_at = max(self._sent_at, now) + nbytes / self.bandwidth
            wait = self._sent_at - now
        if wait > 0:
            time.sleep(wait)

    # -- helpers for tests ---------------------------------------------------------------
    def add_repo(
        self,
        repo_id: str,
        files: dict[str, bytes],
        *,
        private: bool = False,
        gated: bool = False,
        branch: str = "main",
    ) -> str:
        """Create a repo holding ``files`` in one commit on ``branch``; returns the commit."""
        with self.lock:
            repo = self.repos.setdefault(repo_id, Repo(repo_id, private, gated))
            repo.private, repo.gated = private, gated
            data = {p: _mapped(d) if isinstance(d, Path) else d for p, d in files.items()}
            stored = {p: StoredFile(d, _is_lfs(p, len(d))) for p, d in data.items()}
            for f in stored.values():
                if f.lfs:
                    self.lfs[f.sha256] = f.data
            return self._new_commit(repo, branch, stored, "initial commit")

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        """``{path: bytes}`` of a repo at a branch, PR ref or commit."""
        with self.lock:
            repo = self.repos[repo_id]
            return {p: f.data for p, f in repo.commits[self._resolve(repo, revision)].items()}

    def requests(self, method: str | None = None, contains: str = "") -> list[Logged]:
        with self.lock:
            return [r for r in self.log if (method is None or r.method == method) and contains in r.path]

    # -- internals ------------------------------------------------------------------------
    def _new_commit(self, repo: Repo, ref: str, files: dict[str, StoredFile], message: str) -> str:
        parent = repo.refs.get(ref, "")
        digest = hashlib.sha1(f"{parent}\n{message}\n{len(repo.commits)}".encode())
        for path in sorted(files):
            digest.update(f"{path}:{files[path].oid}\n".encode())
        sha = digest.hexdigest()
        repo.commits[sha] = files
        repo.commit_messages[sha] = message
        repo.refs[ref] = sha
        return sha

    def _resolve(self, repo: Repo, revision: str) -> str:
        if revision in repo.refs:
            return repo.refs[revision]
        if revision in repo.commits:
            return revision
        raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")


def _mapped(path: Path) -> mmap.mmap | bytes:
    """A large file served from disk without reading it into memory."""
    with open(path, "rb") as f:
        if f.seek(0, 2) == 0:
            return b""
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)


def _is_lfs(path: str, size: int) -> bool:
    return path.endswith(LFS_SUFFIXES) or size >= LFS_MIN_SIZE


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, *args) -> None:  # keep pytest output clean
        pass

    # One entry point per method; the router raises HubError for Hub-style failures.
    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def _dispatch(self, method: str) -> None:
        state = self.server.state
        url = urlsplit(self.path)
        self.query = parse_qs(url.query)
        self.body = self._read_body()
        self.sent = 0
        status = 500
        try:
            status = self._route(method, url.path)
        except _RateLimited:
            status = 429
            self._send(429, {"error": "rate limited (injected by the test)"}, {"Retry-After": "1"})
        except HubError as e:
            status = e.status
            headers = {"X-Error-Message": e.message}
            if e.code:
                headers["X-Error-Code"] = e.code
            self._send(e.status, {"error": e.message}, headers)
        except Exception as e:  # a bug in this server: answer, so the client does not hang
            self._send(500, {"error": f"test hub server bug: {e!r}"})
            raise
        finally:
            with state.lock:
                state.log.append(
                    Logged(method, url.path, self.headers.get("Range"), len(self.body), self.sent, status)
                )

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    self.rfile.readline()
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(
        self,
        status: int,
        body: dict | list | bytes | None,
        headers: dict | None = None,
        head_only: bool = False,
        length: int | None = None,
    ) -> int:
        data = body if isinstance(body, bytes) else json.dumps(body).encode() if body is not None else b""
        self.send_response(status)
        if not isinstance(body, bytes):
            self.send_header("Content-Type", "application/json")
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(data) if length is None else length))
        self.end_headers()
        if not head_only and self.command != "HEAD":  # a HEAD answer never has a body
            self.wfile.write(data)
            self.sent += len(data)
        return status

    # -- auth -----------------------------------------------------------------------------
    def _user(self) -> str | None:
        auth = self.headers.get("Authorization", "")
        if not auth:
            return None
        token = auth.removeprefix("Bearer ").strip()
        user = self.server.state.tokens.get(token)
        if user is None:
            raise HubError(401, "Invalid credentials in Authorization header")
        return user

    def _repo_for_read(self, repo_id: str) -> Repo:
        user = self._user()
        repo = self.server.state.repos.get(repo_id)
        if repo is None or (repo.private and user != repo_id.split("/")[0]):
            raise HubError(401 if user is None else 404, "Repository not found", "RepoNotFound")
        if repo.gated and user is None:
            raise HubError(401, "Access to model is restricted; you must be authenticated", "GatedRepo")
        return repo

    def _repo_for_write(self, repo_id: str) -> Repo:
        user = self._user()
        if user is None:
            raise HubError(401, "You must be authenticated to write")
        repo = self._repo_for_read(repo_id)
        if repo_id.split("/")[0] != user:
            raise HubError(403, f"You don't have write access to {repo_id}")
        return repo

    # -- routing --------------------------------------------------------------------------
    ROUTES = [
        ("POST", r"/api/repos/create", "create_repo"),
        ("POST", r"/api/validate-yaml", "validate_yaml"),
        ("GET", r"/api/whoami-v2", "whoami"),
        ("GET", r"/api/models/(?P<repo>[^/]+/[^/]+)(?:/revision/(?P<rev>[^/]+))?", "model_info"),
        ("GET", r"/api/models/(?P<repo>[^/]+/[^/]+)/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?", "tree"),
        ("POST", r"/api/models/(?P<repo>[^/]+/[^/]+)/preupload/(?P<rev>[^/]+)", "preupload"),
        ("POST", r"/api/models/(?P<repo>[^/]+/[^/]+)/commit/(?P<rev>[^/]+)", "commit"),
        ("POST", r"/api/models/(?P<repo>[^/]+/[^/]+)/branch/(?P<branch>[^/]+)", "create_branch"),
        ("POST", r"/(?P<repo>[^/]+/[^/]+)\.git/info/lfs/objects/batch", "lfs_batch"),
        ("PUT", r"/lfs-upload/(?P<oid>[0-9a-f]{64})", "lfs_put"),
        ("GET", r"/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)", "resolve"),
        ("HEAD", r"/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)", "resolve"),
    ]

    def _route(self, method: str, path: str) -> int:
        for m, pattern, name in self.ROUTES:
            match = re.fullmatch(pattern, path)
            if m == method and match:
                args = {k: unquote(v) for k, v in match.groupdict().items() if v is not None}
                with self.server.state.lock:
                    answer = getattr(self, "h_" + name)(**args)
                # A file body is sent outside the lock (several downloads at once).
                return answer() if callable(answer) else answer
        raise HubError(404, f"no route for {method} {path}")

    def _json(self) -> dict:
        return json.loads(self.body or b"{}")

    def h_whoami(self) -> int:
        user = self._user()
        if user is None:
            raise HubError(401, "Invalid username or password.")
        return self._send(200, {"type": "user", "name": user, "orgs": []})

    def h_create_repo(self) -> int:
        state = self.server.state
        user = self._user()
        payload = self._json()
        repo_id = f"{payload.get('organization') or user}/{payload['name']}"
        if user is None:
            raise HubError(401, "You must be authenticated to create a repo")
        if repo_id.split("/")[0] != user:
            raise HubError(
                403,
                f'You don\'t have the rights to create a model under the namespace "{repo_id.split("/")[0]}"',
            )
        url = f"{state.endpoint}/{repo_id}"
        if repo_id in state.repos:
            return self._send(409, {"error": "You already created this model repo", "url": url})
        repo = state.repos[repo_id] = Repo(repo_id, private=payload.get("visibility") == "private")
        state._new_commit(
            repo,
            "main",
            {".gitattributes": StoredFile(b"*.safetensors filter=lfs\n", False)},
            "initial commit",
        )
        return self._send(200, {"url": url, "name": repo_id})

    def h_validate_yaml(self) -> int:
        import yaml

        content = self._json().get("content", "")
        match = re.match(r"^---\n(.*?)\n---\n", content, re.S)
        try:
            meta = yaml.safe_load(match.group(1)) if match else {}
            if not isinstance(meta, dict):
                raise ValueError("metadata must be a mapping")
        except Exception as e:
            return self._send(400, {"errors": [{"message": f"invalid YAML: {e}"}]})
        warnings = [] if meta else [{"message": "empty or missing yaml metadata in repo card"}]
        return self._send(200, {"errors": [], "warnings": warnings})

    def h_model_info(self, repo: str, rev: str = "main") -> int:
        r = self._repo_for_read(repo)
        sha = self.server.state._resolve(r, rev)
        blobs = "blobs" in self.query
        siblings = []
        for path, f in sorted(r.commits[sha].items()):
            entry: dict = {"rfilename": path}
            if blobs:
                entry.update(size=len(f.data), blobId=f.blob_id)
                if f.lfs:
                    entry["lfs"] = {"size": len(f.data), "sha256": f.sha256, "pointerSize": 134}
            siblings.append(entry)
        return self._send(
            200,
            {
                "id": repo,
                "modelId": repo,
                "sha": sha,
                "private": r.private,
                "gated": "auto" if r.gated else False,
                "disabled": False,
                "siblings": siblings,
                "tags": [],
            },
        )

    def h_tree(self, repo: str, rev: str, path: str = "") -> int:
        r = self._repo_for_read(repo)
        sha = self.server.state._resolve(r, rev)
        entries = []
        for p, f in sorted(r.commits[sha].items()):
            if path and not p.startswith(path.rstrip("/") + "/"):
                continue
            entry = {"type": "file", "path": p, "size": len(f.data), "oid": f.blob_id}
            if f.lfs:
                entry["lfs"] = {"oid": f.sha256, "size": len(f.data), "pointerSize": 134}
            entries.append(entry)
        return self._send(200, entries)

    def h_preupload(self, repo: str, rev: str) -> int:
        r = self._repo_for_write(repo)
        existing = r.commits[self.server.state._resolve(r, rev)]
        files = []
        for item in self._json()["files"]:
            lfs = _is_lfs(item["path"], item["size"])
            old = existing.get(item["path"])
            files.append(
                {
                    "path": item["path"],
                    "uploadMode": "lfs" if lfs else "regular",
                    "shouldIgnore": False,
                    "oid": old.oid if old is not None and old.lfs == lfs else None,
                }
            )
        return self._send(200, {"files": files, "commitOid": r.refs.get(rev)})

    def h_lfs_batch(self, repo: str) -> int:
        self._repo_for_write(repo)
        state = self.server.state
        objects = []
        for obj in self._json()["objects"]:
            entry = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
            if obj["oid"] not in state.lfs:  # present already: no actions, nothing to send
                entry["actions"] = {"upload": {"href": f"{state.endpoint}/lfs-upload/{obj['oid']}"}}
            objects.append(entry)
        return self._send(200, {"transfer": "basic", "objects": objects, "hash_algo": "sha256"})

    def h_lfs_put(self, oid: str) -> int:
        state = self.server.state
        if oid in state.fail_put_oids:
            raise HubError(403, "upload refused by the test (simulated interruption)")
        if hashlib.sha256(self.body).hexdigest() != oid:
            raise HubError(400, "sha256 of the uploaded body does not match the oid")
        state.lfs[oid] = self.body
        return self._send(200, None)

    def h_commit(self, repo: str, rev: str) -> int:
        state = self.server.state
        r = self._repo_for_write(repo)
        if state.fail_commits > 0:
            state.fail_commits -= 1
            raise HubError(500, "commit failed (simulated by the test)")
        create_pr = self.query.get("create_pr") == ["1"]
        base = state._resolve(r, rev)
        files = dict(r.commits[base])
        message = ""
        for line in self.body.splitlines():
            item = json.loads(line)
            value = item["value"]
            if item["key"] == "header":
                message = value["summary"]
            elif item["key"] == "file":
                files[value["path"]] = StoredFile(base64.b64decode(value["content"]), False)
            elif item["key"] == "lfsFile":
                if value["oid"] not in state.lfs:
                    raise HubError(422, f"LFS object {value['oid']} for {value['path']} was never uploaded")
                stored = files[value["path"]] = StoredFile(state.lfs[value["oid"]], True)
                stored.__dict__["sha256"] = value["oid"]  # verified at PUT time
            elif item["key"] == "deletedFile":
                files.pop(value["path"], None)
        if create_pr:
            r.pr_count += 1
            ref = f"refs/pr/{r.pr_count}"
            r.refs[ref] = base
            sha = state._new_commit(r, ref, files, message)
            pr_url = f"{state.endpoint}/{repo}/discussions/{r.pr_count}"
        else:
            sha = state._new_commit(r, rev, files, message)
            pr_url = None
        return self._send(
            200,
            {
                "success": True,
                "commitOid": sha,
                "pullRequestUrl": pr_url,
                "commitUrl": f"{state.endpoint}/{repo}/commit/{sha}",
            },
        )

    def h_create_branch(self, repo: str, branch: str) -> int:
        state = self.server.state
        r = self._repo_for_write(repo)
        if branch in r.refs:
            raise HubError(409, f"Reference refs/heads/{branch} already exists")
        start = self._json().get("startingPoint") or "main"
        r.refs[branch] = state._resolve(r, start)
        return self._send(200, {})

    def h_resolve(self, repo: str, rev: str, path: str) -> int:
        state = self.server.state
        r = self._repo_for_read(repo)
        sha = state._resolve(r, rev)
        f = r.commits[sha].get(path)
        if f is None:
            raise HubError(404, "Entry not found", "EntryNotFound")
        data = f.data
        headers = {
            "X-Repo-Commit": sha,
            "ETag": f'"{f.sha256 if f.lfs else git_blob_sha1(data)}"',
            "Accept-Ranges": "bytes",
        }
        if f.lfs:
            headers.update({"X-Linked-Size": str(len(data)), "X-Linked-Etag": f'"{f.sha256}"'})
        status = 200
        wanted = self.headers.get("Range")
        if wanted:
            match = re.fullmatch(r"bytes=(\d*)-(\d*)", wanted.strip())
            if not match:
                raise HubError(416, f"bad range {wanted}")
            start = int(match.group(1) or 0)
            end = min(int(match.group(2)) if match.group(2) else len(data) - 1, len(data) - 1)
            if start >= len(data):
                raise HubError(416, f"range {wanted} starts beyond {len(data)} bytes")
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
            if self.command == "HEAD":
                return self._send(206, b"", headers, head_only=True, length=end + 1 - start)
            fault = state._take_fault(path, start)
            if fault is not None and fault.kind == "503":
                raise HubError(503, "Service Unavailable (injected by the test)")
            if fault is not None and fault.kind == "429":
                raise _RateLimited()
            return lambda: self._send_body(206, data, start, end + 1, headers, fault and fault.kind)
        if self.command == "HEAD":
            return self._send(status, b"", headers, head_only=True, length=len(data))
        return lambda: self._send_body(status, data, 0, len(data), headers, None)

    def _send_body(self, status: int, data, start: int, end: int, headers: dict, fault: str | None) -> int:
        """``data[start:end]`` in blocks, under the bandwidth cap; a ``"cut"`` fault stops
        half-way and drops the connection, as a broken link does; a ``"hold"`` fault waits
        half-way until the test releases it (a minute at most, so nothing hangs)."""
        state = self.server.state
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(end - start))
        self.end_headers()
        cut = fault == "cut"
        half = start + (end - start) // 2
        stop = half if cut else end
        block = 256 * 1024
        try:
            at = start
            while at < stop:
                if fault == "hold" and at >= half:
                    self.wfile.flush()
                    state.released.wait(60)
                    fault = None
                upto = min(at + block, half if fault == "hold" else stop)
                piece = data[at:upto]
                state._throttle(len(piece))
                self.wfile.write(piece)
                self.sent += len(piece)
                at = upto
        except (BrokenPipeError, ConnectionResetError):  # the client went away (a cancelled run)
            self.close_connection = True
            return status
        if cut:
            self.wfile.flush()
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        return status


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    state: HubState

    def handle_error(self, request, client_address) -> None:
        import sys

        if isinstance(sys.exc_info()[1], (ConnectionResetError, BrokenPipeError)):
            return  # a client that went away (a cut, a cancelled run) is not a server bug
        super().handle_error(request, client_address)


class HubServer:
    """Run a fake Hub on 127.0.0.1 (a free port) in a background thread."""

    def __init__(self, tokens: dict[str, str] | None = None):
        self.state = HubState(tokens)
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.state = self.state
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        self.state.endpoint = self.endpoint
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> HubServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.state.release()
        self._server.shutdown()
        self._server.server_close()

    def env(self, hf_home: str, token: str | None = None) -> dict[str, str]:
        """Environment for a client subprocess talking to this server only."""
        env = {
            "HF_ENDPOINT": self.endpoint,
            "HF_HOME": hf_home,
            "HF_HUB_DISABLE_XET": "1",
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "HF_HUB_DISABLE_PROGRESS_BARS": "1",
            "HF_HUB_OFFLINE": "0",
            "HF_TOKEN_PATH": f"{hf_home}/token",
            "NO_PROXY": "127.0.0.1",
            "no_proxy": "127.0.0.1",
            # An empty HF_TOKEN reads as "no token" (huggingface_hub strips it to None).
            "HF_TOKEN": token or "",
        }
        return env

    # Shortcuts to the state.
    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        return self.state.files(repo_id, revision)

    def requests(self, method: str | None = None, contains: str = "") -> list[Logged]:
        return self.state.requests(method, contains)

    def add_repo(self, repo_id: str, files: dict[str, bytes], **kwargs) -> str:
        return self.state.add_repo(repo_id, files, **kwargs)
