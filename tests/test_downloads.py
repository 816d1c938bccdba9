"""Download sources, the download job and `nyx download(s)`, against a local fake of the Hub and Civitai
(tests/hub_fake.py). Nothing here reaches a network."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import run_nyx, wait_for
from hub_fake import CivitaiFile, CivitaiVersion, FakeHub, HubFile

from nyx_tui.downloads import sources
from nyx_tui.downloads.model import DownloadError
from nyx_tui.jobs.events import EventWriter, read_events
from nyx_tui.jobs.jobdir import JobDir, create_job

HF_TOKEN = "hf_secret_token_abc123"
CIVITAI_TOKEN = "civ_secret_token_xyz789"

LORA = os.urandom(300_000)
BIG = os.urandom(1_500_000)  # for the slow (throttled) download
CONFIG = b'{"_class_name": "UNet2DConditionModel"}\n'
UNET = os.urandom(70_000)
GATED = os.urandom(20_000)
OTHER = os.urandom(5_000)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, nyx_home: Path) -> Iterator[FakeHub]:
    fake = FakeHub(hf_token=HF_TOKEN, civitai_token=CIVITAI_TOKEN).start()
    fake.add_repo(
        "org/tiny",
        {
            "lora.safetensors": HubFile(LORA),
            "unet/config.json": HubFile(CONFIG, lfs=False),
            "unet/diffusion_pytorch_model.safetensors": HubFile(UNET),
        },
    )
    fake.add_repo("org/gated", {"model.safetensors": HubFile(GATED, gated=True)})
    fake.add_version(
        CivitaiVersion(
            123,
            model_id=77,
            model_name="Shiny Style",
            base_model="SDXL 1.0",
            files=[
                CivitaiFile("shiny_style.safetensors", LORA),
                CivitaiFile("shiny_style_training_data.zip", OTHER, primary=False, type="Training Data"),
            ],
            trained_words=["shiny"],
        )
    )
    fake.add_version(
        CivitaiVersion(
            124, model_id=77, model_name="Shiny Style", name="v2.0", files=[CivitaiFile("shiny_v2.safetensors", OTHER)]
        )
    )
    fake.add_version(
        CivitaiVersion(200, model_id=90, model_name="Big One", files=[CivitaiFile("big.safetensors", BIG)])
    )
    fake.add_version(
        CivitaiVersion(
            300,
            model_id=91,
            model_name="Members Only",
            files=[CivitaiFile("members.safetensors", OTHER)],
            needs_token=True,
        )
    )
    for key, value in fake.env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # no token file of the machine's user
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "CIVITAI_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    yield fake
    fake.stop()


def run_job(sources_: list[str], dest: Path | None = None, **extra: object) -> tuple[JobDir, int]:
    """The download worker in this process (the supervisor's part is tested through the CLI below)."""
    from nyx_tui.downloads.job import DownloadWorker

    spec = {"sources": sources_, "dest": str(dest) if dest else None, "sha256": None, "file": None, **extra}
    job = create_job("download", "dl-test", ["-"], extra={"download": spec, "resource": "cpu"})
    with EventWriter(job.events_path) as events:
        try:
            code = asyncio.run(DownloadWorker(job, events).run())
        except DownloadError as e:
            events.emit("log", level="error", message=e.message, fix=e.fix)
            code = 1
    return job, code


def artifacts(job: JobDir) -> list[Path]:
    return [Path(e["path"]) for e in read_events(job.events_path) if e["kind"] == "artifact"]


def errors(job: JobDir) -> list[str]:
    return [e["message"] for e in read_events(job.events_path) if e["kind"] == "log" and e["level"] == "error"]


def job_text(job: JobDir) -> str:
    return "\n".join(p.read_text(errors="replace") for p in job.path.rglob("*") if p.is_file())


# ---------------------------------------------------------------------------------------------- parsing


@pytest.mark.parametrize(
    ("text", "expect"),
    [
        ("hf:org/model/lora.safetensors", dict(kind="hf", repo="org/model", revision="main", path="lora.safetensors")),
        (
            "hf:org/model@v1.0/unet/x.safetensors",
            dict(kind="hf", repo="org/model", revision="v1.0", path="unet/x.safetensors"),
        ),
        ("hf:org/model", dict(kind="hf", repo="org/model", revision="main", path="")),
        ("hf:org/model@refs%2Fpr%2F1", dict(kind="hf", repo="org/model", revision="refs/pr/1", path="")),
        (
            "https://huggingface.co/org/model/resolve/main/sub/a.safetensors",
            dict(kind="hf", repo="org/model", revision="main", path="sub/a.safetensors"),
        ),
        (
            "https://huggingface.co/org/model/blob/abc123/a.safetensors?download=true",
            dict(kind="hf", repo="org/model", revision="abc123", path="a.safetensors"),
        ),
        ("https://huggingface.co/org/model", dict(kind="hf", repo="org/model", path="")),
        ("https://huggingface.co/org/model/tree/dev", dict(kind="hf", repo="org/model", revision="dev", path="")),
        ("civitai:123456", dict(kind="civitai", version_id=123456)),
        ("https://civitai.com/models/4201?modelVersionId=130072", dict(kind="civitai", version_id=130072)),
        ("https://civitai.com/models/4201/some-style", dict(kind="civitai", version_id=None, model_id=4201)),
        ("https://civitai.com/api/download/models/130072", dict(kind="civitai", version_id=130072)),
        ("https://example.com/files/x.safetensors", dict(kind="url", url="https://example.com/files/x.safetensors")),
    ],
)
def test_parse_source_forms(text: str, expect: dict[str, object]) -> None:
    s = sources.parse_source(text)
    for key, value in expect.items():
        assert getattr(s, key) == value, (text, key)


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("", "empty"),
        ("org/model", "hf:org/model"),
        ("hf:org", "owner/repo"),
        ("hf:org/model@/x", "revision"),
        ("hf:org/model/../../etc/passwd", "path"),
        ("hf:org/mo del/x", "repo id"),
        ("civitai:abc", "civitai:123456"),
        ("civitai:0", "number"),
        ("ftp://example.com/x.bin", "https://"),
        ("https://user:pw@example.com/x.bin", "tokens come from the environment"),
        ("https://civitai.com/api/download/models/1?token=abc", "CIVITAI_TOKEN"),
        ("https://civitai.com/user/someone", "civitai.com/models/ID"),
        ("https://huggingface.co/org/model/tree/main/unet", "resolve"),
        ("https://huggingface.co/datasets/org/data", "model"),
    ],
)
def test_parse_source_rejects_with_a_fix(text: str, words: str) -> None:
    with pytest.raises(DownloadError) as info:
        sources.parse_source(text)
    assert info.value.fix
    assert words in str(info.value), str(info.value)


