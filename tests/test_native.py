"""The native engine end to end on a tiny SD1.5 model built offline: events, control, kohya files that
diffusers loads with the right alpha, a falling loss, reproducibility. Plus the pieces it is made of."""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

import pytest
import tomli_w

import nyx_tui.config
from nyx_tui.config.io import dumps_config
from nyx_tui.config.model import TrainingConfig
from nyx_tui.jobs.control import send
from nyx_tui.jobs.events import read_events, validate
from nyx_tui.jobs.jobdir import JobDir, create_job

PRESET = Path(nyx_tui.config.__file__).parent / "presets" / "demo-tiny-cpu.toml"
DIM, ALPHA = 8, 2.0  # alpha != dim: catches the converter's alpha = rank trap


# ----------------------------------------------------------------------------------------- fixtures


def make_config(assets: dict[str, Path], **sections: dict[str, Any]) -> TrainingConfig:
    """The demo preset pointed at the built assets, with `sections` merged over it."""
    data = tomllib.loads(PRESET.read_text())
    data["model"]["pretrained"] = str(assets["model"])
    data["dataset"]["subsets"] = [{"image_dir": str(assets["dataset"])}]
    data["scheduler"] = {"type": "constant", "warmup_steps": 0}
    data["network"].update(dim=DIM, alpha=ALPHA)
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    return TrainingConfig.model_validate(data)


def new_job(root: Path, cfg: TrainingConfig) -> JobDir:
    return create_job("train", "t", ["native"], config_toml=dumps_config(cfg), root=root)


