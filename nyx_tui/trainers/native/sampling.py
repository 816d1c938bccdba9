"""Sample images during training: `sampling.prompts` rendered with the model as it is being trained.

The pipeline is built from the components already loaded (tokenizer, text encoder(s), VAE, the UNet with
its adapters), never loaded again: a diffusers `StableDiffusionPipeline`, or `StableDiffusionXLPipeline`
when the model has a second text encoder (SDXL), with no safety checker. Each prompt gets a fresh sampler
(diffusers scheduler) built from the model's own scheduler config — its betas, prediction type and, with
`training.zero_terminal_snr`, the rescaled schedule, sampled with "trailing" timesteps as the zero-SNR paper
advises — chosen by sd-scripts' sampler names (`sampling.sampler`, a prompt's `--ss`).

What a prompt leaves out: the training resolution (sd-scripts uses 512 whatever the model), 30 steps and
CFG scale 7.5 (sd-scripts' defaults), and the seed `training.seed` + the prompt's index (sd-scripts draws a
random one): samples of the same prompt at different steps start from the same noise, so they show what
the training changed and nothing else. Every prompt is rendered with its own seeded generator, and the
global torch RNG state is put back afterwards, so a run that renders samples trains exactly like one that
does not. Width and height are rounded down to a multiple of 8, as sd-scripts does.

Files: `<output dir>/samples/<output_name>-step<NNNNNN>-<i>.png`, `i` the prompt's index among the prompts.
The caller (the engine) decides when, puts the network in eval mode and the weights to show in the model,
and emits the `sample` event.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import diffusers
import torch

from nyx_tui.config.model import Sampler, SamplingSection, TrainingConfig
from nyx_tui.config.prompts import NEEDS_SCIPY, SamplePrompt, parse_prompts
from nyx_tui.trainers.native import models

DEFAULT_STEPS = 30
DEFAULT_SCALE = 7.5

# sd-scripts' sampler names → a diffusers scheduler class and its extra arguments
SCHEDULERS: dict[Sampler, tuple[str, dict[str, Any]]] = {
    Sampler.DDIM: ("DDIMScheduler", {}),
    Sampler.PNDM: ("PNDMScheduler", {}),
    Sampler.LMS: ("LMSDiscreteScheduler", {}),
    Sampler.K_LMS: ("LMSDiscreteScheduler", {}),
    Sampler.EULER: ("EulerDiscreteScheduler", {}),
    Sampler.K_EULER: ("EulerDiscreteScheduler", {}),
    Sampler.EULER_A: ("EulerAncestralDiscreteScheduler", {}),
    Sampler.K_EULER_A: ("EulerAncestralDiscreteScheduler", {}),
    Sampler.HEUN: ("HeunDiscreteScheduler", {}),
    Sampler.DPM_2: ("KDPM2DiscreteScheduler", {}),
    Sampler.K_DPM_2: ("KDPM2DiscreteScheduler", {}),
    Sampler.DPM_2_A: ("KDPM2AncestralDiscreteScheduler", {}),
    Sampler.K_DPM_2_A: ("KDPM2AncestralDiscreteScheduler", {}),
    Sampler.DPMSOLVER: ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver"}),
    Sampler.DPMSOLVER_PP: ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    Sampler.DPMSINGLE: ("DPMSolverSinglestepScheduler", {}),
}


@dataclass(frozen=True)
class Job:
    """One image to render: a prompt with every default filled in."""

    index: int
    prompt: str
    negative: str
    width: int
    height: int
    steps: int
    scale: float
    seed: int
    sampler: Sampler


@dataclass(frozen=True)
class Rendered:
    step: int
    images: list[Path]
    prompts: list[str]


def due(sp: SamplingSection, step: int, epoch: int, epoch_finished: bool) -> bool:
    """Whether samples are due after optimizer step `step` (sd-scripts' rule: with every_n_epochs set, at
    those epochs' ends only; else every every_n_steps steps)."""
    if sp.every_n_epochs:
        return epoch_finished and epoch % sp.every_n_epochs == 0
    return bool(sp.every_n_steps) and step % sp.every_n_steps == 0


def jobs(cfg: TrainingConfig) -> list[Job]:
    """The prompts of `cfg` with the run's defaults; raises PromptError for a bad prompt line, ValueError for a
    sampler this installation cannot run."""
    prompts: list[SamplePrompt] = parse_prompts(cfg.sampling.prompts)
    res = cfg.dataset.resolution
    out = [
        Job(
            index=i,
            prompt=p.prompt,
            negative=p.negative,
            width=_multiple_of_8(p.width or res),
            height=_multiple_of_8(p.height or res),
            steps=p.steps or DEFAULT_STEPS,
            scale=DEFAULT_SCALE if p.scale is None else p.scale,
            seed=cfg.training.seed + i if p.seed is None else p.seed,
            sampler=p.sampler or cfg.sampling.sampler,
        )
        for i, p in enumerate(prompts)
    ]
    if any(j.sampler in NEEDS_SCIPY for j in out) and importlib.util.find_spec("scipy") is None:
        raise ValueError("the lms sampler needs scipy (pip install scipy); or choose another, e.g. --ss euler")
    return out


def _multiple_of_8(size: int) -> int:
    return max(64, size - size % 8)


def sample_path(folder: Path, name: str, step: int, index: int) -> Path:
    return folder / f"{name}-step{step:06d}-{index}.png"


def make_scheduler(model: models.SDModel, sampler: Sampler, zero_terminal_snr: bool) -> Any:
    """A fresh sampler of the kind asked for, from the model's (training) scheduler config."""
    name, extra = SCHEDULERS[sampler]
    cls = getattr(diffusers, name)
    config = dict(model.noise_scheduler.config)
    if zero_terminal_snr:
        extra = {**extra, "rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}
    return cls.from_config(config, **extra)


def build_pipeline(model: models.SDModel) -> Any:
    """A diffusers pipeline over the loaded components (the UNet and text encoders with their adapters)."""
    scheduler = make_scheduler(model, Sampler.DDIM, False)  # replaced per prompt
    if model.text_encoder_2 is not None:
        pipe = diffusers.StableDiffusionXLPipeline(
            vae=model.vae,
            text_encoder=model.text_encoder,
            text_encoder_2=model.text_encoder_2,
            tokenizer=model.tokenizer,
            tokenizer_2=model.tokenizer_2,
            unet=model.unet,
            scheduler=scheduler,
            add_watermarker=False,
        )
    else:
        pipe = diffusers.StableDiffusionPipeline(
            vae=model.vae,
            text_encoder=model.text_encoder,
            tokenizer=model.tokenizer,
            unet=model.unet,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    pipe.set_progress_bar_config(disable=True)
    return pipe


class SampleRenderer:
    """Renders the run's prompts at a step. Built once (the prompts are parsed and checked then); the
    pipeline is made on the first render."""

    def __init__(self, cfg: TrainingConfig, model: models.SDModel, folder: Path) -> None:
        self.jobs = jobs(cfg)
        self.model = model
        self.folder = folder
        self.name = cfg.saving.output_name
        self.zero_terminal_snr = cfg.training.zero_terminal_snr
        self.pipe: Any = None

    def render(self, step: int) -> Rendered:
        """Every prompt at the current weights, written as PNGs; the global RNG state is left as it was."""
        if self.pipe is None:
            self.pipe = build_pipeline(self.model)
        self.folder.mkdir(parents=True, exist_ok=True)
        cpu_state = torch.get_rng_state()
        cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
        images: list[Path] = []
        try:
            with torch.no_grad():
                for job in self.jobs:
                    images.append(self.render_one(job, step))
        finally:
            torch.set_rng_state(cpu_state)
            if cuda_states is not None:
                torch.cuda.set_rng_state_all(cuda_states)
        return Rendered(step, images, [j.prompt for j in self.jobs])

    def render_one(self, job: Job, step: int) -> Path:
        self.pipe.scheduler = make_scheduler(self.model, job.sampler, self.zero_terminal_snr)
        # a CPU generator: the same seed gives the same starting noise on every device
        generator = torch.Generator("cpu").manual_seed(job.seed)
        image = self.pipe(
            prompt=job.prompt,
            negative_prompt=job.negative or None,
            width=job.width,
            height=job.height,
            num_inference_steps=job.steps,
            guidance_scale=job.scale,
            generator=generator,
            output_type="pil",
        ).images[0]
        path = sample_path(self.folder, self.name, step, job.index)
        tmp = path.with_name(f".{path.name}.tmp")
        image.save(tmp, format="PNG")
        tmp.replace(path)  # a viewer never reads half an image
        return path
