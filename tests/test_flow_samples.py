"""Samples of Flux (dev, schnell) and SD3 through `SampleRenderer`: the diffusers Flux/SD3 pipelines built from
a loaded `FlowModel`, on tiny random-weight models at 64 px and 2 steps.

What matters to a user: a PNG per prompt, the same image for the same seed (so samples at different steps
show what training changed), an adapter change shows in the image (the pipeline samples the transformer
being trained, not a copy), and the prompt options mean what sd-scripts' Flux/SD3 samplers make of them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from nyx_tui.config.model import Sampler, TrainingConfig

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from nyx_tui.demo_assets import build_tiny_flux, build_tiny_sd3

    root = tmp_path_factory.mktemp("flow-models")
    return {
        "dev": build_tiny_flux(root / "flux-dev"),
        "schnell": build_tiny_flux(root / "flux-schnell", schnell=True),
        "sd3": build_tiny_sd3(root / "sd3"),
    }


def family_of(kind: str) -> str:
    return "sd3" if kind == "sd3" else "flux"


def config(kind: str, folder: Path, prompts: list[str], **sampling: Any) -> TrainingConfig:
    return TrainingConfig.model_validate(
        {
            "model": {"family": family_of(kind), "pretrained": str(folder)},
            "dataset": {"resolution": 64},
            "training": {"seed": 7},
            "saving": {"output_name": "flow"},
            "sampling": {"prompts": prompts, **sampling},
        }
    )


def load(kind: str, folder: Path) -> Any:
    from nyx_tui.config.model import ModelSection
    from nyx_tui.trainers.native.flow_files import load_flow_model

    model = load_flow_model(ModelSection(family=family_of(kind), pretrained=str(folder)))  # type: ignore[arg-type]
    for part in model.parts:
        part.eval()
    return model


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"), dtype=np.int16)


def render(cfg: TrainingConfig, model: Any, folder: Path, step: int) -> list[Path]:
    from nyx_tui.trainers.native.sampling import SampleRenderer

    return SampleRenderer(cfg, model, folder).render(step).images


def add_lora(transformer: Any) -> list[Any]:
    """A plain peft LoRA on the attention projections (what the trainer injects, minus its own naming), with
    random up matrices so it changes the output; returns the lora_B weights."""
    from peft import LoraConfig

    transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v"]))
    ups = [p for n, p in transformer.named_parameters() if "lora_B" in n]
    assert ups
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in ups:
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return ups


@pytest.mark.parametrize("kind", ["dev", "schnell", "sd3"])
def test_samples_render_deterministically_and_show_the_adapter(
    kind: str, tiny: dict[str, Path], tmp_path: Path
) -> None:
    model = load(kind, tiny[kind])
    cfg = config(kind, tiny[kind], ["nyxshape, red circle --s 2 --d 3", "# a comment", "blue square --s 2 --w 80"])
    ups = add_lora(model.transformer)
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)

    first = render(cfg, model, tmp_path / "a", 5)
    assert [p.name for p in first] == ["flow-step000005-0.png", "flow-step000005-1.png"]
    assert torch.equal(torch.rand(3), before)  # the global RNG is left as it was: training is unaffected
    with Image.open(first[0]) as img:
        assert img.size == (64, 64)
    with Image.open(first[1]) as img:
        assert img.size == (80, 64)  # --w 80: a multiple of 16, kept

    again = render(cfg, model, tmp_path / "b", 5)
    for a, b in zip(first, again, strict=True):
        assert np.array_equal(pixels(a), pixels(b)), "same seed, same weights: same image"

    with torch.no_grad():
        ups[0].add_(1.0)  # one adapter weight changes: the samples show it
    changed = render(cfg, model, tmp_path / "c", 6)
    assert not np.array_equal(pixels(first[0]), pixels(changed[0]))


def test_jobs_follow_the_flow_families_defaults(tiny: dict[str, Path]) -> None:
    from nyx_tui.trainers.native.sampling import jobs

    prompts = ["a --w 100 --h 72", "b --s 9 --l 2.5"]
    dev = jobs(config("dev", tiny["dev"], prompts), "dev")
    assert (dev[0].width, dev[0].height) == (96, 64)  # down to multiples of 16 (8 would break the 2x2 packing)
    assert (dev[0].steps, dev[0].scale) == (20, 3.5)  # sd-scripts' Flux sampler: 20 steps, guidance 3.5
    assert (dev[1].steps, dev[1].scale) == (9, 2.5)  # --l is the embedded guidance
    schnell = jobs(config("schnell", tiny["schnell"], prompts), "schnell")
    assert (schnell[0].steps, schnell[0].scale) == (4, 0.0)
    sd3 = jobs(config("sd3", tiny["sd3"], prompts), "sd3")
    assert (sd3[0].width, sd3[0].height, sd3[0].steps, sd3[0].scale) == (96, 64, 30, 7.5)
    # a flow config without a loaded model (the engine parses prompts on every process): the family's defaults
    assert jobs(config("sd3", tiny["sd3"], prompts))[0].steps == 30
    assert jobs(config("dev", tiny["dev"], prompts))[0].steps == 20


def test_guidance_and_negative_prompts_mean_what_sd_scripts_makes_of_them(
    tiny: dict[str, Path], tmp_path: Path
) -> None:
    """Flux dev: --l is the embedded guidance (changes the image), --n is ignored (with one note); schnell has
    no guidance input; SD3: --n is the CFG negative prompt."""
    cases = {
        # kind: (prompt pair that must differ, prompt pair that must not)
        "dev": (("x --s 2 --l 1", "x --s 2 --l 6"), ("x --s 2", "x --s 2 --n blurry")),
        "schnell": (None, ("x --s 2 --l 1", "x --s 2 --l 6")),
        "sd3": (("x --s 2", "x --s 2 --n blurry"), None),
    }
    for kind, (differ, same) in cases.items():
        model = load(kind, tiny[kind])
        for pair, equal in ((differ, False), (same, True)):
            if pair is None:
                continue
            # the same seed for both prompts of a pair: only the option differs
            a, b = render(config(kind, tiny[kind], [f"{p} --d 1" for p in pair]), model, tmp_path / kind, 1)
            assert np.array_equal(pixels(a), pixels(b)) is equal, (kind, pair)


def test_notes_say_once_what_the_flow_samples_ignore(tiny: dict[str, Path]) -> None:
    from nyx_tui.trainers.native.sampling import SampleRenderer, make_scheduler

    model = load("dev", tiny["dev"])
    cfg = config("dev", tiny["dev"], ["a --n bad", "b --n worse --ss euler_a"])
    notes = SampleRenderer(cfg, model, Path("unused")).notes
    assert [level for _, level in notes] == ["info", "warning"]
    assert "sampler" in notes[0][0] and "negative" in notes[1][0]
    assert SampleRenderer(config("dev", tiny["dev"], ["a"]), model, Path("unused")).notes == []
    named = config("dev", tiny["dev"], ["a"], sampler="euler_a")
    assert len(SampleRenderer(named, model, Path("unused")).notes) == 1
    # ddim, the default, is what complete configs write out: not a choice worth a note
    assert SampleRenderer(config("dev", tiny["dev"], ["a"], sampler="ddim"), model, Path("unused")).notes == []
    # whatever is named, the flow-matching scheduler of the model (dev: dynamic shifting) is used
    scheduler = make_scheduler(model, Sampler.EULER_A, False)
    assert type(scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    assert scheduler.config.use_dynamic_shifting is True
    assert scheduler is not model.noise_scheduler


@pytest.mark.parametrize("kind", ["dev", "sd3"])
def test_prompts_are_encoded_as_the_pipeline_would(kind: str, tiny: dict[str, Path], tmp_path: Path) -> None:
    """The renderer hands the pipeline embeddings from the training's own text encoding (so encoders may sit
    on other devices); without T5 masking they are what the pipeline's own encoding gives: the same image."""
    from nyx_tui.trainers.native.sampling import build_pipeline, make_scheduler

    model = load(kind, tiny[kind])
    line = "nyxshape, red circle --s 2 --d 5 --n blurry" if kind == "sd3" else "nyxshape, red circle --s 2 --d 5"
    (ours,) = render(config(kind, tiny[kind], [line]), model, tmp_path, 1)
    pipe = build_pipeline(model)
    pipe.scheduler = make_scheduler(model, Sampler.DDIM, False)
    extra = {"negative_prompt": "blurry", "guidance_scale": 7.5} if kind == "sd3" else {"guidance_scale": 3.5}
    with torch.no_grad():
        image = pipe(
            prompt="nyxshape, red circle",
            width=64,
            height=64,
            num_inference_steps=2,
            generator=torch.Generator("cpu").manual_seed(5),
            max_sequence_length=model.t5_max_token_length,
            **extra,
        ).images[0]
    theirs = np.asarray(image.convert("RGB"), dtype=np.int16)
    assert np.abs(pixels(ours) - theirs).max() <= 1  # the same up to float rounding in the PNG
