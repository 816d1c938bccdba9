"""A local fake of the Hugging Face Hub's download endpoints and of Civitai's API, for the download tests.

One threading `http.server` on 127.0.0.1:0. The API answers on `http://127.0.0.1:PORT`; the bytes come from
a "CDN" on the same port under the other loopback name, `http://localhost:PORT/cdn/…`, so a client that
follows a redirect sees another host (and must drop its `Authorization`). Every request is recorded
(`requests`: method, host, path with query, the Authorization header) so tests can check where tokens went.

Hub: `GET /api/models/{owner}/{repo}/revision/{rev}` (`siblings` with `blobs=true` fields), `HEAD/GET
/{owner}/{repo}/resolve/{rev}/{path}`: an LFS file answers 302 to the CDN with `X-Linked-Size`,
`X-Linked-Etag` (its sha256) and `X-Repo-Commit`; a small (non-LFS) file answers 200 with `ETag` (a git-like
id) itself. A gated file answers 401 without a token and 403 with a wrong one (`X-Error-Code: GatedRepo`).

Civitai: `GET /api/v1/model-versions/{id}`, `GET /api/v1/models/{id}` (newest version first), `GET
/api/download/models/{id}` → 307 to `http://localhost:PORT/cdn/civitai/{name}?token=SIGNATURE` with a fresh
signature each time; a signature works for ONE request (a retry must ask again), and the CDN sends
`Content-Disposition`. A version with `needs_token` answers 401 JSON without a valid token.

Faults: `throttle_bps` slows every CDN body; `drop_after` (bytes) cuts the next CDN body once after that
many bytes. CDN bodies honour `Range` (206 + Content-Range) and `If-Range` against their ETag.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit


@dataclass
class HubFile:
    data: bytes
    lfs: bool = True
    gated: bool = False

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @property
    def blob_id(self) -> str:
        return hashlib.sha1(b"blob %d\0" % len(self.data) + self.data).hexdigest()

    @property
    def etag(self) -> str:
        return self.sha256 if self.lfs else self.blob_id


@dataclass
class HubRepo:
    commit: str
    files: dict[str, HubFile] = field(default_factory=dict)
    revisions: tuple[str, ...] = ("main",)


@dataclass
class CivitaiFile:
    name: str
    data: bytes
    primary: bool = True
    type: str = "Model"


@dataclass
class CivitaiVersion:
    id: int
    model_id: int
    model_name: str
    name: str = "v1.0"
    model_type: str = "LORA"
    base_model: str = "SDXL 1.0"
    files: list[CivitaiFile] = field(default_factory=list)
    needs_token: bool = False
    trained_words: list[str] = field(default_factory=list)


@dataclass
class Request:
    method: str
    host: str
    path: str
    authorization: str | None
    range: str | None


class FakeHub:
    def __init__(self, *, hf_token: str = "hf_good_token", civitai_token: str = "civ_good_token") -> None:
        self.hf_token = hf_token
        self.civitai_token = civitai_token
        self.repos: dict[str, HubRepo] = {}
        self.versions: dict[int, CivitaiVersion] = {}
        self.requests: list[Request] = []
        self.throttle_bps: float | None = None
        self.drop_after: int | None = None
        self.signatures: dict[str, str] = {}  # signature → file name (unused ones)
        self.issued = 0
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    # ---------------------------------------------------------------- set-up
    def add_repo(self, repo: str, files: dict[str, HubFile], commit: str | None = None) -> HubRepo:
        commit = commit or hashlib.sha1(repo.encode()).hexdigest()
        self.repos[repo] = HubRepo(commit, dict(files))
        return self.repos[repo]

    def add_version(self, version: CivitaiVersion) -> CivitaiVersion:
        self.versions[version.id] = version
        return version

    def start(self) -> FakeHub:
        hub = self

        class Handler(_Handler):
            fake = hub

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, name="hub-fake", daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> FakeHub:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        """The API base (HF_ENDPOINT and NYX_CIVITAI_URL)."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def cdn(self) -> str:
        return f"http://localhost:{self.port}"

    def env(self) -> dict[str, str]:
        return {"HF_ENDPOINT": self.url, "NYX_CIVITAI_URL": self.url, "HF_HUB_DISABLE_XET": "1"}

    def sign(self, name: str) -> str:
        with self._lock:
            self.issued += 1
            signature = hashlib.sha256(f"{name}:{self.issued}:{time.time()}".encode()).hexdigest()[:32]
            self.signatures[signature] = name
        return signature

    def requests_to(self, path_prefix: str) -> list[Request]:
        return [r for r in list(self.requests) if r.path.startswith(path_prefix)]


