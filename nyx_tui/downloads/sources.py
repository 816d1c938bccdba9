"""Sources: what `hf:…`, `civitai:…` and URLs stand for, as files the engine can fetch.

Two steps, so the CLI can refuse a typo before it creates a job:

- `parse_source(text)` is syntax only (no network): a `Source`, or a `DownloadError` whose `fix` shows a
  form that works.
- `resolve(source, dest=…)` asks the source's server (synchronous httpx; the worker runs it in a thread,
  the TUI in a worker) and returns a `Resolved`: the `RemoteFile`s, where they go (`meta["dest_dir"]`),
  and for Civitai what the preview shows (name, type, base model, files).

Forms:

| form | means |
|---|---|
| `hf:owner/repo[@rev]/path/in/repo` | one file of a Hugging Face model repo |
| `hf:owner/repo[@rev]` | every file of the repo at that revision (default `main`) |
| `https://huggingface.co/owner/repo/resolve/rev/path` (or `/blob/`) | one file (the host may also be `HF_ENDPOINT`'s) |
| `https://huggingface.co/owner/repo[/tree/rev]` | the whole repo |
| `civitai:VERSION_ID` | a Civitai model version (its primary file, or `--file NAME`) |
| `https://civitai.com/models/ID[/slug][?modelVersionId=V]` | version V, or the model's latest version |
| `https://civitai.com/api/download/models/V` | version V |
| `https://…` (any other URL) | one file; its name from Content-Disposition or the URL path |

A revision with a `/` in it (`refs/pr/1`) is written URL-encoded: `hf:owner/repo@refs%2Fpr%2F1/file`.

Endpoints are read at call time: `HF_ENDPOINT` (default https://huggingface.co) and `NYX_CIVITAI_URL`
(default https://civitai.com), so a mirror or a test server stands in for either. Tokens (`HF_TOKEN`, or the
Hugging Face token file; `CIVITAI_TOKEN`; either also from Nyx's 0600 secrets.toml) go as
`Authorization: Bearer` to their own host only, and only over https or to a loopback host: never to a CDN a
download is redirected to, never into a `RemoteFile.url`, a job spec, an event or a log line.

Plain `http://` is accepted for loopback hosts (tests, a local mirror) and, with a warning in
`Resolved.meta["warnings"]`, elsewhere; a token is never sent over plain http to another host.
"""

from __future__ import annotations

import os
import re
import uuid
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

import httpx

from nyx_tui.downloads.model import DownloadError, RemoteFile, Resolved

HF_DEFAULT = "https://huggingface.co"
CIVITAI_DEFAULT = "https://civitai.com"
TIMEOUT = httpx.Timeout(30.0, connect=15.0)
LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})
USER_AGENT = "nyx-tui (LoRA trainer; downloads)"

HF_TOKEN_FIX = (
    "set HF_TOKEN (huggingface.co → Settings → Access Tokens, a read token) or run `hf auth login`; for a "
    "gated model also accept its terms on the model page"
)
CIVITAI_TOKEN_FIX = "set CIVITAI_TOKEN (civitai.com → account settings → API keys)"
CIVITAI_TOKEN_MESSAGE = "this file needs a Civitai token: set CIVITAI_TOKEN (civitai.com → account settings → API keys)"

_REPO_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_DIGITS = re.compile(r"^[0-9]+$")

SOURCE_FORMS = (
    "hf:owner/repo/path/file.safetensors, hf:owner/repo@rev, civitai:123456, "
    "https://civitai.com/models/ID?modelVersionId=V, or an https:// URL"
)


# ------------------------------------------------------------------------------------------------ endpoints


def hf_endpoint() -> str:
    return (os.environ.get("HF_ENDPOINT") or HF_DEFAULT).rstrip("/")


def civitai_base() -> str:
    return (os.environ.get("NYX_CIVITAI_URL") or CIVITAI_DEFAULT).rstrip("/")


def hf_token() -> str | None:
    """HF_TOKEN from the environment or Nyx's secrets.toml, else the Hugging Face token file (`hf auth login`)."""
    from nyx_tui.settings import get_secret

    token = get_secret("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN")
    if token:
        return token.strip()
    try:
        from huggingface_hub import get_token

        found = get_token()
    except Exception:  # an unreadable token file, an OIDC exchange that failed: no token
        return None
    return found.strip() if found else None


