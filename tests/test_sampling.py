"""Samples during training: sd-scripts' prompt syntax (parser and pre-flight), the renderer on tiny SD1.5 and
SDXL models (seeded, sized, RNG-neutral), and a real run that renders every N steps and on `sample_now`."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

import nyx_tui.config
from nyx_tui.config.io import dumps_config
from nyx_tui.config.model import Sampler, TrainingConfig
from nyx_tui.config.prompts import PromptError, SamplePrompt, parse_prompt, parse_prompts, prompt_problems
from nyx_tui.jobs.control import send
from nyx_tui.jobs.events import read_events, validate
from nyx_tui.jobs.jobdir import create_job
from nyx_tui.trainers.base import NativeTrainer

PRESET = Path(nyx_tui.config.__file__).parent / "presets" / "demo-tiny-cpu.toml"


# ------------------------------------------------------------------------------------------- parser


def test_parse_a_full_line() -> None:
    line = "a photo of a cat, sitting --n blurry, lowres --w 512 --h 768 --s 28 --l 7.5 --d 42 --ss euler_a"
    assert parse_prompt(line) == SamplePrompt(
        prompt="a photo of a cat, sitting",
        negative="blurry, lowres",
        width=512,
        height=768,
        steps=28,
        scale=7.5,
        seed=42,
        sampler=Sampler.EULER_A,
    )


def test_parse_each_option_alone_and_defaults() -> None:
    assert parse_prompt("  just a prompt  ") == SamplePrompt(prompt="just a prompt")
    assert parse_prompt("x --n bad hands").negative == "bad hands"
    assert parse_prompt("x --w 640").width == 640
    assert parse_prompt("x --h 1024").height == 1024
    assert parse_prompt("x --s 1").steps == 1
    assert parse_prompt("x --l 0").scale == 0.0
    assert parse_prompt("x --L 3").scale == 3.0  # option names are case-insensitive, as in sd-scripts
    assert parse_prompt("x --d 0").seed == 0
    assert parse_prompt("x --ss DPMSolver++").sampler is Sampler.DPMSOLVER_PP
    assert parse_prompt("x --d 1 --w 64").width == 64  # any order


@pytest.mark.parametrize(
    ("line", "words"),
    [
        ("a cat --w abc", ["--w", "whole number", "'abc'"]),
        ("a cat --w 32", ["--w", "between 64 and 8192", "32"]),
        ("a cat --s 0", ["--s", "between 1 and 1000"]),
        ("a cat --l much", ["--l", "needs a number"]),
        ("a cat --l 500", ["--l", "between 0 and 100"]),
        ("a cat --d -1", ["--d", "between 0 and"]),
        ("a cat --ss turbo", ["--ss", "'turbo'", "euler_a"]),
        ("a cat --x 1", ["unknown option --x", "--n (negative prompt)"]),
        ("a cat --g 3.5", ["unknown option --g"]),
        ("a cat --n", ["--n", "no value"]),
        ("a cat --d 1 --d 2", ["--d", "twice"]),
        ("--w 512", ["prompt text comes first"]),
        ("   ", ["empty"]),
    ],
)
def test_parse_errors_name_the_option(line: str, words: list[str]) -> None:
    with pytest.raises(PromptError) as info:
        parse_prompt(line)
    for word in words:
        assert word in str(info.value)


def test_parse_prompts_skips_comments_and_names_the_bad_line() -> None:
    prompts = parse_prompts(["# a comment", "", "one --d 1", "two"])
    assert [p.prompt for p in prompts] == ["one", "two"]
    with pytest.raises(PromptError, match=r"sampling\.prompts\[1\] \('two --w x'\): --w"):
        parse_prompts(["one", "two --w x"])


def config(**sampling: Any) -> TrainingConfig:
    return TrainingConfig.model_validate({"sampling": sampling})


def test_preflight_reports_every_bad_prompt() -> None:
    problems = prompt_problems(config(prompts=["fine --d 1", "bad --w x", "# skip", "worse --q 1"], every_n_steps=10))
    assert [(p.field, p.severity) for p in problems] == [
        ("sampling.prompts[1]", "error"),
        ("sampling.prompts[3]", "error"),
    ]
    assert "'bad --w x'" in problems[0].message and "--w" in problems[0].message
    assert prompt_problems(config(prompts=["fine"], every_n_steps=10)) == []


def test_preflight_warns_about_a_schedule_without_prompts() -> None:
    (problem,) = prompt_problems(config(every_n_steps=10))
    assert problem.field == "sampling.every_n_steps" and problem.severity == "warning"
    assert prompt_problems(config()) == []  # nothing scheduled, nothing to say
    (both,) = prompt_problems(config(prompts=["x"], every_n_steps=10, every_n_epochs=1))
    assert both.severity == "warning" and "every_n_epochs" in both.message


def test_native_backend_no_longer_refuses_samples() -> None:
    problems = NativeTrainer().problems(config(prompts=["x"], every_n_steps=5))
    assert not [p for p in problems if p.field.startswith("sampling")]


def test_due_follows_sd_scripts() -> None:
    from nyx_tui.trainers.native.sampling import due

    steps = config(every_n_steps=3).sampling
    assert [s for s in range(1, 10) if due(steps, s, 1, False)] == [3, 6, 9]
    epochs = config(every_n_steps=3, every_n_epochs=2).sampling  # epochs set: steps are ignored
    assert not due(epochs, 3, 1, False)
    assert due(epochs, 7, 2, True) and not due(epochs, 7, 2, False) and not due(epochs, 4, 1, True)
    assert not any(due(config().sampling, s, 1, True) for s in range(1, 10))


# ---------------------------------------------------------------------------------------- renderer


def make_config(assets: dict[str, Path], **sections: dict[str, Any]) -> TrainingConfig:
    data = tomllib.loads(PRESET.read_text())
    data["model"]["pretrained"] = str(assets["model"])
    data["dataset"]["subsets"] = [{"image_dir": str(assets["dataset"])}]
    data["scheduler"] = {"type": "constant", "warmup_steps": 0}
    data["saving"].update(every_n_steps=0, precision="float")
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    return TrainingConfig.model_validate(data)


def renderer_for(cfg: TrainingConfig, folder: Path) -> Any:
    from nyx_tui.trainers.native import models, sampling

    model = models.load_model(cfg.model)
    models.freeze(model)
    model.unet.eval()
    return sampling.SampleRenderer(cfg, model, folder)


def test_renders_seeded_sized_images_and_leaves_the_rng_alone(assets: dict[str, Path], tmp_path: Path) -> None:
    import numpy as np
    import torch
    from PIL import Image

    prompts = ["a red circle --w 64 --h 96 --s 3 --d 5", "a red circle --s 3 --d 5 --ss euler", "a red circle --s 3"]
    renderer = renderer_for(make_config(assets, sampling={"prompts": prompts}), tmp_path)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    first = renderer.render(7)
    assert torch.equal(torch.get_rng_state(), before)  # training's own random stream is untouched
    assert [p.name for p in first.images] == [f"demo-step000007-{i}.png" for i in range(3)]
    assert first.prompts == ["a red circle"] * 3
    sizes = [Image.open(p).size for p in first.images]
    assert sizes == [(64, 96), (64, 64), (64, 64)]  # (width, height); the default is the training resolution
    pixels = [np.asarray(Image.open(p)) for p in first.images]
    again = renderer.render(8)
    assert [p.read_bytes() for p in again.images] == [p.read_bytes() for p in first.images]  # same seed, same image
    assert not np.array_equal(pixels[1], pixels[2])  # the third has another seed (training.seed + its index)


def test_renders_sdxl_with_both_text_encoders(tmp_path: Path) -> None:
    from PIL import Image

    from nyx_tui.demo_assets import build_tiny_sdxl

    model = build_tiny_sdxl(tmp_path / "sdxl")
    cfg = TrainingConfig.model_validate(
        {
            "model": {"family": "sdxl", "pretrained": str(model)},
            "dataset": {"resolution": 64},
            "sampling": {"prompts": ["a blue square --w 96 --h 64 --s 2 --d 1"]},
        }
    )
    renderer = renderer_for(cfg, tmp_path / "out")
    assert renderer.model.text_encoder_2 is not None
    done = renderer.render(1)
    assert type(renderer.pipe).__name__ == "StableDiffusionXLPipeline"
    assert Image.open(done.images[0]).size == (96, 64)


# ------------------------------------------------------------------------------------------ engine


def run_job(root: Path, cfg: TrainingConfig, *commands: str) -> list[dict[str, Any]]:
    """Run the engine on `cfg` (with `commands` already in the control file) and return its events."""
    job = create_job("train", "t", ["native"], config_toml=dumps_config(cfg), root=root)
    for command in commands:
        send(job.control_path, command)  # already waiting when the loop starts: acted on at step 0
    proc = subprocess.run(
        [sys.executable, "-m", "nyx_tui.trainers.native", str(job.path)], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    events = read_events(job.events_path)
    for event in events:
        validate(event)
    return events


@pytest.mark.slow
def test_run_renders_every_n_steps_and_on_sample_now(assets: dict[str, Path], tmp_path: Path) -> None:
    """Samples at steps 2 and 4 (every 2) and at step 0 (sample_now), written where the events say; and the
    run's losses are exactly those of the same run without samples (adapter dropout on: it draws from the
    global RNG, which rendering must leave as it was)."""
    prompts = ["a red circle --w 64 --h 96 --s 2 --d 1", "# not a prompt", "a blue square --s 2 --ss euler_a"]
    training, network = {"max_steps": 4}, {"dropout": 0.1}
    cfg = make_config(assets, training=training, network=network, sampling={"prompts": prompts, "every_n_steps": 2})
    events = run_job(tmp_path / "with", cfg, "sample_now")
    samples = [e for e in events if e["kind"] == "sample"]
    assert [e["step"] for e in samples] == [0, 2, 4]
    folder = Path(samples[0]["images"][0]).parent
    assert folder.name == "samples" and folder.parent.name == "output"
    for e in samples:
        assert e["prompts"] == ["a red circle", "a blue square"]
        assert e["images"] == [str(folder / f"demo-step{e['step']:06d}-{i}.png") for i in range(2)]
    from PIL import Image

    for e in samples:
        assert [Image.open(p).size for p in e["images"]] == [(64, 96), (64, 64)]
    # the weights change between steps 2 and 4: so do the images of the same prompt and seed
    assert Path(samples[1]["images"][0]).read_bytes() != Path(samples[2]["images"][0]).read_bytes()
    acks = [e for e in events if e["kind"] == "log" and e.get("ack") == "sample_now"]
    assert len(acks) == 1 and acks[0]["level"] == "info" and "step 0" in acks[0]["message"]
    assert sorted(p.name for p in folder.iterdir()) == sorted(Path(p).name for e in samples for p in e["images"])

    plain = run_job(tmp_path / "without", make_config(assets, training=training, network=network))
    assert not [e for e in plain if e["kind"] == "sample"]
    with_samples = [e["loss"] for e in events if e["kind"] == "step"]
    assert len(with_samples) == 4 and with_samples == [e["loss"] for e in plain if e["kind"] == "step"]
