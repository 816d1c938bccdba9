"""`nyx lora upload` against a local Hub (tests/hub_upload_fake.py): real HTTP on 127.0.0.1, the real
huggingface_hub client in a real `nyx` process, HF_ENDPOINT pointing at the fake.

What must hold: the repo is created (private when asked) or reused, the LoRA, the samples and the README land
in one commit with the right bytes, the card's metadata says what the file and the options say, the token
travels only in Authorization headers to the Hub (not to the LFS upload URL) and never shows in anything Nyx
prints or writes; a missing token, a rejected one and a bad repo name end with a clear message.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from huggingface_hub import ModelCard
from PIL import Image
from safetensors.numpy import save_file

from tests.conftest import nyx_cmd
from tests.hub_upload_fake import Account, FakeHubUpload

TOKEN = "hf_WriteTokenForTests0123456789abcdef"
READ_TOKEN = "hf_ReadOnlyTokenForTests0123456789xyz"
API_PATHS = (
    "/api/repos/create",
    "/api/validate-yaml",
    "/api/models/alice/zxc-style/preupload/main",
    "/api/models/alice/zxc-style/commit/main",
)


@pytest.fixture
def hub() -> Iterator[FakeHubUpload]:
    with FakeHubUpload({TOKEN: Account("alice", orgs=("team",)), READ_TOKEN: Account("bob", write=False)}) as h:
        yield h


def make_lora(path: Path, dim: int = 4) -> Path:
    """A real kohya-keyed SD1.5 LoRA file with sd-scripts' metadata."""
    rng = np.random.default_rng(0)
    tensors: dict[str, np.ndarray] = {}
    for module, width in (("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q", 32),
                          ("lora_te_text_model_encoder_layers_0_self_attn_q_proj", 32)):  # fmt: skip
        tensors[f"{module}.lora_down.weight"] = rng.standard_normal((dim, width)).astype(np.float16)
        tensors[f"{module}.lora_up.weight"] = rng.standard_normal((width, dim)).astype(np.float16)
        tensors[f"{module}.alpha"] = np.array(2.0, dtype=np.float16)
    metadata = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(dim),
        "ss_network_alpha": "2.0",
        "ss_learning_rate": "0.0001",
        "ss_max_train_steps": "1500",
        "ss_optimizer": "torch.optim.adamw.AdamW",
        "ss_base_model_version": "sd_v1",
        "ss_network_args": json.dumps({"conv_dim": "4"}),
        "modelspec.architecture": "stable-diffusion-v1/lora",
    }
    save_file(tensors, str(path), metadata=metadata)
    return path