def civitai_token() -> str | None:
    from nyx_tui.settings import get_secret

    token = get_secret("CIVITAI_TOKEN")
    return token.strip() if token else None


def _host(url: str) -> str:
    return (urlsplit(url).hostname or "").lower()


def _is_loopback(url: str) -> bool:
    return _host(url) in LOOPBACK


def auth_headers(token: str | None, base: str) -> dict[str, str]:
    """`Authorization: Bearer` for requests to `base`'s host, when there is a token and the channel is safe
    (https, or a loopback host)."""
    if not token:
        return {}
    if urlsplit(base).scheme != "https" and not _is_loopback(base):
        return {}
    return {"Authorization": f"Bearer {token}"}


def _http_warning(url: str) -> str | None:
    if urlsplit(url).scheme == "http" and not _is_loopback(url):
        return f"{_redact(url)} is plain http: the bytes can be altered on the way (no token is sent there)"
    return None


def _redact(url: str) -> str:
    try:
        from nyx_tui.downloads.sidecar import redact_url
    except ImportError:  # pragma: no cover - the engine's module is part of the package
        parts = urlsplit(url)
        return f"{parts.scheme}://{parts.hostname}{parts.path}"
    return redact_url(url)


def sanitize(name: str) -> str:
    from nyx_tui.downloads.engine import sanitize_filename

    return sanitize_filename(name)


# ---------------------------------------------------------------------------------------------------- parse


@dataclass(frozen=True)
class Source:
    """A source as written, understood (no network). `kind` is hf, civitai or url."""

    text: str
    kind: str
    repo: str = ""  # hf: owner/repo
    revision: str = "main"  # hf
    path: str = ""  # hf: path in the repo; "" = the whole repo
    version_id: int | None = None  # civitai
    model_id: int | None = None  # civitai: a model page without a version (latest version)
    url: str = ""  # url

    @property
    def single_file(self) -> bool:
        """Whether the source stands for exactly one file (so `--sha256` can apply to it)."""
        return self.kind != "hf" or bool(self.path)


def _bad(text: str, why: str, fix: str = "") -> DownloadError:
    return DownloadError(f"{text!r}: {why}", fix or f"write a source as {SOURCE_FORMS}")


def _check_repo(text: str, repo: str) -> str:
    parts = repo.split("/")
    if len(parts) != 2 or not all(_REPO_PART.match(p) for p in parts) or any(".." in p for p in parts):
        raise _bad(text, f"{repo!r} is not a Hugging Face repo id", "write it as owner/name, e.g. hf:org/model")
    return repo


def _check_repo_path(text: str, path: str) -> str:
    path = path.strip("/")
    parts = path.split("/")
    if not path or any(p in ("", ".", "..") for p in parts) or "\\" in path or "\x00" in path:
        raise _bad(text, f"{path!r} is not a file path inside a repo", "write the file's path as the repo shows it")
    return path


def _revision(text: str, rev: str) -> str:
    rev = unquote(rev)
    if not rev or rev.startswith("/") or ".." in rev or any(c.isspace() for c in rev):
        raise _bad(text, f"{rev!r} is not a revision", "name a branch, a tag or a commit: hf:owner/repo@main")
    return rev


def _parse_hf_spec(text: str, body: str) -> Source:
    """`owner/repo[@rev][/path]`."""
    body = body.strip().strip("/")
    owner, _, rest = body.partition("/")
    name_rev, _, path = rest.partition("/")
    name, at, rev = name_rev.partition("@")
    if not owner or not name:
        raise _bad(text, "a Hugging Face source names owner/repo", "write hf:owner/repo or hf:owner/repo/file")
    if at and not rev:
        raise _bad(text, "nothing after @", "name a revision: hf:owner/repo@main/file")
    repo = _check_repo(text, f"{owner}/{name}")
    return Source(
        text,
        "hf",
        repo=repo,
        revision=_revision(text, rev) if at else "main",
        path=_check_repo_path(text, path) if path else "",
    )


def _is_hf_host(host: str) -> bool:
    return host in ("huggingface.co", "www.huggingface.co", "hf.co") or host == _host(hf_endpoint())