class _Handler(BaseHTTPRequestHandler):
    fake: FakeHub
    server_version = "hub-fake/1"

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    # ---------------------------------------------------------------- plumbing
    def _record(self) -> None:
        host = (self.headers.get("Host") or "").split(":")[0]
        self.fake.requests.append(
            Request(self.command, host, self.path, self.headers.get("Authorization"), self.headers.get("Range"))
        )

    def _send(self, code: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.send_response(code)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD" and body:
            self.wfile.write(body)

    def _json(self, code: int, value: Any, headers: dict[str, str] | None = None) -> None:
        self._send(code, json.dumps(value).encode(), {"Content-Type": "application/json", **(headers or {})})

    def _bearer(self) -> str | None:
        auth = self.headers.get("Authorization") or ""
        return auth[len("Bearer ") :] if auth.startswith("Bearer ") else None

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        self._record()
        parts = urlsplit(self.path)
        path = unquote(parts.path)
        query = parse_qs(parts.query)
        try:
            if path.startswith("/cdn/"):
                self._cdn(path, query)
            elif path.startswith("/api/models/"):
                self._hf_listing(path)
            elif path.startswith("/api/v1/model-versions/"):
                self._civitai_version(path)
            elif path.startswith("/api/v1/models/"):
                self._civitai_model(path)
            elif path.startswith("/api/download/models/"):
                self._civitai_download(path, query)
            elif "/resolve/" in path:
                self._hf_resolve(path)
            else:
                self._json(404, {"error": "not found"})
        except (BrokenPipeError, ConnectionResetError):
            pass

    # ---------------------------------------------------------------- hub
    def _hf_listing(self, path: str) -> None:
        rest = path[len("/api/models/") :]
        repo_id, _, rev = rest.partition("/revision/")
        repo = self.fake.repos.get(repo_id)
        if repo is None or (rev and rev not in (*repo.revisions, repo.commit)):
            self._json(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
            return
        siblings = []
        for name, f in sorted(repo.files.items()):
            entry: dict[str, Any] = {"rfilename": name, "size": len(f.data), "blobId": f.blob_id}
            if f.lfs:
                entry["lfs"] = {"sha256": f.sha256, "size": len(f.data), "pointerSize": 134}
            siblings.append(entry)
        self._json(200, {"id": repo_id, "modelId": repo_id, "sha": repo.commit, "siblings": siblings})

    def _hf_resolve(self, path: str) -> None:
        head, _, rest = path.lstrip("/").partition("/resolve/")
        rev, _, file_path = rest.partition("/")
        repo = self.fake.repos.get(head)
        if repo is None:
            self._json(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
            return
        if rev not in (*repo.revisions, repo.commit):
            self._json(404, {"error": "Revision not found"}, {"X-Error-Code": "RevisionNotFound"})
            return
        f = repo.files.get(file_path)
        if f is None:
            self._json(404, {"error": "Entry not found"}, {"X-Error-Code": "EntryNotFound"})
            return
        if f.gated:
            token = self._bearer()
            if token is None:
                msg = "Access to this model is restricted. You must be authenticated."
                self._json(401, {"error": msg}, {"X-Error-Code": "GatedRepo", "X-Error-Message": msg})
                return
            if token != self.fake.hf_token:
                msg = "Access to this model is restricted and you are not in the authorized list."
                self._json(403, {"error": msg}, {"X-Error-Code": "GatedRepo", "X-Error-Message": msg})
                return
        common = {"X-Repo-Commit": repo.commit}
        if f.lfs:
            location = f"{self.fake.cdn}/cdn/hf/{f.sha256}?sig={self.fake.sign(f.sha256)}"
            self._send(
                302,
                b"",
                {
                    **common,
                    "Location": location,
                    "X-Linked-Size": str(len(f.data)),
                    "X-Linked-Etag": f'"{f.sha256}"',
                    "ETag": f'"{f.blob_id}"',
                },
            )
            return
        self._body(f.data, {**common, "ETag": f'"{f.blob_id}"'}, throttle=False)

    # ---------------------------------------------------------------- civitai
    def _version_json(self, v: CivitaiVersion) -> dict[str, Any]:
        base = self.fake.url
        return {
            "id": v.id,
            "modelId": v.model_id,
            "name": v.name,
            "baseModel": v.base_model,
            "trainedWords": v.trained_words,
            "model": {"name": v.model_name, "type": v.model_type, "nsfw": False},
            "files": [
                {
                    "id": v.id * 10 + i,
                    "name": f.name,
                    "sizeKB": len(f.data) / 1024,
                    "type": f.type,
                    "primary": f.primary,
                    "hashes": {"SHA256": hashlib.sha256(f.data).hexdigest().upper(), "AutoV2": "ABCDEF0123"},
                    "downloadUrl": f"{base}/api/download/models/{v.id}"
                    + ("" if f.primary else f"?type={quote(f.type)}&file={quote(f.name)}"),
                }
                for i, f in enumerate(v.files)
            ],
            "downloadUrl": f"{base}/api/download/models/{v.id}",
        }

    def _civitai_version(self, path: str) -> None:
        vid = path.rsplit("/", 1)[-1]
        v = self.fake.versions.get(int(vid)) if vid.isdigit() else None
        if v is None:
            self._json(404, {"error": f"No model version with id {vid}"})
            return
        self._json(200, self._version_json(v))

    def _civitai_model(self, path: str) -> None:
        mid = path.rsplit("/", 1)[-1]
        versions = sorted(
            (v for v in self.fake.versions.values() if mid.isdigit() and v.model_id == int(mid)),
            key=lambda v: -v.id,
        )
        if not versions:
            self._json(404, {"error": f"No model with id {mid}"})
            return
        first = versions[0]
        self._json(
            200,
            {
                "id": first.model_id,
                "name": first.model_name,
                "type": first.model_type,
                "modelVersions": [
                    {k: val for k, val in self._version_json(v).items() if k != "model"} for v in versions
                ],
            },
        )

    def _civitai_download(self, path: str, query: dict[str, list[str]]) -> None:
        vid = path.rsplit("/", 1)[-1]
        v = self.fake.versions.get(int(vid)) if vid.isdigit() else None
        if v is None:
            self._json(404, {"error": "Model not found"})
            return
        if v.needs_token and self._bearer() != self.fake.civitai_token:
            self._json(
                401, {"error": "Unauthorized", "message": "The creator of this asset requires you to be logged in"}
            )
            return
        wanted = (query.get("file") or [None])[0]
        f = next((f for f in v.files if f.name == wanted), None) if wanted else None
        f = f or next((f for f in v.files if f.primary), v.files[0])
        signature = self.fake.sign(f"{v.id}/{f.name}")
        location = f"{self.fake.cdn}/cdn/civitai/{v.id}/{quote(f.name)}?token={signature}"
        self._send(307, b"", {"Location": location})

    # ---------------------------------------------------------------- cdn
    def _cdn(self, path: str, query: dict[str, list[str]]) -> None:
        if path.startswith("/cdn/hf/"):
            sha = path.rsplit("/", 1)[-1]
            data = next(
                (f.data for r in self.fake.repos.values() for f in r.files.values() if f.lfs and f.sha256 == sha), None
            )
            if data is None:
                self._send(404, b"no such blob")
                return
            self._body(data, {"ETag": f'"{sha}"'})
            return
        # /cdn/civitai/{vid}/{name}?token=…: each signature is good for one request
        vid, _, name = path[len("/cdn/civitai/") :].partition("/")
        signature = (query.get("token") or [""])[0]
        with self.fake._lock:
            known = self.fake.signatures.pop(signature, None)
        if known != f"{vid}/{name}":
            self._send(403, b"<Error><Code>AccessDenied</Code><Message>Request has expired</Message></Error>")
            return
        v = self.fake.versions[int(vid)]
        f = next(f for f in v.files if f.name == name)
        sha = hashlib.sha256(f.data).hexdigest()
        self._body(f.data, {"ETag": f'"{sha}"', "Content-Disposition": f'attachment; filename="{name}"'})

    def _body(self, data: bytes, headers: dict[str, str], throttle: bool = True) -> None:
        total = len(data)
        start, end = 0, total - 1
        code = 200
        rng = self.headers.get("Range")
        if_range = self.headers.get("If-Range")
        etag = headers.get("ETag")
        if rng and rng.startswith("bytes=") and (if_range is None or if_range == etag):
            first, _, last = rng[len("bytes=") :].partition("-")
            if first.isdigit():
                start = int(first)
                end = int(last) if last.isdigit() else total - 1
                if start >= total:
                    self._send(416, b"", {"Content-Range": f"bytes */{total}"})
                    return
                code = 206
        body = data[start : end + 1]
        self.send_response(code)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        if code == 206:
            self.send_header("Content-Range", f"bytes {start}-{end}/{total}")
        self.end_headers()
        if self.command == "HEAD":
            return
        drop = self.fake.drop_after
        if drop is not None:
            self.fake.drop_after = None  # once
        chunk = 16 * 1024
        sent = 0
        t0 = time.monotonic()
        while sent < len(body):
            piece = body[sent : sent + chunk]
            if drop is not None and sent + len(piece) > drop:
                self.wfile.write(body[sent:drop])
                self.wfile.flush()
                self.close_connection = True
                return
            self.wfile.write(piece)
            sent += len(piece)
            bps = self.fake.throttle_bps if throttle else None
            if bps:
                ahead = sent / bps - (time.monotonic() - t0)
                if ahead > 0:
                    time.sleep(ahead)


def serve_forever_cli() -> None:  # pragma: no cover - a manual aid: python -m tests.hub_fake
    hub = FakeHub().start()
    hub.add_repo("org/model", {"model.safetensors": HubFile(b"x" * 1000)})
    print(hub.url, flush=True)
    threading.Event().wait()


if __name__ == "__main__":  # pragma: no cover
    serve_forever_cli()
