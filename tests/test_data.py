"""The native engine's data pipeline: buckets, kohya repeat folders, caption dropout, regularization
weights, alpha masks, the latent and text-encoder caches, and the pre-flight data conflicts."""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

import nyx_tui.config
from nyx_tui.config.check import check_config
from nyx_tui.config.io import dumps_config
from nyx_tui.config.model import DatasetSection, TrainingConfig
from nyx_tui.jobs.events import read_events, validate
from nyx_tui.jobs.jobdir import create_job
from nyx_tui.trainers.native import data, subsets
from nyx_tui.trainers.native.buckets import Bucketer, bucket_resolutions

PRESET = Path(nyx_tui.config.__file__).parent / "presets" / "demo-tiny-cpu.toml"


def image(
    path: Path, size: tuple[int, int], colour: tuple[int, ...] = (200, 40, 40), caption: str | None = None
) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGBA" if len(colour) == 4 else "RGB", size, colour).save(path)
    if caption is not None:
        path.with_suffix(".txt").write_text(caption)
    return path


def half_transparent(path: Path, size: tuple[int, int], caption: str | None = None) -> Path:
    """An RGBA image whose left half is fully transparent and right half opaque."""
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.new("RGBA", size, (30, 160, 60, 255))
    img.paste((0, 0, 0, 0), (0, 0, size[0] // 2, size[1]))
    img.save(path)
    if caption is not None:
        path.with_suffix(".txt").write_text(caption)
    return path


def section(**values: Any) -> DatasetSection:
    return DatasetSection.model_validate(values)


# ------------------------------------------------------------------------------------------ buckets


def test_bucket_resolutions_are_sd_scripts() -> None:
    resos = bucket_resolutions(512, 256, 1024, 64)
    # sd-scripts' list for 512 px (make_bucket_resolutions): the square plus both orientations
    assert resos == sorted(
        [(512, 512)]
        + [(w, h) for w, h in [(256, 1024), (320, 768), (384, 640), (448, 576)] for w, h in ((w, h), (h, w))]
        + [(256, 832), (256, 896), (256, 960), (320, 704), (832, 256), (896, 256), (960, 256), (704, 320)]
    )
    assert all(w * h <= 512 * 512 and w % 64 == 0 and h % 64 == 0 for w, h in resos)


def test_each_image_goes_to_the_closest_aspect_ratio_and_covers_it() -> None:
    bucketer = Bucketer(512, enable=True, min_reso=256, max_reso=1024, steps=64)
    for size, target in [((1000, 500), (704, 320)), ((500, 1000), (320, 704)), ((800, 600), (576, 448))]:
        geo = bucketer.geometry(size)
        assert geo.target == target
        ratios = [abs(w / h - size[0] / size[1]) for w, h in bucketer.resos]
        assert abs(target[0] / target[1] - size[0] / size[1]) == min(ratios)
        assert geo.resized[0] >= target[0] and geo.resized[1] >= target[1]
        assert min(geo.resized[0] - target[0], geo.resized[1] - target[1]) <= 1  # covers, no more


def test_no_upscale_keeps_small_images_and_shrinks_large_ones() -> None:
    bucketer = Bucketer(512, enable=True, steps=64, no_upscale=True)
    small = bucketer.geometry((300, 200))
    assert small.resized == (300, 200) and small.target == (256, 192)
    large = bucketer.geometry((2000, 1000))
    assert large.target[0] * large.target[1] <= 512 * 512 and large.resized[0] <= 2000
    assert all(s % 64 == 0 for s in large.target)
    assert Bucketer(64).geometry((100, 50)).target == (64, 64)  # without buckets: the square


def test_batches_hold_one_bucket_reproducibly_and_shard(tmp_path: Path) -> None:
    import torch

    folder = tmp_path / "imgs"
    for i in range(5):
        image(folder / f"wide{i}.png", (128, 64), caption=f"wide {i}")
        image(folder / f"tall{i}.png", (64, 128), caption=f"tall {i}")
        image(folder / f"square{i}.png", (64, 64), caption=f"square {i}")
    cfg = section(
        resolution=64, enable_bucket=True, min_bucket_reso=32, max_bucket_reso=128, bucket_reso_steps=16,
        subsets=[{"image_dir": str(folder)}],
    )  # fmt: skip
    items = data.scan(cfg)
    keys = data.bucket_keys(items)
    # ratio 2 is nearest 80x48 (1.67) among 64 px-area buckets in steps of 16 (the next, 96x32, is 3)
    assert {(item.image.name[:4], key) for item, key in zip(items, keys, strict=True)} == {
        ("wide", (80, 48)),
        ("tall", (48, 80)),
        ("squa", (64, 64)),
    }

    def epochs(seed: int, rank: int = 0, world: int = 1) -> list[list[tuple[int, int, int]]]:
        sampler = data.EpochBatches(keys, 2, torch.Generator().manual_seed(seed), rank, world)
        return [b for _ in range(2) for b in sampler]

    first = epochs(1)
    assert first == epochs(1) and first != epochs(2)
    per_epoch = 3 * 3  # three buckets of 5 images, batch 2: 2 full batches and a short one each
    assert len(first) == 2 * per_epoch
    for batch in first:
        assert len({keys[i] for i, _, _ in batch}) == 1
    one_epoch = sorted(i for b in first[:per_epoch] for i, _, _ in b)
    assert one_epoch == list(range(15))  # every item once an epoch
    assert [e for b in first for _, _, e in b] == [1] * 15 + [2] * 15
    r0, r1 = epochs(1, 0, 2), epochs(1, 1, 2)
    assert len(r0) == len(r1) == 2 * (per_epoch // 2)
    assert not {i for b in r0[:4] for i, _, _ in b} & {i for b in r1[:4] for i, _, _ in b}

    dataset = data.ImageCaptionDataset(items, cfg)
    wide = next(i for i, item in enumerate(items) if item.image.name == "wide0.png")
    batch = data.collate([dataset[(wide, 3, 1)]])
    geo = items[wide].geometry
    assert geo is not None
    w, h = geo.target
    assert batch["pixels"].shape == (1, 3, h, w)
    assert batch["original_sizes"] == [(64, 128)] and batch["target_sizes"] == [(h, w)]
    top, left = batch["crop_top_lefts"][0]
    assert (left, top) == ((geo.resized[0] - w) // 2, (geo.resized[1] - h) // 2)


def test_random_crop_and_flip_report_where_the_crop_is(tmp_path: Path) -> None:
    img = tmp_path / "a" / "wide.png"
    image(img, (160, 64), caption="x")
    cfg = section(resolution=64, random_crop=True, flip_aug=True, subsets=[{"image_dir": str(img.parent)}])
    items = data.scan(cfg)
    ds = data.ImageCaptionDataset(items, cfg)
    seen = set()
    for seed in range(40):
        out = ds[(0, seed)]
        top, left = out["crop_top_left"]
        rng = random.Random(seed)
        drawn = rng.randint(0, 160 - 64), rng.randint(0, 0)
        flip = rng.random() < 0.5
        assert out["flipped"] == flip
        assert left == (160 - 64 - drawn[0] if flip else drawn[0]) and top == 0
        seen.add((left, flip))
    assert len(seen) > 10


def test_exif_orientation_is_honored(tmp_path: Path) -> None:
    """A phone photo stored sideways (96x48 pixels, EXIF orientation 6: turn 90° clockwise) trains upright:
    its bucket is tall, and the training pixels are the turned picture (its red left half ends up on top)."""
    folder = tmp_path / "photos"
    folder.mkdir()
    stored = Image.new("RGB", (96, 48), "blue")
    stored.paste((255, 0, 0), (0, 0, 48, 48))  # the left half is red
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(folder / "phone.jpg", exif=exif.tobytes(), quality=95)
    (folder / "phone.txt").write_text("x")
    assert data.image_size(folder / "phone.jpg") == (48, 96)
    cfg = section(
        resolution=64,
        enable_bucket=True,
        min_bucket_reso=32,
        bucket_reso_steps=32,
        subsets=[{"image_dir": str(folder)}],
    )
    (item,) = data.scan(cfg)
    assert item.geometry is not None and item.geometry.target[0] < item.geometry.target[1]  # tall
    pixels = data.ImageCaptionDataset([item], cfg)[(0, 0)]["pixels"]  # [3, h, w] in [-1, 1]
    h = pixels.shape[1]
    top, bottom = pixels[:, : h // 4].mean(dim=(1, 2)), pixels[:, -h // 4 :].mean(dim=(1, 2))
    assert top[0] > 0.5 and top[2] < -0.5  # red on top
    assert bottom[2] > 0.5 and bottom[0] < -0.5  # blue below


# ----------------------------------------------------------------------------- folders and repeats


def test_repeats_from_kohya_folder_names(tmp_path: Path) -> None:
    image(tmp_path / "10_mychar" / "a.png", (64, 64), caption="mychar, smile")
    image(tmp_path / "style" / "b.png", (64, 64), caption="style")
    image(tmp_path / "3_other" / "c.png", (64, 64), caption="other")
    cfg = section(
        resolution=64,
        subsets=[
            {"image_dir": str(tmp_path / "10_mychar")},  # no num_repeats: the folder's 10
            {"image_dir": str(tmp_path / "style")},  # no count in the name: 1
            {"image_dir": str(tmp_path / "3_other"), "num_repeats": 2},  # explicit wins
        ],
    )
    counts = {name: sum(1 for i in data.scan(cfg) if i.image.name == name) for name in ("a.png", "b.png", "c.png")}
    assert counts == {"a.png": 10, "b.png": 1, "c.png": 2}


def test_train_data_dir_expands_to_subsets_with_class_tokens(tmp_path: Path) -> None:
    train, reg = tmp_path / "train", tmp_path / "reg"
    image(train / "4_mychar" / "a.png", (64, 64), caption="mychar, red")
    image(train / "4_mychar" / "b.png", (64, 64))  # no caption: the class token
    image(train / "2_mystyle" / "c.png", (64, 64))
    image(train / "notes" / "ignored.png", (64, 64))  # no count: ignored, as sd-scripts does
    image(reg / "1_woman" / "r.png", (64, 64))
    cfg = section(resolution=64, train_data_dir=str(train), reg_data_dir=str(reg))
    resolved = subsets.resolve(cfg)
    assert [(s.image_dir.name, s.num_repeats, s.class_tokens, s.is_reg) for s in resolved] == [
        ("2_mystyle", 2, "mystyle", False),
        ("4_mychar", 4, "mychar", False),
        ("1_woman", 1, "woman", True),
    ]
    items = data.scan(cfg)
    captions = {i.image.name: i.caption for i in items}
    assert captions == {"a.png": "mychar, red", "b.png": "mychar", "c.png": "mystyle", "r.png": "woman"}
    assert sum(1 for i in items if not i.is_reg) == 4 + 4 + 2
    assert sum(1 for i in items if i.is_reg) == 10  # balanced to the training images
    problems = check_config(TrainingConfig.model_validate({"dataset": cfg.model_dump()}))
    assert any(
        p.field == "dataset.train_data_dir" and p.severity == "warning" and "notes" in p.message for p in problems
    )
    assert not [p for p in problems if p.field.startswith("dataset") and p.is_error]


# ----------------------------------------------------------------------------------- captions


def test_caption_dropout_rates_are_what_was_asked() -> None:
    caption = "trigger, " + ", ".join(f"tag{i}" for i in range(20))
    cfg = section(caption_dropout_rate=0.25)
    n = 4000
    dropped = sum(data.process_caption(caption, cfg, random.Random(s), 1) == "" for s in range(n))
    assert abs(dropped / n - 0.25) < 0.03
    cfg = section(caption_tag_dropout_rate=0.4, keep_tokens=1)
    kept = 0
    for s in range(1000):
        tags = data.process_caption(caption, cfg, random.Random(s), 1).split(", ")
        assert tags[0] == "trigger"  # kept tokens never drop
        kept += len(tags) - 1
    assert abs(kept / (1000 * 20) - 0.6) < 0.02
    cfg = section(caption_dropout_every_n_epochs=2)
    assert [data.process_caption(caption, cfg, random.Random(0), e) == "" for e in (1, 2, 3, 4)] == [
        False, True, False, True,
    ]  # fmt: skip
    assert data.process_caption(caption, cfg, random.Random(0), None) == caption  # validation: never
    assert data.process_caption(caption, section(), random.Random(0), 1) == caption  # nothing asked: as is


def test_color_aug_is_small_and_seeded(tmp_path: Path) -> None:
    img = tmp_path / "a" / "x.png"
    image(img, (64, 64), colour=(200, 60, 40), caption="x")
    cfg = section(resolution=64, color_aug=True, subsets=[{"image_dir": str(img.parent)}])
    ds = data.ImageCaptionDataset(data.scan(cfg), cfg)
    plain = data.ImageCaptionDataset(data.scan(cfg), cfg.model_copy(update={"color_aug": False}))
    base = plain[(0, 1)]["pixels"]
    a, b, c = ds[(0, 1)]["pixels"], ds[(0, 1)]["pixels"], ds[(0, 2)]["pixels"]
    assert (a == b).all() and not (a == c).all()
    assert 0 < (a - base).abs().max() < 0.5  # a shift, not a new image


# ------------------------------------------------------------------------ regularization and masks


def test_reg_balancing_follows_sd_scripts() -> None:
    assert subsets.balance_reg_repeats(8, [1, 1, 1]) == [3, 3, 2]
    assert subsets.balance_reg_repeats(3, [2, 2, 2]) == [2, 2, 0]  # whole repeats first; more reg than train: unused
    assert subsets.balance_reg_repeats(5, [5]) == [5]
    assert subsets.balance_reg_repeats(0, [1, 1]) == [0, 0]


def test_reg_items_carry_the_prior_loss_weight(tmp_path: Path) -> None:
    for i in range(4):
        image(tmp_path / "train" / f"t{i}.png", (64, 64), caption="mychar")
    for i in range(3):
        image(tmp_path / "reg" / f"r{i}.png", (64, 64), caption="woman")
    cfg = section(
        resolution=64,
        subsets=[
            {"image_dir": str(tmp_path / "train"), "num_repeats": 2},
            {"image_dir": str(tmp_path / "reg"), "is_reg": True},
        ],
    )
    items = data.scan(cfg)
    assert sum(i.is_reg for i in items) == sum(not i.is_reg for i in items) == 8
    ds = data.ImageCaptionDataset(items, cfg, prior_loss_weight=0.3)
    batch = data.collate([ds[(k, k)] for k in range(len(items))])
    expected = [0.3 if i.is_reg else 1.0 for i in items]
    assert batch["loss_weights"].shape == (len(items),)
    assert batch["loss_weights"].tolist() == pytest.approx(expected)


def test_mask_from_alpha_is_at_latent_resolution(tmp_path: Path) -> None:
    import torch

    half_transparent(tmp_path / "a" / "cut.png", (128, 64), caption="x")
    image(tmp_path / "b" / "opaque.png", (128, 64), caption="y")
    cfg = section(
        resolution=64, enable_bucket=True, min_bucket_reso=32, max_bucket_reso=128, bucket_reso_steps=16,
        subsets=[{"image_dir": str(tmp_path / "a")}, {"image_dir": str(tmp_path / "b")}],
    )  # fmt: skip
    items = data.scan(cfg)
    ds = data.ImageCaptionDataset(items, cfg, masks=True)
    batch = data.collate([ds[(0, 1)], ds[(1, 1)]])
    _, _, h, w = batch["pixels"].shape
    masks = batch["masks"]
    assert masks.shape == (2, 1, h // 8, w // 8)
    cut = masks[0, 0]
    assert cut[:, : cut.shape[1] // 2 - 1].max() == 0 and cut[:, cut.shape[1] // 2 + 1 :].min() == 1
    assert masks[1].min() == 1  # no alpha: counts fully
    flipped = data.ImageCaptionDataset(items, cfg.model_copy(update={"flip_aug": True}), masks=True)
    seed = next(s for s in range(50) if random.Random(s).random() < 0.5)
    assert torch.allclose(flipped[(0, seed)]["mask"][0], cut.flip(-1), atol=1e-6)  # the mask follows the flip
    no_pixels = data.ImageCaptionDataset(items, cfg, masks=True, pixels=False)
    assert "pixels" not in no_pixels[(0, 1)] and (no_pixels[(0, 1)]["mask"] == cut).all()


# --------------------------------------------------------------------------------- pre-flight


def _cfg(**sections: dict[str, Any]) -> TrainingConfig:
    return TrainingConfig.model_validate(sections)


def _errors(cfg: TrainingConfig, field: str) -> list[str]:
    return [p.message + " | " + p.fix for p in check_config(cfg) if p.field == field and p.is_error]


def test_preflight_refuses_caching_that_would_freeze_augmentation() -> None:
    for cache in ("cache_latents", "cache_latents_to_disk"):
        for aug in ("random_crop", "color_aug"):
            found = _errors(_cfg(training={cache: True}, dataset={aug: True}), f"training.{cache}")
            assert len(found) == 1 and f"dataset.{aug}" in found[0], found
    assert not _errors(_cfg(training={"cache_latents": True}, dataset={"flip_aug": True}), "training.cache_latents")
    key = "training.cache_text_encoder_outputs"
    for values in (
        {"dataset": {"shuffle_caption": True}},
        {"dataset": {"caption_dropout_rate": 0.1}},
        {"dataset": {"caption_tag_dropout_rate": 0.1}},
        {"dataset": {"caption_dropout_every_n_epochs": 3}},
        {"network": {"train_text_encoder": True}},
    ):
        section_name, fields = next(iter(values.items()))
        name = next(iter(fields))
        found = _errors(_cfg(training={"cache_text_encoder_outputs": True}, **values), key)
        assert len(found) == 1 and f"{section_name}.{name}" in found[0], (values, found)
    assert not _errors(_cfg(training={"cache_text_encoder_outputs": True}, dataset={"keep_tokens": 1}), key)


def test_the_engine_refuses_conflicting_caching_that_skipped_the_check() -> None:
    import torch

    from nyx_tui.trainers.native import latents

    cpu = torch.device("cpu")
    frozen = _cfg(training={"cache_latents": True}, dataset={"random_crop": True})
    with pytest.raises(ValueError, match=r"dataset\.random_crop"):
        latents.prepare_latent_cache(None, [], frozen, device=cpu, report=None)  # type: ignore[arg-type]
    shuffled = _cfg(training={"cache_text_encoder_outputs": True}, dataset={"shuffle_caption": True})
    with pytest.raises(ValueError, match=r"dataset\.shuffle_caption"):
        latents.prepare_text_cache(None, [], shuffled, cpu, None)  # type: ignore[arg-type]


def test_preflight_checks_buckets() -> None:
    bucket = {"enable_bucket": True, "resolution": 512}
    assert _errors(_cfg(dataset={**bucket, "bucket_reso_steps": 12}), "dataset.bucket_reso_steps")
    warn = [
        p
        for p in check_config(_cfg(dataset={**bucket, "bucket_reso_steps": 16}))
        if p.field == "dataset.bucket_reso_steps"
    ]
    assert [p.severity for p in warn] == ["warning"] and "sd-scripts" in warn[0].message
    assert _errors(_cfg(dataset={**bucket, "min_bucket_reso": 1024, "max_bucket_reso": 768}), "dataset.min_bucket_reso")
    assert _errors(
        _cfg(dataset={"enable_bucket": True, "resolution": 1024, "max_bucket_reso": 768}), "dataset.max_bucket_reso"
    )
    assert not [p for p in check_config(_cfg(dataset=bucket)) if "bucket" in p.field]


def test_preflight_checks_kohya_folders(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    assert _errors(_cfg(dataset={"train_data_dir": str(tmp_path / "empty")}), "dataset.train_data_dir")
    assert _errors(_cfg(dataset={"train_data_dir": str(tmp_path / "missing")}), "dataset.train_data_dir")
    (tmp_path / "t" / "5_x").mkdir(parents=True)
    assert any(
        "no images" in e
        for e in _errors(_cfg(dataset={"train_data_dir": str(tmp_path / "t")}), "dataset.train_data_dir")
    )
    image(tmp_path / "r" / "r.png", (64, 64))
    only_reg = _cfg(dataset={"subsets": [{"image_dir": str(tmp_path / "r"), "is_reg": True}]})
    assert _errors(only_reg, "dataset.subsets")


# ------------------------------------------------------------------------------ the latent cache


@pytest.fixture(scope="module")
def tiny(assets: dict[str, Path]) -> Any:
    """The tiny model loaded in this process, frozen."""
    from nyx_tui.config.model import ModelSection
    from nyx_tui.trainers.native import models

    model = models.load_model(ModelSection(pretrained=str(assets["model"])))
    models.freeze(model)
    return model


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []

    def emit(self, kind: str, **fields: Any) -> None:
        self.events.append((kind, fields))

    def log(self, message: str, level: str = "info", **fields: Any) -> None:
        self.events.append(("log", {"message": message, **fields}))


def test_latent_cache_reuses_valid_entries_and_reencodes_a_changed_image(
    assets: dict[str, Path], tiny: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    from nyx_tui.trainers.native import latents, models

    folder = tmp_path / "imgs"
    shutil.copytree(assets["dataset"], folder, ignore=lambda d, names: [n for n in names if n[:3] >= "006"])
    cfg = _cfg(
        model={"pretrained": str(assets["model"])},
        dataset={"resolution": 64, "flip_aug": True, "subsets": [{"image_dir": str(folder)}]},
        training={"cache_latents_to_disk": True, "vae_batch_size": 3},
    )
    items = data.scan(cfg.dataset)
    model = tiny
    cpu, root = torch.device("cpu"), tmp_path / "cache"
    encoded: list[int] = []
    real_encode = latents._encode

    def counting(model: Any, pixels: torch.Tensor, device: torch.device) -> Any:
        encoded.append(len(pixels))
        return real_encode(model, pixels, device)

    def build() -> tuple[latents.LatentCache, Recorder]:
        rec = Recorder()
        encoded.clear()
        cache = latents.prepare_latent_cache(model, items, cfg, device=cpu, report=rec, root=root)
        assert cache is not None
        return cache, rec

    monkeypatch.setattr(latents, "_encode", counting)
    first, rec1 = build()
    assert (first.reused, first.encoded, sum(encoded)) == (0, 6, 12)  # both sides of each image
    assert len(list(root.rglob("*.safetensors"))) == 6
    second, rec2 = build()
    assert (second.reused, second.encoded, sum(encoded)) == (6, 0, 0)  # nothing encoded again
    logs = [f for k, f in rec2.events if k == "log"]
    assert logs and logs[-1]["reused"] == 6 and "6 of 6 reused, 0 encoded" in logs[-1]["message"]
    progress = [f for k, f in rec1.events if k == "progress"]
    assert progress[-1] == {"done": 6, "total": 6, "unit": "latents", "message": "caching latents"}
    for path, entry in first.entries.items():
        assert all(torch.equal(entry[k], second.entries[path][k]) for k in entry)

    changed = items[2].image
    with Image.open(changed) as im:
        im.convert("RGB").transpose(Image.Transpose.ROTATE_90).save(changed)
    third, _ = build()
    assert (third.reused, third.encoded, sum(encoded)) == (5, 1, 2)
    assert not torch.equal(third.entries[str(changed)]["mean"], first.entries[str(changed)]["mean"])

    # several processes: the main one encodes and writes first, the others wait, then read its entries
    order: list[str] = []
    rec = Recorder()
    rec.emit = lambda kind, **f: order.append(kind)  # type: ignore[method-assign]
    wait = lambda: order.append("wait")  # noqa: E731
    other = latents.prepare_latent_cache(
        model, items, cfg, device=cpu, report=rec, root=root, is_main=False, wait_for_everyone=wait
    )
    assert other is not None and order[0] == "wait" and other.encoded == 0
    order.clear()
    latents.prepare_latent_cache(model, items, cfg, device=cpu, report=rec, root=root, wait_for_everyone=wait)
    assert order[-1] == "wait" and "progress" in order
    # in memory only: everything encoded, nothing written
    memory_cfg = cfg.model_copy(
        update={"training": cfg.training.model_copy(update={"cache_latents_to_disk": False, "cache_latents": True})}
    )
    memory = latents.prepare_latent_cache(model, items, memory_cfg, device=cpu, report=None, root=tmp_path / "unused")
    assert memory is not None and (memory.reused, memory.encoded) == (0, 6) and not (tmp_path / "unused").exists()

    # a cached batch gives the same latents as encoding its pixels (the same VAE sample from the same seed)
    ds = data.ImageCaptionDataset(items, cfg.dataset)
    batch = data.collate([ds[(0, 11)], ds[(1, 12)], ds[(3, 13)]])
    plain = latents.batch_latents(model, batch, torch.Generator().manual_seed(5), cpu, torch.float32)
    cached = latents.batch_latents(model, batch, torch.Generator().manual_seed(5), cpu, torch.float32, third)
    assert torch.allclose(plain, cached, atol=1e-5)

    text = latents.TextCache(model, cpu)
    captions = [i.caption for i in items]
    text.fill(captions)
    direct = models.encode_text(model, captions[:3], cpu)
    assert torch.allclose(text.conditioning(captions[:3], cpu).hidden, direct.hidden, atol=1e-5)
    assert text.encoded == len(set(captions))


def test_the_loss_honours_loss_weights_and_masks(tiny: Any) -> None:
    import torch

    from nyx_tui.config.model import TrainingSection
    from nyx_tui.trainers.native import losses, models

    cpu = torch.device("cpu")
    lat = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    cond = models.encode_text(tiny, ["a red circle", "a blue square"], cpu)

    def loss(**batch: Any) -> float:
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            value = losses.training_loss(tiny, tiny.unet, lat, cond, batch, gen, TrainingSection(), cpu, torch.float32)
        return float(value)

    base = loss()
    first, second = loss(loss_weights=torch.tensor([1.0, 0.0])), loss(loss_weights=torch.tensor([0.0, 1.0]))
    assert base == pytest.approx(loss(loss_weights=torch.ones(2)), rel=1e-5)
    assert first + second == pytest.approx(base, rel=1e-5) and first != pytest.approx(second)
    assert loss(loss_weights=torch.tensor([0.5, 0.5])) == pytest.approx(base / 2, rel=1e-5)
    assert loss(masks=torch.ones(2, 1, 8, 8)) == pytest.approx(base, rel=1e-5)
    assert loss(masks=torch.zeros(2, 1, 8, 8)) == 0
    half = torch.zeros(2, 1, 8, 8)
    half[..., 4:] = 1
    assert 0 < loss(masks=half) < base


def _run(
    job_root: Path, cfg: TrainingConfig, home: Path
) -> tuple[subprocess.CompletedProcess[str], list[dict[str, Any]]]:
    job = create_job("train", "t", ["native"], config_toml=dumps_config(cfg), root=job_root)
    env = {**os.environ, "NYX_HOME": str(home)}
    proc = subprocess.run(
        [sys.executable, "-m", "nyx_tui.trainers.native", str(job.path)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    return proc, read_events(job.events_path)


@pytest.mark.slow
def test_engine_reuses_the_disk_cache_in_a_second_run(assets: dict[str, Path], tmp_path: Path) -> None:
    """Two real runs with buckets, kohya folders, regularization images, masks, flips and both caches: the
    second reuses every latent except the one of the image changed in between, and says so."""
    train, reg = tmp_path / "train", tmp_path / "reg"
    pngs = sorted(assets["dataset"].glob("*.png"))
    (train / "3_shapes").mkdir(parents=True)
    (reg / "1_shape").mkdir(parents=True)
    for png in pngs[:4]:
        shutil.copy(png, train / "3_shapes" / png.name)
        shutil.copy(png.with_suffix(".txt"), train / "3_shapes" / png.with_suffix(".txt").name)
    half_transparent(train / "3_shapes" / "wide.png", (128, 64), caption="a green wide shape")
    for png in pngs[4:6]:
        shutil.copy(png, reg / "1_shape" / png.name)  # no captions: the class token "shape"
    data_ = tomllib.loads(PRESET.read_text())
    data_["model"]["pretrained"] = str(assets["model"])
    data_["dataset"] = {
        "resolution": 64, "train_data_dir": str(train), "reg_data_dir": str(reg), "flip_aug": True,
        "enable_bucket": True, "min_bucket_reso": 32, "max_bucket_reso": 128, "bucket_reso_steps": 16,
    }  # fmt: skip
    data_["scheduler"] = {"type": "constant", "warmup_steps": 0}
    data_["training"].update(
        max_steps=4, batch_size=2, cache_latents_to_disk=True, vae_batch_size=4, cache_text_encoder_outputs=True,
        masked_loss=True, prior_loss_weight=0.5,
    )  # fmt: skip
    data_["saving"] = {"output_name": "cached", "every_n_steps": 0, "save_state": False}
    cfg = TrainingConfig.model_validate(data_)
    assert not [p for p in check_config(cfg) if p.is_error and p.field.startswith(("dataset", "training"))]
    home = tmp_path / "home"

    proc, events = _run(tmp_path / "jobs1", cfg, home)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    for event in events:
        validate(event)
    logs = [e["message"] for e in events if e["kind"] == "log"]
    assert any("latent cache: 0 of 7 reused, 7 encoded" in m for m in logs), logs
    assert any(e["kind"] == "progress" and e["unit"] == "latents" and e["done"] == 7 for e in events)
    assert any("sizes 64x64: 27, 80x48: 3" in m for m in logs), logs  # (4 + 1 wide) × 3 repeats + 15 reg
    assert [e["step"] for e in events if e["kind"] == "step"] == [1, 2, 3, 4]

    changed = train / "3_shapes" / pngs[0].name
    with Image.open(changed) as im:
        im.transpose(Image.Transpose.FLIP_TOP_BOTTOM).save(changed)
    proc, events = _run(tmp_path / "jobs2", cfg, home)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    cache_logs = [e for e in events if e["kind"] == "log" and e["message"].startswith("latent cache")]
    assert len(cache_logs) == 1 and (cache_logs[0]["reused"], cache_logs[0]["encoded"]) == (6, 1), cache_logs