def make_samples(folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, colour in enumerate(((200, 20, 20), (20, 20, 200))):
        p = folder / f"sample-{i}.png"
        Image.new("RGB", (16, 16), colour).save(p)
        paths.append(p)
    (folder / "sample-0.txt").write_text("zxc style, a red square\n")
    return paths


def env_for(hub: FakeHubUpload, tmp_path: Path, token: str | None = TOKEN) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")}
    env.update(HF_ENDPOINT=hub.url, HF_HUB_DISABLE_XET="1", HF_HOME=str(tmp_path / "hf-home"), NO_COLOR="1")
    if token:
        env["HF_TOKEN"] = token
    return env


def upload(home: Path, env: dict[str, str], *args: str) -> tuple[int, str, str]:
    full = {**env, "NYX_HOME": str(home), "COLUMNS": "200"}
    proc = subprocess.run(nyx_cmd("lora", "upload", *args), env=full, capture_output=True, text=True, timeout=120)
    return proc.returncode, proc.stdout, proc.stderr


def everything_written(home: Path) -> str:
    """Every file Nyx wrote under its home (logs, jobs, settings), as text."""
    return "\n".join(p.read_bytes().decode("utf-8", "replace") for p in home.rglob("*") if p.is_file())


def test_upload_creates_a_private_repo_and_commits_lora_samples_and_card(
    hub: FakeHubUpload, nyx_home: Path, tmp_path: Path
) -> None:
    lora = make_lora(tmp_path / "zxc-style.safetensors")
    images = make_samples(tmp_path / "samples")
    code, out, err = upload(
        nyx_home, env_for(hub, tmp_path), str(lora), "--repo", "alice/zxc-style", "--private",
        "--samples", str(tmp_path / "samples"), "--trigger", "zxc style", "--message", "first upload",
    )  # fmt: skip
    assert code == 0, err
    assert out.strip().splitlines()[-1] == f"{hub.url}/alice/zxc-style"

    repo = hub.repos["alice/zxc-style"]
    assert repo.private is True
    create = next(r for r in hub.requests if r.path == "/api/repos/create")
    assert json.loads(create.body) == {"name": "zxc-style", "organization": "alice", "visibility": "private",
                                       "type": "model"}  # fmt: skip
    assert [c["summary"] for c in repo.commits] == ["first upload"]  # one commit holds everything
    assert set(repo.files) == {"zxc-style.safetensors", "images/00-sample-0.png", "images/01-sample-1.png", "README.md"}
    assert repo.files["zxc-style.safetensors"] == lora.read_bytes()
    assert repo.files["images/00-sample-0.png"] == images[0].read_bytes()
    assert repo.files["images/01-sample-1.png"] == images[1].read_bytes()
    # the binary files went the LFS way (batch, then the upload URL), the README inline
    assert len([r for r in hub.requests if r.method == "PUT"]) == 3

    card = ModelCard(repo.files["README.md"].decode())
    data = card.data.to_dict()
    assert data["base_model"] == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert {"lora", "diffusers", "text-to-image", "stable-diffusion"} <= set(data["tags"])
    assert data["pipeline_tag"] == "text-to-image"
    assert data["library_name"] == "diffusers"
    assert data["instance_prompt"] == "zxc style"
    assert data["widget"] == [
        {"text": "zxc style, a red square", "output": {"url": "images/00-sample-0.png"}},
        {"text": "zxc style", "output": {"url": "images/01-sample-1.png"}},
    ]
    assert "| rank (dim) | 4 |" in card.text
    assert "| alpha | 2.0 |" in card.text
    assert "| network args | conv_dim=4 |" in card.text
    assert "weight_name='zxc-style.safetensors'" in card.text

    # the token: in the Authorization header of every Hub call, nowhere else
    # (huggingface_hub also asks the Hub, without a token, for its agent registry: no Authorization is fine)
    api_calls = [r for r in hub.requests if r.path.split("?")[0] in API_PATHS or ".git/info/lfs/" in r.path]
    assert {r.path.split("?")[0] for r in api_calls} >= set(API_PATHS)
    for r in api_calls:
        assert r.authorization == f"Bearer {TOKEN}", r.path
    for r in hub.requests:
        assert r.authorization in (None, f"Bearer {TOKEN}")
        if r.path.startswith("/lfs-upload/"):
            assert r.authorization is None, "the token must not go to the storage upload URL"
        assert TOKEN.encode() not in r.body
    assert TOKEN not in out and TOKEN not in err
    assert TOKEN not in everything_written(nyx_home)
    assert all(TOKEN.encode() not in data for data in repo.files.values())


def test_upload_reuses_a_repo_and_takes_samples_from_a_run(hub: FakeHubUpload, nyx_home: Path, tmp_path: Path) -> None:
    from nyx_tui.jobs.events import EventWriter
    from nyx_tui.jobs.jobdir import create_job

    lora = make_lora(tmp_path / "v1.safetensors")
    env = env_for(hub, tmp_path)
    code, _, err = upload(nyx_home, env, str(lora), "--repo", "team/shared", "--no-card")
    assert code == 0, err
    assert hub.repos["team/shared"].private is False
    assert "README.md" not in hub.repos["team/shared"].files

    job = create_job("train", "run", ["true"], root=nyx_home / "jobs")
    samples = job.output_dir / "samples"
    samples.mkdir(parents=True)
    for step in (100, 200):
        Image.new("RGB", (8, 8), (step, 0, 0)).save(samples / f"v1-step{step:06d}-0.png")
    with EventWriter(job.events_path) as events:
        for step in (100, 200):
            events.emit("sample", step=step, images=[f"output/samples/v1-step{step:06d}-0.png"], prompts=["a cat"])
    lora2 = make_lora(tmp_path / "v2.safetensors", dim=8)
    code, _, err = upload(
        nyx_home, env, str(lora2), "--repo", "team/shared", "--run", job.id, "--base-model", "my/base"
    )
    assert code == 0, err
    repo = hub.repos["team/shared"]
    assert len(repo.commits) == 2
    assert repo.files["images/00-v1-step000200-0.png"] == (samples / "v1-step000200-0.png").read_bytes()
    assert "images/00-v1-step000100-0.png" not in repo.files  # only the latest samples
    data = ModelCard(repo.files["README.md"].decode()).data.to_dict()
    assert data["base_model"] == "my/base"
    assert data["widget"] == [{"text": "a cat", "output": {"url": "images/00-v1-step000200-0.png"}}]
    assert "| rank (dim) | 8 |" in ModelCard(repo.files["README.md"].decode()).text


def test_no_token_says_how_to_set_one(hub: FakeHubUpload, nyx_home: Path, tmp_path: Path) -> None:
    lora = make_lora(tmp_path / "x.safetensors")
    code, _, err = upload(nyx_home, env_for(hub, tmp_path, token=None), str(lora), "--repo", "alice/x")
    assert code == 1
    text = " ".join(err.split())
    assert "no Hugging Face token" in text and "export HF_TOKEN" in text and "secrets.toml" in text
    assert hub.requests == []


def test_token_from_the_0600_secrets_file_and_not_from_an_open_one(
    hub: FakeHubUpload, nyx_home: Path, tmp_path: Path
) -> None:
    from nyx_tui import paths

    env = env_for(hub, tmp_path, token=None)
    secrets = paths.config_dir() / "secrets.toml"
    secrets.parent.mkdir(parents=True, exist_ok=True)
    secrets.write_text(f'HF_TOKEN = "{TOKEN}"\n')
    lora = make_lora(tmp_path / "x.safetensors")

    secrets.chmod(0o644)
    code, _, err = upload(nyx_home, env, str(lora), "--repo", "alice/x")
    assert code == 1 and "chmod 600" in err
    assert hub.requests == []

    secrets.chmod(stat.S_IRUSR | stat.S_IWUSR)
    code, out, err = upload(nyx_home, env, str(lora), "--repo", "alice/x")
    assert code == 0, err
    assert hub.repos["alice/x"].files["x.safetensors"] == lora.read_bytes()
    create = next(r for r in hub.requests if r.path == "/api/repos/create")
    assert create.authorization == f"Bearer {TOKEN}"
    assert TOKEN not in out + err


@pytest.mark.parametrize(
    ("token", "repo", "expect"),
    [
        (READ_TOKEN, "bob/mine", "(403)"),  # a read-only token
        (TOKEN, "someone-else/theirs", "(403)"),  # a namespace the user does not own
        ("hf_NotAValidTokenAtAll000000000000", "alice/x", "(401)"),
    ],
)
def test_rejected_tokens_are_explained_without_showing_them(
    hub: FakeHubUpload, nyx_home: Path, tmp_path: Path, token: str, repo: str, expect: str
) -> None:
    lora = make_lora(tmp_path / "x.safetensors")
    code, out, err = upload(nyx_home, env_for(hub, tmp_path, token=token), str(lora), "--repo", repo)
    assert code == 1
    text = " ".join(err.split())  # rich wraps long lines
    assert expect in text
    assert "write access" in text or "invalid, expired or revoked" in text
    assert "Traceback" not in err
    assert token not in out + err and token not in everything_written(nyx_home)
    assert repo not in hub.repos


def test_a_bad_repo_name_is_refused_before_any_request(hub: FakeHubUpload, nyx_home: Path, tmp_path: Path) -> None:
    lora = make_lora(tmp_path / "x.safetensors")
    code, _, err = upload(nyx_home, env_for(hub, tmp_path), str(lora), "--repo", "alice/bad--name")
    assert code == 1
    assert "not a valid repo name" in " ".join(err.split())
    assert hub.requests == []


def test_redact_blanks_the_token_and_token_shaped_text() -> None:
    from nyx_tui.lora.upload import redact

    assert redact(f"Bearer {TOKEN} failed", TOKEN) == "Bearer <redacted> failed"
    assert "hf_Other" not in redact("header hf_OtherToken12345678 seen", None)


def test_a_name_alone_goes_under_the_tokens_user(hub: FakeHubUpload, nyx_home: Path, tmp_path: Path) -> None:
    lora = make_lora(tmp_path / "x.safetensors")
    code, out, err = upload(nyx_home, env_for(hub, tmp_path), str(lora), "--repo", "solo-lora")
    assert code == 0, err
    assert out.strip() == f"{hub.url}/alice/solo-lora"
    assert "x.safetensors" in hub.repos["alice/solo-lora"].files
    whoami = next(r for r in hub.requests if r.path == "/api/whoami-v2")
    assert whoami.authorization == f"Bearer {TOKEN}"
    assert "progress" not in err and "%|" not in err  # no progress-bar frames when stderr is not a terminal