def run_engine(job: JobDir, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "nyx_tui.trainers.native", str(job.path)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def steps_of(job: JobDir) -> list[dict[str, Any]]:
    return [e for e in read_events(job.events_path) if e["kind"] == "step"]


def loras_of(job: JobDir) -> list[dict[str, Any]]:
    return [e for e in read_events(job.events_path) if e["kind"] == "artifact" and e["what"] == "lora"]


@pytest.fixture(scope="module")
def run(assets: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One 100-step run at the demo preset's learning rate, shared by the tests that inspect it."""
    cfg = make_config(
        assets,
        training={"max_steps": 100},
        saving={"every_n_steps": 50, "title": "Shapes", "author": "nyx tests", "precision": "fp16"},
    )
    job = new_job(tmp_path_factory.mktemp("jobs"), cfg)
    t0 = time.monotonic()
    proc = run_engine(job)
    return {"job": job, "cfg": cfg, "proc": proc, "wall": time.monotonic() - t0}


# ------------------------------------------------------------------------------------ the whole run


@pytest.mark.slow
def test_run_exits_0_with_valid_events(run: dict[str, Any]) -> None:
    proc, job, cfg = run["proc"], run["job"], run["cfg"]
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    events = read_events(job.events_path)
    for event in events:
        validate(event)
    assert events[0]["kind"] == "start"
    assert events[0] == {**events[0], "job": job.id, "job_kind": "train", "total_steps": 100}
    assert {"path": str(job.config_path), "what": "config"}.items() <= events[1].items()
    assert any(e["kind"] == "progress" and e["unit"] == "stage" for e in events)
    assert not any(e["kind"] == "end" for e in events)  # the supervisor writes it
    steps = steps_of(job)
    assert [e["step"] for e in steps] == list(range(1, 101))
    for e in steps:
        assert math.isfinite(e["loss"]) and math.isfinite(e["loss_avg"])
        assert e["lr"] == [pytest.approx(cfg.optimizer.learning_rate)]
        assert e["total"] == 100 and e["epoch"] >= 1 and e["it_s"] > 0 and e["eta_s"] >= 0
    assert steps[-1]["eta_s"] == 0
    assert steps[-1]["epoch"] == math.ceil(100 / (24 // 2))  # 24 images, batch 2: 12 steps an epoch


@pytest.mark.slow
def test_run_saves_intermediate_and_final(run: dict[str, Any]) -> None:
    job = run["job"]
    saved = loras_of(job)
    assert [(Path(e["path"]).name, e["step"]) for e in saved] == [
        ("demo-step000050.safetensors", 50),
        ("demo.safetensors", 100),
    ]
    for e in saved:
        assert Path(e["path"]).is_file() and Path(e["path"]).parent == job.output_dir
    assert not list(job.output_dir.glob(".*.tmp"))


@pytest.mark.slow
def test_loss_falls_at_the_demo_learning_rate(run: dict[str, Any]) -> None:
    losses = [e["loss"] for e in steps_of(run["job"])]
    k = len(losses) // 5
    first, last = sum(losses[:k]) / k, sum(losses[-k:]) / k
    assert last < first * 0.9, (first, last)


# ------------------------------------------------------------------------------------ the LoRA file


def _final(run: dict[str, Any]) -> Path:
    return Path(loras_of(run["job"])[-1]["path"])


@pytest.mark.slow
def test_file_has_kohya_keys_and_real_alpha(run: dict[str, Any]) -> None:
    from safetensors.torch import load_file

    sd = load_file(_final(run))
    assert sd and all(k.startswith("lora_unet_") for k in sd)
    modules = {k.split(".", 1)[0] for k in sd}
    assert set(sd) == {f"{m}.{s}" for m in modules for s in ("lora_down.weight", "lora_up.weight", "alpha")}
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q" in modules
    assert "lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_attn2_to_out_0" in modules
    for m in modules:
        assert float(sd[f"{m}.alpha"]) == ALPHA
        assert sd[f"{m}.lora_down.weight"].shape[0] == DIM and sd[f"{m}.lora_up.weight"].shape[1] == DIM
        assert sd[f"{m}.lora_down.weight"].dtype.itemsize == 2  # saved in fp16


@pytest.mark.slow
def test_file_metadata(run: dict[str, Any]) -> None:
    import safetensors.torch
    from safetensors import safe_open

    from nyx_tui.trainers.native.lora_io import safetensors_hashes

    path = _final(run)
    with safe_open(path, framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    assert all(isinstance(v, str) for v in meta.values())
    expected = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(DIM),
        "ss_network_alpha": str(ALPHA),
        "ss_base_model_version": "sd_v1",
        "ss_output_name": "demo",
        "ss_steps": "100",
        "ss_max_train_steps": "100",
        "ss_learning_rate": str(run["cfg"].optimizer.learning_rate),
        "ss_lr_scheduler": "constant",
        "ss_lr_warmup_steps": "0",
        "ss_resolution": "(64, 64)",
        "ss_batch_size_per_device": "2",
        "ss_seed": "42",
        "ss_num_train_images": "24",
        "ss_mixed_precision": "no",
        "ss_sd_model_name": "model",
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": "stable-diffusion-v1/lora",
        "modelspec.implementation": "diffusers",
        "modelspec.title": "Shapes",
        "modelspec.author": "nyx tests",
        "modelspec.resolution": "64x64",
        "modelspec.prediction_type": "epsilon",
    }
    assert {k: meta.get(k) for k in expected} == expected
    assert "modelspec.description" not in meta
    assert meta["ss_optimizer"].startswith("torch.optim.adamw.AdamW(")
    assert float(meta["ss_training_started_at"]) <= float(meta["ss_training_finished_at"])
    assert meta["modelspec.date"][:4].isdigit() and "T" in meta["modelspec.date"]
    freq = json.loads(meta["ss_tag_frequency"])
    assert list(freq) == ["dataset"] and freq["dataset"]["nyxshape"] == 24
    assert sum(n for tag, n in freq["dataset"].items() if tag.endswith("background")) == 24
    # the hashes: recomputed the sd-webui-additional-networks way over the file as serialized with ss_* only
    data = safetensors.torch.save(tensors, {k: v for k, v in meta.items() if k.startswith("ss_")})
    n = int.from_bytes(data[:8], "little")
    import hashlib

    assert meta["sshs_model_hash"] == hashlib.sha256(data[8 + n :]).hexdigest()
    assert (meta["sshs_model_hash"], meta["sshs_legacy_hash"]) == safetensors_hashes(tensors, meta)
    # the tensor bytes in the file itself are the hashed bytes
    raw = path.read_bytes()
    assert hashlib.sha256(raw[8 + int.from_bytes(raw[:8], "little") :]).hexdigest() == meta["sshs_model_hash"]


@pytest.mark.slow
def test_lora_loads_in_diffusers_with_its_alpha(run: dict[str, Any], assets: dict[str, Path], tmp_path: Path) -> None:
    """diffusers loads the file, the UNet output moves, and the move scales with alpha (half alpha →
    about half the change, first order in the small LoRA delta)."""
    import torch
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file, save_file

    path = _final(run)
    half = tmp_path / "half-alpha.safetensors"
    sd = load_file(path)
    save_file({k: (v / 2 if k.endswith(".alpha") else v) for k, v in sd.items()}, half)

    gen = torch.Generator().manual_seed(0)
    sample = torch.randn(1, 4, 8, 8, generator=gen)
    hidden = torch.randn(1, 77, 32, generator=gen)

    def unet_delta(lora: Path) -> tuple[float, Any]:
        pipe = StableDiffusionPipeline.from_pretrained(assets["model"], safety_checker=None)
        with torch.no_grad():
            before = pipe.unet(sample, 500, encoder_hidden_states=hidden).sample
            pipe.load_lora_weights(str(lora))
            after = pipe.unet(sample, 500, encoder_hidden_states=hidden).sample
        assert torch.isfinite(after).all()
        return (after - before).norm().item(), pipe

    full, pipe = unet_delta(path)
    halved, _ = unet_delta(half)
    assert full > 1e-3
    assert 0.35 < halved / full < 0.65, (halved, full)
    # and diffusers read the alpha: peft's scale is alpha / rank
    to_q = pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q
    assert list(to_q.scaling.values()) == [pytest.approx(ALPHA / DIM)]


# --------------------------------------------------------------------------------- control and seeds


@pytest.mark.slow
def test_save_now_then_stop_saves_and_exits_early(assets: dict[str, Path], tmp_path: Path) -> None:
    job = new_job(tmp_path, make_config(assets, training={"max_steps": 100_000}, saving={"every_n_steps": 0}))
    proc = subprocess.Popen(
        [sys.executable, "-m", "nyx_tui.trainers.native", str(job.path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while len(steps_of(job)) < 5:
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline, "no training steps within 120 s"
            time.sleep(0.1)
        send(job.control_path, "save_now")
        send(job.control_path, "sample_now")
        while len(loras_of(job)) < 1:
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.1)
        send(job.control_path, "stop")
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    events = read_events(job.events_path)
    saved = loras_of(job)
    assert len(saved) == 2
    assert Path(saved[0]["path"]).name.startswith("demo-step") and Path(saved[0]["path"]).is_file()
    assert Path(saved[1]["path"]).name == "demo.safetensors" and Path(saved[1]["path"]).is_file()
    last_step = steps_of(job)[-1]["step"]
    assert 5 <= last_step < 1000 and saved[1]["step"] == last_step
    logs = " | ".join(e["message"] for e in events if e["kind"] == "log")
    for word in ("save_now", "sample_now", "stop"):
        assert word in logs


@pytest.mark.slow
def test_cancel_exits_0_without_saving(assets: dict[str, Path], tmp_path: Path) -> None:
    job = new_job(tmp_path, make_config(assets, training={"max_steps": 100_000}, saving={"every_n_steps": 0}))
    send(job.control_path, "cancel")  # already waiting when the loop starts
    proc = run_engine(job)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert loras_of(job) == [] and not steps_of(job)
    assert any(e["kind"] == "log" and "cancel" in e["message"] for e in read_events(job.events_path))


@pytest.mark.slow
def test_same_seed_same_losses(assets: dict[str, Path], tmp_path: Path) -> None:
    cfg = make_config(
        assets,
        training={"max_steps": 8, "gradient_accumulation_steps": 2},
        dataset={"flip_aug": True, "shuffle_caption": True, "keep_tokens": 1, "random_crop": True},
        network={"dropout": 0.1},
        saving={"every_n_steps": 0},
    )
    runs = []
    for i in range(2):
        job = new_job(tmp_path / str(i), cfg)
        proc = run_engine(job)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs.append([e["loss"] for e in steps_of(job)])
    assert len(runs[0]) == 8 and runs[0] == runs[1]


@pytest.mark.slow
def test_options_v_prediction_checkpointing_workers_schedule(assets: dict[str, Path], tmp_path: Path) -> None:
    """The less common paths in one short run: a v-prediction model, gradient checkpointing, a data
    loader worker, offset noise, a warmup + cosine schedule, and fp16 asked for on a CPU (runs fp32)."""
    import shutil

    model = tmp_path / "vpred"
    shutil.copytree(assets["model"], model)
    sched = model / "scheduler" / "scheduler_config.json"
    sched.write_text(json.dumps({**json.loads(sched.read_text()), "prediction_type": "v_prediction"}))
    cfg = make_config(
        assets,
        model={"pretrained": str(model)},
        training={"max_steps": 6, "gradient_checkpointing": True, "noise_offset": 0.1, "mixed_precision": "fp16"},
        dataset={"num_workers": 1},
        scheduler={"type": "cosine", "warmup_steps": 2},
        saving={"every_n_steps": 0, "precision": "bf16", "output_dir": str(tmp_path / "out")},
    )
    job = new_job(tmp_path / "jobs", cfg)
    proc = run_engine(job)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lrs = [e["lr"][0] for e in steps_of(job)]
    lr = cfg.optimizer.learning_rate
    assert lrs[:3] == [0.0, pytest.approx(lr / 2), pytest.approx(lr)] and lrs[3] > lrs[4] > lrs[5] > 0
    events = read_events(job.events_path)
    assert any(e["kind"] == "log" and e["level"] == "warning" and "fp16" in e["message"] for e in events)
    (saved,) = loras_of(job)
    assert Path(saved["path"]).parent == tmp_path / "out"
    from safetensors import safe_open

    with safe_open(saved["path"], framework="pt") as f:
        meta = f.metadata()
        assert f.get_tensor(next(iter(f.keys()))).dtype.itemsize == 2
    assert meta["modelspec.prediction_type"] == "v" and meta["ss_mixed_precision"] == "no"


def test_native_package_import_is_light() -> None:
    code = (
        "import sys, nyx_tui.trainers.native, nyx_tui.trainers.native.__main__, nyx_tui.demo_assets\n"
        "print(','.join(m for m in ('torch', 'diffusers', 'transformers', 'peft') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


@pytest.mark.slow
def test_bad_model_folder_exits_1_with_traceback(tmp_path: Path) -> None:
    (tmp_path / "imgs").mkdir()
    from PIL import Image

    Image.new("RGB", (64, 64)).save(tmp_path / "imgs" / "a.png")
    cfg = TrainingConfig.model_validate(
        {
            "model": {"pretrained": str(tmp_path / "nowhere")},
            "dataset": {"resolution": 64, "subsets": [{"image_dir": str(tmp_path / "imgs")}]},
            "training": {"max_steps": 2},
        }
    )
    job = new_job(tmp_path / "jobs", cfg)
    proc = run_engine(job)
    assert proc.returncode == 1
    assert "Traceback" in proc.stderr and "model_index.json" in proc.stderr


# ------------------------------------------------------------------------------------------- pieces


def test_scan_captions_repeats_and_tag_frequency(tmp_path: Path) -> None:
    from PIL import Image

    from nyx_tui.config.model import DatasetSection
    from nyx_tui.trainers.native import data

    a, b = tmp_path / "5_char", tmp_path / "style"
    a.mkdir(), b.mkdir()
    for folder, name in ((a, "x.png"), (a, "y.JPG"), (b, "z.webp"), (a, "notes.md")):
        (folder / name).write_bytes(b"")
    for folder, name in ((a, "x.png"), (a, "y.JPG"), (b, "z.webp")):
        Image.new("RGB", (80, 64)).save(folder / name, format="PNG")
    (a / "x.txt").write_text("char, red hair, smile\n")
    (b / "z.caption").write_text("char, sketch")
    cfg = DatasetSection.model_validate(
        {
            "resolution": 64,
            "subsets": [
                {"image_dir": str(a), "num_repeats": 3},
                {"image_dir": str(b), "caption_extension": ".caption"},
            ],
        }
    )
    items = data.scan(cfg)
    assert len(items) == 3 * 2 + 1
    captions = {i.image.name: i.caption for i in items}
    assert captions == {"x.png": "char, red hair, smile", "y.JPG": "", "z.webp": "char, sketch"}
    assert data.tag_frequency(items) == {
        "5_char": {"char": 1, "red hair": 1, "smile": 1},
        "style": {"char": 1, "sketch": 1},
    }
    ds = data.ImageCaptionDataset(items, cfg)
    assert tuple(ds[(0, 1)]["pixels"].shape) == (3, 64, 64)


def test_shuffle_caption_keeps_leading_tokens() -> None:
    from nyx_tui.trainers.native.data import shuffle_caption

    caption = "trigger, a, b, c, d, e, f"
    seen = {shuffle_caption(caption, 1, random.Random(s)) for s in range(20)}
    assert len(seen) > 1
    for s in seen:
        tags = s.split(", ")
        assert tags[0] == "trigger" and sorted(tags[1:]) == list("abcdef")


def test_square_crop_sizes() -> None:
    from PIL import Image

    from nyx_tui.trainers.native.data import square_crop

    for size in ((300, 200), (200, 300), (64, 64), (50, 500)):
        for rnd in (False, True):
            out = square_crop(Image.new("RGB", size), 64, random.Random(0), rnd)
            assert out.size == (64, 64)


def test_epoch_batches_are_a_seeded_permutation() -> None:
    import torch

    from nyx_tui.trainers.native.data import EpochBatches

    def order(seed: int) -> list[list[tuple[int, int, int]]]:
        return list(EpochBatches(10, 3, torch.Generator().manual_seed(seed)))

    first = order(1)
    assert first == order(1) and first != order(2)
    assert sorted(len(b) for b in first) == [1, 3, 3, 3]  # as sd-scripts: the short last batch is kept
    indices = [i for b in first for i, _, _ in b]
    assert sorted(indices) == list(range(10))


def test_demo_assets_are_idempotent(assets: dict[str, Path]) -> None:
    model_file = assets["model"] / "unet" / "diffusion_pytorch_model.safetensors"
    before = model_file.stat().st_mtime_ns, len(list(assets["dataset"].glob("*.png")))
    proc = subprocess.run(
        [sys.executable, "-m", "nyx_tui.demo_assets", str(assets["ws"])], capture_output=True, text=True
    )
    assert proc.returncode == 0
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {
        "model": str(assets["model"]),
        "dataset": str(assets["dataset"]),
    }
    assert (model_file.stat().st_mtime_ns, len(list(assets["dataset"].glob("*.png")))) == before
    assert 16 <= before[1] <= 24


def test_preset_is_a_valid_partial_overlay() -> None:
    text = PRESET.read_text()
    assert text.startswith("#")
    data = tomllib.loads(text)
    cfg = TrainingConfig.model_validate(data)
    assert cfg.model.pretrained == "model" and cfg.dataset.subsets[0].image_dir == "dataset"
    assert cfg.dataset.resolution == 64 and cfg.training.batch_size == 2
    assert 1e-3 <= cfg.optimizer.learning_rate <= 5e-3
    assert cfg.saving.output_name == "demo" and 0 < cfg.saving.every_n_steps < cfg.training.max_steps
    assert tomli_w.dumps(data)  # plain TOML data
