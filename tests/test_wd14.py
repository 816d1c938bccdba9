"""WD14 tagging: stand-in ONNX taggers built here (no hub), exact captions, batching, conflicts, the job.

The stand-in (NOTES.md): Transpose → GlobalAveragePool → Flatten → Gemm(W=0, b=logit(p)) → Sigmoid gives
exactly the probabilities chosen below for any image, so every caption can be checked as an exact string.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from conftest import run_nyx
from onnx import TensorProto, helper
from PIL import Image

from nyx_tui.jobs.jobdir import JobDir, find_job

onnxruntime = pytest.importorskip("onnxruntime")

from nyx_tui.tagging.wd14 import (  # noqa: E402  (after the importorskip)
    KAOMOJI,
    Labels,
    ModelError,
    Tagger,
    TagOptions,
    load_image,
    mcut_threshold,
    merge_caption,
    preprocess,
    resolve_model,
    select_tags,
    tag_images,
)

SIZE = 32

# (name, category, probability): 4 ratings first, then general (0) and character (4) tags, mixed
TAGS: list[tuple[str, int, float]] = [
    ("general", 9, 0.10),
    ("sensitive", 9, 0.70),
    ("questionable", 9, 0.15),
    ("explicit", 9, 0.05),
    ("long_hair", 0, 0.80),
    ("hatsune_miku", 4, 0.90),
    ("1girl", 0, 0.95),
    ("^_^", 0, 0.60),
    ("smile", 0, 0.50),
    ("kirisame_marisa", 4, 0.50),
    ("blue_eyes", 0, 0.40),
    (">_<", 0, 0.30),
    ("hat_(object)", 0, 0.45),
    ("short_hair", 0, 0.12),
    ("cirno", 4, 0.02),
]
# thresholds 0.35 / 0.85: the one character above 0.85 first, then general tags by probability
DEFAULT_CAPTION = "hatsune miku, 1girl, long hair, ^_^, smile, hat (object), blue eyes"


def _graph_io(batch: int | str, n_out: int) -> tuple[Any, Any]:
    x = helper.make_tensor_value_info("input_1", TensorProto.FLOAT, [batch, SIZE, SIZE, 3])
    y = helper.make_tensor_value_info("predictions_sigmoid", TensorProto.FLOAT, [batch, n_out])
    return x, y


def _save(path: Path, nodes: list[Any], io: tuple[Any, Any], inits: list[Any]) -> None:
    graph = helper.make_graph(nodes, "wd14-stand-in", [io[0]], [io[1]], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path / "model.onnx"))


def _write_tags(path: Path, tags: list[tuple[str, int]]) -> None:
    lines = ["tag_id,name,category,count"]
    lines += [f"{i},{name},{cat},{1000 - i}" for i, (name, cat) in enumerate(tags)]
    (path / "selected_tags.csv").write_text("\n".join(lines) + "\n")


def make_fixed_model(path: Path, batch: int | str = "batch") -> Path:
    """A tagger that answers TAGS' probabilities for any image."""
    p = np.array([t[2] for t in TAGS], dtype=np.float64)
    bias = np.log(p / (1 - p)).astype(np.float32)
    nodes = [
        helper.make_node("Transpose", ["input_1"], ["nchw"], perm=[0, 3, 1, 2]),
        helper.make_node("GlobalAveragePool", ["nchw"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["flat"]),
        helper.make_node("Gemm", ["flat", "W", "b"], ["logits"]),
        helper.make_node("Sigmoid", ["logits"], ["predictions_sigmoid"]),
    ]
    inits = [
        helper.make_tensor("W", TensorProto.FLOAT, [3, len(TAGS)], np.zeros(3 * len(TAGS), np.float32).tolist()),
        helper.make_tensor("b", TensorProto.FLOAT, [len(TAGS)], bias.tolist()),
    ]
    _save(path, nodes, _graph_io(batch, len(TAGS)), inits)
    _write_tags(path, [(n, c) for n, c, _ in TAGS])
    return path


def make_channel_model(path: Path) -> Path:
    """A tagger whose three outputs are the mean of input channels 0, 1, 2 over 255: shows what it was fed."""
    nodes = [
        helper.make_node("Transpose", ["input_1"], ["nchw"], perm=[0, 3, 1, 2]),
        helper.make_node("GlobalAveragePool", ["nchw"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["flat"]),
        helper.make_node("Mul", ["flat", "scale"], ["predictions_sigmoid"]),
    ]
    inits = [helper.make_tensor("scale", TensorProto.FLOAT, [1], [1 / 255])]
    _save(path, nodes, _graph_io("batch", 3), inits)
    _write_tags(path, [("channel_0", 0), ("channel_1", 0), ("channel_2", 0)])
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {
        "dynamic": make_fixed_model(root / "dynamic"),
        "fixed": make_fixed_model(root / "fixed", batch=1),
        "channels": make_channel_model(root / "channels"),
    }


@pytest.fixture(scope="module")
def tagger(models: dict[str, Path]) -> Tagger:
    return Tagger.load(str(models["dynamic"]))


def make_images(folder: Path, n: int, size: tuple[int, int] = (40, 24)) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        path = folder / f"img{i:02d}.png"
        Image.new("RGB", size, (20 * i % 256, 100, 200)).save(path)
        out.append(path)
    return out


def caption(image: Path, ext: str = ".txt") -> str:
    return image.with_suffix(ext).read_text()


def probs() -> np.ndarray:
    return np.array([t[2] for t in TAGS], dtype=np.float32)


def labels() -> Labels:
    return Labels(tuple(t[0] for t in TAGS), np.array([t[1] for t in TAGS]))


def tags_for(**options: Any) -> str:
    return ", ".join(select_tags(probs(), labels(), TagOptions(**options)).tags)


# ------------------------------------------------------------------------------------------- postprocess


def test_thresholds_and_order() -> None:
    assert tags_for() == DEFAULT_CAPTION
    assert (
        tags_for(threshold=0.5, character_threshold=0.4)
        == "hatsune miku, kirisame marisa, 1girl, long hair, ^_^, smile"
    )
    # >_< (0.30) comes in below 0.35, keeping its underscore; short_hair (0.12) still does not
    assert tags_for(threshold=0.25) == DEFAULT_CAPTION + ", >_<"


def test_rating_on_and_off() -> None:
    assert tags_for(rating=True) == "sensitive, " + DEFAULT_CAPTION
    assert tags_for(rating=False) == DEFAULT_CAPTION


def test_mcut() -> None:
    # general, sorted: .95 .80 | .60 .50 .45 .40 .30 .12 — the largest gap (.20) is cut at .70
    # character: .90 .50 | .02 — the largest gap (.48) is cut at .26 (above the 0.15 floor)
    assert tags_for(mcut=True) == "hatsune miku, kirisame marisa, 1girl, long hair"
    assert mcut_threshold(np.array([0.9, 0.1, 0.8], np.float32)) == pytest.approx(0.45)
    assert mcut_threshold(np.array([0.5], np.float32)) is None
    # characters all unlikely: the cut (.055) falls under the floor, which keeps them out
    low = probs()
    low[[5, 9, 14]] = [0.10, 0.01, 0.0]
    chosen = select_tags(low, labels(), TagOptions(mcut=True))
    assert chosen.characters == []
    assert [n for n, _ in chosen.general] == ["1girl", "long hair"]


def test_undesired_and_underscores() -> None:
    # an undesired tag matches in either spelling (long hair / long_hair)
    assert tags_for(undesired=("smile", "long hair", "sensitive"), rating=True) == (
        "hatsune miku, 1girl, ^_^, hat (object), blue eyes"
    )
    assert tags_for(replace_underscores=False) == (
        "hatsune_miku, 1girl, long_hair, ^_^, smile, hat_(object), blue_eyes"
    )
    assert tags_for(escape_parens=True) == "hatsune miku, 1girl, long hair, ^_^, smile, hat \\(object\\), blue eyes"
    assert {"^_^", ">_<", "o_o", "0_0", "(o)_(o)", "+_+", "@_@", "u_u", "x_x", "|_|", "||_||", "=_="} <= KAOMOJI


def test_merge_caption() -> None:
    tags = DEFAULT_CAPTION.split(", ")
    existing = "my_token, Long_Hair, Smile"
    assert merge_caption(existing, tags, "append") == (
        "my_token, Long_Hair, Smile, hatsune miku, 1girl, ^_^, hat (object), blue eyes"
    )
    assert merge_caption("", tags, "append") == DEFAULT_CAPTION
    assert merge_caption(DEFAULT_CAPTION, tags, "append") is None  # nothing new: the file stays
    assert merge_caption(existing, tags, "overwrite") == DEFAULT_CAPTION
    assert merge_caption(existing, tags, "skip") is None
    assert merge_caption("", tags, "skip") == DEFAULT_CAPTION


# -------------------------------------------------------------------------------------------- preprocess


def test_preprocess_hand_computed() -> None:
    """4x2 RGBA, size 4: no resize; one white row above and below; alpha onto white; BGR order."""
    img = Image.new("RGBA", (4, 2))
    px = [
        [(255, 0, 0, 255), (0, 255, 0, 255), (0, 0, 255, 0), (10, 20, 30, 51)],
        [(1, 2, 3, 255), (250, 100, 50, 255), (9, 9, 9, 0), (0, 0, 0, 255)],
    ]
    for y, row in enumerate(px):
        for x, value in enumerate(row):
            img.putpixel((x, y), value)
    white = [255.0, 255.0, 255.0]
    expected = np.array(
        [
            [white] * 4,
            [[0, 0, 255], [0, 255, 0], white, [210, 208, 206]],  # BGR; 51/255 = 0.2 of (10,20,30) over white
            [[3, 2, 1], [50, 100, 250], white, [0, 0, 0]],
            [white] * 4,
        ],
        dtype=np.float32,
    )
    out = preprocess(img, 4)
    assert out.dtype == np.float32 and out.shape == (4, 4, 3)
    np.testing.assert_allclose(out, expected, atol=1.0)  # the partly transparent pixel may round by one
    exact = np.ones(expected.shape, bool)
    exact[1, 3] = False
    np.testing.assert_array_equal(out[exact], expected[exact])
    # a non-square image is padded, never stretched: a tall one gets white columns left and right
    tall = preprocess(Image.new("RGB", (2, 4), (0, 0, 0)), 4)
    assert (tall[:, 0] == 255).all() and (tall[:, 3] == 255).all() and (tall[:, 1:3] == 0).all()
    assert preprocess(Image.new("L", (100, 60), 0), SIZE).shape == (SIZE, SIZE, 3)


def test_model_sees_bgr_and_white_padding(models: dict[str, Path], tmp_path: Path) -> None:
    """Through a real session: a red image, 32x16 (padded to 32x32 with white), gives channel means
    B 0.5, G 0.5, R 1.0 — black padding or RGB order would give something else."""
    tagger = Tagger.load(str(models["channels"]))
    red = tmp_path / "red.png"
    Image.new("RGB", (SIZE, SIZE // 2), (255, 0, 0)).save(red)
    clear = tmp_path / "clear.png"
    Image.new("RGBA", (SIZE, SIZE), (0, 0, 0, 0)).save(clear)
    out = tagger.predict(np.stack([load_image(red, tagger.size), load_image(clear, tagger.size)]))
    np.testing.assert_allclose(out, [[0.5, 0.5, 1.0], [1.0, 1.0, 1.0]], atol=1e-6)


# --------------------------------------------------------------------------------------------- the loop


def test_tagger_reads_interface(models: dict[str, Path], tagger: Tagger) -> None:
    assert (tagger.size, tagger.fixed_batch, tagger.input_name) == (SIZE, None, "input_1")
    assert tagger.providers[-1] == "CPUExecutionProvider"
    fixed = Tagger.load(str(models["fixed"]))
    assert fixed.fixed_batch == 1 and fixed.batch_size(8) == 1 and tagger.batch_size(8) == 8


def test_batches_sized_to_the_model(models: dict[str, Path], tmp_path: Path) -> None:
    images = make_images(tmp_path / "a", 5)
    dynamic = Tagger.load(str(models["dynamic"]))
    summary = tag_images(dynamic, images, TagOptions(batch_size=2, mode="overwrite"))
    assert dynamic.stats.batch_sizes == [2, 2, 1] and summary.written == 5
    fixed = Tagger.load(str(models["fixed"]))
    summary = tag_images(fixed, images, TagOptions(batch_size=8, mode="overwrite"))
    assert fixed.stats.batch_sizes == [1] * 5 and summary.unchanged == 5
    assert [caption(p) for p in images] == [DEFAULT_CAPTION] * 5


def test_modes_append_overwrite_skip(tagger: Tagger, tmp_path: Path) -> None:
    images = make_images(tmp_path / "m", 3)
    images[0].with_suffix(".txt").write_text("my_token, Long_Hair, Smile\n")
    images[1].with_suffix(".txt").write_text("a photo")
    summary = tag_images(tagger, images, TagOptions(mode="skip"))
    assert (summary.skipped, summary.written) == (2, 1)
    assert [caption(p) for p in images] == ["my_token, Long_Hair, Smile\n", "a photo", DEFAULT_CAPTION]

    summary = tag_images(tagger, images, TagOptions(mode="append"))
    appended = "my_token, Long_Hair, Smile, hatsune miku, 1girl, ^_^, hat (object), blue eyes"
    assert [caption(p) for p in images] == [appended, "a photo, " + DEFAULT_CAPTION, DEFAULT_CAPTION]
    assert (summary.written, summary.unchanged) == (2, 1)
    again = tag_images(tagger, images, TagOptions(mode="append"))  # twice: nothing is duplicated
    assert (again.written, again.unchanged) == (0, 3)

    tag_images(tagger, images, TagOptions(mode="overwrite", rating=True, caption_ext=".tags"))
    assert [caption(p, ".tags") for p in images] == ["sensitive, " + DEFAULT_CAPTION] * 3
    tag_images(tagger, images, TagOptions(mode="overwrite"))
    assert [caption(p) for p in images] == [DEFAULT_CAPTION] * 3


def test_conflict_is_not_overwritten(models: dict[str, Path], tmp_path: Path) -> None:
    """Someone saves a caption while its image is in the session: their edit stays, the rest is written."""
    tagger = Tagger.load(str(models["dynamic"]))
    images = make_images(tmp_path / "c", 3)
    edited = images[1].with_suffix(".txt")
    edited.write_text("before")
    real = tagger.session

    class EditDuringRun:
        def run(self, *args: Any, **kw: Any) -> Any:
            edited.write_text("edited by hand meanwhile")
            return real.run(*args, **kw)

    tagger.session = EditDuringRun()
    warnings: list[str] = []
    summary = tag_images(tagger, images, TagOptions(mode="overwrite"), warn=warnings.append)
    assert edited.read_text() == "edited by hand meanwhile"
    assert (summary.conflicts, summary.written) == (1, 2)
    assert caption(images[0]) == caption(images[2]) == DEFAULT_CAPTION
    assert len(warnings) == 1 and str(edited) in warnings[0]


def test_broken_image_and_stop(models: dict[str, Path], tagger: Tagger, tmp_path: Path) -> None:
    images = make_images(tmp_path / "b", 5)
    broken = tmp_path / "b" / "img01.png"
    broken.write_bytes(b"not a png")
    warnings: list[str] = []
    summary = tag_images(tagger, images, TagOptions(batch_size=2), warn=warnings.append)
    assert (summary.failed, summary.written, summary.done) == (1, 4, 5)
    assert not broken.with_suffix(".txt").exists() and "img01.png" in warnings[0]

    stop_tagger = Tagger.load(str(models["dynamic"]))
    fresh = make_images(tmp_path / "s", 5)
    seen: list[tuple[int, int]] = []
    summary = tag_images(
        stop_tagger,
        fresh,
        TagOptions(batch_size=2),
        should_stop=lambda: stop_tagger.stats.runs >= 1,
        progress=lambda done, total: seen.append((done, total)),
    )
    assert summary.stopped and summary.written == 2 and seen == [(2, 5)]
    assert [p.with_suffix(".txt").exists() for p in fresh] == [True, True, False, False, False]


def test_worker_obeys_stop(tmp_path: Path) -> None:
    from nyx_tui.jobs.control import send
    from nyx_tui.jobs.events import EventWriter, read_events
    from nyx_tui.tagging.tag_job import _Commands

    job = JobDir(tmp_path)
    with EventWriter(job.events_path) as events:
        commands = _Commands(job, events)
        assert commands() is False
        send(job.control_path, "stop")
        assert commands() is True and commands.requested == "stop"
    acks = [e for e in read_events(job.events_path) if e.get("ack")]
    assert [e["ack"] for e in acks] == ["stop"]


# ------------------------------------------------------------------------------------- models and the CLI


def test_resolve_model_folder_problems(tmp_path: Path) -> None:
    folder = tmp_path / "half"
    folder.mkdir()
    (folder / "model.onnx").write_bytes(b"")
    with pytest.raises(ModelError, match=r"lacks selected_tags\.csv"):
        resolve_model(str(folder))
    with pytest.raises(ModelError, match="neither a folder nor"):
        resolve_model("no such thing here")


def test_cli_rejects_bad_input(
    models: dict[str, Path], tmp_path: Path, nyx_home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from nyx_tui.cli import main

    images = tmp_path / "imgs"
    make_images(images, 1)
    empty = tmp_path / "empty"
    empty.mkdir()
    half = tmp_path / "half"
    half.mkdir()
    (half / "model.onnx").write_bytes(b"")
    cases = [
        ([str(tmp_path / "nope"), "--model", str(models["dynamic"])], "does not exist"),
        ([str(empty), "--model", str(models["dynamic"])], "holds no images"),
        ([str(images), "--model", str(half)], "lacks selected_tags.csv"),
        ([str(images), "--model", "./not/a/folder"], "neither an existing folder nor"),
        ([str(images), "--model", str(models["dynamic"]), "--threshold", "1.5"], "not a probability"),
        ([str(images), "--model", str(models["dynamic"]), "--batch-size", "0"], "not a batch size"),
    ]
    for argv, message in cases:
        assert main(["tag", *argv]) == 2, argv
        err = " ".join(capsys.readouterr().err.split())  # Rich wraps long lines
        assert message in err and "fix" in err, err
    assert not (nyx_home / "jobs").exists() or not list((nyx_home / "jobs").iterdir())


def test_nyx_tag_job_end_to_end(models: dict[str, Path], tmp_path: Path, nyx_home: Path) -> None:
    images = make_images(tmp_path / "data", 4)
    (tmp_path / "data" / "sub").mkdir()
    nested = make_images(tmp_path / "data" / "sub", 1)[0]
    images[0].with_suffix(".txt").write_text("my_token")
    proc = run_nyx(
        "tag", str(tmp_path / "data"), "--model", str(models["fixed"]), "--rating", "--undesired", "smile",
        home=nyx_home, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    expected = "sensitive, hatsune miku, 1girl, long hair, ^_^, hat (object), blue eyes"
    assert caption(images[0]) == "my_token, " + expected
    assert [caption(p) for p in [*images[1:], nested]] == [expected] * 4
    job = find_job("last", nyx_home / "jobs")
    assert job.effective_state() == "finished" and job.spec()["kind"] == "tag"
    events = job.events()
    start = next(e for e in events if e["kind"] == "start")
    assert (start["job_kind"], start["total"]) == ("tag", 5)
    last = [e for e in events if e["kind"] == "progress"][-1]
    assert (last["done"], last["total"], last["unit"]) == (5, 5, "images")
    assert "FINISHED" in proc.stdout


def test_repo_id_not_cached_fails_clearly(
    models: dict[str, Path], tmp_path: Path, nyx_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_images(tmp_path / "data", 1)
    hf = tmp_path / "hf"
    monkeypatch.setenv("HF_HOME", str(hf))
    monkeypatch.setenv("HF_HUB_CACHE", str(hf / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    proc = run_nyx("tag", str(tmp_path / "data"), "--model", "SmilingWolf/wd-vit-tagger-v3", home=nyx_home, timeout=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    job = find_job("last", nyx_home / "jobs")
    assert job.effective_state() == "failed"
    errors = [e["message"] for e in job.events() if e["kind"] == "log" and e.get("level") == "error"]
    assert len(errors) == 1
    assert "SmilingWolf/wd-vit-tagger-v3 is not in the Hugging Face cache" in errors[0]
    assert "hf download SmilingWolf/wd-vit-tagger-v3 model.onnx selected_tags.csv" in errors[0]
    assert "not in the Hugging Face cache" in proc.stdout  # the follower shows it
    assert not list((tmp_path / "data").glob("*.txt"))