def _parse_hf_url(text: str, path: str) -> Source:
    parts = [unquote(p) for p in path.strip("/").split("/")]
    if parts and parts[0] in ("datasets", "spaces"):
        raise _bad(text, f"Hugging Face {parts[0]} are not models", "download model repos: huggingface.co/owner/repo")
    if len(parts) < 2:
        raise _bad(text, "this is not a Hugging Face model URL", "copy the URL of a file or of the model page")
    repo = _check_repo(text, f"{parts[0]}/{parts[1]}")
    if len(parts) == 2:
        return Source(text, "hf", repo=repo)
    mode = parts[2]
    if mode == "tree" and len(parts) >= 4:
        if len(parts) > 4:
            raise _bad(text, "a folder of a repo is not a source", "download one file (its /resolve/ URL) or the repo")
        return Source(text, "hf", repo=repo, revision=_revision(text, parts[3]))
    if mode in ("resolve", "blob") and len(parts) >= 5:
        return Source(
            text, "hf", repo=repo, revision=_revision(text, parts[3]), path=_check_repo_path(text, "/".join(parts[4:]))
        )
    raise _bad(
        text,
        "this Hugging Face URL names neither a file nor a repo",
        "copy a file's URL (…/resolve/main/file or …/blob/main/file), or write hf:owner/repo",
    )


def _positive_int(text: str, value: str, what: str) -> int:
    if not _DIGITS.match(value) or int(value) <= 0:
        raise _bad(text, f"{value!r} is not a Civitai {what} id", f"write civitai:123456 (the {what} id is a number)")
    return int(value)


def _is_civitai_host(host: str) -> bool:
    return host in ("civitai.com", "www.civitai.com") or host == _host(civitai_base())


def _parse_civitai_url(text: str, path: str, query: str) -> Source:
    parts = [p for p in path.strip("/").split("/") if p]
    params = parse_qs(query)
    if "token" in params:
        raise _bad(text, "the URL carries a token", "drop ?token=… from the URL and set CIVITAI_TOKEN instead")
    if parts[:3] == ["api", "download", "models"] and len(parts) == 4:
        return Source(text, "civitai", version_id=_positive_int(text, parts[3], "model version"))
    if parts[:1] == ["models"] and len(parts) >= 2:
        model_id = _positive_int(text, parts[1], "model")
        versions = params.get("modelVersionId") or []
        if versions:
            return Source(text, "civitai", version_id=_positive_int(text, versions[0], "model version"))
        return Source(text, "civitai", model_id=model_id)
    raise _bad(
        text,
        "this Civitai URL names no model",
        "copy the model page's URL (civitai.com/models/ID?modelVersionId=V) or write civitai:VERSION_ID",
    )


def parse_source(text: str) -> Source:
    """Understand a source without asking any server; raise DownloadError (message + fix) when it is not one."""
    raw = text
    text = text.strip()
    if not text:
        raise _bad(raw, "an empty source")
    lower = text.lower()
    if lower.startswith("hf:"):
        return _parse_hf_spec(raw, text[3:])
    if lower.startswith("civitai:"):
        body = text[len("civitai:") :].strip()
        return Source(raw, "civitai", version_id=_positive_int(raw, body, "model version"))
    if "://" not in text:
        if re.match(r"^[A-Za-z0-9][\w.-]*/[\w.-]+", text) and not text.startswith((".", "/", "~")):
            raise _bad(raw, "a repo id needs its hub", f"write hf:{text} for a Hugging Face repo")
        raise _bad(raw, "not a source Nyx knows")
    try:
        parts = urlsplit(text)
        host = (parts.hostname or "").lower()
        parts.port  # noqa: B018 (raises ValueError for a bad port)
    except ValueError as e:
        raise _bad(raw, f"not a valid URL ({e})") from None
    if parts.scheme not in ("http", "https") or not host:
        raise _bad(raw, "only http(s) URLs can be downloaded", "use an https:// URL")
    if parts.username or parts.password:
        raise _bad(raw, "the URL carries a user name or password", "drop them; tokens come from the environment")
    civitai_path = re.match(r"^/(models/[0-9]+|api/download/models/)", parts.path)
    if _is_civitai_host(host) and civitai_path:  # first: a mirror may serve both APIs on one host
        return _parse_civitai_url(raw, parts.path, parts.query)
    if _is_hf_host(host):
        return _parse_hf_url(raw, parts.path)
    if _is_civitai_host(host):
        return _parse_civitai_url(raw, parts.path, parts.query)
    return Source(raw, "url", url=text)


