"""The torch-free dataset library: scan (header sizes, EXIF, kohya folders, captions), layout problems,
stats and buckets, tag operations with conflict-safe writes and undo, and `nyx dataset scan|stats|tags`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import run_nyx
from PIL import Image

from nyx_tui.datasets import tags as t
from nyx_tui.datasets.captions import MISSING, CaptionConflict, read_caption, restore_caption, write_caption
from nyx_tui.datasets.images import image_size, read_header
from nyx_tui.datasets.layout import Problem
from nyx_tui.datasets.scan import Dataset, normalize_ext, scan
from nyx_tui.datasets.stats import BucketSettings, aspect_bin, compute_stats, short_side_bin
from nyx_tui.datasets.undo import Journal, NothingToUndo, history, undo

# ------------------------------------------------------------------------------------------- helpers


def png(path: Path, size: tuple[int, int] = (64, 48), mode: str = "RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size).save(path)
    return path


def jpg_rotated(path: Path, size: tuple[int, int] = (64, 48), orientation: int = 6) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.new("RGB", size, (200, 10, 10)).save(path, exif=exif)
    return path


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode("utf-8"))
    return path


def codes(ds: Dataset) -> list[str]:
    return [p.code for p in ds.problems]


def problem(ds: Dataset, code: str) -> Problem:
    found = [p for p in ds.problems if p.code == code]
    assert len(found) == 1, f"{code}: {[p.message for p in ds.problems]}"
    return found[0]


@pytest.fixture
def kohya(tmp_path: Path) -> Path:
    """A kohya dataset: `10_mychar` (png, webp, EXIF-rotated jpg, RGBA png, an unreadable .png) and `3_other`."""
    root = tmp_path / "train"
    d = root / "10_mychar"
    png(d / "a.png")
    write(d / "a.txt", "mychar, kitty, smile\n")  # a trailing newline: kept byte for byte unless edited
    d.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (64, 48), (0, 90, 0)).save(d / "b.webp")
    write(d / "b.txt", "mychar, cat ears, kitty")
    jpg_rotated(d / "c.jpg")
    write(d / "c.txt", "mychar, smile, smile")
    png(d / "d.png", (48, 64), "RGBA")  # no caption
    write(d / "bad.png", "this is not a png")
    write(d / "bad.txt", "broken")
    o = root / "3_other"
    png(o / "e.png", (128, 64))
    write(o / "e.txt", "")
    return root


def captions(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): p.read_text() for p in sorted(root.rglob("*.txt")) if ".nyx" not in p.parts}


# ---------------------------------------------------------------------------------------------- scan


def test_header_sizes_exif_alpha_and_unreadable(kohya: Path) -> None:
    ds = scan(kohya)
    by = ds.by_rel()
    assert sorted(by) == [
        "10_mychar/a.png",
        "10_mychar/b.webp",
        "10_mychar/bad.png",
        "10_mychar/c.jpg",
        "10_mychar/d.png",
        "3_other/e.png",
    ]
    assert by["10_mychar/a.png"].size == (64, 48)
    assert by["10_mychar/b.webp"].size == (64, 48) and by["10_mychar/b.webp"].format == "WEBP"
    rotated = by["10_mychar/c.jpg"]
    assert rotated.orientation == 6 and rotated.size == (48, 64)  # EXIF 6: stored 64x48, shown 48x64
    assert by["10_mychar/d.png"].has_alpha and not by["10_mychar/a.png"].has_alpha
    bad = by["10_mychar/bad.png"]
    assert not bad.readable and bad.size is None and bad.error
    assert [e.rel for e in ds.unreadable] == ["10_mychar/bad.png"]
    # header-only helpers; orientation 8 in a PNG's eXIf chunk swaps too, 3 (180°) does not
    assert image_size(rotated.path) == (48, 64)
    h = read_header(jpg_rotated(kohya.parent / "o3.jpg", (64, 48), 3))
    assert h.orientation == 3 and h.size == (64, 48)
    exif = Image.Exif()
    exif[0x0112] = 8
    Image.new("RGB", (64, 48)).save(kohya.parent / "o8.png", exif=exif)
    assert read_header(kohya.parent / "o8.png").size == (48, 64)


def test_captions_and_kohya_folders(kohya: Path) -> None:
    ds = scan(kohya)
    by = ds.by_rel()
    a = by["10_mychar/a.png"]
    assert a.caption == "mychar, kitty, smile" and a.tags == ["mychar", "kitty", "smile"]
    assert a.kohya is not None and (a.kohya.repeats, a.kohya.name) == (10, "mychar") and a.repeats == 10
    assert by["10_mychar/d.png"].caption is None and not by["10_mychar/d.png"].has_caption
    assert by["3_other/e.png"].caption == "" and by["3_other/e.png"].repeats == 3
    assert [(k.rel, k.repeats, k.name) for k in ds.kohya_folders] == [
        ("10_mychar", 10, "mychar"),
        ("3_other", 3, "other"),
    ]
    # the root itself named N_name (a subset folder scanned directly)
    sub = scan(kohya / "10_mychar")
    assert sub.images[0].kohya is not None and sub.images[0].repeats == 10
    assert "no-repeat-prefix" not in codes(sub) and "root-images" not in codes(sub)
    # without header reads (tag edits): no sizes, no unreadable images, same captions
    quick = scan(kohya, read_sizes=False)
    assert all(e.size is None and e.readable for e in quick.images)
    assert quick.by_rel()["10_mychar/a.png"].caption == "mychar, kitty, smile"


def test_scan_bad_input(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        scan(tmp_path / "nope")
    with pytest.raises(NotADirectoryError):
        scan(write(tmp_path / "f.txt", "x"))
    assert normalize_ext("caption") == ".caption"
    with pytest.raises(ValueError, match="not a file extension"):
        normalize_ext(".")


def test_scan_progress_and_threads(tmp_path: Path) -> None:
    for i in range(150):
        png(tmp_path / "ds" / f"{i:03d}.png", (32 + i % 3, 32))
    seen: list[tuple[int, int]] = []
    ds = scan(tmp_path / "ds", workers=4, progress=lambda d, n: seen.append((d, n)))
    assert len(ds.images) == 150 and all(e.size is not None for e in ds.images)
    assert seen[0] == (0, 150) and seen[-1] == (150, 150)
    assert [e.rel for e in ds.images] == sorted(e.rel for e in ds.images)


# ------------------------------------------------------------------------------------ layout problems


def test_layout_kohya_dataset(kohya: Path) -> None:
    write(kohya / "10_mychar" / "gone.txt", "orphan")
    ds = scan(kohya)
    assert ds.problems[0].severity == "error"  # errors first
    p = problem(ds, "unreadable")
    assert p.severity == "error" and "`10_mychar/bad.png` cannot be read" in p.message
    assert "re-export" in p.fix
    p = problem(ds, "missing-caption")
    assert p.path == kohya / "10_mychar" and "1 of 5 images in `10_mychar` has no caption" in p.message
    assert "class token `mychar`" in p.fix and p.paths == (kohya / "10_mychar" / "d.png",)
    p = problem(ds, "empty-caption")
    assert "1 caption in `3_other` is empty: `3_other/e.txt`" in p.message and "class token `other`" in p.fix
    p = problem(ds, "orphan-caption")
    assert p.severity == "info" and "`10_mychar/gone.txt`" in p.message and "delete it" in p.fix
    assert p.to_json(kohya)["paths"] == ["10_mychar/gone.txt"]


def test_layout_no_repeat_prefix_root_images_nested_and_empty(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    png(root / "10_good" / "a.png")
    png(root / "img" / "b.png")
    png(root / "loose.png")
    png(root / "10_good" / "extra" / "c.png")
    png(root / "0_off" / "z.png")
    (root / "empty" / "deeper").mkdir(parents=True)
    (root / "5_hollow").mkdir()
    ds = scan(root)
    p = problem(ds, "no-repeat-prefix")
    assert p.message == "folder `img` has no repeat prefix: the trainer skips its 1 image"
    assert p.fix.startswith("rename it to `10_img` or set repeats in the config")
    p = problem(ds, "root-images")
    assert p.path == root and "1 image directly in the dataset folder is not trained on" in p.message
    assert "`N_name` folder" in p.fix
    p = problem(ds, "nested-images")
    assert "`10_good/extra`" in p.message and "directly in `10_good`" in p.message
    assert "move them up into `10_good`" in p.fix
    p = problem(ds, "zero-repeats")
    assert "`0_off` has a repeat count of 0" in p.message and "`1_off`" in p.fix
    empties = {x.path.name: x for x in ds.problems if x.code == "empty-folder"}
    assert set(empties) == {"empty", "5_hollow"}  # the topmost empty folder only, not `empty/deeper`
    assert empties["empty"].severity == "info" and empties["empty"].fix == "add images to it or delete it"
    assert empties["5_hollow"].severity == "error" and "stops" in empties["5_hollow"].message
    # captions of images that are not trained where they are do not matter; `img` (to be renamed) does
    missing = [x for x in ds.problems if x.code == "missing-caption"]
    assert sorted(x.path.name for x in missing) == ["0_off", "10_good", "img"]


def test_layout_caption_extension_mismatch(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    for name in ("a", "b"):
        png(root / f"{name}.png")
        write(root / f"{name}.caption", f"{name}, tag")
    ds = scan(root)
    p = problem(ds, "caption-ext-mismatch")
    assert p.message == "no `.txt` captions, but 2 images have `.caption` captions: the trainer reads only `.txt`"
    assert "--caption-ext .caption" in p.fix and 'dataset.caption_extension = ".caption"' in p.fix
    assert "missing-caption" not in codes(ds) and "orphan-caption" not in codes(ds)
    ok = scan(root, ".caption")
    assert ok.problems == [] and ok.images[0].caption == "a, tag"
    # mixed: one .txt, one .caption only
    write(root / "a.txt", "a")
    p = problem(scan(root), "caption-ext-mismatch")
    assert p.message.startswith("1 image has a `.caption` caption but no `.txt` one")
    assert p.paths == (root / "b.caption",)


def test_layout_shared_caption_unsupported_format_and_no_images(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    png(root / "a.png")
    png(root / "a.jpg")
    Image.new("RGB", (16, 16)).save(root / "g.gif")
    write(root / "a.txt", "a")
    write(root / "g.txt", "g")
    ds = scan(root)
    p = problem(ds, "shared-caption")
    assert "`a.jpg` and `a.png` share one caption file `a.txt`" in p.message
    p = problem(ds, "unsupported-format")
    assert p.message.startswith("1 image (.gif) is not read by the trainer, which reads only .bmp .jpeg")
    assert p.fix == "convert them to PNG or JPEG"
    empty = tmp_path / "empty"
    empty.mkdir()
    p = problem(scan(empty), "no-images")
    assert p.severity == "error" and "point at the folder" in p.fix


def test_flat_subset_folder(tmp_path: Path) -> None:
    root = tmp_path / "flat"
    png(root / "a.png")
    write(root / "a.txt", "x")
    png(root / "more" / "b.png")
    ds = scan(root)
    assert codes(ds) == ["nested-images"]
    assert "[[dataset.subsets]]" in ds.problems[0].fix


# --------------------------------------------------------------------------------------------- stats


def test_stats_numbers_and_tag_frequencies(kohya: Path) -> None:
    write(kohya / "orphan.txt", "x")
    st = compute_stats(scan(kohya), BucketSettings(resolution=512))
    assert (st.images, st.readable, st.unreadable) == (6, 5, 1)
    assert (st.captioned, st.missing_captions, st.empty_captions, st.orphans) == (5, 1, 1, 1)
    assert st.with_repeats == 4 * 10 + 1 * 3  # readable images in the trained folders, with repeats
    assert dict(st.short_side)["<256"] == 5
    assert {k: v for k, v in st.aspect if v} == {"4:3": 2, "3:4": 2, "2:1": 1}
    assert st.sizes[0] == ((48, 64), 2) or st.sizes[0] == ((64, 48), 2)
    assert dict(st.sizes)[(128, 64)] == 1
    assert st.smaller_than_resolution == 5
    # captions holding each tag (a tag twice in one caption counts once)
    assert dict(st.tags) == {"mychar": 3, "kitty": 2, "smile": 2, "cat ears": 1, "broken": 1}
    assert st.tags[0] == ("mychar", 3) and st.unique_tags == 5
    assert [(f.path, f.repeats, f.images, f.captioned) for f in st.folders] == [
        ("10_mychar", 10, 5, 4),
        ("3_other", 3, 1, 1),
    ]
    data = st.to_json(top=2)
    assert [x["tag"] for x in data["tags"]] == ["mychar", "kitty"]
    assert short_side_bin((1024, 2000)) == "1024-1535" and aspect_bin((1920, 1080)) == "16:9"


def test_bucket_counts(kohya: Path) -> None:
    ds = scan(kohya)
    st = compute_stats(ds, BucketSettings(resolution=512))
    assert [(b.size, b.images, b.with_repeats) for b in st.buckets] == [
        ((448, 576), 2, 20),  # c.jpg (EXIF-rotated) and d.png
        ((576, 448), 2, 20),  # a.png, b.webp
        ((704, 320), 1, 3),  # e.png (2:1)
    ]
    no_up = compute_stats(ds, BucketSettings(resolution=512, bucket_no_upscale=True))
    assert [(b.size, b.images) for b in no_up.buckets] == [((64, 64), 4), ((128, 64), 1)]
    square = compute_stats(ds, BucketSettings(resolution=512, enable_bucket=False))
    assert [(b.size, b.images) for b in square.buckets] == [((512, 512), 5)]
    wide = compute_stats(ds, BucketSettings(resolution=1024, max_bucket_reso=2048, bucket_reso_steps=32))
    assert sum(b.images for b in wide.buckets) == 5


# ------------------------------------------------------------------------------------- tag operations


@pytest.mark.parametrize(
    ("op", "before", "after"),
    [
        (t.add_tags(["new"]), "a, b", "a, b, new"),
        (t.add_tags(["x", "a", "y"], front=True), "a, b", "x, y, a, b"),
        (t.remove_tags(["b", "c"]), "a, b, c, b", "a"),
        (t.replace_tag("b", "z"), "a, b, c", "a, z, c"),
        (t.replace_tag("b", "a"), "a, b, c", "a, c"),
        (t.replace_tag("b", ""), "a, b, c", "a, c"),
        (t.move_to_front(["c", "q", "b"]), "a, b, c", "c, b, a"),
        (t.dedupe_tags(), "a, b, a, c, b", "a, b, c"),
        (t.sort_tags("alpha", keep_tokens=1), "mychar, zeta, Beta, alpha", "mychar, alpha, Beta, zeta"),
        (t.sort_tags("frequency", frequencies={"x": 1, "y": 5, "z": 5}), "x, z, y", "y, z, x"),
        (t.prune_tags({"a": 1, "b": 3, "k": 1}, 2, keep_tokens=1), "k, a, b", "k, b"),
        (t.apply_aliases({"kitty": "cat", "feline": "cat"}), "kitty, smile, feline, cat", "cat, smile"),
        (
            t.apply_implications({"cat ears": ["animal ears"], "animal ears": ["ears"]}),
            "cat ears",
            "cat ears, animal ears, ears",
        ),
    ],
)
def test_tag_op(op: t.TagOp, before: str, after: str) -> None:
    assert t.join_tags(op(t.split_tags(before))) == after


def test_split_tags() -> None:
    assert t.split_tags(" a ,b,, c\nd ") == ["a", "b", "c", "d"]
    with pytest.raises(ValueError, match="no comma"):
        t.add_tags(["a, b"])


def test_batch_ops_exact_captions(kohya: Path) -> None:
    ds = scan(kohya, read_sizes=False)
    r = t.edit_captions(ds, t.add_tags(["mychar", "solo"], front=True), "add")
    assert r.ok and len(r.written) == 6
    assert captions(kohya) == {
        "10_mychar/a.txt": "solo, mychar, kitty, smile",
        "10_mychar/b.txt": "solo, mychar, cat ears, kitty",
        "10_mychar/bad.txt": "mychar, solo, broken",  # the missing ones, in the order given
        "10_mychar/c.txt": "solo, mychar, smile, smile",
        "10_mychar/d.txt": "mychar, solo",  # created for the image that had none
        "3_other/e.txt": "mychar, solo",
    }
    ds = scan(kohya, read_sizes=False)
    freq = t.tag_frequencies(ds.images)
    assert freq["solo"] == 6 and freq["smile"] == 2
    t.edit_captions(ds, t.dedupe_tags(), "dedupe")
    ds = scan(kohya, read_sizes=False)
    t.edit_captions(ds, t.prune_tags(t.tag_frequencies(ds.images), 2), "prune")
    assert captions(kohya) == {
        "10_mychar/a.txt": "solo, mychar, kitty, smile",
        "10_mychar/b.txt": "solo, mychar, kitty",
        "10_mychar/bad.txt": "mychar, solo",
        "10_mychar/c.txt": "solo, mychar, smile",
        "10_mychar/d.txt": "mychar, solo",
        "3_other/e.txt": "mychar, solo",
    }
    ds = scan(kohya, read_sizes=False)
    t.edit_captions(ds, t.sort_tags("alpha", keep_tokens=1), "sort")
    assert captions(kohya)["10_mychar/a.txt"] == "solo, kitty, mychar, smile"


def test_unchanged_captions_are_not_rewritten(kohya: Path) -> None:
    ds = scan(kohya, read_sizes=False)
    r = t.edit_captions(ds, t.replace_tag("cat ears", "animal ears"), "replace")
    assert [e.caption_path.name for e in r.written] == ["b.txt"]
    assert (kohya / "10_mychar" / "a.txt").read_text() == "mychar, kitty, smile\n"  # trailing newline kept
    assert r.edits[0].removed == ["cat ears"] and r.edits[0].added == ["animal ears"]


def test_selection_vs_whole(kohya: Path) -> None:
    ds = scan(kohya, read_sizes=False)
    assert [e.rel for e in t.select(ds.images, ["3_other"])] == ["3_other/e.png"]
    assert [e.rel for e in t.select(ds.images, ["*.webp", "10_mychar/a.png"])] == [
        "10_mychar/a.png",
        "10_mychar/b.webp",
    ]
    assert [e.rel for e in t.select(ds.images, has=["smile"])] == ["10_mychar/a.png", "10_mychar/c.jpg"]
    picked = t.select(ds.images, has=["kitty"])
    r = t.edit_captions(ds, t.add_tags(["cat"]), "add cat", selection=picked)
    assert len(r.written) == 2
    after = captions(kohya)
    assert after["10_mychar/a.txt"] == "mychar, kitty, smile, cat"
    assert after["10_mychar/b.txt"] == "mychar, cat ears, kitty, cat"
    assert after["10_mychar/c.txt"] == "mychar, smile, smile" and after["3_other/e.txt"] == ""
    ds = scan(kohya, read_sizes=False)
    r = t.edit_captions(ds, t.remove_tags(["cat"]), "remove cat")  # the whole dataset
    assert len(r.written) == 2 and captions(kohya)["10_mychar/a.txt"] == "mychar, kitty, smile"


def test_dry_run_writes_nothing(kohya: Path) -> None:
    before = captions(kohya)
    r = t.edit_captions(scan(kohya, read_sizes=False), t.remove_tags(["mychar"]), "remove", dry_run=True)
    assert r.dry_run and len(r.edits) == 3 and not r.written and r.journal is None
    assert captions(kohya) == before and history(kohya) == []


# --------------------------------------------------------------------------------- aliases, implications


def test_rules_text_and_toml(tmp_path: Path, kohya: Path) -> None:
    text = write(
        tmp_path / "rules.txt",
        "# my rules\nkitty -> cat\nfeline → kitty   # a chain: feline → cat\n"
        "cat ears => animal ears\ncat => animal, pet\nanimal ears ⇒ ears\nc# -> csharp\n",
    )
    rules = t.load_rules(text)
    assert rules.aliases == {"kitty": "cat", "feline": "cat", "c#": "csharp"}
    assert rules.implications == {"cat ears": ["animal ears"], "cat": ["animal", "pet"], "animal ears": ["ears"]}
    toml = write(
        tmp_path / "rules.toml",
        '[aliases]\nkitty = "cat"\n[implications]\n"cat ears" = ["animal ears"]\nkitty = "pet"\n',
    )
    rules2 = t.load_rules(toml)
    assert rules2.aliases == {"kitty": "cat"} and rules2.implications == {"cat ears": ["animal ears"], "cat": ["pet"]}

    ds = scan(kohya, read_sizes=False)
    t.edit_captions(ds, t.apply_aliases(rules.aliases), "aliases")
    ds = scan(kohya, read_sizes=False)
    t.edit_captions(ds, t.apply_implications(rules.implications), "implications")
    after = captions(kohya)
    assert after["10_mychar/a.txt"] == "mychar, cat, smile, animal, pet"
    assert after["10_mychar/b.txt"] == "mychar, cat ears, cat, animal ears, animal, pet, ears"
    assert after["10_mychar/c.txt"] == "mychar, smile, smile"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("kitty cat\n", "rules.txt:1: 'kitty cat' is not a rule"),
        ("a -> b, c\n", "rules.txt:1: an alias is one tag -> one tag"),
        ("a -> b\nb -> a\n", "aliases loop"),
        ("a -> b\na -> c\n", "rules.txt:2: 'a' is already an alias of 'b'"),
        (" => x\n", "rules.txt:1: an implication is"),
    ],
)
def test_rules_errors(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(t.RulesError, match=message.replace("(", r"\(")):
        t.load_rules(write(tmp_path / "rules.txt", text))


def test_rules_file_errors(tmp_path: Path) -> None:
    with pytest.raises(t.RulesError, match="cannot read"):
        t.load_rules(tmp_path / "missing.txt")
    with pytest.raises(t.RulesError, match=r"unknown table \[alias\]"):
        t.load_rules(write(tmp_path / "r.toml", '[alias]\na = "b"\n'))


# ------------------------------------------------------------------------------------ conflicts, undo


def test_caption_edited_on_disk_is_not_overwritten(kohya: Path) -> None:
    ds = scan(kohya, read_sizes=False)  # captions read here…
    a = kohya / "10_mychar" / "a.txt"
    a.write_text("edited by hand in another editor")  # …changed on disk before the batch writes
    r = t.edit_captions(ds, t.add_tags(["x"]), "add x")
    assert r.conflicts == [a] and not r.ok
    assert a.read_text() == "edited by hand in another editor"  # not overwritten
    assert len(r.written) == 5 and (kohya / "10_mychar" / "b.txt").read_text() == "mychar, cat ears, kitty, x"
    batch = Journal(kohya).last()
    assert batch is not None and a not in [f.path for f in batch.files] and len(batch.files) == 5
    # the race inside the write itself: the stamp is checked again right before the rename
    with pytest.raises(CaptionConflict):
        write_caption(a, "mine", MISSING)
    assert a.read_text() == "edited by hand in another editor"


def test_undo_restores_exactly(kohya: Path) -> None:
    before = {p: p.read_bytes() for p in kohya.rglob("*.txt")}
    ds = scan(kohya, read_sizes=False)
    r = t.edit_captions(ds, t.add_tags(["trigger"], front=True), 'add "trigger" at front')
    assert r.batch_id == 1 and r.journal == kohya / ".nyx" / "undo" / "0001.json"
    assert (kohya / "10_mychar" / "d.txt").exists()
    ds = scan(kohya, read_sizes=False)
    r2 = t.edit_captions(ds, t.replace_tag("kitty", "cat"), "replace")
    assert r2.batch_id == 2
    journal = json.loads(r2.journal.read_text()) if r2.journal else {}
    assert journal["files"][0]["before"] == "trigger, mychar, kitty, smile"
    assert journal["files"][0]["after"] == "trigger, mychar, cat, smile"

    u = undo(kohya)
    assert u.ok and u.batch.id == 2 and len(u.restored) == 2
    u = undo(kohya)
    assert u.ok and u.batch.id == 1 and len(u.restored) == 6
    assert {p: p.read_bytes() for p in kohya.rglob("*.txt")} == before  # byte for byte, newline included
    assert not (kohya / "10_mychar" / "d.txt").exists()  # created by the batch: removed again
    assert [b.undone is not None for b in history(kohya)] == [True, True]
    with pytest.raises(NothingToUndo, match="undone already"):
        undo(kohya)
    # the journal is hidden from scans
    assert all(".nyx" not in e.rel for e in scan(kohya, read_sizes=False).images)


def test_undo_refuses_to_clobber(kohya: Path) -> None:
    ds = scan(kohya, read_sizes=False)
    t.edit_captions(ds, t.remove_tags(["mychar"]), "remove mychar")
    a, b = kohya / "10_mychar" / "a.txt", kohya / "10_mychar" / "b.txt"
    assert a.read_text() == "kitty, smile"
    a.write_text("kitty, smile, my own edit")
    dry = undo(kohya, dry_run=True)
    assert dry.conflicts == [a] and b in dry.restored and b.read_text() == "cat ears, kitty"
    u = undo(kohya)
    assert u.conflicts == [a] and not u.ok
    assert a.read_text() == "kitty, smile, my own edit"  # the later edit is kept
    assert b.read_text() == "mychar, cat ears, kitty"
    with pytest.raises(NothingToUndo):
        undo(kohya)
    with pytest.raises(NothingToUndo, match="no batch 7"):
        undo(kohya, 7)


def test_restore_caption_conflict_and_delete(tmp_path: Path) -> None:
    p = write(tmp_path / "a.txt", "one")
    _, stamp = read_caption(p)
    new = restore_caption(p, b"two\n", stamp)
    assert p.read_bytes() == b"two\n"
    with pytest.raises(CaptionConflict):
        restore_caption(p, None, stamp)
    assert restore_caption(p, None, new) == MISSING and not p.exists()


# ----------------------------------------------------------------------------------------------- CLI


def test_cli_scan_and_stats_json(kohya: Path, nyx_home: Path) -> None:
    proc = run_nyx("dataset", "scan", str(kohya), "--json", home=nyx_home, timeout=60)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert (data["images"], data["readable"], data["captioned"], data["missing_captions"]) == (6, 5, 5, 1)
    assert data["unreadable"][0]["path"] == "10_mychar/bad.png"
    assert {"unreadable", "missing-caption", "empty-caption"} <= {p["code"] for p in data["problems"]}
    assert all(p["fix"] for p in data["problems"])
    assert run_nyx("dataset", "scan", str(kohya), "--strict", home=nyx_home, timeout=60).returncode == 1

    proc = run_nyx(
        "dataset", "stats", str(kohya), "--resolution", "512", "--json", "--top", "2", home=nyx_home, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    st = json.loads(proc.stdout)
    assert [(b["width"], b["height"], b["images"]) for b in st["buckets"]["sizes"]] == [
        (448, 576, 2),
        (576, 448, 2),
        (704, 320, 1),
    ]
    assert st["tags"] == [{"tag": "mychar", "count": 3}, {"tag": "kitty", "count": 2}]

    missing = run_nyx("dataset", "scan", str(kohya / "nope"), home=nyx_home, timeout=60)
    assert missing.returncode == 2 and "does not exist" in missing.stderr


def test_cli_tags_and_undo(kohya: Path, nyx_home: Path, tmp_path: Path) -> None:
    def nyx(*args: str) -> subprocess.CompletedProcess[str]:
        return run_nyx("dataset", "tags", str(kohya), *args, home=nyx_home, timeout=60)

    before = captions(kohya)
    dry = nyx("replace", "kitty", "cat", "--dry-run", "--json")
    assert dry.returncode == 0, dry.stderr
    assert json.loads(dry.stdout)["changed"] == 2 and captions(kohya) == before
    done = nyx("replace", "kitty", "cat", "--only", "10_mychar/a.png")
    assert done.returncode == 0, done.stderr
    assert "wrote 1 of 1 captions" in done.stdout and "undo" in done.stdout
    assert captions(kohya)["10_mychar/a.txt"] == "mychar, cat, smile"
    rules = write(tmp_path / "rules.txt", "cat => animal\n")
    assert nyx("imply", str(rules)).returncode == 0
    assert captions(kohya)["10_mychar/a.txt"] == "mychar, cat, smile, animal"
    listed = nyx("undo", "--list", "--json")
    assert [b["batch"] for b in json.loads(listed.stdout)] == [1, 2]
    assert nyx("undo").returncode == 0 and nyx("undo").returncode == 0
    assert captions(kohya) == before
    last = nyx("undo")
    assert last.returncode == 1 and "nothing to undo" in last.stderr
    bad = nyx("alias", str(tmp_path / "none.txt"))
    assert bad.returncode == 2 and "cannot read" in bad.stderr
    prune = nyx("prune", "--below", "0")
    assert prune.returncode == 2 and "--below 0" in prune.stderr


def test_no_heavy_imports() -> None:
    code = (
        "import sys\n"
        "import nyx_tui.datasets.cli, nyx_tui.datasets.scan, nyx_tui.datasets.stats, nyx_tui.datasets.tags\n"
        "import nyx_tui.datasets.layout, nyx_tui.datasets.undo\n"
        "print([m for m in ('torch', 'textual', 'onnxruntime', 'transformers') if m in sys.modules])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