def test_endpoint_hosts_are_read_at_call_time(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    s = sources.parse_source("http://127.0.0.1:9/org/model/resolve/main/a.bin")
    assert (s.kind, s.repo, s.path) == ("hf", "org/model", "a.bin")
    monkeypatch.setenv("NYX_CIVITAI_URL", "http://localhost:9")
    assert sources.parse_source("http://localhost:9/models/5?modelVersionId=6").version_id == 6
    assert sources.check_sha256(sha(b"x").upper()) == sha(b"x")
    with pytest.raises(DownloadError):
        sources.check_sha256("abc")


# ------------------------------------------------------------------------------------------ Hugging Face


def test_hf_file_into_the_cache_layout(hub: FakeHub, tmp_path: Path) -> None:
    from huggingface_hub import try_to_load_from_cache

    job, code = run_job(["hf:org/tiny/unet/diffusion_pytorch_model.safetensors"])
    assert code == 0, errors(job)
    cache = tmp_path / "hf-cache"
    found = try_to_load_from_cache("org/tiny", "unet/diffusion_pytorch_model.safetensors", cache_dir=cache)
    assert isinstance(found, str) and Path(found).read_bytes() == UNET
    repo_dir = cache / "models--org--tiny"
    assert (repo_dir / "blobs" / sha(UNET)).read_bytes() == UNET
    commit = hub.repos["org/tiny"].commit
    assert (repo_dir / "refs" / "main").read_text() == commit
    link = repo_dir / "snapshots" / commit / "unet" / "diffusion_pytorch_model.safetensors"
    assert link.is_symlink() and not os.path.isabs(os.readlink(link))
    assert artifacts(job) == [link]
    progress = [e for e in read_events(job.events_path) if e["kind"] == "progress" and e.get("total")]
    assert progress[-1]["done"] == progress[-1]["total"] == len(UNET)
    assert {"speed_bps", "eta_s", "file"} <= progress[-1].keys() and progress[-1]["unit"] == "bytes"
    # the bytes came from the CDN host; the second run finds the blob and fetches nothing
    before = len(hub.requests_to("/cdn/"))
    _job2, code2 = run_job(["hf:org/tiny/unet/diffusion_pytorch_model.safetensors"])
    assert code2 == 0 and len(hub.requests_to("/cdn/")) == before


def test_hf_file_and_whole_repo_into_dest(hub: FakeHub, tmp_path: Path) -> None:
    dest = tmp_path / "models"
    job, code = run_job([f"{hub.url}/org/tiny/resolve/main/unet/diffusion_pytorch_model.safetensors"], dest)
    assert code == 0, errors(job)
    assert (dest / "unet" / "diffusion_pytorch_model.safetensors").read_bytes() == UNET

    whole = tmp_path / "whole"
    job, code = run_job(["hf:org/tiny"], whole)
    assert code == 0, errors(job)
    assert (whole / "lora.safetensors").read_bytes() == LORA
    assert (whole / "unet" / "config.json").read_bytes() == CONFIG  # a small (non-LFS) file, served directly
    assert sorted(p.name for p in artifacts(job)) == [
        "config.json",
        "diffusion_pytorch_model.safetensors",
        "lora.safetensors",
    ]
    assert not list(whole.rglob("*.part"))


def test_hf_whole_repo_into_cache_for_diffusers(hub: FakeHub, tmp_path: Path) -> None:
    from huggingface_hub import try_to_load_from_cache

    job, code = run_job(["https://huggingface.co/org/tiny"])  # a page URL, resolved against HF_ENDPOINT
    assert code == 0, errors(job)
    cache = tmp_path / "hf-cache"
    for path, data in (("unet/config.json", CONFIG), ("lora.safetensors", LORA)):
        found = try_to_load_from_cache("org/tiny", path, cache_dir=cache)
        assert isinstance(found, str) and Path(found).read_bytes() == data


def test_hf_gated_file_needs_the_token_and_it_goes_to_the_hub_only(
    hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(DownloadError) as info:
        sources.resolve("hf:org/gated/model.safetensors", dest=None)
    assert info.value.status == 401 and "HF_TOKEN" in info.value.fix

    monkeypatch.setenv("HF_TOKEN", "hf_wrong")
    with pytest.raises(DownloadError) as info:
        sources.resolve("hf:org/gated/model.safetensors", dest=None)
    assert info.value.status == 403 and "not in the authorized list" in info.value.message

    monkeypatch.setenv("HF_TOKEN", HF_TOKEN)
    job, code = run_job(["hf:org/gated/model.safetensors"], tmp_path / "gated")
    assert code == 0, errors(job)
    assert (tmp_path / "gated" / "model.safetensors").read_bytes() == GATED
    sent = [r for r in hub.requests if r.authorization]
    assert sent and all(r.host == "127.0.0.1" for r in sent)
    assert any(r.authorization == f"Bearer {HF_TOKEN}" and "/resolve/" in r.path for r in sent)
    assert any(r.path.startswith("/cdn/hf/") and r.host == "localhost" for r in hub.requests)
    assert HF_TOKEN not in job_text(job)


def test_hf_gated_job_fails_with_a_clear_message(hub: FakeHub, tmp_path: Path) -> None:
    job, code = run_job(["hf:org/gated/model.safetensors"], tmp_path / "x")
    assert code == 1
    assert any("needs a token" in m for m in errors(job)), errors(job)


# ------------------------------------------------------------------------------------------------ Civitai


def test_civitai_version_metadata_and_choice(hub: FakeHub, tmp_path: Path) -> None:
    r = sources.resolve("civitai:123", dest=tmp_path)
    (f,) = r.files
    assert (f.filename, f.size, f.sha256) == ("shiny_style.safetensors", len(LORA), sha(LORA))
    assert f.headers == {} and f.resolve is not None and "token=" not in f.url
    assert r.meta["name"] == "Shiny Style" and r.meta["type"] == "LORA" and r.meta["base_model"] == "SDXL 1.0"
    assert [x["name"] for x in r.meta["files"]] == ["shiny_style.safetensors", "shiny_style_training_data.zip"]
    picked = sources.resolve("civitai:123", dest=tmp_path, file="shiny_style_training_data.zip")
    assert picked.files[0].sha256 == sha(OTHER)
    with pytest.raises(DownloadError) as info:
        sources.resolve("civitai:123", dest=tmp_path, file="nope.bin")
    assert "shiny_style.safetensors" in info.value.fix
    latest = sources.resolve(f"{hub.url}/models/77", dest=tmp_path)  # a model page: its newest version
    assert latest.meta["version_id"] == 124 and latest.files[0].filename == "shiny_v2.safetensors"
    with pytest.raises(DownloadError) as info:
        sources.resolve("civitai:999", dest=tmp_path)
    assert info.value.status == 404


def test_civitai_download_checks_hash_and_re_resolves_the_signed_url(
    hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CIVITAI_TOKEN", CIVITAI_TOKEN)
    hub.drop_after = 100_000  # the first CDN body is cut: the retry must ask Civitai for a fresh URL
    job, code = run_job(["civitai:123"], tmp_path / "loras")
    assert code == 0, errors(job)
    out = tmp_path / "loras" / "shiny_style.safetensors"
    assert sha(out.read_bytes()) == sha(LORA)
    cdn = hub.requests_to("/cdn/civitai/")
    assert len(cdn) >= 2 and len({r.path for r in cdn}) == len(cdn)  # each attempt a fresh signature
    assert len(hub.requests_to("/api/download/models/123")) == len(cdn)
    assert any(r.range for r in cdn[1:])  # the retry resumed
    assert all(r.authorization is None for r in cdn)  # the token never reaches the CDN
    assert all(r.authorization == f"Bearer {CIVITAI_TOKEN}" for r in hub.requests_to("/api/"))
    text = job_text(job)
    assert "token=" not in text and CIVITAI_TOKEN not in text
    assert artifacts(job) == [out]


def test_civitai_wrong_hash_override_fails(hub: FakeHub, tmp_path: Path) -> None:
    job, code = run_job(["civitai:123"], tmp_path / "x", sha256="0" * 64)
    assert code == 1 and any("sha256" in m for m in errors(job)), errors(job)
    assert not (tmp_path / "x" / "shiny_style.safetensors").exists()


def test_civitai_token_required(hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    r = sources.resolve("civitai:300", dest=tmp_path)
    assert r.files[0].resolve is not None
    with pytest.raises(DownloadError) as info:
        r.files[0].resolve()
    assert str(info.value) == sources.CIVITAI_TOKEN_MESSAGE
    job, code = run_job(["civitai:300"], tmp_path)
    assert code == 1 and any("needs a Civitai token" in m for m in errors(job)), errors(job)
    monkeypatch.setenv("CIVITAI_TOKEN", CIVITAI_TOKEN)
    job, code = run_job(["civitai:300"], tmp_path)
    assert code == 0 and (tmp_path / "members.safetensors").read_bytes() == OTHER


def test_plain_url_name_from_the_path(hub: FakeHub, tmp_path: Path) -> None:
    url = f"{hub.cdn}/cdn/hf/{sha(LORA)}"
    r = sources.resolve(url, dest=tmp_path)
    assert r.files[0].filename == sha(LORA) and r.files[0].size == len(LORA)
    _job, code = run_job([url], tmp_path, sha256=sha(LORA))
    assert code == 0 and (tmp_path / sha(LORA)).read_bytes() == LORA


# ---------------------------------------------------------------------------------------------------- CLI


def test_cli_rejects_bad_input_before_starting_anything(nyx_home: Path) -> None:
    proc = run_nyx("download", "civitai:abc", home=nyx_home, timeout=60)
    assert proc.returncode == 2 and "fix" in proc.stderr and "nothing was started" in proc.stderr
    proc = run_nyx("download", "hf:org/tiny", "--sha256", "0" * 64, home=nyx_home, timeout=60)
    assert proc.returncode == 2 and "--sha256" in proc.stderr
    assert not (nyx_home / "jobs").exists() or not any((nyx_home / "jobs").iterdir())


def test_cli_download_list_cancel_resume(
    hub: FakeHub, nyx_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CIVITAI_TOKEN", CIVITAI_TOKEN)
    dest = tmp_path / "D"
    proc = run_nyx("download", "civitai:123", "--dest", str(dest), home=nyx_home, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert sha((dest / "shiny_style.safetensors").read_bytes()) == sha(LORA)
    proc = run_nyx("downloads", "--json", home=nyx_home, timeout=60)
    (row,) = json.loads(proc.stdout)
    assert row["state"] == "finished" and row["files_done"] == 1 and row["sources"] == ["civitai:123"]
    first = JobDir(Path(row["dir"]))
    assert "token=" not in job_text(first) and CIVITAI_TOKEN not in job_text(first)
    assert CIVITAI_TOKEN not in first.spec_path.read_text()

    # a slow one: cancel it, the part stays; resume finishes it with the right hash
    hub.throttle_bps = 150_000
    proc = run_nyx("download", "civitai:200", "--dest", str(dest), "--detach", home=nyx_home, timeout=60)
    assert proc.returncode == 0, proc.stderr
    job_id = proc.stdout.strip().splitlines()[-1]
    job = JobDir(nyx_home / "jobs" / job_id)
    wait_for(lambda: any(e["kind"] == "progress" and e["done"] > 50_000 for e in job.events()), timeout=30)
    table = run_nyx("downloads", home=nyx_home, timeout=60).stdout
    assert job_id in table and "running" in table and "/s" in table
    proc = run_nyx("downloads", "cancel", job_id, home=nyx_home, timeout=60)
    assert proc.returncode == 0, proc.stderr
    wait_for(lambda: job.status().get("state") == "cancelled", timeout=30)
    part = dest / "big.safetensors.part"
    assert part.is_file() and 0 < part.stat().st_size < len(BIG)
    assert not (dest / "big.safetensors").exists()
    assert any(e.get("ack") == "cancel" for e in job.events())
    hub.throttle_bps = None
    proc = run_nyx("downloads", "resume", job_id, home=nyx_home, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert sha((dest / "big.safetensors").read_bytes()) == sha(BIG) and not part.exists()
    resumed = [r for r in hub.requests_to("/cdn/civitai/200/") if r.range]
    assert resumed, "the resume did not ask for the rest only"
    rows = json.loads(run_nyx("downloads", "--json", home=nyx_home, timeout=60).stdout)
    assert [r["state"] for r in rows] == ["finished", "cancelled", "finished"]
    proc = run_nyx("downloads", "retry", rows[-1]["id"], home=nyx_home, timeout=60)
    assert proc.returncode == 1 and "nothing to resume" in proc.stderr
