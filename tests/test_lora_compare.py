"""`nyx lora compare`: a real job (supervisor + worker) on the tiny demo SD1.5 model with random kohya LoRAs,
followed by the CLI to its end; the grid's layout, and what its tiles show.

What must hold: the job ends `finished` with its events (start, progress, one sample per column, the grid as
an image artifact); the grid is `left + cols × tile` by `top + rows × tile` and each tile is pasted unscaled;
the LoRA at strength 0 renders exactly the base model's image while strength 1 changes it; `--run` compares a
training job's saved checkpoints on the run's own model; bad options start nothing.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import save_file

from tests.conftest import nyx_cmd

# kohya names of attention projections of the tiny demo UNet (32 wide at these blocks)
MODULES = [
    f"lora_unet_{block}_attentions_{i}_transformer_blocks_0_{attn}_{proj}"
    for block, count in (("down_blocks_0", 1), ("up_blocks_1", 2))
    for i in range(count)
    for attn in ("attn1", "attn2")
    for proj in ("to_q", "to_k", "to_v", "to_out_0")
]


def random_lora(path: Path, seed: int, dim: int = 4, scale: float = 0.5) -> Path:
    """A real kohya-keyed LoRA for the tiny model, strong enough to change a 2-step render."""
    rng = np.random.default_rng(seed)
    tensors: dict[str, np.ndarray] = {}
    for name in MODULES:
        tensors[f"{name}.lora_down.weight"] = (rng.standard_normal((dim, 32)) * scale).astype(np.float32)
        tensors[f"{name}.lora_up.weight"] = (rng.standard_normal((32, dim)) * scale).astype(np.float32)
        tensors[f"{name}.alpha"] = np.array(float(dim), dtype=np.float32)
    save_file(tensors, str(path), metadata={"ss_base_model_version": "sd_v1", "ss_network_dim": str(dim)})
    return path


def compare(home: Path, *args: str, timeout: float = 400) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "NYX_HOME": str(home), "COLUMNS": "200", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.run(nyx_cmd("lora", "compare", *args), env=env, capture_output=True, text=True, timeout=timeout)


def only_job(home: Path) -> object:
    from nyx_tui.jobs.jobdir import list_jobs

    jobs = list_jobs(home / "jobs")
    assert len(jobs) == 1, jobs
    return jobs[0]


def tile_pixels(grid: Image.Image, lay: object, row: int, col: int) -> np.ndarray:
    return np.asarray(grid.crop(lay.box(row, col)).convert("RGB")).astype(np.int16)  # type: ignore[attr-defined]


@pytest.mark.slow
def test_base_vs_lora_at_strengths(assets: dict[str, Path], nyx_home: Path, tmp_path: Path) -> None:
    from nyx_tui.lora.grid import layout

    lora = random_lora(tmp_path / "shapes-lora.safetensors", seed=1)
    grid_path = tmp_path / "grid.png"
    prompts = ["a red circle on white", "a blue square"]
    proc = compare(
        nyx_home, str(lora), "--model", str(assets["model"]), "--prompt", prompts[0], "--prompt", prompts[1],
        "--strength", "0,1", "--seed", "7", "--steps", "2", "--size", "64x64", "-o", str(grid_path),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == str(grid_path)  # not a TTY: the path, no image

    job = only_job(nyx_home)
    assert job.status()["state"] == "finished"  # type: ignore[attr-defined]
    spec = job.spec()  # type: ignore[attr-defined]
    assert spec["kind"] == "compare" and spec["resource"] == "gpu"
    events = job.events()  # type: ignore[attr-defined]
    kinds = [e["kind"] for e in events]
    assert kinds[0] == "start" and kinds[-1] == "end"
    start = events[0]
    assert start["job_kind"] == "compare" and start["total"] == 6
    samples = [e for e in events if e["kind"] == "sample"]
    assert [s["column"] for s in samples] == ["base", "strength 0", "strength 1"]
    assert all(s["prompts"] == prompts and len(s["images"]) == 2 for s in samples)
    progress = [e for e in events if e["kind"] == "progress"]
    assert progress[-1]["done"] == progress[-1]["total"] == 6
    artifact = next(e for e in events if e["kind"] == "artifact")
    assert artifact["what"] == "image" and artifact["path"] == str(grid_path)

    grid = Image.open(grid_path)
    lay = layout(64, 64, ["base", "strength 0", "strength 1"], prompts)
    assert lay.left > 0 and lay.top > 0  # room for the labels
    assert grid.size == lay.size == (lay.left + 3 * 64, lay.top + 2 * 64)
    for s in samples:  # each tile is its image, pasted unscaled
        for r, image in enumerate(s["images"]):
            assert np.array_equal(tile_pixels(grid, lay, r, s["step"]), np.asarray(Image.open(image).convert("RGB")))
    # the label bands carry text (dark pixels on white)
    assert np.asarray(grid.crop((0, lay.top, lay.left, lay.top + 64)).convert("L")).min() < 128
    assert np.asarray(grid.crop((lay.left, 0, lay.left + 64 * 3, lay.top)).convert("L")).min() < 128
    for r in range(2):
        base, zero, one = (tile_pixels(grid, lay, r, c) for c in range(3))
        assert np.array_equal(zero, base), "strength 0 must render exactly the base model"
        assert np.abs(one - base).mean() > 2.0, "strength 1 must change the image"
    assert (job.output_dir / "compare.png").read_bytes() == grid_path.read_bytes()  # type: ignore[attr-defined]


@pytest.mark.slow
def test_epoch_vs_epoch_of_a_run_on_its_own_model(assets: dict[str, Path], nyx_home: Path, tmp_path: Path) -> None:
    from nyx_tui.config.io import dumps_config
    from nyx_tui.config.model import TrainingConfig
    from nyx_tui.jobs.events import EventWriter
    from nyx_tui.jobs.jobdir import create_job

    cfg = TrainingConfig.model_validate({"model": {"family": "sd15", "pretrained": str(assets["model"])}})
    run = create_job("train", "run", ["true"], config_toml=dumps_config(cfg), root=nyx_home / "jobs")
    run.output_dir.mkdir()
    with EventWriter(run.events_path) as events:
        for step, seed in ((20, 2), (10, 3)):  # saved out of order: columns follow the steps
            path = random_lora(run.output_dir / f"lora-{step:06d}.safetensors", seed=seed)
            events.emit("artifact", path=f"output/{path.name}", what="lora", step=step)
        events.emit("end", state="finished")
    run.write_status(state="finished")

    proc = compare(nyx_home, "--run", run.id, "--prompt", "a green triangle", "--steps", "1", "--size", "64x64")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    from nyx_tui.jobs.jobdir import list_jobs

    job = next(j for j in list_jobs(nyx_home / "jobs") if j.spec()["kind"] == "compare")
    assert job.status()["state"] == "finished"
    artifact = job.last_event("artifact")
    assert artifact is not None and artifact["columns"] == ["base", "step 10 @ 1", "step 20 @ 1"]
    assert artifact["path"] == str(job.output_dir / "compare.png")
    assert proc.stdout.strip().splitlines()[-1] == artifact["path"]
    assert json.loads(job.spec_path.read_text())["compare"]["model"] == str(assets["model"].resolve())
    tiles = [np.asarray(Image.open(e["images"][0])) for e in job.events() if e["kind"] == "sample"]
    assert len(tiles) == 3
    assert not np.array_equal(tiles[1], tiles[2]), "two different checkpoints must render differently"


def test_bad_options_start_nothing(assets: dict[str, Path], nyx_home: Path, tmp_path: Path) -> None:
    lora = random_lora(tmp_path / "l.safetensors", seed=1)
    model = str(assets["model"])
    cases = [
        ((str(lora), "--model", model, "--prompt", "x", "--strength", "0,half"), "--strength"),
        ((str(lora), "--model", model), "no prompt"),
        ((str(tmp_path / "missing.safetensors"), "--model", model, "--prompt", "x"), "no such LoRA file"),
        ((str(lora), "--prompt", "x"), "no base model"),
        ((str(lora), "--model", model, "--prompt", "x", "-o", str(tmp_path / "grid.jpg")), ".png"),
        (("--model", model, "--prompt", "x"), "nothing to compare"),
    ]
    for args, expect in cases:
        proc = compare(nyx_home, *args, timeout=60)
        assert proc.returncode == 2, (args, proc.stderr)
        assert expect in " ".join(proc.stderr.split()), (args, proc.stderr)
    assert not (nyx_home / "jobs").exists() or not any((nyx_home / "jobs").iterdir())


def test_grid_layout_and_missing_tiles(tmp_path: Path) -> None:
    from nyx_tui.lora.grid import MISSING, layout, make_grid

    colours = [[(255, 0, 0), (0, 255, 0), (0, 0, 255)], [(9, 9, 9), (200, 200, 0), None]]
    tiles: list[list[Path | None]] = []
    for r, row in enumerate(colours):
        tiles.append([])
        for c, colour in enumerate(row):
            if colour is None:
                tiles[r].append(None)
                continue
            p = tmp_path / f"{r}-{c}.png"
            Image.new("RGB", (40, 30), colour).save(p)
            tiles[r].append(p)
    cols, rows = ["base", "a very long column label that wraps", "1"], ["first prompt", "second"]
    grid = make_grid(tiles, cols, rows)
    lay = layout(40, 30, cols, rows)
    assert grid.size == (lay.left + 3 * 40, lay.top + 2 * 30)
    assert len(lay.col_lines[1]) > 1  # wrapped to the tile's width
    for r, row in enumerate(colours):
        for c, colour in enumerate(row):
            block = np.asarray(grid.crop(lay.box(r, c)))
            assert (block == np.array(colour if colour else MISSING, dtype=np.uint8)).all()
    # no labels: no bands
    bare = make_grid(tiles, ["", "", ""], ["", ""])
    assert bare.size == (3 * 40, 2 * 30)


@pytest.mark.slow
def test_stop_writes_the_grid_of_what_was_rendered(assets: dict[str, Path], nyx_home: Path, tmp_path: Path) -> None:
    """`nyx stop` between images: the worker acknowledges, writes the grid with grey squares for the rest, and
    the job ends `cancelled`."""
    from nyx_tui.jobs.control import send
    from nyx_tui.jobs.jobdir import TERMINAL
    from nyx_tui.lora.compare import CompareOptions, start_compare_job
    from nyx_tui.lora.grid import MISSING, layout
    from tests.conftest import wait_for

    lora = random_lora(tmp_path / "l.safetensors", seed=1)
    prompts = [f"prompt {i}" for i in range(4)]
    options = CompareOptions(
        loras=[str(lora)], model=str(assets["model"]), prompts=prompts, strengths=[1.0], steps=30, width=64, height=64
    )
    job = start_compare_job(options)

    def first_image() -> bool:
        return any(e["kind"] == "progress" and e["done"] >= 1 for e in job.events())

    wait_for(first_image, timeout=180, interval=0.05)
    send(job.control_path, "stop")
    wait_for(lambda: job.effective_state() in TERMINAL, timeout=180)
    assert job.status()["state"] == "cancelled"
    events = job.events()
    assert any(e["kind"] == "log" and e.get("ack") == "stop" for e in events)
    done = max(e["done"] for e in events if e["kind"] == "progress")
    assert 1 <= done < 8
    grid = Image.open(job.output_dir / "compare.png").convert("RGB")
    lay = layout(64, 64, ["base", "strength 1"], prompts)
    assert grid.size == lay.size
    # column by column, row by row: the last tile (column 1, last row) was never rendered
    assert (np.asarray(grid.crop(lay.box(3, 1))) == np.array(MISSING, dtype=np.uint8)).all()
