"""Duplicate finding: planted copies (resized, recompressed, mirrored, cropped, byte copies) are grouped with
their originals and nothing else is; the hash cache serves a second run; quarantine moves, never deletes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import run_nyx
from PIL import Image, ImageDraw, ImageFilter

from nyx_tui.datasets import dedupe
from nyx_tui.datasets.dedupe import find_duplicates, near_pairs, quarantine, restore, sidecars
from nyx_tui.datasets.hashcache import HashCache, Stat

N_DISTINCT = 30


def blobs(seed: int, size: int = 128) -> Image.Image:
    """A picture of random ellipses and boxes on a random background: distinct seeds give pictures ~30 bits
    apart in pHash (the closest of 30 is ~20), far beyond the threshold."""
    rng = np.random.default_rng(seed)
    img = Image.new("RGB", (size, size), tuple(int(x) for x in rng.integers(0, 256, 3)))
    d = ImageDraw.Draw(img)
    for _ in range(8):
        x0, y0 = (int(v) for v in rng.integers(0, size, 2))
        r = int(rng.integers(size // 10, size // 3))
        col = tuple(int(x) for x in rng.integers(0, 256, 3))
        if rng.random() < 0.5:
            d.ellipse([x0 - r, y0 - r, x0 + r, y0 + r], fill=col)
        else:
            d.rectangle([x0 - r, y0 - r // 2, x0 + r, y0 + r], fill=col)
    return img.filter(ImageFilter.GaussianBlur(1))


# planted copy → its original
PLANTED = {
    "d01_half.png": "d01.png",
    "d02_q60.jpg": "d02.png",
    "d03_flip.png": "d03.png",
    "d04_crop.png": "d04.png",
    "d05_copy.png": "d05.png",
    "sub/d06_copy.png": "d06.png",
    "sub/d07_crop_flip.jpg": "d07.png",
}


def build_dataset(root: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    (root / "sub").mkdir(exist_ok=True)
    for s in range(N_DISTINCT):
        blobs(s).save(root / f"d{s:02d}.png")
        (root / f"d{s:02d}.txt").write_text(f"tag{s}, blobs")
    d01 = Image.open(root / "d01.png")
    d01.resize((64, 64), Image.Resampling.LANCZOS).save(root / "d01_half.png")
    Image.open(root / "d02.png").save(root / "d02_q60.jpg", quality=60)
    Image.open(root / "d03.png").transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(root / "d03_flip.png")
    # 2 px off every side: 3% of each side. pHash is crop-sensitive on these flat synthetic pictures: 3 px a
    # side reaches 8 bits, 5 px 16 (photos move less: NOTES.md measures 2-6 for a 5% crop)
    Image.open(root / "d04.png").crop((2, 2, 126, 126)).save(root / "d04_crop.png")
    shutil.copyfile(root / "d05.png", root / "d05_copy.png")
    shutil.copyfile(root / "d06.png", root / "sub" / "d06_copy.png")
    img7 = Image.open(root / "d07.png").crop((2, 2, 126, 126)).transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    img7.convert("RGB").save(root / "sub" / "d07_crop_flip.jpg", quality=85)
    (root / "d01_half.txt").write_text("tag1, small")
    (root / "d02_q60.txt").write_text("tag2, jpeg")
    (root / "d02_q60.npz").write_bytes(b"latents")


@pytest.fixture(scope="module")
def master(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("dedupe") / "ds"
    build_dataset(root)
    return root


@pytest.fixture
def ds(master: Path, tmp_path: Path) -> Path:
    """A private copy (quarantine tests move files)."""
    root = tmp_path / "ds"
    shutil.copytree(master, root)
    return root


def expected_groups() -> set[frozenset[str]]:
    return {frozenset({orig, copy}) for copy, orig in PLANTED.items()}


def all_files(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in root.rglob("*") if p.is_file() and p.name != dedupe.MANIFEST}


def test_finds_exactly_the_planted_groups(master: Path, tmp_path: Path) -> None:
    result = find_duplicates(master, cache_path=tmp_path / "h.sqlite")
    assert not result.unreadable
    assert len(result.images) == N_DISTINCT + len(PLANTED)
    found = {frozenset({g.keeper.rel, *(m.image.rel for m in g.members)}) for g in result.groups}
    assert found == expected_groups()
    by_keeper = {g.keeper.rel: g for g in result.groups}
    # the keeper is the larger / less compressed one, or the first name for identical bytes
    for keeper in ("d01.png", "d02.png", "d04.png", "d05.png", "d06.png", "d07.png"):
        assert keeper in by_keeper, keeper
    members = {m.image.rel: m for g in result.groups for m in g.members}
    assert members["d05_copy.png"].exact and members["d05_copy.png"].distance == 0
    assert members["sub/d06_copy.png"].exact
    assert members["d01_half.png"].distance <= 2 and not members["d01_half.png"].exact
    flip = members.get("d03_flip.png") or members["d03.png"]
    assert flip.flipped and flip.distance <= 2
    assert members["sub/d07_crop_flip.jpg"].flipped
    assert all(m.distance <= result.threshold for m in members.values())
    assert by_keeper["d01.png"].keeper.width == 128


def test_exact_only_reads_no_pixels(master: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dedupe, "phash_pair", lambda p: pytest.fail(f"decoded {p}"))
    result = find_duplicates(master, exact_only=True, cache_path=tmp_path / "h.sqlite")
    found = {frozenset({g.keeper.rel, *(m.image.rel for m in g.members)}) for g in result.groups}
    assert found == {frozenset({"d05.png", "d05_copy.png"}), frozenset({"d06.png", "sub/d06_copy.png"})}


def test_cache_serves_a_second_run_and_rehashes_changed_files(
    ds: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "h.sqlite"
    first = find_duplicates(ds, cache_path=cache)
    n = len(first.images)
    assert (first.hashed, first.cached) == (n, 0)

    def boom(path: Path) -> object:
        raise AssertionError(f"{path} was read again")

    with monkeypatch.context() as m:  # a warm run must not open a single image
        m.setattr(dedupe, "phash_pair", boom)
        m.setattr(dedupe, "file_sha256", boom)
        warm = find_duplicates(ds, cache_path=cache)
    assert (warm.hashed, warm.cached) == (0, n)
    assert [g.to_json() for g in warm.groups] == [g.to_json() for g in first.groups]

    touched = ds / "d10.png"
    st = touched.stat()
    os.utime(touched, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    blobs(1).save(ds / "d20.png")  # rewritten: now a copy of d01's picture
    again = find_duplicates(ds, cache_path=cache)
    assert (again.hashed, again.cached) == (2, n - 2)
    found = {frozenset({g.keeper.rel, *(m.image.rel for m in g.members)}) for g in again.groups}
    assert frozenset({"d01.png", "d01_half.png", "d20.png"}) in found

    (ds / "d11.png").unlink()  # a deleted image leaves the cache on the next run
    find_duplicates(ds, cache_path=cache)
    with HashCache(cache) as db:
        assert db.prune(ds, [str(p) for p in ds.rglob("*.png")] + [str(p) for p in ds.rglob("*.jpg")]) == 0


def test_unreadable_image_is_reported_not_fatal(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    root.mkdir()
    blobs(1).save(root / "a.png")
    (root / "broken.png").write_bytes(b"not an image at all")
    result = find_duplicates(root, cache_path=tmp_path / "h.sqlite")
    assert [i.rel for i in result.unreadable] == ["broken.png"]
    assert result.groups == []


def test_near_pairs_matches_brute_force() -> None:
    rng = np.random.default_rng(0)
    base = rng.integers(0, 2**63, 40, dtype=np.uint64)
    # plant near neighbours: flip a few bits of some hashes
    h = np.concatenate([base, base[:10] ^ np.uint64(0b1011), base[10:15] ^ np.uint64(0xFF)])
    f = rng.integers(0, 2**63, len(h), dtype=np.uint64)
    f[-1] = h[0]  # the last one's mirror image is the first
    pairs = {tuple(p) for p in near_pairs(h, f, 6, chunk_cells=97).tolist()}
    brute = set()
    for i in range(len(h)):
        for j in range(i + 1, len(h)):
            d = min(int(h[i] ^ h[j]).bit_count(), int(h[i] ^ f[j]).bit_count())
            if d <= 6:
                brute.add((i, j))
    assert pairs == brute
    assert (0, len(h) - 1) in pairs and (0, 40) in pairs and (10, 50) not in pairs


def test_quarantine_moves_extras_with_captions_and_restore_puts_them_back(ds: Path, tmp_path: Path) -> None:
    before = all_files(ds)
    result = find_duplicates(ds, cache_path=tmp_path / "h.sqlite")
    report = quarantine(ds, {p: "dup" for p in result.extras()})
    assert report.batch is not None and report.batch.parent == ds / ".nyx" / "quarantine"
    moved = {m.source for m in report.moved}
    assert {"d01_half.png", "d01_half.txt", "d02_q60.jpg", "d02_q60.txt", "d02_q60.npz"} <= moved
    for m in report.moved:
        assert not (ds / m.source).exists() and (report.batch / m.target).is_file()
    assert (report.batch / "sub" / "d06_copy.png").is_file()  # relative paths kept
    assert all_files(ds) == before  # nothing deleted: every byte is still under the dataset folder
    again = find_duplicates(ds, cache_path=tmp_path / "h.sqlite")  # the quarantine is not scanned
    assert again.groups == []
    back = restore(ds)
    assert {m.target for m in back.moved} == moved
    assert not (ds / ".nyx" / "quarantine" / report.batch.name).exists()
    assert all_files(ds) == before


def test_shared_sidecar_stays(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(b"x")
    (tmp_path / "a.jpg").write_bytes(b"y")
    (tmp_path / "a.txt").write_text("caption")
    (tmp_path / "b.png").write_bytes(b"z")
    (tmp_path / "b.caption").write_text("caption")
    assert sidecars(tmp_path / "a.png") == ([], [tmp_path / "a.txt"])
    assert sidecars(tmp_path / "b.png") == ([tmp_path / "b.caption"], [])


def test_stat_key_changes_with_mtime(tmp_path: Path) -> None:
    p = tmp_path / "a.bin"
    p.write_bytes(b"1")
    s1 = Stat.of(p)
    os.utime(p, ns=(s1.mtime_ns, s1.mtime_ns + 1000))
    assert Stat.of(p) != s1 and Stat.of(p).path == s1.path


def test_cli_json_cache_and_quarantine(ds: Path, nyx_home: Path) -> None:
    proc = run_nyx("dataset", "dedupe", str(ds), "--json", home=nyx_home, timeout=120)
    assert proc.returncode == 0, proc.stderr
    answer = json.loads(proc.stdout)
    assert answer["images"] == N_DISTINCT + len(PLANTED)
    assert answer["hashed"] == answer["images"] and answer["cached"] == 0
    assert answer["threshold"] == 6 and answer["duplicates"] == len(PLANTED)
    group = answer["groups"][0]
    assert set(group) == {"keeper", "members"}
    assert set(group["keeper"]) == {"path", "width", "height", "bytes"}
    assert {"path", "distance", "exact", "flipped", "width", "height", "bytes"} <= set(group["members"][0])
    found = {frozenset({g["keeper"]["path"], *(m["path"] for m in g["members"])}) for g in answer["groups"]}
    assert found == expected_groups()
    assert (nyx_home / "cache" / "image-hashes.sqlite").is_file()

    before = all_files(ds)
    # no --yes and no terminal to ask on: refused, nothing moved, warm run served from the cache
    proc = run_nyx("dataset", "dedupe", str(ds), "--quarantine", home=nyx_home, timeout=120, stdin=subprocess.DEVNULL)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "--yes" in proc.stderr and not (ds / ".nyx").exists()
    assert "0 hashed" in proc.stdout and f"{answer['images']} from cache" in proc.stdout

    proc = run_nyx("dataset", "dedupe", str(ds), "--json", "--quarantine", "--yes", home=nyx_home, timeout=120)
    assert proc.returncode == 0, proc.stderr
    moved = json.loads(proc.stdout)["quarantine"]["moved"]
    extras = {m["path"] for g in answer["groups"] for m in g["members"]}
    assert {m["from"] for m in moved if m["sidecar_of"] is None} == extras and len(extras) == len(PLANTED)
    assert all_files(ds) == before

    proc = run_nyx("dataset", "quarantine", str(ds), "--restore", "--yes", home=nyx_home, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert all(p.exists() for p in (ds / name for name in PLANTED))


def test_cli_bad_input(tmp_path: Path, nyx_home: Path) -> None:
    proc = run_nyx("dataset", "dedupe", str(tmp_path / "nope"), home=nyx_home, timeout=120)
    assert proc.returncode == 2 and "does not exist" in proc.stderr
    proc = run_nyx("dataset", "dedupe", str(tmp_path), "--threshold", "99", home=nyx_home, timeout=120)
    assert proc.returncode == 2 and "0..64" in proc.stderr


def test_phash_is_imagehash_phash(master: Path) -> None:
    """The hash is computed here (two small matmuls) but must be imagehash's pHash bit for bit."""
    import imagehash

    for p in sorted(master.rglob("*.*g")):
        straight, mirrored, _w, _h = dedupe.phash_pair(p)
        gray, _size = dedupe.open_small_gray(p, dedupe.DRAFT_SIDE)
        small = gray.resize((32, 32), Image.Resampling.LANCZOS)
        assert straight == str(imagehash.phash(small)), p
        assert mirrored == str(imagehash.phash(small.transpose(Image.Transpose.FLIP_LEFT_RIGHT))), p
