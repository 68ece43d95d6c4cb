"""A Hugging Face Hub stand-in on 127.0.0.1 for driving the real huggingface_hub client offline.

It implements just the routes huggingface_hub 2.4 calls for create_repo, repo_info,
create_branch, preupload_lfs_files and create_commit on the classic (non-Xet) LFS path
(read from the client's source: hf_api.py, _commit_api.py, lfs.py):

    POST /api/repos/create                         create_repo (409 when it exists)
    GET  /api/models/{repo}[/revision/{rev}]       repo_info / model_info
    POST /api/models/{repo}/branch/{branch}        create_branch (409 when it exists)
    POST /api/validate-yaml                        README.md front matter check (create_commit)
    POST /api/models/{repo}/preupload/{rev}        upload mode per file: "lfs" or "regular"
    POST /{repo}.git/info/lfs/objects/batch        git-lfs batch API: where to PUT each object
    PUT  /_lfs/{oid}                               the object's bytes (sha256-checked)
    POST /_lfs/{oid}/verify                        LFS verify step
    POST /api/models/{repo}/commit/{rev}           NDJSON commit (header, file, lfsFile, deletedFile)

State is kept in memory: repos with branches (path -> bytes), the commits received (message,
files) and pull requests. ``fail(...)`` injects faults: an HTTP status or a dropped connection
for the next N requests matching a method and path. When ``token`` is set, write routes and
private repos need ``Authorization: Bearer <token>``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
LFS_MIN_BYTES = 10 * 1024 * 1024
GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Commit:
    repo_id: str
    revision: str
    oid: str
    summary: str
    description: str
    files: dict[str, bytes]
    deleted: list[str]
    lfs_paths: list[str]
    pr: int | None = None


@dataclass
class Repo:
    repo_id: str
    private: bool
    branches: dict[str, dict[str, bytes]] = field(default_factory=dict)
    heads: dict[str, str] = field(default_factory=dict)
    prs: list[str] = field(default_factory=list)


@dataclass
class Fault:
    method: str
    pattern: re.Pattern[str]
    status: int | None  # None: drop the connection without answering
    times: int


class FakeHub:
    """The in-memory Hub; ``start()`` serves it on a free loopback port."""

    def __init__(self, token: str | None = None) -> None:
        self.token = token
        self.repos: dict[str, Repo] = {}
        self.lfs: dict[str, bytes] = {}
        self.commits: list[Commit] = []
        self.requests: list[tuple[str, str, str]] = []  # (method, path, Host header)
        self.auth_headers: set[str] = set()
        self.faults: list[Fault] = []
        self.lock = threading.Lock()
        self.server: ThreadingHTTPServer | None = None
        self.endpoint = ""

    # ------------------------------------------------------------------ control
    def start(self) -> str:
        hub = self

        class Handler(_Handler):
            fake = hub

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        # a short poll interval makes stop() (shutdown) quick
        serve = threading.Thread(target=self.server.serve_forever, args=(0.02,), daemon=True)
        serve.start()
        return self.endpoint

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()

    def fail(self, method: str, path_regex: str, status: int | None = 503, times: int = 1) -> None:
        """Answer the next ``times`` matching requests with ``status`` (None: drop the connection)."""
        self.faults.append(Fault(method, re.compile(path_regex), status, times))

    def take_fault(self, method: str, path: str) -> Fault | None:
        with self.lock:
            for fault in self.faults:
                if fault.times > 0 and fault.method == method and fault.pattern.search(path):
                    fault.times -= 1
                    return fault
        return None

    def create(self, repo_id: str, private: bool = False, files: dict[str, bytes] | None = None) -> Repo:
        repo = Repo(repo_id, private)
        repo.branches["main"] = {".gitattributes": GITATTRIBUTES, **(files or {})}
        repo.heads["main"] = hashlib.sha1(f"init {repo_id}".encode()).hexdigest()
        self.repos[repo_id] = repo
        return repo


class _Handler(BaseHTTPRequestHandler):
    fake: FakeHub
    protocol_version = "HTTP/1.1"
    # Headers and body go out in two writes; with Nagle on, each answer waits ~40 ms for an ACK.
    disable_nagle_algorithm = True

    def log_message(self, format: str, *args: Any) -> None:  # keep pytest output clean
        pass

    # ------------------------------------------------------------------ plumbing
    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    self.rfile.readline()
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _send(self, status: int, data: Any = None, headers: dict[str, str] | None = None) -> None:
        body = b"" if data is None else json.dumps(data).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)

    def _error(self, status: int, message: str, code: str | None = None) -> None:
        headers = {"X-Error-Message": message}
        if code:
            headers["X-Error-Code"] = code
        self._send(status, {"error": message}, headers)

    def _authorized(self) -> bool:
        auth = self.headers.get("Authorization")
        if auth:
            self.fake.auth_headers.add(auth)
        return self.fake.token is None or auth == f"Bearer {self.fake.token}"

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self._dispatch("GET")

    def do_POST(self) -> None:  # noqa: N802
        self._dispatch("POST")

    def do_PUT(self) -> None:  # noqa: N802
        self._dispatch("PUT")

    def _dispatch(self, method: str) -> None:
        url = urlsplit(self.path)
        path, query = unquote(url.path), parse_qs(url.query)
        body = self._body()
        self.fake.requests.append((method, path, self.headers.get("Host", "")))
        fault = self.fake.take_fault(method, path)
        if fault is not None:
            if fault.status is None:
                self.close_connection = True  # hang up without a response: a transport error
                self.connection.shutdown(2)
                return
            self._error(fault.status, f"injected {fault.status}")
            return
        for route_method, pattern, handler in ROUTES:
            match = re.fullmatch(pattern, path)
            if route_method == method and match:
                handler(self, match, query, body)
                return
        self._error(404, f"stand-in has no route {method} {path}")

    # ------------------------------------------------------------------ helpers
    def _repo(self, repo_id: str, write: bool = False) -> Repo | None:
        if write and not self._authorized():
            self._error(401, "Invalid credentials in Authorization header")
            return None
        repo = self.fake.repos.get(repo_id)
        if repo is None or (repo.private and not self._authorized()):
            self._error(404, "Repository not found", "RepoNotFound")
            return None
        return repo

    def _url(self, suffix: str) -> str:
        return f"{self.fake.endpoint}/{suffix}"

    # ------------------------------------------------------------------ routes
    def create_repo(self, m: re.Match[str], q: dict[str, list[str]], body: bytes) -> None:
        if not self._authorized():
            self._error(401, "Invalid credentials in Authorization header")
            return
        payload = json.loads(body)
        org = payload.get("organization")
        repo_id = f"{org}/{payload['name']}" if org else payload["name"]
        if repo_id in self.fake.repos:  # the Hub's 409 carries the url; create_repo(exist_ok) reads it
            message = "You already created this model repo"
            self._send(409, {"error": message, "url": self._url(repo_id)}, {"X-Error-Message": message})
            return
        self.fake.create(repo_id, private=payload.get("visibility") == "private")
        self._send(200, {"url": self._url(repo_id), "name": repo_id, "id": repo_id})

    def repo_info(self, m: re.Match[str], q: dict[str, list[str]], body: bytes) -> None:
        repo = self._repo(m["repo"])
        if repo is None:
            return
        rev = m["rev"] or "main"
        if rev not in repo.branches:
            self._error(404, "Revision not found", "RevisionNotFound")
            return
        siblings = [{"rfilename": p} for p in sorted(repo.branches[rev])]
        info = {"id": repo.repo_id, "sha": repo.heads[rev], "private": repo.private, "siblings": siblings}
        self._send(200, info)

    def create_branch(self, m: re.Match[str], q: dict[str, list[str]], body: bytes) -> None:
        repo = self._repo(m["repo"], write=True)
        if repo is None:
            return
        branch = m["branch"]
        if branch in repo.branches:
            self._error(409, "Reference already exists")
            return
        start = (json.loads(body or b"{}").get("startingPoint")) or "main"
        repo.branches[branch] = dict(repo.branches[start])
        repo.heads[branch] = repo.heads[start]
        self._send(200, {})

    def validate_yaml(self, m: re.Match[str], q: dict[str, list[str]], body: bytes) -> None:
        content = json.loads(body)["content"]
        if content.startswith("---"):
            block = content.split("\n---", 1)[0].removeprefix("---")
            try:
                meta = yaml.safe_load(block)
            except yaml.YAMLError as e:
                self._send(400, {"errors": [{"message": f"invalid YAML: {e}"}]})
                return
            if not isinstance(meta, dict):
                self._send(400, {"errors": [{"message": "metadata must be a mapping"}]})
                return
        self._send(200, {"errors": [], "warnings": []})

    def preupload(self, m: re.Match[str], q: dict[str, list[str]], body: bytes) -> None:
        repo = self._repo(m["repo"], write=True)
        if repo is None:
            return
        rev = m["rev"]
        if rev not in repo.branches and "create_pr" not in q:
            self._error(404, "Revision not found", "RevisionNotFound")
            return
        current = repo.branches.get(rev, repo.branches["main"])
        files = []
        for f in json.loads(body)["files"]:
            lfs = f["path"].endswith(LFS_SUFFIXES) or f["size"] >= LFS_MIN_BYTES
            old = current.get(f["path"])
            oid = None
            if old is not None:
                oid = hashlib.sha256(old).hexdigest() if lfs else git_blob_sha1(old)
            mode = "lfs" if lfs else "regular"
            files.append({"path": f["path"], "uploadMode": mode, "shouldIgnore": False, "oid": oid})
        self._send(200, {"files": files})

    def lfs_batch(self, m: re.Match[str], q: dict[str, list[str]], body: bytes) -> None:
        repo = self._repo(m["repo"], write=True)
        if repo is None:
            return
        objects = []
        for obj in json.loads(body)["objects"]:
            item: dict[str, Any] = {"oid": obj["oid"], "size": obj["size"]}
            if obj["oid"] not in self.fake.lfs:  # already stored: no actions, nothing to upload
                item["authenticated"] = True
                item["actions"] = {
                    "upload": {"href": self._url(f"_lfs/{obj['oid']}")},
                    "verify": {"href": self._url(f"_lfs/{obj['oid']}/verify")},
                }
            objects.append(item)
        self._send(200, {"transfer": "basic", "objects": objects})

    def lfs_put(self, m: re.Match[str], q: dict[str, list[str]], body: bytes) -> None:
        if hashlib.sha256(body).hexdigest() != m["oid"]:
            self._error(400, "content does not match its sha256")
            return
        self.fake.lfs[m["oid"]] = body
        self._send(200, {})

    def lfs_verify(self, m: re.Match[str], q: dict[str, list[str]], body: bytes) -> None:
        stored = self.fake.lfs.get(m["oid"])
        if stored is None or len(stored) != json.loads(body)["size"]:
            self._error(404, "object not uploaded")
            return
        self._send(200, {})

    def commit(self, m: re.Match[str], q: dict[str, list[str]], body: bytes) -> None:
        repo = self._repo(m["repo"], write=True)
        if repo is None:
            return
        rev, create_pr = m["rev"], "create_pr" in q
        if rev not in repo.branches:
            self._error(404, "Revision not found", "RevisionNotFound")
            return
        header: dict[str, Any] = {}
        files: dict[str, bytes] = {}
        deleted: list[str] = []
        lfs_paths: list[str] = []
        for line in body.splitlines():
            item = json.loads(line)
            value = item["value"]
            if item["key"] == "header":
                header = value
            elif item["key"] == "file":
                files[value["path"]] = base64.b64decode(value["content"])
            elif item["key"] == "lfsFile":
                if value["oid"] not in self.fake.lfs:
                    self._error(422, f"LFS object {value['oid']} for {value['path']} was never uploaded")
                    return
                files[value["path"]] = self.fake.lfs[value["oid"]]
                lfs_paths.append(value["path"])
            elif item["key"] in ("deletedFile", "deletedFolder"):
                deleted.append(value["path"])
        tree = dict(repo.branches[rev])
        for path in deleted:
            tree.pop(path, None)
        tree.update(files)
        seed = f"{len(self.fake.commits)} {repo.repo_id} {header.get('summary')}"
        oid = hashlib.sha1(seed.encode()).hexdigest()
        pr = None
        if create_pr:
            pr = len(repo.prs) + 1
            ref = f"refs/pr/{pr}"
            repo.prs.append(ref)
            repo.branches[ref], repo.heads[ref] = tree, oid
        else:
            repo.branches[rev], repo.heads[rev] = tree, oid
        self.fake.commits.append(
            Commit(repo.repo_id, rev, oid, header.get("summary", ""), header.get("description", ""),
                   files, deleted, lfs_paths, pr)
        )
        self._send(
            200,
            {
                "commitUrl": self._url(f"{repo.repo_id}/commit/{oid}"),
                "commitOid": oid,
                "pullRequestUrl": self._url(f"{repo.repo_id}/discussions/{pr}") if pr else None,
            },
        )


_REPO = r"(?P<repo>[\w.-]+/[\w.-]+)"
ROUTES = [
    ("POST", r"/api/repos/create", _Handler.create_repo),
    ("GET", rf"/api/models/{_REPO}(?:/revision/(?P<rev>.+))?", _Handler.repo_info),
    ("POST", rf"/api/models/{_REPO}/branch/(?P<branch>.+)", _Handler.create_branch),
    ("POST", r"/api/validate-yaml", _Handler.validate_yaml),
    ("POST", rf"/api/models/{_REPO}/preupload/(?P<rev>.+)", _Handler.preupload),
    ("POST", rf"/{_REPO}\.git/info/lfs/objects/batch", _Handler.lfs_batch),
    ("PUT", r"/_lfs/(?P<oid>[0-9a-f]{64})", _Handler.lfs_put),
    ("POST", r"/_lfs/(?P<oid>[0-9a-f]{64})/verify", _Handler.lfs_verify),
    ("POST", rf"/api/models/{_REPO}/commit/(?P<rev>.+)", _Handler.commit),
]
