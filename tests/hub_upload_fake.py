"""A local fake of the Hugging Face Hub's upload endpoints, for the `nyx lora upload` tests.

One threading `http.server` on 127.0.0.1:0 answering what huggingface_hub 2.x calls for `whoami`,
`create_repo` and `create_commit` on the plain LFS path (the client must run with `HF_HUB_DISABLE_XET=1`:
with hf_xet installed it would otherwise ask for a Xet write token, which this server does not offer):

- `GET /api/whoami-v2`
- `POST /api/repos/create` ({name, organization, visibility, type}) → 200 {url}, 409 when it exists
- `GET /api/models/{owner}/{name}` (repo_info, which create_repo calls after a 403 with exist_ok)
- `POST /api/validate-yaml` (create_commit checks a README's front matter first; parsed with PyYAML here)
- `POST /api/models/{owner}/{name}/preupload/{rev}` → uploadMode `lfs` for binary files, `regular` for text
- `POST /{owner}/{name}.git/info/lfs/objects/batch` → a `basic` upload action to `PUT /lfs-upload/{oid}` (an
  "S3" URL: it must come WITHOUT the Authorization header) and a `verify` action
- `POST /api/models/{owner}/{name}/commit/{rev}` (NDJSON: header, `file` base64, `lfsFile` by oid)

Tokens (`tokens`: token → `Account(user, write, orgs)`) decide: no or unknown token → 401 with the Hub's
`X-Error-Message: Invalid credentials in Authorization header`; a read-only token, or a namespace that is
neither the user nor one of their orgs → 403. Every request is recorded (`requests`: method, path, the
Authorization header, the body) and the repos keep their files, privacy and commits, so tests can assert
what reached the Hub and where the token went.
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
from urllib.parse import unquote, urlsplit

import yaml

LFS_SUFFIXES = (".safetensors", ".bin", ".png", ".jpg", ".jpeg", ".webp", ".ckpt", ".pt")
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")


@dataclass
class Account:
    user: str
    write: bool = True
    orgs: tuple[str, ...] = ()


@dataclass
class Repo:
    repo_id: str
    private: bool
    files: dict[str, bytes] = field(default_factory=dict)
    commits: list[dict[str, Any]] = field(default_factory=list)

    @property
    def sha(self) -> str:
        return self.commits[-1]["oid"] if self.commits else "0" * 40


@dataclass
class Request:
    method: str
    path: str
    authorization: str | None
    body: bytes


class FakeHubUpload:
    def __init__(self, tokens: dict[str, Account]) -> None:
        self.tokens = tokens
        self.repos: dict[str, Repo] = {}
        self.lfs: dict[str, bytes] = {}  # oid (sha256) → bytes uploaded to the "S3" URL
        self.requests: list[Request] = []
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> FakeHubUpload:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    # ------------------------------------------------------------------------------ the handler
    def _handler(self) -> type[BaseHTTPRequestHandler]:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:  # quiet
                return None

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    out = b""
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                        if size == 0:
                            self.rfile.readline()
                            return out
                        out += self.rfile.read(size)
                        self.rfile.readline()
                length = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(length) if length else b""

            def _send(self, status: int, payload: Any = None, headers: dict[str, str] | None = None) -> None:
                data = b"" if payload is None else json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            def _handle(self, method: str) -> None:
                body = self._body()
                path = urlsplit(self.path).path
                auth = self.headers.get("Authorization")
                with hub.lock:
                    hub.requests.append(Request(method, self.path, auth, body))
                try:
                    hub.route(self, method, unquote(path), auth, body)
                except Exception as e:  # a bug here must show as a 500 with its cause, not a hang
                    self._send(500, {"error": f"fake hub: {type(e).__name__}: {e}"})

            def do_GET(self) -> None:
                self._handle("GET")

            def do_POST(self) -> None:
                self._handle("POST")

            def do_PUT(self) -> None:
                self._handle("PUT")

        return Handler

    # ------------------------------------------------------------------------------ auth
    def account(self, auth: str | None) -> Account | None:
        if not auth or not auth.startswith("Bearer "):
            return None
        return self.tokens.get(auth[len("Bearer ") :])

    def may_write(self, account: Account, namespace: str) -> bool:
        return account.write and (namespace == account.user or namespace in account.orgs)

    def _deny(self, h: Any, auth: str | None, namespace: str) -> bool:
        """Answer 401/403 and return True unless the token may write to `namespace`."""
        account = self.account(auth)
        if account is None:
            h._send(
                401,
                {"error": "Invalid username or password."},
                {"X-Error-Message": "Invalid credentials in Authorization header"},
            )
            return True
        if not self.may_write(account, namespace):
            h._send(403, {"error": f'You don\'t have the rights to create a model under the namespace "{namespace}"'})
            return True
        return False

    # ------------------------------------------------------------------------------ routes
    def route(self, h: Any, method: str, path: str, auth: str | None, body: bytes) -> None:
        m: re.Match[str] | None
        if method == "GET" and path == "/api/whoami-v2":
            account = self.account(auth)
            if account is None:
                h._send(401, {"error": "Invalid credentials"})
                return
            role = "write" if account.write else "read"
            h._send(200, {"type": "user", "name": account.user, "auth": {"accessToken": {"role": role}}})
            return
        if method == "POST" and path == "/api/repos/create":
            self.create_repo(h, auth, json.loads(body))
            return
        if method == "POST" and path == "/api/validate-yaml":
            self.validate_yaml(h, json.loads(body))
            return
        if method == "PUT" and (m := re.fullmatch(r"/lfs-upload/([0-9a-f]{64})", path)):
            oid = m.group(1)
            if hashlib.sha256(body).hexdigest() != oid:
                h._send(400, {"error": "sha256 mismatch"})
                return
            with self.lock:
                self.lfs[oid] = body
            h._send(200)
            return
        if method == "POST" and (m := re.fullmatch(r"/([^/]+)/([^/]+)\.git/info/lfs/objects/(batch|verify)", path)):
            namespace, name, what = m.groups()
            if self._deny(h, auth, namespace):
                return
            if what == "verify":
                oid = json.loads(body)["oid"]
                h._send(200 if oid in self.lfs else 404, {"ok": oid in self.lfs})
            else:
                self.lfs_batch(h, f"{namespace}/{name}", json.loads(body))
            return
        if m := re.fullmatch(r"/api/models/([^/]+)/([^/]+)(?:/(preupload|commit)/(.+))?", path):
            namespace, name, action, _rev = m.groups()
            repo = self.repos.get(f"{namespace}/{name}")
            if action is None and method == "GET":
                account = self.account(auth)
                if repo is None or (repo.private and (account is None or not self.may_write(account, namespace))):
                    h._send(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
                    return
                siblings = [{"rfilename": p} for p in sorted(repo.files)]
                h._send(200, {"id": repo.repo_id, "sha": repo.sha, "private": repo.private, "siblings": siblings})
                return
            if self._deny(h, auth, namespace):
                return
            if repo is None:
                h._send(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
                return
            if action == "preupload":
                self.preupload(h, repo, json.loads(body))
            elif action == "commit":
                self.commit(h, repo, body)
            return
        h._send(404, {"error": f"fake hub: no route for {method} {path}"})

    def create_repo(self, h: Any, auth: str | None, payload: dict[str, Any]) -> None:
        name = str(payload.get("name") or "")
        namespace = payload.get("organization")
        account = self.account(auth)
        if account is not None and not namespace:
            namespace = account.user
        if self._deny(h, auth, str(namespace)):
            return
        if not NAME.match(name) or "--" in name or ".." in name:
            h._send(400, {"error": "Invalid repo name"})
            return
        repo_id = f"{namespace}/{name}"
        if repo_id in self.repos:
            h._send(409, {"error": "You already created this model repo", "url": f"{self.url}/{repo_id}"})
            return
        with self.lock:
            self.repos[repo_id] = Repo(repo_id, private=payload.get("visibility") == "private")
        h._send(200, {"url": f"{self.url}/{repo_id}", "name": repo_id})

    def validate_yaml(self, h: Any, payload: dict[str, Any]) -> None:
        content = str(payload.get("content", ""))
        m = re.match(r"^---\n(.*?)\n---\n", content, re.DOTALL)
        try:
            data = yaml.safe_load(m.group(1)) if m else None
        except yaml.YAMLError as e:
            h._send(400, {"errors": [{"message": f"invalid YAML: {e}"}], "warnings": []})
            return
        if m and not isinstance(data, dict):
            h._send(400, {"errors": [{"message": "metadata must be a mapping"}], "warnings": []})
            return
        h._send(200, {"errors": [], "warnings": []})

    def preupload(self, h: Any, repo: Repo, payload: dict[str, Any]) -> None:
        files = []
        for f in payload["files"]:
            path = str(f["path"])
            sample = base64.b64decode(f["sample"])
            lfs = path.lower().endswith(LFS_SUFFIXES) or b"\0" in sample or int(f["size"]) > 10_000_000
            existing = repo.files.get(path)
            oid = None
            if existing is not None:
                oid = (
                    hashlib.sha256(existing).hexdigest()
                    if lfs
                    else hashlib.sha1(b"blob %d\0" % len(existing) + existing).hexdigest()
                )
            files.append({"path": path, "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False, "oid": oid})
        h._send(200, {"files": files, "commitOid": repo.sha})

    def lfs_batch(self, h: Any, repo_id: str, payload: dict[str, Any]) -> None:
        objects = []
        for obj in payload["objects"]:
            oid, size = obj["oid"], obj["size"]
            entry: dict[str, Any] = {"oid": oid, "size": size, "authenticated": True}
            if oid not in self.lfs:
                entry["actions"] = {
                    "upload": {"href": f"{self.url}/lfs-upload/{oid}", "header": {}},
                    "verify": {"href": f"{self.url}/{repo_id}.git/info/lfs/objects/verify"},
                }
            objects.append(entry)
        h._send(200, {"transfer": "basic", "objects": objects})

    def commit(self, h: Any, repo: Repo, body: bytes) -> None:
        lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        header = next(item["value"] for item in lines if item["key"] == "header")
        changed: dict[str, bytes] = {}
        for item in lines:
            value = item["value"]
            if item["key"] == "file":
                changed[value["path"]] = base64.b64decode(value["content"])
            elif item["key"] == "lfsFile":
                if value["oid"] not in self.lfs:
                    h._send(400, {"error": f"LFS object {value['oid']} was never uploaded"})
                    return
                changed[value["path"]] = self.lfs[value["oid"]]
        oid = hashlib.sha1(json.dumps([repo.sha, header, sorted(changed)]).encode()).hexdigest()
        with self.lock:
            repo.files.update(changed)
            repo.commits.append({"oid": oid, "summary": header.get("summary"), "files": sorted(changed)})
        h._send(200, {"commitUrl": f"{self.url}/{repo.repo_id}/commit/{oid}", "commitOid": oid, "success": True})
