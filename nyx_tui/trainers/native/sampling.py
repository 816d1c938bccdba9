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

Flux and SD3 (`FlowModel`) are sampled through diffusers' `FluxPipeline` / `StableDiffusion3Pipeline`, built
the same way from the loaded parts, with `max_sequence_length` = the T5 length the model trains with. Their
sampler is always the model's own `FlowMatchEulerDiscreteScheduler` (Flux dev's with dynamic shifting, from
its config): the SD samplers (`sampling.sampler`, `--ss`) integrate a DDPM noise schedule a flow model does
not have, so a config choosing one gets a note saying it is not used. Prompt options map as in sd-scripts'
Flux/SD3 scripts: `--l` is Flux dev's embedded guidance (default 3.5; schnell has no guidance input, and
renders in 4 steps by default, dev in 20) and SD3's CFG scale (default 7.5, 30 steps); `--n` is SD3's
negative prompt, while Flux samples ignore it (true CFG would double the sampling cost and sd-scripts' Flux
sampler does not use it either; one note says so). Sizes round down to a multiple of 16 for both (the VAE's
8x times the 2x2 packing/patches). Prompts are encoded as training encodes captions (`flow_models.encode_text`)
and handed to the pipeline as embeddings: the same T5 length and padding treatment, and each text encoder
runs wherever its weights are (`flow.t5_on_cpu`, encoders moved off the device after caching).

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

from nyx_tui.config.fields import FLOW_FAMILIES, Family
from nyx_tui.config.model import Sampler, SamplingSection, TrainingConfig
from nyx_tui.config.prompts import NEEDS_SCIPY, SamplePrompt, parse_prompts
from nyx_tui.trainers.native import models
from nyx_tui.trainers.native.flow_models import FlowModel, encode_text

DEFAULT_STEPS = 30
DEFAULT_SCALE = 7.5
# flow models: (steps, scale) a prompt leaves out, by variant (sd-scripts' Flux sampler: 20 steps, guidance
# 3.5; schnell is distilled for ~4 steps and takes no guidance; SD3: sd-scripts' 30 steps, CFG 7.5)
FLOW_DEFAULTS: dict[str, tuple[int, float]] = {"dev": (20, 3.5), "schnell": (4, 0.0), "sd3": (30, 7.5)}
FLOW_SIZE_MULTIPLE = 16  # VAE 8x downsampling times the 2x2 packing (Flux) / patches (SD3)

AnyModel = models.SDModel | FlowModel

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


def jobs(cfg: TrainingConfig, variant: str = "") -> list[Job]:
    """The prompts of `cfg` with the run's defaults; raises PromptError for a bad prompt line, ValueError for a
    sampler this installation cannot run.

    `variant`: a flow model's ("dev", "schnell", "sd3"), known once it is loaded; it picks the default steps
    and scale. Without it a Flux config gets dev's defaults (the step count is only a default anyway)."""
    prompts: list[SamplePrompt] = parse_prompts(cfg.sampling.prompts)
    res = cfg.dataset.resolution
    flow = cfg.model.family in FLOW_FAMILIES
    if flow:
        steps, scale = FLOW_DEFAULTS.get(variant) or FLOW_DEFAULTS["sd3" if cfg.model.family == Family.SD3 else "dev"]
        multiple = FLOW_SIZE_MULTIPLE
    else:
        steps, scale, multiple = DEFAULT_STEPS, DEFAULT_SCALE, 8
    out = [
        Job(
            index=i,
            prompt=p.prompt,
            negative=p.negative,
            width=_round_down(p.width or res, multiple),
            height=_round_down(p.height or res, multiple),
            steps=p.steps or steps,
            scale=scale if p.scale is None else p.scale,
            seed=cfg.training.seed + i if p.seed is None else p.seed,
            sampler=p.sampler or cfg.sampling.sampler,
        )
        for i, p in enumerate(prompts)
    ]
    # a flow model never uses the SD samplers: whether scipy is there does not matter to it
    if not flow and any(j.sampler in NEEDS_SCIPY for j in out) and importlib.util.find_spec("scipy") is None:
        raise ValueError("the lms sampler needs scipy (pip install scipy); or choose another, e.g. --ss euler")
    return out


def _round_down(size: int, multiple: int) -> int:
    return max(64, size - size % multiple)


def flow_notes(cfg: TrainingConfig, model: FlowModel) -> list[tuple[str, str]]:
    """What a Flux/SD3 run's samples do differently from what the config says, as (message, level) pairs for
    the run's log, each said once: a named SD sampler is not used, Flux ignores negative prompts."""
    notes: list[tuple[str, str]] = []
    prompts = parse_prompts(cfg.sampling.prompts)
    # ddim is the default, which complete configs (`nyx config new`) write out: only another choice is news
    named = cfg.sampling.sampler != Sampler.DDIM or any(p.sampler for p in prompts)
    if named:
        notes.append(
            (
                f"samples of {cfg.model.family.value} use the model's flow-matching Euler sampler; sampling.sampler "
                "and --ss (SD samplers) do not apply to flow models and are ignored",
                "info",
            )
        )
    if model.family == Family.FLUX and any(p.negative for p in prompts):
        notes.append(
            (
                "Flux samples ignore negative prompts (--n): Flux is sampled without true CFG, as sd-scripts does; "
                "--l sets the dev model's embedded guidance instead",
                "warning",
            )
        )
    return notes


def sample_path(folder: Path, name: str, step: int, index: int) -> Path:
    return folder / f"{name}-step{step:06d}-{index}.png"