def check_sha256(value: str) -> str:
    """A lower-case sha256 hex digest, or DownloadError."""
    value = value.strip().lower()
    if not _SHA256.match(value):
        raise DownloadError(f"{value!r} is not a SHA-256", "give the 64 hex digits the model page lists as SHA256")
    return value


# -------------------------------------------------------------------------------------------------- resolve


def resolve(
    source: str | Source,
    *,
    dest: Path | None,
    file: str | None = None,
    sha256: str | None = None,
    client: httpx.Client | None = None,
) -> Resolved:
    """Ask the source's server what `source` stands for (synchronous: call it in a thread from async code).

    `dest`: the folder to put the files in (a repo's files keep their paths below it); None means the
    default place: the Hugging Face cache for `hf:` sources (so diffusers finds them), `<data>/downloads`
    for the rest. `file` picks a Civitai file by name; `sha256` overrides the expected hash of a one-file
    source. The answer's `meta["dest_dir"]` is the folder to fetch into; for the HF cache
    `meta["hf_cache"]` tells `finish_file` which links to make once a blob is in place.
    """
    src = source if isinstance(source, Source) else parse_source(source)
    own = client is None
    http = client or httpx.Client(timeout=TIMEOUT, headers={"User-Agent": USER_AGENT})
    try:
        if src.kind == "hf":
            resolved = _resolve_hf(src, dest, http)
        elif src.kind == "civitai":
            resolved = _resolve_civitai(src, dest, file, http)
        else:
            resolved = _resolve_url(src, dest, http)
    except httpx.HTTPError as e:
        raise DownloadError(
            f"{src.text}: could not reach the server ({type(e).__name__}: {e})",
            "check the network (and HF_ENDPOINT / NYX_CIVITAI_URL); `nyx downloads retry JOB` tries again",
            retryable=True,
        ) from None
    finally:
        if own:
            http.close()
    if file and src.kind != "civitai":
        raise DownloadError(f"--file {file!r} only picks among a Civitai version's files", "drop --file")
    if sha256:
        if len(resolved.files) != 1:
            raise DownloadError(
                f"--sha256 names one file's hash, but {src.text} has {len(resolved.files)} files",
                "drop --sha256, or name one file of the repo",
            )
        resolved.files[0].sha256 = check_sha256(sha256)
    return resolved


def default_downloads_dir() -> Path:
    from nyx_tui import paths

    return paths.data_dir() / "downloads"


def hf_cache_dir() -> Path:
    """The Hugging Face hub cache, read at call time: HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/huggingface/hub."""
    value = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if value:
        return Path(os.path.expandvars(value)).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "huggingface"
    )
    return Path(os.path.expandvars(home)).expanduser() / "hub"


def _status_error(resp: httpx.Response, what: str, *, token_sent: bool, fix_token: str) -> DownloadError:
    code = resp.status_code
    detail = resp.headers.get("X-Error-Message") or ""
    if code == 401:
        if token_sent:
            return DownloadError(f"{what}: the server refused the token (401)", fix_token, status=code)
        return DownloadError(f"{what}: needs a token (401)", fix_token, status=code)
    if code == 403:
        why = detail or "the token has no access"
        return DownloadError(f"{what}: access denied (403: {why})", fix_token, status=code)
    if code == 404:
        return DownloadError(
            f"{what}: not found (404{': ' + detail if detail else ''})",
            "check the spelling of the id, the revision and the path (a private repo also answers 404 without a token)",
            status=code,
        )
    retry = code in (408, 429) or code >= 500
    return DownloadError(
        f"{what}: the server answered {code}{': ' + detail if detail else ''}",
        "try again later (`nyx downloads retry JOB`)" if retry else "check the source",
        retryable=retry,
        status=code,
    )


# ---------------------------------------------------------------------------------------------- Hugging Face


def _hf_resolve_url(endpoint: str, repo: str, revision: str, path: str) -> str:
    return f"{endpoint}/{repo}/resolve/{quote(revision, safe='')}/{quote(path, safe='/')}"


