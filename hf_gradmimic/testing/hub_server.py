"""A loopback test double of the Hugging Face Hub HTTP API.

The real ``huggingface_hub``, ``datasets`` and ``transformers`` clients talk to it when
``HF_ENDPOINT`` points at it (set ``HF_HUB_DISABLE_XET=1`` too: uploads must use the plain LFS
protocol, Xet storage is not emulated). It serves on 127.0.0.1 only and keeps its data in a
directory: content-addressed blobs in ``objects/`` and repos, branches and commits in
``state.json``, so a server restarted on the same directory keeps its repos.

    with HubServer() as hub:          # or: python -m hf_gradmimic.testing.hub_server --port 8080
        os.environ["HF_ENDPOINT"] = hub.url

Endpoints (``{type}`` is ``models`` or ``datasets``, ``{repo}`` is ``namespace/name``,
``{rev}`` a branch name or a 40-hex commit sha, URL-quoted as the clients send it):

    GET    /api/whoami-v2                         the user owning the bearer token
    POST   /api/repos/create                      {"name", "organization", "type", "private"}; 409 if it exists
    DELETE /api/repos/delete                      {"name", "organization", "type"}
    POST   /api/validate-yaml                     {"content"}: the README front matter must be a YAML mapping
    GET    /api/{type}/{repo}                     repo info at ``main`` (sha, siblings with size and LFS data)
    GET    /api/{type}/{repo}/revision/{rev}      repo info at a revision
    GET    /api/{type}/{repo}/refs                branches (tags, converts and PRs are always empty)
    GET    /api/{type}/{repo}/tree/{rev}[/{path}] folder listing; ``?recursive=true`` lists the whole subtree
    POST   /api/{type}/{repo}/paths-info/{rev}    form ``paths=...``: info on existing paths only
    POST   /api/{type}/{repo}/preupload/{rev}     upload mode per file: ``lfs`` for paths matching the LFS
                                                  patterns of the repo's .gitattributes (Parquet, .safetensors,
                                                  .bin, ...), binary samples and files >= 10 MB; else ``regular``
    POST   /api/{type}/{repo}/commit/{branch}     NDJSON: ``header`` (summary, description, parentCommit ->
                                                  412 if stale), ``file`` (base64 inline), ``lfsFile`` (an
                                                  uploaded object, by sha256 oid), ``deletedFile``, ``deletedFolder``
    POST   /api/{type}/{repo}/branch/{branch}     create a branch at ``startingPoint`` (default ``main``)
    POST   /[datasets/]{repo}.git/info/lfs/objects/batch
                                                  LFS batch API, ``upload`` operation, ``basic`` transfer: objects
                                                  not stored yet get an upload href
    PUT    /lfs-objects/{sha256}                  the upload href; the body must hash to the oid
    HEAD   /[datasets/]{repo}/resolve/{rev}/{path}
    GET    /[datasets/]{repo}/resolve/{rev}/{path}
                                                  file content, 200 directly (the real Hub redirects LFS files to a
                                                  CDN), ``Range: bytes=`` -> 206; headers X-Repo-Commit, ETag (git
                                                  blob sha1, or sha256 for LFS files), X-Linked-Etag and
                                                  X-Linked-Size for LFS files, Content-Length, Accept-Ranges

Errors answer ``{"error": message}`` with the ``X-Error-Message`` header and, where the clients
map them to exceptions, ``X-Error-Code``: ``RepoNotFound`` (404), ``RevisionNotFound`` (404),
``EntryNotFound`` (404, with X-Repo-Commit). A bearer token that is not a known one gets 401
"Invalid credentials in Authorization header"; anonymous requests may read public repos only.

Test hooks: ``HubServer.requests`` logs every ``(method, unquoted path)``;
``HubServer.fail_next(path_regex, status=500)`` makes the next matching request fail.
Not emulated: Xet, pull requests, tags, Spaces, multipart LFS uploads, pagination (listings come in
one page), commit listing.
"""

from __future__ import annotations

import argparse
import base64
import fnmatch
import hashlib
import json
import re
import signal
import socket
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from ..fileio import atomic_write, write_json

DEFAULT_TOKEN = "hf_test_token"
DEFAULT_USER = "test-user"
INVALID_CREDENTIALS = "Invalid credentials in Authorization header"
LFS_SIZE_THRESHOLD = 10 * 1024 * 1024

