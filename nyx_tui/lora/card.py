"""The README model card of a LoRA uploaded to the Hugging Face Hub, built with huggingface_hub's card API.

A card is YAML metadata (`ModelCardData`: base model, tags, the trigger words as `instance_prompt`, a `widget`
of sample images with their prompts) over a Markdown body that says how to use the file and how it was
trained. The training settings come from the file's own `ss_*` metadata (what sd-scripts and Nyx write), so a
card says what the file says, not what a config somewhere claims. Torch-free: the header is read with
safetensors' numpy reader.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nyx_tui.config.fields import Family

# the diffusers repo each family's LoRAs are usually trained on, when neither --base-model nor the file says one
DEFAULT_BASE_MODELS: dict[Family, str] = {
    Family.SD15: "stable-diffusion-v1-5/stable-diffusion-v1-5",
    Family.SD2: "stabilityai/stable-diffusion-2-1",
    Family.SDXL: "stabilityai/stable-diffusion-xl-base-1.0",
    Family.FLUX: "black-forest-labs/FLUX.1-dev",
    Family.SD3: "stabilityai/stable-diffusion-3.5-large",
}
FAMILY_TAGS: dict[Family, list[str]] = {
    Family.SD15: ["stable-diffusion", "sd-1.5"],
    Family.SD2: ["stable-diffusion", "sd-2"],
    Family.SDXL: ["stable-diffusion-xl", "sdxl"],
    Family.FLUX: ["flux"],
    Family.SD3: ["sd3", "stable-diffusion-3"],
}
BASE_TAGS = ["lora", "diffusers", "text-to-image", "template:sd-lora", "nyx"]

# ss_* keys shown in the card's training table, with their labels, in this order
TRAINING_KEYS: tuple[tuple[str, str], ...] = (
    ("ss_network_module", "network module"),
    ("ss_network_dim", "rank (dim)"),
    ("ss_network_alpha", "alpha"),
    ("ss_network_args", "network args"),
    ("ss_optimizer", "optimizer"),
    ("ss_learning_rate", "learning rate"),
    ("ss_unet_lr", "UNet / transformer lr"),
    ("ss_text_encoder_lr", "text encoder lr"),
    ("ss_lr_scheduler", "lr scheduler"),
    ("ss_max_train_steps", "steps"),
    ("ss_num_epochs", "epochs"),
    ("ss_batch_size_per_device", "batch size"),
    ("ss_gradient_accumulation_steps", "gradient accumulation"),
    ("ss_resolution", "resolution"),
    ("ss_num_train_images", "training images"),
    ("ss_mixed_precision", "mixed precision"),
    ("ss_noise_offset", "noise offset"),
    ("ss_min_snr_gamma", "min SNR gamma"),
    ("ss_seed", "seed"),
    ("ss_base_model_version", "base model version"),
    ("ss_training_comment", "comment"),
)


@dataclass(frozen=True)
class Sample:
    """An image for the card's widget: its path in the repo and the prompt that made it (None: unknown)."""

    path_in_repo: str
    prompt: str | None = None


@dataclass
class CardInfo:
    """What goes on the card."""

    repo_id: str
    lora_filename: str
    family: Family | None = None
    base_model: str | None = None
    trigger: str | None = None
    samples: list[Sample] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)
    license: str | None = None


def read_metadata(path: Path) -> dict[str, str]:
    """The safetensors header metadata of `path` (empty when it has none). Raises ValueError for a file that is
    not a safetensors file."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            return dict(f.metadata() or {})
    except Exception as e:  # safetensors raises its own error types, and OSError
        raise ValueError(f"{path} is not a readable .safetensors file ({e})") from e


def training_settings(metadata: dict[str, str]) -> list[tuple[str, str]]:
    """(label, value) rows for the training table, from the file's `ss_*` metadata; empty values left out."""
    rows: list[tuple[str, str]] = []
    for key, label in TRAINING_KEYS:
        value = str(metadata.get(key, "")).strip()
        if not value or value in ("None", "null"):
            continue
        if key == "ss_network_args":
            try:
                args = json.loads(value)
            except ValueError:
                args = None
            if isinstance(args, dict):
                if not args:
                    continue
                value = ", ".join(f"{k}={v}" for k, v in args.items())
        rows.append((label, value))
    return rows