def _etag(value: str | None) -> str | None:
    if not value:
        return None
    return value.removeprefix("W/").strip().strip('"') or None


def _safe_parts(repo_path: str) -> list[str]:
    parts = [sanitize(p) for p in repo_path.split("/")]
    if any(p in ("", ".", "..") for p in parts):
        raise DownloadError(f"{repo_path!r} is not a safe file path", "the server listed a strange file; report it")
    return parts


def _hf_head(
    http: httpx.Client, endpoint: str, repo: str, revision: str, path: str, headers: dict[str, str], text: str
) -> dict[str, Any]:
    """HEAD the resolve URL without following the CDN redirect: commit, blob etag, size (as the Hub sends them)."""
    url = _hf_resolve_url(endpoint, repo, revision, path)
    resp = http.head(url, headers=headers, follow_redirects=False)
    if resp.is_redirect and "x-repo-commit" not in resp.headers:
        location = resp.headers.get("location", "")
        if location.startswith("/"):  # a renamed repo: the Hub answers with a relative redirect
            resp = http.head(endpoint + location, headers=headers, follow_redirects=False)
    if resp.status_code >= 400:
        raise _status_error(
            resp, f"{text} ({repo}/{path}@{revision})", token_sent=bool(headers), fix_token=HF_TOKEN_FIX
        )
    commit = resp.headers.get("x-repo-commit")
    etag = _etag(resp.headers.get("x-linked-etag") or resp.headers.get("etag"))
    size_text = resp.headers.get("x-linked-size") or resp.headers.get("content-length")
    size = int(size_text) if size_text and size_text.isdigit() else None
    lfs = bool(resp.headers.get("x-linked-etag"))
    return {"commit": commit, "etag": etag, "size": size, "lfs": lfs}


def _hf_listing(
    http: httpx.Client, endpoint: str, src: Source, headers: dict[str, str]
) -> tuple[str | None, list[dict[str, Any]]]:
    url = f"{endpoint}/api/models/{src.repo}/revision/{quote(src.revision, safe='')}"
    resp = http.get(url, headers=headers, params={"blobs": "true"}, follow_redirects=True)
    if resp.status_code >= 400:
        raise _status_error(
            resp, f"{src.text} ({src.repo}@{src.revision})", token_sent=bool(headers), fix_token=HF_TOKEN_FIX
        )
    try:
        data = resp.json()
        siblings = data.get("siblings") or []
        commit = data.get("sha")
    except (ValueError, AttributeError):
        raise DownloadError(
            f"{src.text}: the Hub's answer is not the repo listing", "check HF_ENDPOINT (is it a Hub?)"
        ) from None
    files: list[dict[str, Any]] = []
    for s in siblings:
        if not isinstance(s, dict) or not isinstance(s.get("rfilename"), str):
            continue
        lfs = s.get("lfs") if isinstance(s.get("lfs"), dict) else None
        sha = str(lfs["sha256"]).lower() if lfs and lfs.get("sha256") else None
        size = (lfs or {}).get("size", s.get("size"))
        files.append(
            {
                "path": s["rfilename"],
                "etag": sha or s.get("blobId"),
                "sha256": sha,
                "size": size if isinstance(size, int) else None,
            }
        )
    return commit if isinstance(commit, str) else None, files