def make_scheduler(model: AnyModel, sampler: Sampler, zero_terminal_snr: bool) -> Any:
    """A fresh sampler of the kind asked for, from the model's (training) scheduler config.

    A flow model gets its own flow-matching Euler scheduler whatever `sampler` says (the SD samplers step a
    DDPM schedule it does not have); fresh for each prompt because the scheduler keeps per-run state (its step
    index, and the sigmas dynamic shifting sets for the image size)."""
    if isinstance(model, FlowModel):
        return diffusers.FlowMatchEulerDiscreteScheduler.from_config(dict(model.noise_scheduler.config))
    name, extra = SCHEDULERS[sampler]
    cls = getattr(diffusers, name)
    config = dict(model.noise_scheduler.config)
    if zero_terminal_snr:
        extra = {**extra, "rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}
    return cls.from_config(config, **extra)


def build_pipeline(model: AnyModel) -> Any:
    """A diffusers pipeline over the loaded components (the UNet or transformer and the text encoders, with
    their adapters): nothing is loaded or copied, so a sample shows exactly the weights being trained."""
    scheduler = make_scheduler(model, Sampler.DDIM, False)  # replaced per prompt
    if isinstance(model, FlowModel):
        pipe = _flow_pipeline(model, scheduler)
    elif model.text_encoder_2 is not None:
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


def _flow_pipeline(model: FlowModel, scheduler: Any) -> Any:
    """`FluxPipeline` (CLIP-L + T5) or `StableDiffusion3Pipeline` (CLIP-L, CLIP-G, T5): FlowModel's parts
    already carry the pipelines' names."""
    if model.family == Family.FLUX:
        return diffusers.FluxPipeline(
            scheduler=scheduler,
            vae=model.vae,
            text_encoder=model.text_encoder,
            tokenizer=model.tokenizer,
            text_encoder_2=model.text_encoder_2,
            tokenizer_2=model.tokenizer_2,
            transformer=model.transformer,
        )
    return diffusers.StableDiffusion3Pipeline(
        transformer=model.transformer,
        scheduler=scheduler,
        vae=model.vae,
        text_encoder=model.text_encoder,
        tokenizer=model.tokenizer,
        text_encoder_2=model.text_encoder_2,
        tokenizer_2=model.tokenizer_2,
        text_encoder_3=model.text_encoder_3,
        tokenizer_3=model.tokenizer_3,
    )


class SampleRenderer:
    """Renders the run's prompts at a step. Built once (the prompts are parsed and checked then); the
    pipeline is made on the first render."""

    def __init__(self, cfg: TrainingConfig, model: AnyModel, folder: Path) -> None:
        # (message, level) for the run's log, said once: what a flow model's samples do unlike the config
        self.notes: list[tuple[str, str]] = []
        if isinstance(model, FlowModel):
            self.jobs = jobs(cfg, model.variant)
            self.notes = flow_notes(cfg, model)
        else:
            self.jobs = jobs(cfg)
        self.model = model
        self.folder = folder
        self.name = cfg.saving.output_name
        self.zero_terminal_snr = cfg.training.zero_terminal_snr
        self.flow_cfg = cfg.flow
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
        args: dict[str, Any] = {
            "width": job.width,
            "height": job.height,
            "num_inference_steps": job.steps,
            "guidance_scale": job.scale,
            "generator": generator,
            "output_type": "pil",
        }
        if isinstance(self.model, FlowModel):
            args.update(self.flow_prompt(job))
        else:
            args.update(prompt=job.prompt, negative_prompt=job.negative or None)
        image = self.pipe(**args).images[0]
        path = sample_path(self.folder, self.name, step, job.index)
        tmp = path.with_name(f".{path.name}.tmp")
        image.save(tmp, format="PNG")
        tmp.replace(path)  # a viewer never reads half an image
        return path

    def flow_prompt(self, job: Job) -> dict[str, Any]:
        """The pipeline's prompt arguments for a Flux/SD3 job, as embeddings encoded the way training encodes
        captions (`flow_models.encode_text`: the same T5 length, T5's padding zeroed with
        `flow.apply_t5_attn_mask`, each encoder run where its weights are). The pipelines' own encoding would
        send every encoder's input to one device, which breaks with `flow.t5_on_cpu` or with encoders moved
        to the CPU after their outputs were cached. No caption dropout: a sample shows the full prompt.

        Flux: no negative prompt (no true CFG); `guidance_scale` is the dev model's embedded guidance, which
        the pipeline leaves out for schnell (no guidance embedding). SD3: the negative prompt (empty when not
        given, as the pipeline does) for CFG."""
        model = self.model
        assert isinstance(model, FlowModel)
        device = next(model.transformer.parameters()).device  # blocks may swap; the embedders stay put
        prompts = [job.prompt]
        cfg_on = model.family == Family.SD3 and job.scale > 1.0
        if cfg_on:
            prompts.append(job.negative)
        cond = encode_text(model, prompts, device, self.flow_cfg)
        # T5 kept on the CPU runs in fp32: its states take the dtype the rest of the conditioning has
        hidden, pooled = cond.hidden.to(cond.pooled.dtype), cond.pooled
        out: dict[str, Any] = {"prompt_embeds": hidden[:1], "pooled_prompt_embeds": pooled[:1]}
        if model.family == Family.FLUX:
            out["max_sequence_length"] = model.t5_max_token_length
        elif cfg_on:
            out["negative_prompt_embeds"] = hidden[1:]
            out["negative_pooled_prompt_embeds"] = pooled[1:]
        return out
