"""Quality filter (size, aspect, blur), preprocessing into a new folder (resize, bucket crop, alpha, format,
EXIF, captions; originals untouched) and caption quality (each reason on a crafted caption)."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import run_nyx
from PIL import Image, ImageDraw, ImageFilter

from nyx_tui.datasets.caption_quality import (
    check_captions,
    judge_caption,
    load_vocabulary,
    normalize_tag,
)
from nyx_tui.datasets.preprocess import PrepOptions, bucket_box, prepare
from nyx_tui.datasets.quality import check_quality, laplacian_variance


def blobs(seed: int, w: int, h: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    img = Image.new("RGB", (w, h), (200, 180, 160))
    d = ImageDraw.Draw(img)
    for _ in range(40):
        x, y = int(rng.integers(0, w)), int(rng.integers(0, h))
        r = int(rng.integers(5, max(6, min(w, h) // 6)))
        d.ellipse([x - r, y - r, x + r, y + r], fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    return img


def digest(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*")
            if p.is_file()}  # fmt: skip


# ---------------------------------------------------------------------------------------------- quality


@pytest.fixture(scope="module")
def quality_ds(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("quality") / "ds"
    root.mkdir()
    blobs(1, 600, 600).save(root / "sharp.png")
    blobs(2, 100, 100).save(root / "tiny.png")
    blobs(3, 2080, 520).save(root / "wide.png")
    blobs(4, 600, 600).filter(ImageFilter.GaussianBlur(6)).save(root / "blurry.png")
    return root


def test_quality_flags_each_problem_with_its_reason(quality_ds: Path, tmp_path: Path) -> None:
    result = check_quality(quality_ds, min_side=512, max_aspect=3, min_blur=50, cache_path=tmp_path / "h.sqlite")
    items = {i.rel: i for i in result.items}
    assert not items["sharp.png"].reasons, items["sharp.png"]
    assert [r.split(":")[0] for r in items["tiny.png"].reasons] == ["too small"]
    assert items["tiny.png"].min_side == 100
    assert [r.split(":")[0] for r in items["wide.png"].reasons] == ["extreme aspect ratio"]
    assert items["wide.png"].aspect == pytest.approx(4.0)
    assert [r.split(":")[0] for r in items["blurry.png"].reasons] == ["blurry"]
    assert items["blurry.png"].blur is not None and items["sharp.png"].blur is not None
    assert items["blurry.png"].blur < 10 < 50 < items["sharp.png"].blur
    assert {i.rel for i in result.failures} == {"tiny.png", "wide.png", "blurry.png"}
    assert (result.decoded, result.cached) == (4, 0)
    warm = check_quality(quality_ds, min_side=512, max_aspect=3, min_blur=50, cache_path=tmp_path / "h.sqlite")
    assert (warm.decoded, warm.cached) == (0, 4)


def test_laplacian_variance_is_zero_on_flat_and_high_on_noise() -> None:
    assert laplacian_variance(np.full((20, 20), 7.0)) == 0.0
    noise = np.random.default_rng(0).uniform(0, 255, (64, 64))
    assert laplacian_variance(noise) > 1000


def test_filter_cli_json_and_quarantine(quality_ds: Path, tmp_path: Path, nyx_home: Path) -> None:
    import shutil

    root = tmp_path / "ds"
    shutil.copytree(quality_ds, root)
    before = digest(root)
    proc = run_nyx("dataset", "filter", str(root), "--json", "--quarantine", "--yes", home=nyx_home, timeout=120)
    assert proc.returncode == 0, proc.stderr
    answer = json.loads(proc.stdout)
    assert answer["failed"] == 3 and {i["path"] for i in answer["items"]} == {"tiny.png", "wide.png", "blurry.png"}
    assert all(i["reasons"] for i in answer["items"])
    assert sorted(p.name for p in root.glob("*.png")) == ["sharp.png"]
    after = {k.split("/", 3)[-1] if k.startswith(".nyx/") else k: v for k, v in digest(root).items()
             if not k.endswith("manifest.json")}  # fmt: skip
    assert after == before  # moved, not deleted
    proc = run_nyx("dataset", "filter", str(root), "--min-side", "0", home=nyx_home, timeout=120)
    assert proc.returncode == 0 and "1 images, 0 fail" in proc.stdout


# ------------------------------------------------------------------------------------------------- prep


@pytest.fixture
def prep_ds(tmp_path: Path) -> Path:
    root = tmp_path / "in"
    (root / "10_chara").mkdir(parents=True)
    blobs(1, 800, 600).save(root / "10_chara" / "photo.jpg", quality=90)
    (root / "10_chara" / "photo.txt").write_text("chara, smile")
    rgba = Image.new("RGBA", (300, 500), (0, 0, 0, 0))
    ImageDraw.Draw(rgba).ellipse([100, 200, 200, 300], fill=(255, 0, 0, 255))
    rgba.save(root / "10_chara" / "cutout.png")
    (root / "10_chara" / "cutout.caption").write_text("chara, red circle")
    # stored 400x200, EXIF orientation 6: displayed 200x400
    rotated = blobs(5, 400, 200)
    exif = Image.Exif()
    exif[0x0112] = 6
    rotated.save(root / "rotated.jpg", quality=90, exif=exif)
    return root


def test_prep_resizes_flattens_copies_captions_and_leaves_originals(prep_ds: Path, tmp_path: Path) -> None:
    before = digest(prep_ds)
    out = tmp_path / "out"
    result = prepare(prep_ds, out, PrepOptions(max_side=512))
    assert not result.failed
    assert digest(prep_ds) == before
    with Image.open(out / "10_chara" / "photo.jpg") as im:
        assert im.size == (512, 384)
    with Image.open(out / "10_chara" / "cutout.png") as im:
        assert im.size == (300, 500)  # never upscaled
        assert im.mode == "RGB" and im.getpixel((5, 5)) == (255, 255, 255)
        assert im.getpixel((150, 250)) == (255, 0, 0)
    with Image.open(out / "rotated.jpg") as im:
        assert im.size == (200, 400)  # EXIF orientation applied
        assert im.getexif().get(0x0112) in (None, 1)
    assert (out / "10_chara" / "photo.txt").read_text() == "chara, smile"
    assert (out / "10_chara" / "cutout.caption").read_text() == "chara, red circle"


def test_prep_bucket_crop_and_format(prep_ds: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    opts = PrepOptions(bucket_resolution=512, bucket_step=64, fmt="webp", quality=90, flatten="black")
    result = prepare(prep_ds, out, opts)
    assert not result.failed
    outputs = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.webp"))
    assert outputs == ["10_chara/cutout.webp", "10_chara/photo.webp", "rotated.webp"]
    for p in out.rglob("*.webp"):
        with Image.open(p) as im:
            w, h = im.size
            assert w % 64 == 0 and h % 64 == 0, (p, im.size)
            assert w * h <= 512 * 512
    with Image.open(out / "10_chara" / "photo.webp") as im:
        assert im.size == (576, 448)  # the 4:3 photo's bucket (aspect 1.29 vs 1.33), scaled down to cover it
    with Image.open(out / "10_chara" / "cutout.webp") as im:
        # 300x500 is smaller than its bucket: cropped at the bucket's aspect, not enlarged
        assert im.size[0] <= 300 and im.size[1] <= 500
        px = im.convert("RGB").getpixel((2, 2))
        assert isinstance(px, tuple) and max(px) < 10  # flattened onto black


def test_bucket_box_never_upscales() -> None:
    opts = PrepOptions(bucket_resolution=1024, bucket_step=64)
    resized, box = bucket_box((4000, 3000), opts)
    assert resized[0] < 4000 and (box[2] - box[0]) % 64 == 0 and (box[3] - box[1]) % 64 == 0
    resized, box = bucket_box((200, 130), opts)
    assert resized == (200, 130) and box[2] - box[0] <= 200 and box[3] - box[1] <= 130
    assert (box[2] - box[0]) % 64 == 0 and (box[3] - box[1]) % 64 == 0


def test_prep_colour_corrections(tmp_path: Path) -> None:
    root = tmp_path / "in"
    root.mkdir()
    arr = np.zeros((64, 64, 3), dtype=np.uint8)
    arr[..., 0] = np.linspace(60, 120, 64, dtype=np.uint8)[None, :]  # dim, red-tinted
    arr[..., 1] = 40
    arr[..., 2] = 30
    Image.fromarray(arr).save(root / "tinted.png")
    prepare(root, tmp_path / "wb", PrepOptions(white_balance=True))
    prepare(root, tmp_path / "ac", PrepOptions(autocontrast=True))
    wb = np.asarray(Image.open(tmp_path / "wb" / "tinted.png"), dtype=np.float32).reshape(-1, 3).mean(axis=0)
    assert wb.max() - wb.min() < 10  # gray world: channel means equalised
    ac = np.asarray(Image.open(tmp_path / "ac" / "tinted.png"))
    assert ac[..., 0].min() < 10 and ac[..., 0].max() > 245


def test_prep_cli_and_bad_input(prep_ds: Path, tmp_path: Path, nyx_home: Path) -> None:
    out = tmp_path / "out"
    proc = run_nyx("dataset", "prep", str(prep_ds), "--out", str(out), "--max-side", "256", "--format", "jpg",
                   "--json", home=nyx_home, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    answer = json.loads(proc.stdout)
    assert answer["written"] == 3 and answer["failed"] == 0
    assert {tuple(i["size"]) for i in answer["items"]} == {(256, 192), (154, 256), (128, 256)}
    assert (out / "10_chara" / "cutout.jpg").is_file() and (out / "10_chara" / "cutout.caption").is_file()
    proc = run_nyx("dataset", "prep", str(prep_ds), "--out", str(prep_ds / "inside"), home=nyx_home, timeout=120)
    assert proc.returncode == 2 and "inside the input folder" in proc.stderr
    proc = run_nyx("dataset", "prep", str(prep_ds), "--out", str(out), "--bucket-resolution", "512",
                   "--bucket-max", "448", home=nyx_home, timeout=120)  # fmt: skip
    assert proc.returncode == 2 and "--bucket-max" in proc.stderr


# ------------------------------------------------------------------------------------------ captions


VOCAB_CSV = """tag_id,name,category,count
9999999,general,9,100
1,1girl,0,100
2,1boy,0,100
3,solo,0,100
4,long_hair,0,100
5,short_hair,0,100
6,smile,0,100
7,open_mouth,0,100
8,closed_mouth,0,100
9,^_^,0,100
10,very_long_hair,0,100
11,blue_eyes,0,100
"""


def test_caption_reasons_each_trigger() -> None:
    vocab = {"1girl", "1boy", "solo", "long hair", "short hair", "smile", "open mouth", "closed mouth", "^_^",
             "very long hair", "blue eyes"}  # fmt: skip

    def codes(text: str | None, **kw: object) -> list[str]:
        return judge_caption(text, vocab=vocab, **kw)[1]  # type: ignore[arg-type]

    assert codes(None) == ["empty"] and judge_caption(None)[0] == 0
    assert codes("   ") == ["empty"]
    assert codes("1girl, solo") == ["short"]
    assert codes("a girl") == ["short"]  # prose: too few words
    assert codes("a girl with long hair smiling in a field") == []
    assert codes("1girl, solo, smile, Smile, long_hair") == ["duplicate"]
    assert codes("1girl, solo, smile, lnog hair") == ["unknown"]
    assert codes("mychar, 1girl, solo, smile", keep_tokens=1) == []  # the trigger word is not checked
    assert codes("1girl, solo, long hair, short hair") == ["conflict"]
    assert codes("1girl, solo, smile, open mouth, closed_mouth") == ["conflict"]
    assert codes("1girl, 1boy, smile, long hair, very long hair") == []  # not conflicts
    assert codes("1girl, solo, ^_^, blue_eyes") == []  # kaomoji keep their underscore
    score, c, reasons, _ = judge_caption("1girl, 1girl, long hair, short hair, typo tag", vocab=vocab)
    assert c == ["duplicate", "unknown", "conflict"] and score == 100 - 10 - 5 - 25
    assert any("short hair / long hair" in r for r in reasons)


def test_normalize_tag() -> None:
    assert normalize_tag(" Long_Hair ") == "long hair"
    assert normalize_tag("gawr gura \\(1st costume\\)") == "gawr gura (1st costume)"
    assert normalize_tag(">_<") == ">_<"


def test_check_captions_sorted_worst_first_and_cli(tmp_path: Path, nyx_home: Path) -> None:
    root = tmp_path / "ds"
    root.mkdir()
    captions = {"a": "1girl, solo, smile, blue eyes", "b": None, "c": "1girl, solo, long hair, short hair",
                "d": "1girl, smile"}  # fmt: skip
    for name, caption in captions.items():
        Image.new("RGB", (8, 8)).save(root / f"{name}.png")
        if caption is not None:
            (root / f"{name}.txt").write_text(caption)
    vocab_file = tmp_path / "selected_tags.csv"
    vocab_file.write_text(VOCAB_CSV)
    vocab = load_vocabulary(vocab_file)
    assert "long hair" in vocab and "^_^" in vocab
    reports = check_captions(root, vocab=vocab)
    assert [r.rel for r in reports] == ["b.png", "d.png", "c.png", "a.png"]
    assert reports[-1].codes == []
    proc = run_nyx("dataset", "captions-quality", str(root), "--vocab", str(vocab_file), "--json",
                   home=nyx_home, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    answer = json.loads(proc.stdout)
    assert answer["flagged"] == 3 and [i["path"] for i in answer["items"]] == ["b.png", "d.png", "c.png"]
    assert answer["items"][0]["codes"] == ["empty"]
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n1,2\n")
    proc = run_nyx("dataset", "captions-quality", str(root), "--vocab", str(bad), home=nyx_home, timeout=120,
                   stdin=subprocess.DEVNULL)  # fmt: skip
    assert proc.returncode == 2 and "selected_tags.csv" in proc.stderr