def _resolve_hf(src: Source, dest: Path | None, http: httpx.Client) -> Resolved:
    endpoint = hf_endpoint()
    headers = auth_headers(hf_token(), endpoint)
    warnings = [w for w in [_http_warning(endpoint)] if w]
    if src.path:
        head = _hf_head(http, endpoint, src.repo, src.revision, src.path, headers, src.text)
        commit = head["commit"]
        entries = [
            {
                "path": src.path,
                "etag": head["etag"],
                "sha256": head["etag"] if head["lfs"] and head["etag"] and _SHA256.match(head["etag"]) else None,
                "size": head["size"],
            }
        ]
    else:
        commit, entries = _hf_listing(http, endpoint, src, headers)
        if not entries:
            raise DownloadError(f"{src.text}: the repo has no files at {src.revision}", "check the revision")
        if entries:  # a gated repo lists its files to anyone: ask for the first one now, not mid-download
            _hf_head(http, endpoint, src.repo, src.revision, entries[0]["path"], headers, src.text)
    rev_for_url = commit or src.revision  # every file from the same commit, even if the branch moves meanwhile
    files: list[RemoteFile] = []
    links: list[dict[str, str]] = []
    cache_repo = hf_cache_dir() / f"models--{src.repo.replace('/', '--')}"
    use_cache = dest is None and bool(commit)
    for entry in entries:
        parts = _safe_parts(entry["path"])
        url = _hf_resolve_url(endpoint, src.repo, rev_for_url, entry["path"])
        if use_cache:
            etag = entry["etag"]
            if not etag or not re.match(r"^[0-9A-Za-z._-]+$", etag):
                etag = None
            if etag is None:
                raise DownloadError(
                    f"{src.text}: the Hub sent no ETag for {entry['path']}, so it cannot go into the HF cache",
                    "pass --dest DIR to download into a folder instead",
                )
            files.append(RemoteFile(url, etag, entry["size"], entry["sha256"], "blobs", dict(headers), None, src.text))
            links.append({"blob": etag, "path": entry["path"]})
        else:
            subdir = "/".join(parts[:-1])
            files.append(
                RemoteFile(url, parts[-1], entry["size"], entry["sha256"], subdir, dict(headers), None, src.text)
            )
    meta: dict[str, Any] = {
        "kind": "hf",
        "repo": src.repo,
        "revision": src.revision,
        "commit": commit,
        "endpoint": endpoint,
        "warnings": warnings,
        "dest_dir": str(cache_repo if use_cache else (dest or _hf_default_dest(src))),
    }
    if use_cache:
        meta["hf_cache"] = {"repo_dir": str(cache_repo), "revision": src.revision, "commit": commit, "links": links}
    title = (
        f"{src.repo}" + (f"/{src.path}" if src.path else "") + ("" if src.revision == "main" else f"@{src.revision}")
    )
    return Resolved(src.text, files, title=title, meta=meta)


def _hf_default_dest(src: Source) -> Path:
    """Only when the Hub sent no commit (a minimal mirror): a plain folder under <data>/downloads."""
    return default_downloads_dir() / "hf" / src.repo.replace("/", "--")


def finish_file(resolved: Resolved, file: RemoteFile, fetched: Path) -> Path:
    """What the user gets for a fetched file: for the HF cache, make `snapshots/<commit>/<path>` (a relative
    symlink to the blob, as huggingface_hub does) and `refs/<rev>`, and return the snapshot path; otherwise
    the fetched path itself."""
    cache = resolved.meta.get("hf_cache")
    if not cache:
        return fetched
    repo_dir, commit, revision = Path(cache["repo_dir"]), str(cache["commit"]), str(cache["revision"])
    final = fetched
    for link in cache["links"]:
        if link["blob"] != file.filename:
            continue
        pointer = repo_dir / "snapshots" / commit / PurePosixPath(link["path"])
        # abspath, not resolve(): an earlier pointer is a symlink into blobs/
        if not Path(os.path.abspath(pointer)).is_relative_to(os.path.abspath(repo_dir / "snapshots" / commit)):
            raise DownloadError(f"{link['path']!r} would leave the snapshot folder", "report the repo listing")
        pointer.parent.mkdir(parents=True, exist_ok=True)
        target = os.path.relpath(fetched, pointer.parent)
        tmp = pointer.with_name(f".{pointer.name}.{uuid.uuid4().hex[:8]}.lnk")
        tmp.unlink(missing_ok=True)
        try:
            os.symlink(target, tmp)
            os.replace(tmp, pointer)
        except OSError:  # no symlinks here (some filesystems): a copy, as huggingface_hub does
            import shutil

            tmp.unlink(missing_ok=True)
            shutil.copyfile(fetched, pointer)
        final = pointer
    if revision != commit:
        ref = repo_dir / "refs" / revision
        ref.parent.mkdir(parents=True, exist_ok=True)
        tmp_ref = ref.with_name(f".{ref.name}.{uuid.uuid4().hex[:8]}.tmp")  # files finish in parallel threads
        tmp_ref.write_text(commit)
        os.replace(tmp_ref, ref)
    return final


