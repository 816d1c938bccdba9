"""CLIP image–caption similarity (`tagging.clip_score`) and its use in `nyx dataset captions-quality --clip`,
with a tiny random CLIP built offline (no hub): a byte-level tokenizer without merges, 32 px images."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from conftest import run_nyx
from PIL import Image

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

CAPTIONS = {
    "red.png": "1girl, red dress, smile, outdoors",
    "green.png": "1boy, green shirt, standing, indoors",
    "blue.png": "cat, blue sky, grass, day",
    "gray.png": "a grey square on a plain background",
    "yellow.png": "dog, yellow ball, running, park",
}
COLORS = {"red.png": (220, 30, 30), "green.png": (30, 200, 60), "blue.png": (40, 60, 230),
          "gray.png": (128, 128, 128), "yellow.png": (240, 220, 20)}  # fmt: skip


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's byte → printable character table."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs], strict=True))


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor, CLIPTokenizer

    try:
        from transformers import CLIPImageProcessorPil as ImageProcessor  # transformers 5 without torchvision
    except ImportError:
        from transformers import CLIPImageProcessor as ImageProcessor

    folder = tmp_path_factory.mktemp("tiny-clip")
    chars = list(_bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    bos, eos = len(vocab), len(vocab) + 1
    vocab["<|startoftext|>"], vocab["<|endoftext|>"] = bos, eos
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)
    common = {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 4}
    config = CLIPConfig(
        text_config={**common, "vocab_size": len(vocab), "max_position_embeddings": 77,
                     "bos_token_id": bos, "eos_token_id": eos, "pad_token_id": eos},
        vision_config={**common, "image_size": 32, "patch_size": 8},
        projection_dim=16,
    )  # fmt: skip
    torch.manual_seed(0)
    CLIPModel(config).eval().save_pretrained(folder)
    image_processor = ImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    root = tmp_path / "ds"
    root.mkdir()
    for name, caption in CAPTIONS.items():
        Image.new("RGB", (48, 40), COLORS[name]).save(root / name)
        (root / name).with_suffix(".txt").write_text(caption, encoding="utf-8")
    return root


def _paths(root: Path) -> tuple[list[Path], list[str]]:
    names = sorted(CAPTIONS)
    return [root / n for n in names], [CAPTIONS[n] for n in names]


def test_tokenizer_round_trip(tiny_clip: Path) -> None:
    from transformers import AutoProcessor

    tok = AutoProcessor.from_pretrained(str(tiny_clip)).tokenizer
    ids = tok(["a cat"])["input_ids"][0]
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert len(set(ids[1:-1])) == 4  # a</w> c a t</w>: distinct pieces, no unknowns
    assert tok.unk_token_id not in ids[1:-1]


def test_similarities_finite_bounded_deterministic(tiny_clip: Path, dataset: Path) -> None:
    from nyx_tui.tagging.clip_score import clip_similarities

    images, captions = _paths(dataset)
    first = clip_similarities(images, captions, str(tiny_clip), batch_size=2)
    assert len(first) == len(images)
    assert all(math.isfinite(s) and -1.0 <= s <= 1.0 for s in first)
    again = clip_similarities(images, captions, str(tiny_clip), batch_size=16)
    assert again == pytest.approx(first, abs=1e-5)
    assert len(set(round(s, 6) for s in first)) > 1  # not a constant


def test_similarity_matches_by_hand(tiny_clip: Path, dataset: Path) -> None:
    from transformers import AutoProcessor, CLIPModel

    from nyx_tui.tagging.clip_score import clip_similarities

    image, caption = dataset / "red.png", CAPTIONS["red.png"]
    # a long caption is truncated to the model's 77 tokens rather than failing
    long_caption = caption + ", " + ", ".join(["extra tag"] * 60)
    got = clip_similarities([image, image], [caption, long_caption], str(tiny_clip), device="cpu")
    processor = AutoProcessor.from_pretrained(str(tiny_clip))
    model = CLIPModel.from_pretrained(str(tiny_clip)).eval()
    with Image.open(image) as im:
        pixels = processor.image_processor(images=[im.convert("RGB")], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        vision = model.vision_model(pixel_values=pixels).pooler_output
        img = model.visual_projection(vision)[0]
        ids = processor.tokenizer([caption], return_tensors="pt")
        text = model.text_model(**ids).pooler_output
        txt = model.text_projection(text)[0]
    expected = float(torch.dot(img, txt) / (img.norm() * txt.norm()))
    assert got[0] == pytest.approx(expected, abs=1e-5)
    assert math.isfinite(got[1]) and -1.0 <= got[1] <= 1.0


def test_alpha_and_exif_are_applied(tiny_clip: Path, tmp_path: Path) -> None:
    from nyx_tui.tagging.clip_score import clip_similarities

    white = tmp_path / "white.png"
    Image.new("RGB", (40, 40), (255, 255, 255)).save(white)
    clear = tmp_path / "clear.png"
    Image.new("RGBA", (40, 40), (0, 0, 0, 0)).save(clear)  # fully transparent: white once laid on white
    upright = tmp_path / "upright.png"
    img = Image.new("RGB", (64, 32), (200, 0, 0))
    for x in range(0, 64, 8):  # vertical stripes: horizontal ones when turned
        img.paste((0, 0, 200), (x, 0, x + 4, 32))
    img.save(upright)
    rotated, sideways = tmp_path / "rotated.png", tmp_path / "sideways.png"
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to view": stored turned the other way (lossless PNG: same pixels)
    img.rotate(90, expand=True).save(rotated, exif=exif)
    img.rotate(90, expand=True).save(sideways)  # the same pixels without the tag: a different picture
    cap = "a plain picture"
    sims = clip_similarities([white, clear, upright, rotated, sideways], [cap] * 5, str(tiny_clip))
    assert sims[0] == pytest.approx(sims[1], abs=1e-5)
    assert sims[2] == pytest.approx(sims[3], abs=1e-5)
    assert abs(sims[2] - sims[4]) > 1e-2  # the check above can tell orientations apart


def test_cli_json_includes_similarity(tiny_clip: Path, dataset: Path, nyx_home: Path) -> None:
    proc = run_nyx("dataset", "captions-quality", str(dataset), "--clip", str(tiny_clip), "--json", "--top", "0",
                   home=nyx_home)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    answer = json.loads(proc.stdout)
    clip = answer["clip"]
    assert set(clip["similarities"]) == set(CAPTIONS)
    assert all(-1.0 <= v <= 1.0 for v in clip["similarities"].values())
    assert clip["median"] is not None and clip["threshold"] < clip["median"]
    for item in answer["items"]:
        assert item["clip"] == clip["similarities"][item["path"]]


def test_planted_outlier_is_flagged_first(
    dataset: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from nyx_tui.cli import main
    from nyx_tui.tagging import clip_score

    seen: dict[str, object] = {}

    def fake(images: list[Path], captions: list[str], model: str, **kw: object) -> list[float]:
        seen.update(model=model, n=len(images))
        base = {"red.png": 0.27, "green.png": 0.29, "blue.png": 0.26, "gray.png": 0.28, "yellow.png": 0.12}
        return [base[Path(p).name] for p in images]

    monkeypatch.setattr(clip_score, "clip_similarities", fake)
    assert main(["dataset", "captions-quality", str(dataset), "--clip", "some/model", "--json", "--top", "0"]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert seen == {"model": "some/model", "n": 5}
    first = answer["items"][0]
    assert first["path"] == "yellow.png" and "clip" in first["codes"]
    assert first["clip"] == pytest.approx(0.12)
    assert any("far from the image (CLIP similarity 0.12, dataset median 0.27)" in r for r in first["reasons"])
    assert answer["flagged"] == 1  # the others are typical

    assert main(["dataset", "captions-quality", str(dataset), "--clip", "some/model"]) == 0
    text = capsys.readouterr().out
    assert "far from the image" in text and text.index("yellow.png") < text.index("images,")


def test_apply_clip_rules(tmp_path: Path) -> None:
    from nyx_tui.datasets.caption_quality import CaptionReport, apply_clip, clip_threshold

    assert clip_threshold([0.3, 0.2]) is None  # too few to say what is typical
    median, cut = clip_threshold([0.30, 0.30, 0.30, 0.05]) or (0, 0)
    assert median == pytest.approx(0.30) and cut == pytest.approx(0.28)  # MAD 0: the minimum margin
    reports = [CaptionReport(tmp_path / f"{i}.png", f"{i}.png", "a, b, c") for i in range(4)]
    reports.append(CaptionReport(tmp_path / "e.png", "e.png", None, 0, ["empty: no caption file"], ["empty"]))
    sims = {tmp_path / "0.png": 0.30, tmp_path / "1.png": 0.31, tmp_path / "2.png": 0.29,
            tmp_path / "3.png": 0.10, tmp_path / "e.png": -0.9}  # fmt: skip
    out = apply_clip(reports, sims)
    assert [r.rel for r in out][:2] == ["e.png", "3.png"]
    assert out[1].codes == ["clip"] and out[1].score == 80
    assert out[0].codes == ["empty"]  # an image without a caption is not also `clip`-flagged
    assert all(r.codes == [] for r in out[2:])


def test_missing_repo_is_a_clear_error(
    dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, nyx_home: Path
) -> None:
    hf = tmp_path / "empty-hf"
    hf.mkdir()
    monkeypatch.setenv("HF_HOME", str(hf))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    proc = run_nyx("dataset", "captions-quality", str(dataset), "--clip", "nobody/no-such-clip", home=nyx_home)
    assert proc.returncode == 2
    err = " ".join(proc.stderr.split())
    assert "nobody/no-such-clip" in err and "hf download nobody/no-such-clip" in err
    assert "Traceback" not in proc.stderr