def base_model_of(metadata: dict[str, str], family: Family | None, given: str | None) -> str | None:
    """The Hub id of the base model: the one given, else the file's `ss_sd_model_name` when it is a repo id,
    else the family's usual base model."""
    from nyx_tui.config.io import looks_like_repo_id

    if given:
        return given
    named = str(metadata.get("ss_sd_model_name", "")).strip()
    if named and looks_like_repo_id(named) and not Path(named).exists():
        return named
    return DEFAULT_BASE_MODELS.get(family) if family is not None else None


def trigger_of(metadata: dict[str, str], given: str | None) -> str | None:
    """The trigger words: the ones given, else the file's `modelspec.trigger_phrase`."""
    if given and given.strip():
        return given.strip()
    phrase = str(metadata.get("modelspec.trigger_phrase", "")).strip()
    return phrase or None


def card_data(info: CardInfo) -> Any:
    """The card's YAML metadata as huggingface_hub's `ModelCardData`."""
    from huggingface_hub import ModelCardData

    tags = [*BASE_TAGS, *(FAMILY_TAGS.get(info.family, []) if info.family else [])]
    widget = [{"text": s.prompt or info.trigger or "", "output": {"url": s.path_in_repo}} for s in info.samples]
    extra: dict[str, Any] = {}
    if info.trigger:
        extra["instance_prompt"] = info.trigger
    if widget:
        extra["widget"] = widget
    return ModelCardData(
        base_model=info.base_model,
        tags=tags,
        library_name="diffusers",
        pipeline_tag="text-to-image",
        license=info.license,
        **extra,
    )


def card_body(info: CardInfo) -> str:
    """The Markdown under the metadata: what it is, the trigger, the samples, how to load it, the settings."""
    name = info.repo_id.split("/")[-1]
    lines = [f"# {name}", ""]
    what = f"a LoRA for {info.base_model}" if info.base_model else "a LoRA"
    lines += [
        f"`{info.lora_filename}` is {what}, uploaded with Nyx.",
        "",
    ]
    if info.trigger:
        lines += ["## Trigger words", "", f"Use `{info.trigger}` in the prompt.", ""]
    if info.samples:
        lines += ["## Samples", ""]
        for s in info.samples:
            alt = (s.prompt or Path(s.path_in_repo).stem).replace("]", ")").replace("[", "(")
            lines.append(f"![{alt}]({s.path_in_repo})")
            if s.prompt:
                lines += ["", f"*{s.prompt}*"]
            lines.append("")
    lines += [
        "## Use it",
        "",
        "With diffusers:",
        "",
        "```python",
        "import torch",
        "from diffusers import AutoPipelineForText2Image",
        "",
        f"pipe = AutoPipelineForText2Image.from_pretrained({(info.base_model or 'BASE_MODEL')!r}, "
        "torch_dtype=torch.float16).to('cuda')",
        f"pipe.load_lora_weights({info.repo_id!r}, weight_name={info.lora_filename!r})",
        f"image = pipe({(info.trigger or 'your prompt')!r}).images[0]",
        "```",
        "",
        "In ComfyUI, A1111 or Forge: download the file into the LoRA folder.",
        "",
    ]
    rows = training_settings(info.metadata)
    if rows:
        lines += ["## Training settings", "", "From the file's metadata.", "", "| setting | value |", "|---|---|"]
        lines += [f"| {label} | {value.replace('|', '/')} |" for label, value in rows]
        lines.append("")
    return "\n".join(lines)


def build_card(info: CardInfo) -> Any:
    """The README as huggingface_hub's `ModelCard` (its `str()` is the file: YAML front matter, then Markdown)."""
    from huggingface_hub import ModelCard

    data = card_data(info)
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{card_body(info)}")