# --------------------------------------------------------------------------------------------------- Civitai


def _civitai_get(http: httpx.Client, url: str, headers: dict[str, str], what: str) -> Any:
    resp = http.get(url, headers=headers, follow_redirects=True)
    if resp.status_code >= 400:
        raise _status_error(resp, what, token_sent=bool(headers), fix_token=CIVITAI_TOKEN_FIX)
    try:
        return resp.json()
    except ValueError:
        raise DownloadError(f"{what}: the answer is not JSON", "check NYX_CIVITAI_URL (is it Civitai's API?)") from None


def _size_from_kb(size_kb: Any) -> int | None:
    if not isinstance(size_kb, int | float) or size_kb <= 0:
        return None
    exact = size_kb * 1024
    return round(exact) if abs(exact - round(exact)) < 0.01 else None  # a rounded sizeKB is only a hint


def _pick_file(files: list[dict[str, Any]], name: str | None, what: str) -> dict[str, Any]:
    if not files:
        raise DownloadError(f"{what} has no files", "pick another version on the model page")
    if name:
        for f in files:
            if f.get("name") == name:
                return f
        lowered = [f for f in files if str(f.get("name", "")).lower() == name.lower()]
        if len(lowered) == 1:
            return lowered[0]
        names = ", ".join(str(f.get("name")) for f in files)
        raise DownloadError(f"{what} has no file {name!r}", f"choose one of: {names}")
    primary = [f for f in files if f.get("primary")]
    if primary:
        return primary[0]
    models = [f for f in files if f.get("type") == "Model"]
    return (models or files)[0]


def civitai_redirect(download_url: str, headers: dict[str, str], *, client: httpx.Client | None = None) -> str:
    """Ask Civitai's download endpoint where the bytes are now: the signed CDN URL of its redirect. Called
    before every attempt; the answer is handed to the engine and never stored."""
    own = client is None
    http = client or httpx.Client(timeout=TIMEOUT, headers={"User-Agent": USER_AGENT})
    try:
        try:
            with http.stream("GET", download_url, headers=headers, follow_redirects=False) as resp:
                status, location = resp.status_code, resp.headers.get("location")
                if status >= 400:
                    resp.read()
        except httpx.HTTPError as e:
            raise DownloadError(
                f"Civitai's download endpoint is unreachable ({type(e).__name__})", "retrying", retryable=True
            ) from None
        what = f"civitai download {_redact(download_url)}"
        if status == 401 and not headers:
            raise DownloadError(CIVITAI_TOKEN_MESSAGE, status=401)  # the message is its own fix
        if status >= 400:
            raise _status_error(resp, what, token_sent=bool(headers), fix_token=CIVITAI_TOKEN_FIX)
        if 300 <= status < 400 and location:
            return str(httpx.URL(download_url).join(location))
        if status == 200:
            return download_url  # a mirror that serves the bytes itself
        raise DownloadError(f"{what}: unexpected answer {status}", "try again later", retryable=True, status=status)
    finally:
        if own:
            http.close()


