"""Uploading a LoRA to the Hugging Face Hub: the file, sample images and a model card, in one commit.

huggingface_hub's `HfApi` does the talking: `create_repo` (reused when it exists; `--private` applies to a
new repo only, as on the Hub), then one `create_commit` with the LoRA, the images under `images/` and the
README built by `card.py` — one commit, so the repo never shows a LoRA without its card.

The token comes from `settings.get_secret("HF_TOKEN")` (the environment, or `secrets.toml` when only its
owner can read it) and goes to the Hub in the Authorization header only: it is never printed, never put in
argv, events or logs, and every message that leaves this module passes `redact`, which blanks the token and
anything shaped like one. `HF_ENDPOINT` (a mirror, or a local server in the tests) is honoured even when
huggingface_hub was imported before it was set: it is passed to `HfApi` explicitly.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nyx_tui.lora.card import CardInfo, Sample, base_model_of, build_card, read_metadata, trigger_of

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
TOKEN_SHAPE = re.compile(r"hf_[A-Za-z0-9]{8,}")
TOKEN_HELP = (
    "set HF_TOKEN in the environment (export HF_TOKEN=hf_…; a token with write access from "
    'https://huggingface.co/settings/tokens), or put the line HF_TOKEN = "hf_…" in {path} and run chmod 600 on it'
)


class UploadError(Exception):
    """An upload that cannot go on; the message says why and what to do, and holds no token."""


@dataclass
class UploadOptions:
    lora: Path
    repo: str
    private: bool = False
    samples: list[Path] = field(default_factory=list)
    run: str | None = None
    base_model: str | None = None
    trigger: str | None = None
    message: str | None = None
    card: bool = True


@dataclass(frozen=True)
class UploadResult:
    repo_id: str
    url: str
    commit: str
    files: list[str]


def redact(text: str, token: str | None) -> str:
    """`text` without the token (and without anything shaped like a Hugging Face token)."""
    if token:
        text = text.replace(token, "<redacted>")
    return TOKEN_SHAPE.sub("hf_<redacted>", text)


def get_token() -> str:
    """The Hugging Face token, or UploadError saying how to set one."""
    from nyx_tui import settings

    token = settings.get_secret("HF_TOKEN")
    if token:
        return token
    path = settings.secrets_path()
    try:
        mode = path.stat().st_mode
    except OSError:
        mode = None
    if mode is not None and mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise UploadError(
            f"no Hugging Face token used: {path} can be read by other users, so Nyx does not read it. "
            f"Run chmod 600 {path}, or set HF_TOKEN in the environment"
        )
    raise UploadError("no Hugging Face token: " + TOKEN_HELP.format(path=path))


def check_repo_id(repo: str) -> None:
    """UploadError unless `repo` is a valid model repo id, OWNER/NAME (or NAME: the token's user then owns it)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo)
    except HFValidationError as e:
        raise UploadError(
            f"{repo!r} is not a valid repo name ({e}). Use OWNER/NAME with letters, digits, '-', '_' and '.' "
            "(no '--' or '..', at most 96 characters), e.g. --repo alice/my-style-lora"
        ) from None


def images_in(paths: list[Path]) -> list[tuple[Path, str | None]]:
    """Sample images from files and folders (a folder's images in name order), each with the prompt in a
    same-named .txt beside it, when there is one. UploadError for a path that is neither."""
    found: list[Path] = []
    for p in paths:
        p = p.expanduser()
        if p.is_dir():
            found += sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
        elif p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES:
            found.append(p)
        else:
            raise UploadError(f"--samples {p}: not an image ({', '.join(IMAGE_SUFFIXES)}) or a folder of images")
    out: list[tuple[Path, str | None]] = []
    for f in found:
        caption = f.with_suffix(".txt")
        prompt = caption.read_text(encoding="utf-8", errors="replace").strip() if caption.is_file() else None
        out.append((f, prompt or None))
    return out


def run_samples(ref: str) -> list[tuple[Path, str | None]]:
    """The images of a training job's last `sample` event (the latest step), with their prompts."""
    from nyx_tui.jobs.jobdir import find_job

    try:
        job = find_job(ref)
    except LookupError as e:
        raise UploadError(f"--run {ref}: {e}") from None
    event = job.last_event("sample")
    if event is None:
        return []
    images = [Path(str(p)) for p in event.get("images") or []]
    prompts = [str(p) for p in event.get("prompts") or []]
    out: list[tuple[Path, str | None]] = []
    for i, image in enumerate(images):
        path = image if image.is_absolute() else job.path / image
        if path.is_file():
            out.append((path, prompts[i] if i < len(prompts) else None))
    return out


def _repo_paths(samples: list[tuple[Path, str | None]]) -> list[tuple[Path, Sample]]:
    """Each image's path in the repo, `images/NN-name`, unique even when two folders hold the same name."""
    return [(path, Sample(f"images/{i:02d}-{path.name}", prompt)) for i, (path, prompt) in enumerate(samples)]


def prepare(options: UploadOptions) -> tuple[CardInfo, list[tuple[Path, Sample]]]:
    """Check the inputs (nothing touches the network) and gather what goes up. Raises UploadError."""
    from nyx_tui.families import detect

    lora = options.lora.expanduser()
    if not lora.is_file():
        raise UploadError(f"{lora}: no such file; give the LoRA .safetensors file to upload")
    try:
        metadata = read_metadata(lora)
    except ValueError as e:
        raise UploadError(f"{e}; only .safetensors LoRAs are uploaded") from None
    family = detect(lora).family
    check_repo_id(options.repo)
    samples = run_samples(options.run) if options.run else []
    samples += images_in(options.samples)
    pairs = _repo_paths(samples)
    info = CardInfo(
        repo_id=options.repo,
        lora_filename=lora.name,
        family=family,
        base_model=base_model_of(metadata, family, options.base_model),
        trigger=trigger_of(metadata, options.trigger),
        samples=[s for _, s in pairs],
        metadata=metadata,
    )
    return info, pairs


def _http_error(e: Exception, repo: str, token: str) -> UploadError:
    """A clear UploadError for an HTTP error of the Hub (by its status), with no token in it."""
    response = getattr(e, "response", None)
    status = getattr(response, "status_code", None)
    owner = repo.split("/")[0] if "/" in repo else "your account"
    server = ""
    if response is not None:
        try:
            server = str(response.json().get("error") or "")
        except Exception:
            server = ""
    said = f" (the Hub says: {server})" if server else ""
    if status == 401:
        message = (
            f"the Hub rejected the token (401){said}: it is invalid, expired or revoked. Make a new one with write "
            "access at https://huggingface.co/settings/tokens and set HF_TOKEN"
        )
    elif status == 403:
        message = (
            f"the token may not write to {repo} (403){said}: it is read-only or fine-grained without write access "
            f"to {owner}, or {owner} is an organisation you cannot create repos in. Use a token with write access "
            "(https://huggingface.co/settings/tokens) or a repo under your own name"
        )
    elif status == 404:
        message = f"{repo} was not found (404){said}; check the name, and that the token can see the repo"
    elif status == 400:
        message = f"the Hub refused the request (400){said}; check the repo name ({repo})"
    else:
        message = f"the upload failed ({type(e).__name__}: {e})"
    return UploadError(redact(message, token))


def upload(options: UploadOptions, *, token: str | None = None, say: Callable[[str], Any] = print) -> UploadResult:
    """Create or reuse the repo and commit the LoRA, the samples and the card. Raises UploadError."""
    info, pairs = prepare(options)
    token = token or get_token()
    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub.errors import HfHubHTTPError

    endpoint = os.environ.get("HF_ENDPOINT") or None
    api = HfApi(endpoint=endpoint, token=token)
    repo = options.repo
    try:
        if "/" not in repo:  # NAME alone: the token's user owns it
            user = api.whoami().get("name")
            if not user:
                raise UploadError("the Hub did not say whose token this is; give the repo as OWNER/NAME")
            repo = f"{user}/{repo}"
            info.repo_id = repo
        say(f"repo {repo}: creating it{' (private)' if options.private else ''} or reusing it")
        # not private: None, so an organisation whose repos are private by default keeps that default
        private = True if options.private else None
        url = str(api.create_repo(repo, repo_type="model", private=private, exist_ok=True))
        operations = [CommitOperationAdd(path_in_repo=options.lora.name, path_or_fileobj=str(options.lora))]
        operations += [CommitOperationAdd(path_in_repo=s.path_in_repo, path_or_fileobj=str(p)) for p, s in pairs]
        if options.card:
            readme = str(build_card(info)).encode("utf-8")
            operations.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=readme))
        files = [op.path_in_repo for op in operations]
        say(f"uploading {len(files)} files: {', '.join(files)}")
        commit = api.create_commit(
            repo,
            operations=operations,
            commit_message=options.message or f"Upload {options.lora.name} with Nyx",
            repo_type="model",
        )
    except UploadError:
        raise
    except HfHubHTTPError as e:
        raise _http_error(e, repo, token) from None
    except (OSError, ValueError) as e:
        raise UploadError(redact(f"the upload failed: {e}", token)) from None
    except Exception as e:  # httpx2 connection errors and the like: say what, never the token
        raise UploadError(redact(f"the upload failed ({type(e).__name__}: {e})", token)) from None
    repo_url = url or f"{api.endpoint}/{repo}"
    return UploadResult(repo_id=repo, url=repo_url, commit=str(commit.oid), files=files)