# An excerpt of the .gitattributes the real Hub commits into every new repo: it is what makes
# the Hub answer "lfs" at preupload for weights and data files.
DEFAULT_GITATTRIBUTES = "".join(
    f"{pattern} filter=lfs diff=lfs merge=lfs -text\n"
    for pattern in (
        "*.7z *.arrow *.bin *.bz2 *.ckpt *.gz *.h5 *.joblib *.model *.msgpack *.npy *.npz *.onnx"
        " *.parquet *.pb *.pickle *.pkl *.pt *.pth *.safetensors *.tar *.tflite *.tgz *.xz *.zip"
        " *.zst *tfevents*"
    ).split()
)

_TYPE_SEGMENTS = {"models": "model", "datasets": "dataset"}
_REPO = r"(?P<repo>[^/]+/[^/]+)"
_API_REPO = rf"/api/(?P<type>models|datasets)/{_REPO}"
_GIT_REPO = rf"/(?:(?P<type>datasets)/)?{_REPO}"


class HubError(Exception):
    """An error answer: status, message, and the X-Error-Code the clients map to exceptions."""

    def __init__(self, status: int, message: str, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code
        self.headers = headers or {}


# ----------------------------------------------------------------------------------------------
# Storage
# ----------------------------------------------------------------------------------------------


@dataclass
class Commit:
    oid: str
    title: str
    date: str
    parent: str | None
    # path -> {"sha256", "size", "lfs", "oid" (git blob sha1), "commit" (last commit changing it)}
    files: dict[str, dict[str, Any]]


@dataclass
class Repo:
    type: str
    id: str
    private: bool
    created_at: str
    branches: dict[str, str] = field(default_factory=dict)
    commits: dict[str, Commit] = field(default_factory=dict)

    def resolve(self, revision: str) -> Commit:
        revision = revision.removeprefix("refs/heads/")
        oid = self.branches.get(revision, revision)
        if oid not in self.commits:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return self.commits[oid]


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _git_blob_oid(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def _lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


class HubStore:
    """Repos, branches and commits (``state.json``) and content-addressed blobs (``objects/``)."""

    def __init__(self, root: Path):
        self.root = root
        self.objects = root / "objects"
        self.objects.mkdir(parents=True, exist_ok=True)
        self.lock = threading.RLock()
        self.repos: dict[str, Repo] = {}
        state = root / "state.json"
        if state.exists():
            for key, raw in json.loads(state.read_text()).items():
                commits = {oid: Commit(**c) for oid, c in raw.pop("commits").items()}
                self.repos[key] = Repo(**raw, commits=commits)

    def save(self) -> None:
        write_json(self.root / "state.json", {key: asdict(repo) for key, repo in self.repos.items()}, indent=None)

    # Blobs -------------------------------------------------------------------------------------

    def put_object(self, content: bytes) -> str:
        sha256 = hashlib.sha256(content).hexdigest()
        target = self.objects / sha256
        if not target.exists():
            # Atomic, so that a concurrent reader never sees a partial blob.
            atomic_write(target, lambda tmp: Path(tmp).write_bytes(content))
        return sha256

    def object_path(self, sha256: str) -> Path:
        return self.objects / sha256

    def has_object(self, sha256: str) -> bool:
        return (self.objects / sha256).exists()

    # Repos -------------------------------------------------------------------------------------

    def get(self, repo_type: str, repo_id: str) -> Repo:
        repo = self.repos.get(f"{repo_type}/{repo_id}")
        if repo is None:
            raise HubError(404, "Repository not found", "RepoNotFound")
        return repo

    def create(self, repo_type: str, repo_id: str, private: bool) -> Repo:
        with self.lock:
            if f"{repo_type}/{repo_id}" in self.repos:
                raise HubError(409, f"You already created this {repo_type} repo")
            repo = Repo(type=repo_type, id=repo_id, private=private, created_at=_now())
            self.repos[f"{repo_type}/{repo_id}"] = repo
            # Like the real Hub: an initial commit holding .gitattributes, so `main` exists at once.
            self.commit(
                repo,
                "main",
                "initial commit",
                [
                    {
                        "key": "file",
                        "value": {"path": ".gitattributes", "content": DEFAULT_GITATTRIBUTES, "encoding": "utf-8"},
                    }
                ],
            )
            return repo

    def delete(self, repo_type: str, repo_id: str) -> None:
        with self.lock:
            self.get(repo_type, repo_id)
            del self.repos[f"{repo_type}/{repo_id}"]
            self.save()

    def commit(
        self, repo: Repo, branch: str, title: str, operations: list[dict[str, Any]], parent_commit: str | None = None
    ) -> Commit:
        with self.lock:
            if branch not in repo.branches and repo.commits:
                raise HubError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
            parent = repo.branches.get(branch)
            if parent_commit and not (parent or "").startswith(parent_commit):
                raise HubError(412, "A commit has happened since. Please refresh and try again.")
            oid = hashlib.sha1(f"{parent}\n{title}\n{time.time_ns()}\n{uuid.uuid4()}".encode()).hexdigest()
            files = dict(repo.commits[parent].files) if parent else {}
            for op in operations:
                self._apply(files, op, oid)
            repo.commits[oid] = Commit(oid=oid, title=title, date=_now(), parent=parent, files=files)
            repo.branches[branch] = oid
            self.save()
            return repo.commits[oid]

    def _apply(self, files: dict[str, dict[str, Any]], op: dict[str, Any], commit_oid: str) -> None:
        key, value = op.get("key"), op.get("value") or {}
        path = str(value.get("path", "")).strip("/")
        if key == "file":
            raw = value.get("content", "")
            content = base64.b64decode(raw) if value.get("encoding") == "base64" else raw.encode()
            files[path] = {
                "sha256": self.put_object(content),
                "size": len(content),
                "lfs": False,
                "oid": _git_blob_oid(content),
                "commit": commit_oid,
            }
        elif key == "lfsFile":
            sha256 = str(value.get("oid", ""))
            if not re.fullmatch(r"[0-9a-f]{64}", sha256) or not self.has_object(sha256):
                raise HubError(
                    400,
                    f"Your push was rejected because an LFS pointer pointed to a file that "
                    f"does not exist: {path} ({sha256})",
                )
            size = self.object_path(sha256).stat().st_size
            files[path] = {
                "sha256": sha256,
                "size": size,
                "lfs": True,
                "oid": _git_blob_oid(_lfs_pointer(sha256, size)),
                "commit": commit_oid,
            }
        elif key == "deletedFile":
            if files.pop(path, None) is None:
                raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
        elif key == "deletedFolder":
            doomed = [p for p in files if p.startswith(path + "/")]
            if not doomed:
                raise HubError(404, f"A folder with this name doesn't exist: {path}", "EntryNotFound")
            for p in doomed:
                del files[p]
        else:
            raise HubError(400, f"Unsupported commit operation: {key!r}")


# ----------------------------------------------------------------------------------------------
# JSON views of the storage
# ----------------------------------------------------------------------------------------------


def _file_info(path: str, entry: dict[str, Any], repo: Repo, expand: bool) -> dict[str, Any]:
    info: dict[str, Any] = {"type": "file", "path": path, "size": entry["size"], "oid": entry["oid"]}
    if entry["lfs"]:
        pointer_size = len(_lfs_pointer(entry["sha256"], entry["size"]))
        info["lfs"] = {"oid": entry["sha256"], "size": entry["size"], "pointerSize": pointer_size}
    if expand:
        last = repo.commits[entry["commit"]]
        info["lastCommit"] = {"id": last.oid, "title": last.title, "date": last.date}
    return info


def _folder_info(path: str, commit: Commit) -> dict[str, Any]:
    # Not a real git tree id, but stable for a given content, which is all clients compare.
    content = "".join(f"{p}:{e['oid']}\n" for p, e in sorted(commit.files.items()) if p.startswith(path + "/"))
    return {"type": "directory", "path": path, "oid": hashlib.sha1(content.encode()).hexdigest()}


def _folders(commit: Commit) -> set[str]:
    return {parent for path in commit.files for parent in _parents(path)}


def _parents(path: str) -> list[str]:
    parts = path.split("/")[:-1]
    return ["/".join(parts[: i + 1]) for i in range(len(parts))]


def _repo_info(repo: Repo, commit: Commit) -> dict[str, Any]:
    siblings = []
    for path, entry in sorted(commit.files.items()):
        sibling: dict[str, Any] = {"rfilename": path, "size": entry["size"], "blobId": entry["oid"]}
        if entry["lfs"]:
            pointer_size = len(_lfs_pointer(entry["sha256"], entry["size"]))
            sibling["lfs"] = {"size": entry["size"], "sha256": entry["sha256"], "pointerSize": pointer_size}
        siblings.append(sibling)
    return {
        "_id": hashlib.sha1(f"{repo.type}/{repo.id}".encode()).hexdigest()[:24],
        "id": repo.id,
        "author": repo.id.split("/")[0],
        "sha": commit.oid,
        "private": repo.private,
        "gated": False,
        "disabled": False,
        "createdAt": repo.created_at,
        "lastModified": commit.date,
        "downloads": 0,
        "likes": 0,
        "tags": [],
        "siblings": siblings,
    }


def _is_lfs(path: str, size: int, sample: bytes, gitattributes: str) -> bool:
    if size >= LFS_SIZE_THRESHOLD or b"\0" in sample:
        return True
    for line in gitattributes.splitlines():
        pattern, *attributes = line.split() or ["#"]
        if not pattern.startswith("#") and "filter=lfs" in attributes:
            target = path if "/" in pattern else path.rsplit("/", 1)[-1]
            if fnmatch.fnmatchcase(target, pattern):
                return True
    return False


def _yaml_front_matter_error(content: str) -> str | None:
    match = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", content, re.DOTALL)
    if match is None:
        return None
    try:
        import yaml
    except ImportError:  # pragma: no cover - pyyaml comes with datasets and huggingface_hub
        return None
    try:
        data = yaml.safe_load(match.group(1))
    except yaml.YAMLError as err:
        return f"Invalid YAML in README.md metadata: {err}"
    if data is not None and not isinstance(data, dict):
        return "README.md metadata must be a YAML mapping"
    return None


# ----------------------------------------------------------------------------------------------
# HTTP
# ----------------------------------------------------------------------------------------------


@dataclass
class Response:
    status: int = 200
    json_body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    # (blob path, first byte, length): streamed from disk instead of a JSON body
    file: tuple[Path, int, int] | None = None


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: Any
    body: bytes
    user: str | None
    match: re.Match[str]

    def json(self) -> Any:
        try:
            return json.loads(self.body or b"{}")
        except json.JSONDecodeError as err:
            raise HubError(400, f"Invalid JSON body: {err}") from err

    def repo_type(self) -> str:
        return _TYPE_SEGMENTS.get(self.match.group("type") or "models", "model")

    def arg(self, name: str) -> str:
        return unquote(self.match.group(name) or "")

    def flag(self, name: str) -> bool:
        return (self.query.get(name) or ["false"])[0].lower() in ("1", "true")


@dataclass
class _Fault:
    pattern: re.Pattern[str]
    status: int
    method: str | None
    times: int
    message: str


class HubServer:
    """The loopback Hub: ``start()``/``stop()`` or a context manager; ``url`` once started."""

    def __init__(
        self,
        storage_dir: str | Path | None = None,
        *,
        port: int = 0,
        tokens: dict[str, str] | None = None,
        verbose: bool = False,
    ):
        self._tmp = tempfile.TemporaryDirectory(prefix="hub-server-") if storage_dir is None else None
        self.storage_dir = Path(self._tmp.name if self._tmp else storage_dir)  # type: ignore[arg-type]
        self.store = HubStore(self.storage_dir)
        self.tokens = dict(tokens) if tokens is not None else {DEFAULT_TOKEN: DEFAULT_USER}
        self.port = port
        self.verbose = verbose
        self.requests: list[tuple[str, str]] = []
        self._faults: list[_Fault] = []
        self._faults_lock = threading.Lock()
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._routes = self.routes()

    @property
    def url(self) -> str:
        if self._httpd is None:
            raise RuntimeError("HubServer is not started")
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def start(self) -> HubServer:
        self._httpd = _HTTPServer(("127.0.0.1", self.port), _Handler)
        self._httpd.hub = self
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,), name="hub-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving; a temporary storage directory made by the server is removed."""
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd.close_connections()
            self._httpd = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def fail_next(
        self,
        path_regex: str,
        status: int = 500,
        *,
        method: str | None = None,
        times: int = 1,
        message: str = "Injected failure",
    ) -> None:
        """Answer ``status`` to the next ``times`` requests whose path matches ``path_regex`` (re.search)."""
        with self._faults_lock:
            self._faults.append(_Fault(re.compile(path_regex), status, method, times, message))

    def reset_log(self) -> None:
        """Forget the request log and pending injected faults (repos are kept)."""
        self.requests.clear()
        with self._faults_lock:
            self._faults.clear()

    def _take_fault(self, method: str, path: str) -> _Fault | None:
        with self._faults_lock:
            for fault in self._faults:
                if (fault.method in (None, method)) and fault.pattern.search(path):
                    fault.times -= 1
                    if fault.times <= 0:
                        self._faults.remove(fault)
                    return fault
        return None

    # Endpoint handlers -------------------------------------------------------------------------
    # Each takes the parsed request and returns a Response or raises HubError.

    def _readable_repo(self, req: Request) -> Repo:
        repo = self.store.get(req.repo_type(), req.arg("repo"))
        if repo.private and req.user is None:
            raise HubError(404, "Repository not found", "RepoNotFound")
        return repo

    def whoami(self, req: Request) -> Response:
        return Response(
            json_body={
                "type": "user",
                "id": hashlib.sha1(str(req.user).encode()).hexdigest()[:24],
                "name": req.user,
                "fullname": req.user,
                "email": None,
                "emailVerified": False,
                "isPro": False,
                "orgs": [],
                "auth": {"type": "access_token", "accessToken": {"displayName": "test token", "role": "write"}},
            }
        )

    def _repo_from_body(self, req: Request) -> tuple[str, str, dict[str, Any]]:
        payload = req.json()
        repo_type = payload.get("type") or "model"
        if repo_type not in ("model", "dataset"):
            raise HubError(400, f"This test server only hosts model and dataset repos, not {repo_type!r}")
        namespace = payload.get("organization") or req.user
        return repo_type, f"{namespace}/{payload.get('name')}", payload

    def create_repo(self, req: Request) -> Response:
        repo_type, repo_id, payload = self._repo_from_body(req)
        private = bool(payload.get("private")) or payload.get("visibility") == "private"
        prefix = "" if repo_type == "model" else f"{repo_type}s/"
        url = f"{self.url}/{prefix}{repo_id}"
        try:
            self.store.create(repo_type, repo_id, private)
        except HubError as err:
            if err.status != 409:
                raise
            # Like the Hub: the 409 names the existing repo, which `create_repo(exist_ok=True)` returns.
            return Response(409, {"error": err.message, "url": url}, {"X-Repo-Url": url})
        return Response(json_body={"url": url, "name": repo_id, "id": repo_id})

    def delete_repo(self, req: Request) -> Response:
        repo_type, repo_id, _ = self._repo_from_body(req)
        self.store.delete(repo_type, repo_id)
        return Response(json_body={})

    def validate_yaml(self, req: Request) -> Response:
        error = _yaml_front_matter_error(str(req.json().get("content", "")))
        if error is not None:
            return Response(400, {"errors": [{"message": error}], "warnings": []}, {"X-Error-Message": error})
        return Response(json_body={"errors": [], "warnings": []})

    def repo_info(self, req: Request) -> Response:
        repo = self._readable_repo(req)
        with self.store.lock:
            commit = repo.resolve(req.arg("rev") or "main")
            return Response(json_body=_repo_info(repo, commit))

    def refs(self, req: Request) -> Response:
        repo = self._readable_repo(req)
        with self.store.lock:
            branches = [
                {"name": name, "ref": f"refs/heads/{name}", "targetCommit": oid}
                for name, oid in sorted(repo.branches.items())
            ]
        body: dict[str, Any] = {"branches": branches, "converts": [], "tags": []}
        if req.flag("include_prs"):
            body["pullRequests"] = []
        return Response(json_body=body)

    def tree(self, req: Request) -> Response:
        repo = self._readable_repo(req)
        root, recursive, expand = req.arg("path").strip("/"), req.flag("recursive"), req.flag("expand")
        with self.store.lock:
            commit = repo.resolve(req.arg("rev"))
            folders = _folders(commit)
            if root and root not in folders:
                raise HubError(
                    404,
                    f"Path {root} does not exist or is not a folder",
                    "EntryNotFound",
                    {"X-Repo-Commit": commit.oid},
                )
            prefix = f"{root}/" if root else ""

            def listed(path: str) -> bool:
                return path.startswith(prefix) and (recursive or "/" not in path[len(prefix) :])

            entries = [_folder_info(p, commit) for p in sorted(folders) if listed(p)]
            entries += [_file_info(p, e, repo, expand) for p, e in sorted(commit.files.items()) if listed(p)]
        return Response(json_body=entries)

    def paths_info(self, req: Request) -> Response:
        repo = self._readable_repo(req)
        ctype = req.headers.get("Content-Type", "")
        form = req.json() if "json" in ctype else parse_qs(req.body.decode())
        paths, expand = form.get("paths", []), str(form.get("expand", ["false"])[0]).lower() == "true"
        with self.store.lock:
            commit = repo.resolve(req.arg("rev"))
            folders = _folders(commit)
            infos = []
            for path in (p.strip("/") for p in paths):
                if path in commit.files:
                    infos.append(_file_info(path, commit.files[path], repo, expand))
                elif path in folders:
                    infos.append(_folder_info(path, commit))
        return Response(json_body=infos)

    def preupload(self, req: Request) -> Response:
        repo = self._readable_repo(req)
        files = req.json().get("files", [])
        with self.store.lock:
            commit = repo.resolve(req.arg("rev"))
            attributes = commit.files.get(".gitattributes")
            gitattributes = (
                self.store.object_path(attributes["sha256"]).read_text() if attributes else DEFAULT_GITATTRIBUTES
            )
            answers = []
            for item in files:
                path, sample = item["path"], base64.b64decode(item.get("sample", ""))
                lfs = _is_lfs(path, int(item.get("size", 0)), sample, gitattributes)
                answer = {"path": path, "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False}
                if (existing := commit.files.get(path)) is not None:
                    # What the client compares with its local oid to skip unchanged files.
                    answer["oid"] = existing["sha256"] if existing["lfs"] else existing["oid"]
                answers.append(answer)
        return Response(json_body={"files": answers, "commitOid": commit.oid})

    def commit(self, req: Request) -> Response:
        repo = self._readable_repo(req)
        if req.flag("create_pr"):
            raise HubError(400, "Pull requests are not supported by this test server")
        try:
            lines = [json.loads(line) for line in req.body.splitlines() if line.strip()]
        except json.JSONDecodeError as err:
            raise HubError(400, f"Invalid NDJSON commit payload: {err}") from err
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "The first NDJSON line of a commit must be its header")
        header = lines[0].get("value") or {}
        commit = self.store.commit(
            repo,
            req.arg("rev").removeprefix("refs/heads/"),
            header.get("summary", ""),
            lines[1:],
            parent_commit=header.get("parentCommit"),
        )
        prefix = "" if repo.type == "model" else f"{repo.type}s/"
        return Response(
            json_body={
                "success": True,
                "commitOid": commit.oid,
                "pullRequestUrl": None,
                "commitUrl": f"{self.url}/{prefix}{repo.id}/commit/{commit.oid}",
            }
        )

    def create_branch(self, req: Request) -> Response:
        repo = self._readable_repo(req)
        branch = req.arg("rev")
        with self.store.lock:
            if branch in repo.branches:
                raise HubError(409, f"Reference already exists: refs/heads/{branch}")
            repo.branches[branch] = repo.resolve(req.json().get("startingPoint") or "main").oid
            self.store.save()
        return Response(json_body={})

    def lfs_batch(self, req: Request) -> Response:
        self._readable_repo(req)
        payload = req.json()
        if payload.get("operation") != "upload":
            raise HubError(400, "Only the LFS 'upload' operation is supported")
        objects = []
        for obj in payload.get("objects", []):
            answer: dict[str, Any] = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
            if not self.store.has_object(obj["oid"]):
                answer["actions"] = {"upload": {"href": f"{self.url}/lfs-objects/{obj['oid']}", "header": {}}}
            objects.append(answer)
        return Response(
            json_body={"transfer": "basic", "objects": objects},
            headers={"Content-Type": "application/vnd.git-lfs+json"},
        )

    def lfs_upload(self, req: Request) -> Response:
        oid = req.arg("oid")
        if hashlib.sha256(req.body).hexdigest() != oid:
            raise HubError(400, f"Uploaded content does not match its sha256 oid {oid}")
        self.store.put_object(req.body)
        return Response(json_body={}, headers={"ETag": f'"{oid}"'})

    def resolve(self, req: Request) -> Response:
        repo = self._readable_repo(req)
        path = req.arg("path")
        with self.store.lock:
            commit = repo.resolve(req.arg("rev"))
            entry = commit.files.get(path)
        headers = {"X-Repo-Commit": commit.oid}
        if entry is None:
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound", headers)
        size = entry["size"]
        headers.update(
            {
                "Accept-Ranges": "bytes",
                "Content-Type": "application/octet-stream",
                "ETag": f'"{entry["sha256"] if entry["lfs"] else entry["oid"]}"',
            }
        )
        if entry["lfs"]:
            headers.update({"X-Linked-Etag": f'"{entry["sha256"]}"', "X-Linked-Size": str(size)})
        start, length, status = _parse_range(req.headers.get("Range"), size)
        if status == 206:
            headers["Content-Range"] = f"bytes {start}-{start + length - 1}/{size}"
        return Response(status, headers=headers, file=(self.store.object_path(entry["sha256"]), start, length))

    def routes(self) -> list[tuple[str, re.Pattern[str], Callable[[Request], Response], bool]]:
        """(method, path regex on the still-quoted path, handler, needs a valid token)."""
        table = [
            ("GET", r"/api/whoami-v2", self.whoami, True),
            ("POST", r"/api/repos/create", self.create_repo, True),
            ("DELETE", r"/api/repos/delete", self.delete_repo, True),
            ("POST", r"/api/validate-yaml", self.validate_yaml, False),
            ("GET", rf"{_API_REPO}(?:/revision/(?P<rev>[^/]+))?", self.repo_info, False),
            ("GET", rf"{_API_REPO}/refs", self.refs, False),
            ("GET", rf"{_API_REPO}/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?", self.tree, False),
            ("POST", rf"{_API_REPO}/paths-info/(?P<rev>[^/]+)", self.paths_info, False),
            ("POST", rf"{_API_REPO}/preupload/(?P<rev>[^/]+)", self.preupload, True),
            ("POST", rf"{_API_REPO}/commit/(?P<rev>[^/]+)", self.commit, True),
            ("POST", rf"{_API_REPO}/branch/(?P<rev>[^/]+)", self.create_branch, True),
            ("POST", rf"{_GIT_REPO}\.git/info/lfs/objects/batch", self.lfs_batch, True),
            # The upload href is a capability URL, as the real Hub's pre-signed S3 URLs are.
            ("PUT", r"/lfs-objects/(?P<oid>[0-9a-f]{64})", self.lfs_upload, False),
            ("GET", rf"{_GIT_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)", self.resolve, False),
            ("HEAD", rf"{_GIT_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)", self.resolve, False),
        ]
        return [(method, re.compile(f"^{regex}$"), handler, auth) for method, regex, handler, auth in table]


def _parse_range(header: str | None, size: int) -> tuple[int, int, int]:
    """(first byte, length, status) for an optional ``Range: bytes=a-b`` header."""
    if not header:
        return 0, size, 200
    match = re.fullmatch(r"\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*", header)
    if match is None or match.groups() == ("", ""):
        return 0, size, 200  # multi-range and malformed ranges: answer the whole file, as RFC 9110 allows
    first, last = match.groups()
    if first == "":  # suffix range: the last N bytes
        start = max(size - int(last), 0)
        end = size - 1
    else:
        start, end = int(first), min(int(last) if last else size - 1, size - 1)
    if start >= size or start > end:
        raise HubError(416, f"Range not satisfiable: {header}", headers={"Content-Range": f"bytes */{size}"})
    return start, end - start + 1, 206


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    hub: HubServer

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.connections: set[socket.socket] = set()

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Clients dropping connections mid-answer are routine here, not worth a traceback.
        if not isinstance(sys.exc_info()[1], OSError):
            super().handle_error(request, client_address)

    def close_connections(self) -> None:
        # Handler threads block on idle keep-alive sockets; closing them lets those threads end.
        for conn in list(self.connections):
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the clients' connection pools expect
    server: _HTTPServer

    def setup(self) -> None:
        super().setup()
        self.server.connections.add(self.connection)

    def finish(self) -> None:
        self.server.connections.discard(self.connection)
        super().finish()

    def do_GET(self) -> None:
        self._dispatch()

    do_HEAD = do_POST = do_PUT = do_DELETE = do_GET

    def log_message(self, format: str, *args: Any) -> None:
        if self.server.hub.verbose:
            super().log_message(format, *args)

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while (size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)) > 0:
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
                pass
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def _dispatch(self) -> None:
        hub = self.server.hub
        # Read the whole body before anything else, error answers included: leftover bytes would be
        # parsed as the next request of this kept-alive connection.
        body = self._read_body()
        split = urlsplit(self.path)
        hub.requests.append((self.command, unquote(split.path)))
        try:
            response = self._handle(hub, split.path, parse_qs(split.query), body)
        except HubError as err:
            headers = {
                "X-Error-Message": re.sub(r"[\r\n]+", " ", err.message).encode("latin-1", "replace").decode("latin-1"),
                **err.headers,
            }
            if err.code:
                headers["X-Error-Code"] = err.code
            response = Response(err.status, {"error": err.message}, headers)
        except Exception as err:  # a bug here must reach the client as a 500, not a dropped connection
            response = Response(500, {"error": f"Internal error in the test hub: {err!r}"})
        self._send(response)

    def _handle(self, hub: HubServer, path: str, query: dict[str, list[str]], body: bytes) -> Response:
        if (fault := hub._take_fault(self.command, unquote(path))) is not None:
            raise HubError(fault.status, fault.message)
        user = self._authenticate(hub)
        for method, pattern, handler, needs_auth in hub._routes:
            if method == self.command and (match := pattern.match(path)):
                if needs_auth and user is None:
                    raise HubError(401, INVALID_CREDENTIALS)
                return handler(Request(self.command, path, query, self.headers, body, user, match))
        if path.startswith(("/api/models/", "/api/datasets/")) or "/resolve/" in path:
            raise HubError(404, "Repository not found", "RepoNotFound")
        raise HubError(404, f"No such endpoint on the test hub: {self.command} {path}")

    def _authenticate(self, hub: HubServer) -> str | None:
        authorization = self.headers.get("Authorization", "")
        if not authorization:
            return None
        token = authorization.removeprefix("Bearer ").strip()
        if token not in hub.tokens:
            raise HubError(401, INVALID_CREDENTIALS)
        return hub.tokens[token]

    def _send(self, response: Response) -> None:
        payload = b"" if response.file else json.dumps(response.json_body).encode()
        length = response.file[2] if response.file else len(payload)
        self.send_response(response.status)
        headers = {"Content-Type": "application/json", **response.headers, "Content-Length": str(length)}
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        if self.command == "HEAD":
            return
        if response.file is None:
            self.wfile.write(payload)
            return
        blob, start, remaining = response.file
        with open(blob, "rb") as f:
            f.seek(start)
            while remaining > 0 and (chunk := f.read(min(remaining, 1 << 20))):
                self.wfile.write(chunk)
                remaining -= len(chunk)