def _resolve_civitai(src: Source, dest: Path | None, file: str | None, http: httpx.Client) -> Resolved:
    base = civitai_base()
    token = civitai_token()
    headers = auth_headers(token, base)
    warnings = [w for w in [_http_warning(base)] if w]
    if src.version_id is None:
        model = _civitai_get(http, f"{base}/api/v1/models/{src.model_id}", headers, f"civitai model {src.model_id}")
        versions = model.get("modelVersions") if isinstance(model, dict) else None
        if not versions:
            raise DownloadError(f"civitai model {src.model_id} has no versions", "pick another model")
        version = versions[0]  # newest first, as Civitai lists them
        version.setdefault("model", {"name": model.get("name"), "type": model.get("type")})
        version.setdefault("modelId", src.model_id)
    else:
        version = _civitai_get(
            http, f"{base}/api/v1/model-versions/{src.version_id}", headers, f"civitai:{src.version_id}"
        )
    if not isinstance(version, dict):
        raise DownloadError(f"{src.text}: Civitai's answer has no model version", "check NYX_CIVITAI_URL")
    version_id = version.get("id", src.version_id)
    model_info = version.get("model") or {}
    files = [f for f in version.get("files") or [] if isinstance(f, dict)]
    what = f"civitai:{version_id} ({model_info.get('name', '?')} / {version.get('name', '?')})"
    chosen = _pick_file(files, file, what)
    sha = ((chosen.get("hashes") or {}).get("SHA256") or "").lower() or None
    if sha and not _SHA256.match(sha):
        sha = None
    download_url = str(chosen.get("downloadUrl") or f"{base}/api/download/models/{version_id}")
    if _host(download_url) != _host(base):  # Civitai's own host only gets the token
        file_headers: dict[str, str] = {}
    else:
        file_headers = headers
    # the API names its own host civitai.com even behind a mirror: ask the configured base instead
    parts = urlsplit(download_url)
    if _host(download_url) in ("civitai.com", "www.civitai.com") and _host(base) not in (
        "civitai.com",
        "www.civitai.com",
    ):
        download_url = base + parts.path + (f"?{parts.query}" if parts.query else "")
        file_headers = headers

    def fresh_url(url: str = download_url, auth: dict[str, str] = file_headers) -> str:
        return civitai_redirect(url, auth)

    remote = RemoteFile(
        url=download_url,
        filename=sanitize(str(chosen.get("name") or f"civitai-{version_id}.safetensors")),
        size=_size_from_kb(chosen.get("sizeKB")),
        sha256=sha,
        subdir="",
        headers={},  # the bytes come from a CDN: no token there
        resolve=fresh_url,
        source=src.text,
    )
    meta: dict[str, Any] = {
        "kind": "civitai",
        "version_id": version_id,
        "model_id": version.get("modelId", src.model_id),
        "name": model_info.get("name"),
        "version": version.get("name"),
        "type": model_info.get("type"),
        "base_model": version.get("baseModel"),
        "trained_words": version.get("trainedWords") or [],
        "files": [
            {
                "name": f.get("name"),
                "size": _size_from_kb(f.get("sizeKB")),
                "type": f.get("type"),
                "primary": bool(f.get("primary")),
                "sha256": ((f.get("hashes") or {}).get("SHA256") or "").lower() or None,
                "chosen": f is chosen,
            }
            for f in files
        ],
        "warnings": warnings,
        "dest_dir": str(dest or default_downloads_dir()),
    }
    title = f"{model_info.get('name') or 'civitai'} — {version.get('name') or version_id}"
    return Resolved(src.text, [remote], title=title, meta=meta)


# ----------------------------------------------------------------------------------------------- plain URLs


def filename_from_disposition(value: str | None) -> str | None:
    """The file name a Content-Disposition header offers (RFC 6266), unsanitized."""
    from nyx_tui.downloads.engine import content_disposition_filename

    return content_disposition_filename(value)


def _resolve_url(src: Source, dest: Path | None, http: httpx.Client) -> Resolved:
    warnings = [w for w in [_http_warning(src.url)] if w]
    size: int | None = None
    name: str | None = None
    final_url = src.url
    try:
        resp = http.head(src.url, follow_redirects=True)
        if resp.status_code in (403, 405, 501) or resp.status_code >= 500:  # some servers refuse HEAD: ask by GET
            with http.stream("GET", src.url, follow_redirects=True) as resp:
                pass
    except httpx.HTTPError:
        raise
    if resp.status_code >= 400:
        raise _status_error(resp, f"{_redact(src.url)}", token_sent=False, fix_token="check that the URL is public")
    final_url = str(resp.url)
    name = filename_from_disposition(resp.headers.get("content-disposition"))
    length = resp.headers.get("content-length")
    if length and length.isdigit() and "content-encoding" not in resp.headers:
        size = int(length)
    if not name:
        for candidate in (src.url, final_url):
            last = unquote(PurePosixPath(urlsplit(candidate).path).name)
            if last:
                name = last
                break
    filename = sanitize(name or "download")
    remote = RemoteFile(src.url, filename, size, None, "", {}, None, src.text)
    meta = {"kind": "url", "warnings": warnings, "dest_dir": str(dest or default_downloads_dir())}
    return Resolved(src.text, [remote], title=filename, meta=meta)


__all__ = [
    "Source",
    "check_sha256",
    "civitai_redirect",
    "finish_file",
    "hf_cache_dir",
    "parse_source",
    "resolve",
]
