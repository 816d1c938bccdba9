"""`TrainingConfig`: the one description of a training run, as sections that are TOML tables.

Static rules (types, ranges, choices, fields that contradict each other) live here as pydantic
validation; checks that need the filesystem or a backend live in `config.check`. Every section forbids
unknown keys, so a misspelled key is an error and never silently ignored (as sd-scripts does).
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, field_validator, model_validator

from nyx_tui.config.fields import FLOW_FAMILIES, UNET_FAMILIES, Family, param

ScalarArg = bool | int | float | str


class _Section(BaseModel):
    # allow_inf_nan=False: no parameter means anything as inf/nan, and pydantic's JSON-mode dump writes
    # them as null, which TOML cannot hold (a config that validates must also save and load again).
    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_enum_values=False, allow_inf_nan=False)


# --------------------------------------------------------------------------------------------- choices


class NetworkKind(StrEnum):
    LORA = "lora"
    LOCON = "locon"
    LOHA = "loha"
    LOKR = "lokr"
    DORA = "dora"


class OptimizerKind(StrEnum):
    ADAMW = "adamw"
    ADAMW8BIT = "adamw8bit"
    LION = "lion"
    PRODIGY = "prodigy"
    CAME = "came"
    ADAFACTOR = "adafactor"
    ADAMW_SCHEDULEFREE = "adamw_schedulefree"


class SchedulerKind(StrEnum):
    CONSTANT = "constant"
    CONSTANT_WITH_WARMUP = "constant_with_warmup"
    LINEAR = "linear"
    COSINE = "cosine"
    COSINE_WITH_RESTARTS = "cosine_with_restarts"
    POLYNOMIAL = "polynomial"


class MixedPrecision(StrEnum):
    NO = "no"
    FP16 = "fp16"
    BF16 = "bf16"


class SavePrecision(StrEnum):
    FLOAT = "float"
    FP16 = "fp16"
    BF16 = "bf16"


class TimestepSampling(StrEnum):
    SIGMA = "sigma"
    UNIFORM = "uniform"
    SIGMOID = "sigmoid"
    SHIFT = "shift"
    FLUX_SHIFT = "flux_shift"


class BackendKind(StrEnum):
    NATIVE = "native"
    KOHYA = "kohya"
    KOHYA_CUSTOM = "kohya-custom"


# -------------------------------------------------------------------------------------------- sections


class ModelSection(_Section):
    family: Family = param(
        Family.SD15,
        description="Model family of the base model: sd15, sd2, sdxl, flux or sd3.",
        group="model",
    )
    pretrained: str = param(
        "",
        description="Base model: a diffusers folder, a single .safetensors checkpoint, or a Hugging Face repo id.",
        group="model",
        kohya="pretrained_model_name_or_path",
        path=True,
        example="stable-diffusion-v1-5/stable-diffusion-v1-5",
    )
    vae: str | None = param(
        None,
        description="A VAE to use instead of the base model's own (folder, file or repo id).",
        group="model",
        advanced=True,
        kohya="vae",
        path=True,
    )


class SubsetConfig(_Section):
    image_dir: str = param(
        description="Folder of training images with their caption files beside them.",
        group="dataset",
        kohya="image_dir",
        path=True,
        example="./images",
    )
    num_repeats: int = param(
        1,
        description="How many times each image of this folder is seen per epoch.",
        group="dataset",
        kohya="num_repeats",
        unit="×",
        ge=1,
    )
    caption_extension: str | None = param(
        None,
        description="Caption file extension for this folder; empty means the dataset's.",
        group="dataset",
        advanced=True,
        kohya="caption_extension",
    )

    @field_validator("caption_extension")
    @classmethod
    def _dot(cls, v: str | None) -> str | None:
        if v is not None and (not v.startswith(".") or len(v) < 2 or "/" in v):
            raise ValueError('must be a file extension starting with a dot, such as ".txt" or ".caption"')
        return v


class DatasetSection(_Section):
    subsets: list[SubsetConfig] = param(
        default_factory=list,
        description="The image folders to train on ([[dataset.subsets]] tables).",
        group="dataset",
        kohya="subsets",
    )
    resolution: int = param(
        512,
        description="Training resolution: images are resized and cropped to this square size.",
        group="dataset",
        kohya="resolution",
        unit="px",
        ge=64,
        le=4096,
        example="512",
    )
    caption_extension: str = param(
        ".txt",
        description="Extension of the caption file beside each image.",
        group="dataset",
        kohya="caption_extension",
    )
    shuffle_caption: bool = param(
        False,
        description="Shuffle the comma-separated tags of each caption every time it is used.",
        group="dataset",
        kohya="shuffle_caption",
    )
    keep_tokens: int = param(
        0,
        description="With shuffling: how many leading tags stay in place (e.g. the trigger word).",
        group="dataset",
        kohya="keep_tokens",
        ge=0,
    )
    flip_aug: bool = param(
        False,
        description="Randomly mirror images left-right (not for asymmetric subjects or text).",
        group="dataset",
        kohya="flip_aug",
    )
    random_crop: bool = param(
        False,
        description="Crop at a random place instead of the centre.",
        group="dataset",
        advanced=True,
        kohya="random_crop",
    )
    num_workers: int = param(
        0,
        description="Data loader worker processes (0 loads in the training process).",
        group="dataset",
        advanced=True,
        kohya="max_data_loader_n_workers",
        ge=0,
        le=64,
    )

    @field_validator("resolution")
    @classmethod
    def _multiple_of_8(cls, v: int) -> int:
        if v % 8:
            raise ValueError(f"must be a multiple of 8 (the VAE downsamples by 8); try {max(64, v - v % 8)}")
        return v

    @field_validator("caption_extension")
    @classmethod
    def _dot(cls, v: str) -> str:
        if not v.startswith(".") or len(v) < 2 or "/" in v:
            raise ValueError('must be a file extension starting with a dot, such as ".txt" or ".caption"')
        return v


class NetworkSection(_Section):
    kind: NetworkKind = param(
        NetworkKind.LORA,
        description="Adapter type: lora, locon, loha, lokr or dora.",
        group="network",
        kohya="network_module",
    )
    dim: int = param(
        16,
        description="Rank of the adapter: its capacity and file size.",
        group="network",
        kohya="network_dim",
        unit="rank",
        gt=0,
        le=1024,
        example="16",
    )
    alpha: float = param(
        8.0,
        description="Scales the adapter's effect by alpha/dim; often dim/2 or 1.",
        group="network",
        kohya="network_alpha",
        gt=0,
        example="8",
    )
    dropout: float = param(
        0.0,
        description="Dropout on the adapter's input during training.",
        group="network",
        advanced=True,
        kohya="network_dropout",
        ge=0.0,
        lt=1.0,
    )
    target_modules: list[str] = param(
        default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"],
        description="UNet module names the adapter is applied to (diffusers names).",
        group="network",
        advanced=True,
        families=UNET_FAMILIES,
    )
    train_unet: bool = param(
        True,
        description="Train the UNet / transformer adapter (sd-scripts: not network_train_text_encoder_only).",
        group="network",
    )
    train_text_encoder: bool = param(
        False,
        description="Also train adapters on the text encoder(s) (sd-scripts: not network_train_unet_only).",
        group="network",
    )

    @field_validator("target_modules")
    @classmethod
    def _nonempty(cls, v: list[str]) -> list[str]:
        if not v or any(not m.strip() for m in v):
            raise ValueError('must list at least one module name, e.g. ["to_q", "to_k", "to_v", "to_out.0"]')
        return v


class OptimizerSection(_Section):
    type: OptimizerKind = param(
        OptimizerKind.ADAMW,
        description="Optimizer.",
        group="optimizer",
        kohya="optimizer_type",
    )
    learning_rate: float = param(
        1e-4,
        description="Learning rate of the adapter weights.",
        group="optimizer",
        kohya="learning_rate",
        gt=0,
        le=10.0,
        example="1e-4",
    )
    weight_decay: float = param(
        0.01,
        description="Decoupled weight decay.",
        group="optimizer",
        advanced=True,
        ge=0.0,
        le=1.0,
    )
    betas: tuple[float, float] = param(
        (0.9, 0.999),
        description="Adam's (beta1, beta2).",
        group="optimizer",
        advanced=True,
    )
    eps: float = param(
        1e-8,
        description="Adam's epsilon.",
        group="optimizer",
        advanced=True,
        gt=0,
    )
    args: dict[str, ScalarArg] = param(
        default_factory=dict,
        description="Extra keyword arguments passed to the optimizer as they are.",
        group="optimizer",
        advanced=True,
        kohya="optimizer_args",
    )
    max_grad_norm: float = param(
        1.0,
        description="Clip the gradient norm to this value (0 disables clipping).",
        group="optimizer",
        advanced=True,
        kohya="max_grad_norm",
        ge=0.0,
    )

    @field_validator("betas")
    @classmethod
    def _betas(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not all(0.0 <= b < 1.0 for b in v):
            raise ValueError("both betas must be in [0, 1), e.g. [0.9, 0.999]")
        return v


class SchedulerSection(_Section):
    type: SchedulerKind = param(
        SchedulerKind.CONSTANT,
        description="Learning-rate schedule after the warmup.",
        group="scheduler",
        kohya="lr_scheduler",
    )
    warmup_steps: int = param(
        0,
        description="Steps over which the learning rate rises linearly from 0.",
        group="scheduler",
        kohya="lr_warmup_steps",
        unit="steps",
        ge=0,
    )
    num_cycles: int = param(
        1,
        description="Restarts of cosine_with_restarts.",
        group="scheduler",
        advanced=True,
        kohya="lr_scheduler_num_cycles",
        ge=1,
    )
    power: float = param(
        1.0,
        description="Power of the polynomial schedule.",
        group="scheduler",
        advanced=True,
        kohya="lr_scheduler_power",
        gt=0,
    )


class TrainingSection(_Section):
    max_steps: int = param(
        1000,
        description="Optimizer steps to train.",
        group="training",
        kohya="max_train_steps",
        unit="steps",
        gt=0,
        example="1000",
    )
    batch_size: int = param(
        1,
        description="Images per step.",
        group="training",
        kohya="train_batch_size",
        gt=0,
        le=1024,
    )
    gradient_accumulation_steps: int = param(
        1,
        description="Batches accumulated into one optimizer step.",
        group="training",
        advanced=True,
        kohya="gradient_accumulation_steps",
        ge=1,
    )
    seed: int = param(
        42,
        description="Random seed: the same seed, data and config give the same run.",
        group="training",
        kohya="seed",
        ge=0,
        lt=2**32,
    )
    mixed_precision: MixedPrecision = param(
        MixedPrecision.NO,
        description="Compute precision: no (fp32), fp16 or bf16 (GPU only).",
        group="training",
        kohya="mixed_precision",
    )
    gradient_checkpointing: bool = param(
        False,
        description="Recompute activations in the backward pass: less VRAM, about 20% slower.",
        group="training",
        kohya="gradient_checkpointing",
    )
    noise_offset: float = param(
        0.0,
        description="Offset noise strength; helps very dark or bright images (0.05–0.1).",
        group="training",
        advanced=True,
        kohya="noise_offset",
        ge=0.0,
        le=1.0,
    )


class FlowSection(_Section):
    timestep_sampling: TimestepSampling = param(
        TimestepSampling.SIGMA,
        description="How training timesteps are drawn for flow-matching models.",
        group="flow",
        families=FLOW_FAMILIES,
        kohya="timestep_sampling",
    )
    discrete_flow_shift: float = param(
        3.0,
        description="Shift of the flow-matching schedule (with timestep_sampling = shift).",
        group="flow",
        families=FLOW_FAMILIES,
        kohya="discrete_flow_shift",
        gt=0,
    )
    guidance_scale: float = param(
        1.0,
        description="Guidance value fed to guidance-distilled Flux models during training.",
        group="flow",
        families=(Family.FLUX,),
        kohya="guidance_scale",
        ge=0,
    )


class SavingSection(_Section):
    output_name: str = param(
        "lora",
        description="File name of the saved LoRA, without extension.",
        group="saving",
        kohya="output_name",
        example="mychar",
    )
    output_dir: str | None = param(
        None,
        description="Where LoRA files are written; empty means the job's own output folder.",
        group="saving",
        kohya="output_dir",
        path=True,
    )
    every_n_steps: int = param(
        0,
        description="Also save a LoRA every N steps (0: only at the end).",
        group="saving",
        kohya="save_every_n_steps",
        unit="steps",
        ge=0,
    )
    save_state: bool = param(
        True,
        description="With each saved LoRA, also save the training state (optimizer, schedule, random generators) "
        "as `<name>-state/`, so the run can be resumed. A stop always saves it.",
        group="saving",
        advanced=True,
        kohya="save_state",
    )
    precision: SavePrecision = param(
        SavePrecision.FP16,
        description="Precision of the saved weights.",
        group="saving",
        kohya="save_precision",
    )
    title: str | None = param(
        None,
        description="Title written into the file's metadata (modelspec.title).",
        group="saving",
        advanced=True,
        kohya="metadata_title",
    )
    author: str | None = param(
        None,
        description="Author written into the file's metadata.",
        group="saving",
        advanced=True,
        kohya="metadata_author",
    )
    description: str | None = param(
        None,
        description="Description written into the file's metadata.",
        group="saving",
        advanced=True,
        kohya="metadata_description",
    )

    @field_validator("output_name")
    @classmethod
    def _file_name(cls, v: str) -> str:
        if not v or v in (".", "..") or any(c in v for c in '/\\\0') or len(v) > 200:
            raise ValueError('must be a plain file name without slashes, such as "mychar"')
        return v


class SamplingSection(_Section):
    prompts: list[str] = param(
        default_factory=list,
        description="Prompts rendered as sample images during training.",
        group="sampling",
        kohya="sample_prompts",
    )
    every_n_steps: int = param(
        0,
        description="Render samples every N steps (0: never).",
        group="sampling",
        kohya="sample_every_n_steps",
        unit="steps",
        ge=0,
    )


class LoggingSection(_Section):
    loss_avg_window: int = param(
        50,
        description="Steps in the moving average reported as loss_avg.",
        group="logging",
        advanced=True,
        unit="steps",
        ge=1,
    )


class BackendSection(_Section):
    name: BackendKind = param(
        BackendKind.NATIVE,
        description="Trainer: Nyx's native engine, kohya sd-scripts, or sd-scripts with custom optimizers.",
        group="backend",
    )
    path: str | None = param(
        None,
        description="An sd-scripts checkout for the kohya backends (empty: the one `nyx backend install` made).",
        group="backend",
        advanced=True,
        path=True,
    )


class TrainingConfig(_Section):
    """A whole training run. Sections are TOML tables; `nyx config new` writes a complete one."""

    model: ModelSection = ModelSection()
    dataset: DatasetSection = DatasetSection()
    network: NetworkSection = NetworkSection()
    optimizer: OptimizerSection = OptimizerSection()
    scheduler: SchedulerSection = SchedulerSection()
    training: TrainingSection = TrainingSection()
    flow: FlowSection = FlowSection()
    saving: SavingSection = SavingSection()
    sampling: SamplingSection = SamplingSection()
    logging: LoggingSection = LoggingSection()
    backend: BackendSection = BackendSection()

    @model_validator(mode="after")
    def _cross_field(self) -> TrainingConfig:
        if self.scheduler.warmup_steps >= self.training.max_steps:
            raise ValueError(
                f"scheduler.warmup_steps ({self.scheduler.warmup_steps}) must be below training.max_steps "
                f"({self.training.max_steps}); lower the warmup, e.g. to {self.training.max_steps // 10}"
            )
        if not (self.network.train_unet or self.network.train_text_encoder):
            raise ValueError(
                "network.train_unet and network.train_text_encoder are both false: nothing would be trained;"
                " set network.train_unet = true"
            )
        return self

    def dump(self) -> dict[str, Any]:
        """Plain TOML-ready data: enums as strings, tuples as lists, unset optionals left out."""
        return self.model_dump(mode="json", exclude_none=True)