def main(argv: list[str] | None = None, prog: str | None = None) -> None:
    """Serve until interrupted (Ctrl-C or SIGTERM); ``prog`` names the command in ``--help``."""
    parser = argparse.ArgumentParser(
        prog=prog, description="Serve a loopback Hugging Face Hub test double on 127.0.0.1."
    )
    parser.add_argument("--port", type=int, default=0, help="port to listen on (default: a free one)")
    parser.add_argument("--data-dir", help="storage directory, kept across restarts (default: a temporary one)")
    parser.add_argument("--token", default=DEFAULT_TOKEN, help=f"the accepted token (default: {DEFAULT_TOKEN})")
    parser.add_argument("--user", default=DEFAULT_USER, help=f"its user name (default: {DEFAULT_USER})")
    parser.add_argument("--quiet", action="store_true", help="do not log requests")
    args = parser.parse_args(argv)
    # Ctrl-C and `kill` both set a flag rather than raise: an exception raised wherever the signal lands could
    # escape between the "listening" line and the wait (CI saw exit -2 from a SIGTERM sent just after that line).
    stop_requested = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop_requested.set())
    with HubServer(args.data_dir, port=args.port, tokens={args.token: args.user}, verbose=not args.quiet) as server:
        print(f"Hub test server listening on {server.url} (storage: {server.storage_dir})", flush=True)
        print(f"  export HF_ENDPOINT={server.url} HF_TOKEN={args.token} HF_HUB_DISABLE_XET=1", flush=True)
        # A timed wait, so the main thread wakes to run the signal handler.
        while not stop_requested.wait(0.5):
            pass
        print("Stopping.", flush=True)


if __name__ == "__main__":
    main()
