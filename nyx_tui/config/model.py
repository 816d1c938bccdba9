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
from nyx_tui.families import FAMILY_DEFAULTS, native_resolutions

ScalarArg = bool | int | float | str
# Flux module types with their own rank in flow.block_type_dims (sd-scripts' <type>_dim network args)
FLUX_TYPE_DIMS = ("img_attn", "txt_attn", "img_mlp", "txt_mlp", "img_mod", "txt_mod", "single", "single_mod")


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
    LION8BIT = "lion8bit"
    PRODIGY = "prodigy"
    CAME = "came"
    ADAFACTOR = "adafactor"
    ADAMW_SCHEDULEFREE = "adamw_schedulefree"
    CUSTOM = "custom"  # optimizer.class_path names the class, like sd-scripts' dotted optimizer_type


class SchedulerKind(StrEnum):
    CONSTANT = "constant"
    CONSTANT_WITH_WARMUP = "constant_with_warmup"
    LINEAR = "linear"
    COSINE = "cosine"
    COSINE_WITH_RESTARTS = "cosine_with_restarts"
    POLYNOMIAL = "polynomial"
    REX = "rex"


class MixedPrecision(StrEnum):
    NO = "no"
    FP16 = "fp16"
    BF16 = "bf16"


class SavePrecision(StrEnum):
    FLOAT = "float"
    FP16 = "fp16"
    BF16 = "bf16"


class LoraFormat(StrEnum):
    KOHYA = "kohya"
    DIFFUSERS = "diffusers"


class TimestepSampling(StrEnum):
    SIGMA = "sigma"
    UNIFORM = "uniform"
    SIGMOID = "sigmoid"
    SHIFT = "shift"
    FLUX_SHIFT = "flux_shift"


class ModelPredictionType(StrEnum):
    """sd-scripts' Flux model_prediction_type: how the transformer's output becomes the prediction."""

    RAW = "raw"
    ADDITIVE = "additive"
    SIGMA_SCALED = "sigma_scaled"


class WeightingScheme(StrEnum):
    """SD3's loss/timestep weighting schemes (diffusers' compute_density_for_timestep_sampling names)."""

    NONE = "none"
    UNIFORM = "uniform"
    SIGMA_SQRT = "sigma_sqrt"
    LOGIT_NORMAL = "logit_normal"
    MODE = "mode"
    COSMAP = "cosmap"


class TrainBlocks(StrEnum):
    """Which Flux transformer blocks get adapters (sd-scripts' train_blocks)."""

    ALL = "all"
    DOUBLE = "double"
    SINGLE = "single"


class BaseQuantization(StrEnum):
    """How the frozen base transformer is stored: as is, fp8 (upcast for compute), 8-bit or 4-bit NF4."""

    NONE = "none"
    FP8 = "fp8"
    INT8 = "int8"
    NF4 = "nf4"


class LossType(StrEnum):
    L2 = "l2"
    L1 = "l1"
    HUBER = "huber"
    SMOOTH_L1 = "smooth_l1"


class HuberSchedule(StrEnum):
    CONSTANT = "constant"
    EXPONENTIAL = "exponential"
    SNR = "snr"


class Sampler(StrEnum):
    """sd-scripts' sample_sampler names; `k_` names are aliases of the plain ones."""

    DDIM = "ddim"
    PNDM = "pndm"
    LMS = "lms"
    EULER = "euler"
    EULER_A = "euler_a"
    HEUN = "heun"
    DPM_2 = "dpm_2"
    DPM_2_A = "dpm_2_a"
    DPMSOLVER = "dpmsolver"
    DPMSOLVER_PP = "dpmsolver++"
    DPMSINGLE = "dpmsingle"
    K_LMS = "k_lms"
    K_EULER = "k_euler"
    K_EULER_A = "k_euler_a"
    K_DPM_2 = "k_dpm_2"
    K_DPM_2_A = "k_dpm_2_a"


class BackendKind(StrEnum):
    NATIVE = "native"
    KOHYA = "kohya"
    KOHYA_CUSTOM = "kohya-custom"


# -------------------------------------------------------------------------------------------- sections


class ModelSection(_Section):
    family: Family = param(
        Family.SD15,
        description="Model family of the base model: sd15, sd2, sdxl, flux or sd3. A dataset.resolution left out "
        f"follows it: {native_resolutions()}.",
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
    single_file_config: str | None = param(
        None,
        description="For a single-file checkpoint in model.pretrained: a diffusers folder or Hugging Face repo id "
        "of the same family whose configs and tokenizers describe it (only its JSON and text files are read). "
        "Empty: the family's reference model in the local Hugging Face cache (stable-diffusion-v1-5/"
        "stable-diffusion-v1-5, stabilityai/stable-diffusion-2-1 (v-prediction), stabilityai/stable-diffusion-xl-"
        "base-1.0; `hf download REPO --include '*.json' '*.txt'` fetches them). An SD2 epsilon (512 px) checkpoint "
        "needs stabilityai/stable-diffusion-2-1-base here.",
        group="model",
        advanced=True,
        families=UNET_FAMILIES,
        path=True,
        example="stabilityai/stable-diffusion-xl-base-1.0",
    )
    clip_l: str | None = param(
        None,
        description="CLIP-L text encoder file (ComfyUI's clip_l.safetensors) for a Flux or SD3 transformer file "
        "in model.pretrained that has no text encoders. Empty: taken from model.pretrained.",
        group="model",
        families=FLOW_FAMILIES,
        kohya="clip_l",
        path=True,
        example="models/clip/clip_l.safetensors",
    )
    clip_g: str | None = param(
        None,
        description="CLIP-G (OpenCLIP bigG) text encoder file for an SD3 transformer file without text encoders.",
        group="model",
        families=(Family.SD3,),
        kohya="clip_g",
        path=True,
        example="models/clip/clip_g.safetensors",
    )
    t5xxl: str | None = param(
        None,
        description="T5-XXL text encoder file (e.g. t5xxl_fp16.safetensors) for a Flux or SD3 transformer file "
        "without text encoders.",
        group="model",
        families=FLOW_FAMILIES,
        kohya="t5xxl",
        path=True,
        example="models/clip/t5xxl_fp16.safetensors",
    )
    flow_config: str | None = param(
        None,
        description="For Flux/SD3 single files: a diffusers folder or Hugging Face repo id of the same model whose "
        "configs and tokenizers describe them (only JSON and text files are read). Empty: the family's reference "
        "repo in the local Hugging Face cache (black-forest-labs/FLUX.1-dev, stabilityai/stable-diffusion-3.5-"
        "medium).",
        group="model",
        advanced=True,
        families=FLOW_FAMILIES,
        path=True,
        example="black-forest-labs/FLUX.1-dev",
    )


class SubsetConfig(_Section):
    image_dir: str = param(
        description="Folder of training images with their caption files beside them.",
        group="dataset",
        kohya="image_dir",
        path=True,
        example="./images",
    )
    num_repeats: int | None = param(
        None,
        description="How many times each image of this folder is seen per epoch; empty: the count in a "
        "kohya-style folder name (`10_mychar` → 10), else 1.",
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
    is_reg: bool = param(
        False,
        description="Regularization images (pictures of the class, not the subject): their loss is weighted by "
        "training.prior_loss_weight, and they are repeated to as many as the training images (with repeats).",
        group="dataset",
        advanced=True,
        kohya="is_reg",
    )
    class_tokens: str | None = param(
        None,
        description='The caption of this folder\'s images that have no caption file (e.g. "mychar woman").',
        group="dataset",
        advanced=True,
        kohya="class_tokens",
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
    train_data_dir: str | None = param(
        None,
        description="A folder of kohya-style `N_name` folders (e.g. `10_mychar`): each is a subset trained N "
        "times an epoch, `name` captioning its images that have no caption file. Adds to dataset.subsets.",
        group="dataset",
        kohya="train_data_dir",
        path=True,
        example="./train",
    )
    reg_data_dir: str | None = param(
        None,
        description="A folder of `N_name` folders of regularization images (like train_data_dir, with is_reg).",
        group="dataset",
        advanced=True,
        kohya="reg_data_dir",
        path=True,
    )
    resolution: int = param(
        512,
        description="Training resolution: images are resized and cropped to this square size (with "
        "enable_bucket: to about this many pixels in area).",
        group="dataset",
        kohya="resolution",
        unit="px",
        ge=64,
        le=4096,
        example="512",
    )
    enable_bucket: bool = param(
        False,
        description="Aspect-ratio bucketing: each image trains at the bucket size closest to its aspect ratio "
        "(area at most resolution²) instead of a centre square; a batch holds one bucket's images.",
        group="dataset",
        kohya="enable_bucket",
    )
    min_bucket_reso: int = param(
        256,
        description="Smallest bucket side.",
        group="dataset",
        advanced=True,
        kohya="min_bucket_reso",
        unit="px",
        ge=16,
        le=8192,
    )
    max_bucket_reso: int = param(
        1024,
        description="Largest bucket side.",
        group="dataset",
        advanced=True,
        kohya="max_bucket_reso",
        unit="px",
        ge=64,
        le=8192,
    )
    bucket_reso_steps: int = param(
        64,
        description="Bucket sides are multiples of this (64 for SD1.5/SD2, 32 or 64 for SDXL).",
        group="dataset",
        advanced=True,
        kohya="bucket_reso_steps",
        unit="px",
        ge=8,
        le=1024,
    )
    bucket_no_upscale: bool = param(
        False,
        description="Never enlarge an image: a smaller one trains at its own size (rounded down to "
        "bucket_reso_steps); min/max_bucket_reso are then ignored.",
        group="dataset",
        advanced=True,
        kohya="bucket_no_upscale",
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
    max_token_length: int = param(
        75,
        description="CLIP tokens of a caption the text encoders see: 75, or 150/225 for long captions (encoded "
        "as 75-token windows, as sd-scripts does); tokens beyond are cut off.",
        group="dataset",
        advanced=True,
        kohya="max_token_length",
        unit="tokens",
        example="150",
    )
    caption_dropout_rate: float = param(
        0.0,
        description="Chance that an image trains with an empty caption (helps the LoRA work without its tags).",
        group="dataset",
        advanced=True,
        kohya="caption_dropout_rate",
        ge=0.0,
        le=1.0,
    )
    caption_tag_dropout_rate: float = param(
        0.0,
        description="Chance that each tag (after keep_tokens) is left out of the caption.",
        group="dataset",
        advanced=True,
        kohya="caption_tag_dropout_rate",
        ge=0.0,
        le=1.0,
    )
    caption_dropout_every_n_epochs: int = param(
        0,
        description="Train every N-th epoch with empty captions (0: never).",
        group="dataset",
        advanced=True,
        kohya="caption_dropout_every_n_epochs",
        unit="epochs",
        ge=0,
    )
    flip_aug: bool = param(
        False,
        description="Randomly mirror images left-right (not for asymmetric subjects or text).",
        group="dataset",
        kohya="flip_aug",
    )
    color_aug: bool = param(
        False,
        description="Small random hue (±16°) and saturation (±10%) shifts of each image (not with cached latents).",
        group="dataset",
        advanced=True,
        kohya="color_aug",
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
    validation_split: float = param(
        0.0,
        description="Fraction of the images held out of training (chosen by training.seed) to compute a "
        "validation loss on (0: none).",
        group="dataset",
        kohya="validation_split",
        ge=0.0,
        le=0.5,
        example="0.1",
    )

    @field_validator("resolution")
    @classmethod
    def _multiple_of_8(cls, v: int) -> int:
        if v % 8:
            raise ValueError(f"must be a multiple of 8 (the VAE downsamples by 8); try {max(64, v - v % 8)}")
        return v

    @field_validator("max_token_length")
    @classmethod
    def _token_windows(cls, v: int) -> int:
        if v not in (75, 150, 225):
            raise ValueError("must be 75, 150 or 225 (one, two or three 75-token windows)")
        return v

    @field_validator("caption_extension")
    @classmethod
    def _dot(cls, v: str) -> str:
        if not v.startswith(".") or len(v) < 2 or "/" in v:
            raise ValueError('must be a file extension starting with a dot, such as ".txt" or ".caption"')
        return v


# UNet blocks in sd-scripts' block-wise numbering (networks/lora.py): sd15/sd2 12 in + mid + 12 out;
# sdxl 1 (time/label embedding) + 9 in + 3 mid + 9 out + 1 (out).
UNET_BLOCK_COUNTS: dict[Family, int] = {Family.SD15: 25, Family.SD2: 25, Family.SDXL: 23}
BLOCK_FIELDS = ("block_dims", "block_alphas", "conv_block_dims", "conv_block_alphas", "block_lr_weights")


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
        description="Dropout in the adapter during training (lora/dora: on its input; locon/loha/lokr: on its output).",
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
    text_encoder_lr: float | None = param(
        None,
        description="Learning rate of the text-encoder adapters (empty: optimizer.learning_rate).",
        group="network",
        advanced=True,
        kohya="text_encoder_lr",
        gt=0,
        le=10.0,
        example="5e-5",
    )
    conv_dim: int | None = param(
        None,
        description="Rank of the adapters on 3x3 convolutions (ResNet and up/down-sampling layers); "
        "empty: dim for locon/loha/lokr, none for lora/dora; 0: no convolutions.",
        group="network",
        advanced=True,
        families=UNET_FAMILIES,
        kohya="network_args.conv_dim",
        unit="rank",
        ge=0,
        le=1024,
        example="8",
    )
    conv_alpha: float | None = param(
        None,
        description="Alpha of the convolution adapters (empty: alpha).",
        group="network",
        advanced=True,
        families=UNET_FAMILIES,
        kohya="network_args.conv_alpha",
        gt=0,
        example="4",
    )
    rank_dropout: float = param(
        0.0,
        description="Drop this fraction of each adapter's ranks at every step (locon, loha, lokr).",
        group="network",
        advanced=True,
        kohya="network_args.rank_dropout",
        ge=0.0,
        lt=1.0,
    )
    module_dropout: float = param(
        0.0,
        description="Skip each adapter module entirely with this probability at every step (locon, loha, lokr).",
        group="network",
        advanced=True,
        kohya="network_args.module_dropout",
        ge=0.0,
        lt=1.0,
    )
    lokr_factor: int | None = param(
        None,
        description="LoKr: split each weight's sides by this factor for the Kronecker product (empty: as square "
        "as possible; larger: smaller file).",
        group="network",
        advanced=True,
        kohya="network_args.factor",
        ge=1,
        example="8",
    )
    block_dims: list[int] | None = param(
        None,
        description="Rank per UNet block in sd-scripts' order (sd15/sd2: 25 numbers, 12 in, mid, 12 out; "
        "sdxl: 23); 0 leaves a block out. Empty: dim everywhere.",
        group="network",
        advanced=True,
        families=UNET_FAMILIES,
        kohya="network_args.block_dims",
        unit="ranks",
    )
    block_alphas: list[float] | None = param(
        None,
        description="Alpha per UNet block, in the order of block_dims (empty: alpha everywhere).",
        group="network",
        advanced=True,
        families=UNET_FAMILIES,
        kohya="network_args.block_alphas",
    )
    conv_block_dims: list[int] | None = param(
        None,
        description="Rank of the 3x3 convolution adapters per UNet block, in the order of block_dims; "
        "0 leaves a block's convolutions out (empty: conv_dim everywhere).",
        group="network",
        advanced=True,
        families=UNET_FAMILIES,
        kohya="network_args.conv_block_dims",
        unit="ranks",
    )
    conv_block_alphas: list[float] | None = param(
        None,
        description="Alpha of the convolution adapters per UNet block (empty: conv_alpha everywhere).",
        group="network",
        advanced=True,
        families=UNET_FAMILIES,
        kohya="network_args.conv_block_alphas",
    )
    block_lr_weights: list[float] | None = param(
        None,
        description="Learning-rate multiplier per UNet block, in the order of block_dims (sd-scripts' "
        "down_lr_weight + mid_lr_weight + up_lr_weight); 0 leaves a block out.",
        group="network",
        advanced=True,
        families=UNET_FAMILIES,
        kohya="network_args.down_lr_weight/mid_lr_weight/up_lr_weight",
    )
    weights: str | None = param(
        None,
        description="A kohya-format LoRA (.safetensors) whose weights the adapter starts from instead of a fresh "
        "init, to continue training it (the optimizer and schedule start anew; training.resume continues a "
        "whole run). It must be a LoRA of model.family with the same kind, dim, alpha and modules as this "
        "network section (the pre-flight says which setting differs).",
        group="network",
        advanced=True,
        kohya="network_weights",
        path=True,
        example="./output/my-lora.safetensors",
    )

    @field_validator("block_dims", "conv_block_dims")
    @classmethod
    def _block_ranks(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and any(not 0 <= d <= 1024 for d in v):
            raise ValueError("every rank must be between 0 (leave the block out) and 1024")
        return v

    @field_validator("block_alphas", "conv_block_alphas")
    @classmethod
    def _block_alphas(cls, v: list[float] | None) -> list[float] | None:
        if v is not None and any(not a > 0 for a in v):
            raise ValueError("every alpha must be above 0")
        return v

    @field_validator("block_lr_weights")
    @classmethod
    def _block_lr_weights(cls, v: list[float] | None) -> list[float] | None:
        if v is not None and any(not 0 <= w <= 100 for w in v):
            raise ValueError("every learning-rate weight must be between 0 (leave the block out) and 100")
        return v

    @field_validator("target_modules")
    @classmethod
    def _nonempty(cls, v: list[str]) -> list[str]:
        if not v or any(not m.strip() for m in v):
            raise ValueError('must list at least one module name, e.g. ["to_q", "to_k", "to_v", "to_out.0"]')
        return v


class OptimizerSection(_Section):
    type: OptimizerKind = param(
        OptimizerKind.ADAMW,
        description="Optimizer: adamw; adamw8bit and lion8bit (8-bit state, bitsandbytes); lion; prodigy (finds its "
        "own step size: a learning rate of about 1.0); came; adafactor; adamw_schedulefree (needs a constant "
        "schedule); custom (optimizer.class_path).",
        group="optimizer",
        kohya="optimizer_type",
    )
    class_path: str | None = param(
        None,
        description="With type = custom: the optimizer class as a dotted path, like sd-scripts' optimizer_type; it "
        "gets the learning rate and optimizer.args only.",
        group="optimizer",
        advanced=True,
        kohya="optimizer_type",
        example="pytorch_optimizer.CAME",
    )
    learning_rate: float = param(
        1e-4,
        description="Learning rate of the adapter weights (Prodigy: a multiplier of its own estimate, usually 1.0).",
        group="optimizer",
        kohya="learning_rate",
        gt=0,
        le=10.0,
        example="1e-4",
    )
    weight_decay: float = param(
        0.01,
        description="Weight decay (decoupled in the AdamW family, Lion and Prodigy); custom optimizers take it "
        "only through optimizer.args.",
        group="optimizer",
        advanced=True,
        ge=0.0,
        le=1.0,
    )
    betas: tuple[float, float] = param(
        (0.9, 0.999),
        description="(beta1, beta2) of adamw, adamw8bit, prodigy and adamw_schedulefree; lion and lion8bit take "
        "them only when changed from this default (their own is 0.9, 0.99).",
        group="optimizer",
        advanced=True,
    )
    eps: float = param(
        1e-8,
        description="Epsilon of adamw, adamw8bit, prodigy and adamw_schedulefree.",
        group="optimizer",
        advanced=True,
        gt=0,
    )
    args: dict[str, ScalarArg] = param(
        default_factory=dict,
        description="Extra keyword arguments for the optimizer, e.g. {d_coef = 2, use_bias_correction = true}; "
        "they override the fields above. Strings are read as Python literals, as sd-scripts reads optimizer_args "
        '(betas = "0.9,0.999,0.9999" is a tuple).',
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
        description="Learning-rate schedule after the warmup: constant, constant_with_warmup, linear, cosine, "
        "cosine_with_restarts, polynomial, or rex (decays like linear but stays higher for longer).",
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
    min_lr_ratio: float = param(
        0.0,
        description="Floor of the decaying schedules (linear, cosine, cosine_with_restarts, polynomial, rex) as a "
        "fraction of each learning rate: they end at the learning rate × this instead of 0.",
        group="scheduler",
        advanced=True,
        kohya="lr_scheduler_min_lr_ratio",
        ge=0.0,
        le=1.0,
        example="0.1",
    )


class TrainingSection(_Section):
    max_steps: int = param(
        1000,
        description="Optimizer steps to train (0: training.max_epochs decides instead).",
        group="training",
        kohya="max_train_steps",
        unit="steps",
        ge=0,
        example="1000",
    )
    max_epochs: int = param(
        0,
        description="Passes over the data to train instead of a step count (0: training.max_steps decides). "
        "Exactly one of the two is set; the steps follow from the data, batch and accumulation.",
        group="training",
        kohya="max_train_epochs",
        unit="epochs",
        ge=0,
        example="10",
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
    full_bf16: bool = param(
        False,
        description="Keep the LoRA weights, their gradients and the optimizer state in bf16 too, not only the "
        "frozen model (with mixed_precision = bf16): less VRAM, a little less precise.",
        group="training",
        advanced=True,
        kohya="full_bf16",
    )
    gradient_checkpointing: bool = param(
        False,
        description="Recompute activations in the backward pass: less VRAM, about 20% slower.",
        group="training",
        kohya="gradient_checkpointing",
    )
    cache_latents: bool = param(
        False,
        description="Encode every image with the VAE once before training and keep the latents in memory "
        "(faster steps; not with dataset.random_crop or dataset.color_aug; flip_aug caches both sides).",
        group="training",
        kohya="cache_latents",
    )
    cache_latents_to_disk: bool = param(
        False,
        description="Cache the latents on disk too (in Nyx's cache folder), reused by later runs while the "
        "image, its size and crop, and the VAE are unchanged. Implies cache_latents.",
        group="training",
        kohya="cache_latents_to_disk",
    )
    vae_batch_size: int = param(
        1,
        description="Images the VAE encodes at once while caching latents.",
        group="training",
        advanced=True,
        kohya="vae_batch_size",
        ge=1,
        le=256,
    )
    cache_text_encoder_outputs: bool = param(
        False,
        description="Encode every caption once before training and keep the text encoders' outputs in memory "
        "(not with caption shuffling or dropout, or network.train_text_encoder).",
        group="training",
        advanced=True,
        kohya="cache_text_encoder_outputs",
    )
    cache_text_encoder_outputs_to_disk: bool = param(
        False,
        description="Cache the text encoders' outputs on disk too (reused by later runs with the same captions and "
        "encoders); with a flow model the encoders are then unloaded before training. Implies "
        "cache_text_encoder_outputs.",
        group="training",
        advanced=True,
        kohya="cache_text_encoder_outputs_to_disk",
    )
    cpu_offload_checkpointing: bool = param(
        False,
        description="With gradient_checkpointing: keep the activations saved for the backward pass in CPU memory "
        "(less VRAM, slower). Not together with flow.blocks_to_swap.",
        group="training",
        advanced=True,
        families=FLOW_FAMILIES,
        kohya="cpu_offload_checkpointing",
    )
    base_quantization: BaseQuantization = param(
        BaseQuantization.NONE,
        description="Storage of the frozen base transformer's block layers: none, fp8 (half of bf16, upcast for "
        "compute; sd-scripts' fp8_base), int8 (Nyx's per-row scaled int8; no sd-scripts equivalent) or nf4 "
        "(bitsandbytes 4-bit; no sd-scripts equivalent). DoRA needs none or nf4.",
        group="training",
        families=FLOW_FAMILIES,
        kohya="fp8_base",
    )
    prior_loss_weight: float = param(
        1.0,
        description="Loss weight of the regularization images (subsets with is_reg).",
        group="training",
        advanced=True,
        kohya="prior_loss_weight",
        ge=0.0,
        le=100.0,
    )
    masked_loss: bool = param(
        False,
        description="Weight each pixel's loss by the image's alpha channel (transparent parts are not "
        "learned; images without alpha count fully).",
        group="training",
        advanced=True,
        kohya="masked_loss",
    )
    resume: str | None = param(
        None,
        description="A training-state folder (`<name>-state/`) saved by an earlier run: continue it exactly "
        "(weights, optimizer, schedule, data order and noise) from the step it was saved at.",
        group="training",
        kohya="resume",
        path=True,
        example="./output/mychar-state",
    )
    validate_every_n_steps: int = param(
        0,
        description="Compute the validation loss on the held-out images (dataset.validation_split) every N "
        "steps, with the same noise each time (0: at the start and the end only).",
        group="training",
        kohya="validate_every_n_steps",
        unit="steps",
        ge=0,
    )
    ema_decay: float = param(
        0.0,
        description="Keep an exponential moving average of the LoRA weights with this decay (e.g. 0.999; 0: off). "
        "The saved LoRA then holds the averaged weights.",
        group="training",
        advanced=True,
        ge=0.0,
        lt=1.0,
    )
    num_processes: int = param(
        1,
        description="GPUs to train on together (data parallel, one process each, through `accelerate launch`); "
        "the batch size is per GPU.",
        group="training",
        advanced=True,
        unit="GPUs",
        ge=1,
        le=64,
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
    noise_offset_random_strength: bool = param(
        False,
        description="Draw the noise offset's strength uniformly between 0 and training.noise_offset each step.",
        group="training",
        advanced=True,
        families=UNET_FAMILIES,
        kohya="noise_offset_random_strength",
    )
    adaptive_noise_scale: float = param(
        0.0,
        description="Add this times each latent channel's absolute mean to the noise offset (needs "
        "training.noise_offset; 0: off). Around a tenth of noise_offset is typical.",
        group="training",
        advanced=True,
        families=UNET_FAMILIES,
        kohya="adaptive_noise_scale",
        ge=-1.0,
        le=1.0,
    )
    multires_noise_iterations: int = param(
        0,
        description="Multi-resolution (pyramid) noise: add this many levels of coarser noise (6–10 is usual; 0: off).",
        group="training",
        advanced=True,
        families=UNET_FAMILIES,
        kohya="multires_noise_iterations",
        ge=0,
        le=32,
    )
    multires_noise_discount: float = param(
        0.3,
        description="Weight of each coarser level of multi-resolution noise relative to the one before "
        "(with training.multires_noise_iterations).",
        group="training",
        advanced=True,
        families=UNET_FAMILIES,
        kohya="multires_noise_discount",
        gt=0.0,
        le=1.0,
    )
    ip_noise_gamma: float = param(
        0.0,
        description="Input-perturbation noise: extra noise of this strength in the noised input (not in the "
        "target); 0.1 is usual (0: off).",
        group="training",
        advanced=True,
        families=UNET_FAMILIES,
        kohya="ip_noise_gamma",
        ge=0.0,
        le=1.0,
    )
    ip_noise_gamma_random_strength: bool = param(
        False,
        description="Draw the input-perturbation strength uniformly between 0 and training.ip_noise_gamma each step.",
        group="training",
        advanced=True,
        families=UNET_FAMILIES,
        kohya="ip_noise_gamma_random_strength",
    )
    min_timestep: int = param(
        0,
        description="Lowest timestep trained on (0: the start of the schedule).",
        group="training",
        advanced=True,
        families=UNET_FAMILIES,
        kohya="min_timestep",
        ge=0,
        le=1000,
    )
    max_timestep: int = param(
        1000,
        description="Timesteps are drawn below this one (exclusive, as in sd-scripts; 1000: the whole schedule).",
        group="training",
        advanced=True,
        families=UNET_FAMILIES,
        kohya="max_timestep",
        ge=1,
        le=1000,
    )
    loss_type: LossType = param(
        LossType.L2,
        description="Loss between prediction and target: l2 (MSE), l1, huber or smooth_l1 (Huber-like, less "
        "sensitive to outliers; their threshold follows training.huber_schedule).",
        group="training",
        advanced=True,
        kohya="loss_type",
    )
    huber_schedule: HuberSchedule = param(
        HuberSchedule.SNR,
        description="How the Huber threshold changes with the timestep: constant (huber_c), exponential (from 1 "
        "down to huber_c) or snr (from the noise level). With loss_type huber or smooth_l1.",
        group="training",
        advanced=True,
        kohya="huber_schedule",
    )
    huber_c: float = param(
        0.1,
        description="Huber threshold (constant), or its lowest value (exponential, snr).",
        group="training",
        advanced=True,
        kohya="huber_c",
        gt=0.0,
        le=1.0,
    )
    huber_scale: float = param(
        1.0,
        description="Multiplies the Huber threshold of the constant and exponential schedules.",
        group="training",
        advanced=True,
        kohya="huber_scale",
        gt=0.0,
        le=100.0,
    )
    min_snr_gamma: float = param(
        0.0,
        description="Min-SNR weighting: cap each timestep's weight at this signal-to-noise ratio (5 is the "
        "paper's choice; 0: off). Steadies training by not over-weighting the low-noise timesteps.",
        group="training",
        advanced=True,
        families=UNET_FAMILIES,
        kohya="min_snr_gamma",
        ge=0.0,
        le=100.0,
    )
    debiased_estimation_loss: bool = param(
        False,
        description="Weight each timestep's loss by 1/sqrt(SNR) (v-prediction: 1/(SNR+1)), the debiased "
        "estimation of Yu et al.",
        group="training",
        advanced=True,
        families=UNET_FAMILIES,
        kohya="debiased_estimation_loss",
    )
    zero_terminal_snr: bool = param(
        False,
        description="Rescale the noise schedule so the last timestep is pure noise (zero terminal SNR); for "
        "v-prediction models. Samples use the rescaled schedule with trailing timesteps.",
        group="training",
        advanced=True,
        families=UNET_FAMILIES,
        kohya="zero_terminal_snr",
    )
    scale_v_pred_loss_like_noise_pred: bool = param(
        False,
        description="Scale a v-prediction model's loss by SNR/(SNR+1), so each timestep weighs as in noise "
        "prediction (v-prediction models only).",
        group="training",
        advanced=True,
        families=UNET_FAMILIES,
        kohya="scale_v_pred_loss_like_noise_pred",
    )
    v_pred_like_loss: float = param(
        0.0,
        description="Add a v-prediction-like loss of this weight to a noise-prediction model's loss (0: off; "
        "epsilon models only).",
        group="training",
        advanced=True,
        families=UNET_FAMILIES,
        kohya="v_pred_like_loss",
        ge=0.0,
        le=10.0,
    )


class FlowSection(_Section):
    timestep_sampling: TimestepSampling = param(
        TimestepSampling.SIGMA,
        description="How training timesteps are drawn for flow-matching models: sigma (from the scheduler's "
        "sigmas, with weighting_scheme), uniform, sigmoid (of a normal draw times sigmoid_scale), shift "
        "(sigmoid, then shifted by discrete_flow_shift) or flux_shift (shifted by the image's size, as Flux "
        "inference does).",
        group="flow",
        families=FLOW_FAMILIES,
        kohya="timestep_sampling",
    )
    sigmoid_scale: float = param(
        1.0,
        description="Scale of the normal draw before the sigmoid (timestep_sampling sigmoid, shift, flux_shift).",
        group="flow",
        advanced=True,
        families=FLOW_FAMILIES,
        kohya="sigmoid_scale",
        gt=0,
    )
    discrete_flow_shift: float = param(
        3.0,
        description="Shift of the flow-matching schedule (with timestep_sampling = shift; SD3 with sigma).",
        group="flow",
        families=FLOW_FAMILIES,
        kohya="discrete_flow_shift",
        gt=0,
    )
    model_prediction_type: ModelPredictionType = param(
        ModelPredictionType.SIGMA_SCALED,
        description="Flux: how the output becomes the prediction: raw, additive (plus the noisy input) or "
        "sigma_scaled (output·(−σ) + noisy input, then weighted by the scheme).",
        group="flow",
        advanced=True,
        families=(Family.FLUX,),
        kohya="model_prediction_type",
    )
    weighting_scheme: WeightingScheme = param(
        WeightingScheme.UNIFORM,
        description="Weighting of timesteps/loss: none or uniform, sigma_sqrt, logit_normal (logit_mean, "
        "logit_std), mode (mode_scale) or cosmap.",
        group="flow",
        advanced=True,
        families=FLOW_FAMILIES,
        kohya="weighting_scheme",
    )
    logit_mean: float = param(
        0.0,
        description="Mean of the logit-normal timestep density (weighting_scheme = logit_normal).",
        group="flow",
        advanced=True,
        families=FLOW_FAMILIES,
        kohya="logit_mean",
    )
    logit_std: float = param(
        1.0,
        description="Standard deviation of the logit-normal timestep density.",
        group="flow",
        advanced=True,
        families=FLOW_FAMILIES,
        kohya="logit_std",
        gt=0,
    )
    mode_scale: float = param(
        1.29,
        description="Scale of the mode timestep density (weighting_scheme = mode).",
        group="flow",
        advanced=True,
        families=FLOW_FAMILIES,
        kohya="mode_scale",
    )
    guidance_scale: float = param(
        1.0,
        description="Guidance value fed to guidance-distilled Flux models (dev) during training; schnell has none.",
        group="flow",
        families=(Family.FLUX,),
        kohya="guidance_scale",
        ge=0,
    )
    t5_max_token_length: int | None = param(
        None,
        description="T5 tokens per caption. Empty: the detected model's (Flux dev 512, schnell 256, SD3 256).",
        group="flow",
        advanced=True,
        families=FLOW_FAMILIES,
        kohya="t5xxl_max_token_length",
        ge=1,
        le=512,
        unit="tokens",
    )
    apply_t5_attn_mask: bool = param(
        False,
        description="Mask T5's padding tokens in the encoder and in the transformer's attention.",
        group="flow",
        advanced=True,
        families=FLOW_FAMILIES,
        kohya="apply_t5_attn_mask",
    )
    apply_lg_attn_mask: bool = param(
        False,
        description="SD3: mask the CLIP-L/G padding tokens (their outputs at padding positions are zeroed).",
        group="flow",
        advanced=True,
        families=(Family.SD3,),
        kohya="apply_lg_attn_mask",
    )
    training_shift: float = param(
        1.0,
        description="SD3: shift applied to the sampled timesteps during training (sd-scripts' training_shift).",
        group="flow",
        advanced=True,
        families=(Family.SD3,),
        kohya="training_shift",
        gt=0,
    )
    clip_l_dropout_rate: float = param(
        0.0,
        description="SD3: probability of dropping the CLIP-L conditioning of a caption (zeros instead).",
        group="flow",
        advanced=True,
        families=(Family.SD3,),
        kohya="clip_l_dropout_rate",
        ge=0,
        le=1,
    )
    clip_g_dropout_rate: float = param(
        0.0,
        description="SD3: probability of dropping the CLIP-G conditioning of a caption.",
        group="flow",
        advanced=True,
        families=(Family.SD3,),
        kohya="clip_g_dropout_rate",
        ge=0,
        le=1,
    )
    t5_dropout_rate: float = param(
        0.0,
        description="SD3: probability of dropping the T5 conditioning of a caption.",
        group="flow",
        advanced=True,
        families=(Family.SD3,),
        kohya="t5_dropout_rate",
        ge=0,
        le=1,
    )
    train_blocks: TrainBlocks = param(
        TrainBlocks.ALL,
        description="Flux: put adapters on all blocks, only the double (joint) blocks, or only the single blocks.",
        group="flow",
        families=(Family.FLUX,),
        kohya="network_args.train_blocks",
    )
    double_block_indices: list[int] | None = param(
        None,
        description="Flux: only these double blocks (0-based, e.g. [0, 1, 7]); SD3: only these joint blocks. "
        "Empty: every block train_blocks allows.",
        group="flow",
        advanced=True,
        families=FLOW_FAMILIES,
        kohya="network_args.train_double_block_indices",
    )
    single_block_indices: list[int] | None = param(
        None,
        description="Flux: only these single blocks (0-based). Empty: every block train_blocks allows.",
        group="flow",
        advanced=True,
        families=(Family.FLUX,),
        kohya="network_args.train_single_block_indices",
    )
    block_type_dims: dict[str, int] | None = param(
        None,
        description="Flux: rank per module type, overriding network.dim: keys img_attn, txt_attn, img_mlp, txt_mlp, "
        "img_mod, txt_mod, single, single_mod; 0 leaves that type out (sd-scripts' img_attn_dim … single_mod_dim).",
        group="flow",
        advanced=True,
        families=(Family.FLUX,),
        kohya="network_args.type_dims",
    )
    split_qkv: bool = param(
        False,
        description="Separate adapters for q, k and v (Flux single blocks: and the MLP input) instead of one "
        "rank-dim adapter on the fused projection (sd-scripts' split_qkv); the file keeps the fused names, with "
        "the downs stacked and the ups block-diagonal.",
        group="flow",
        advanced=True,
        families=FLOW_FAMILIES,
        kohya="network_args.split_qkv",
    )
    blocks_to_swap: int = param(
        0,
        description="Keep transformer blocks in CPU memory and move each to the GPU only for its forward and "
        "backward (less VRAM, slower). Counted as sd-scripts does: for Flux n//2 double blocks and "
        "2·(n − n//2) single blocks (a single block is half a double one), so 38 swaps every block but the "
        "first; SD3: n joint blocks. Not with training.cpu_offload_checkpointing.",
        group="flow",
        families=FLOW_FAMILIES,
        kohya="blocks_to_swap",
        ge=0,
        le=38,
        unit="blocks",
    )
    t5_on_cpu: bool = param(
        False,
        description="Run T5-XXL on the CPU (it encodes each caption once with cached outputs): about 9 GB of VRAM "
        "less for a slower start.",
        group="flow",
        advanced=True,
        families=FLOW_FAMILIES,
        kohya="t5xxl_device",
    )

    @field_validator("block_type_dims")
    @classmethod
    def _type_dims(cls, value: dict[str, int] | None) -> dict[str, int] | None:
        if value is None:
            return value
        unknown = sorted(set(value) - set(FLUX_TYPE_DIMS))
        if unknown:
            raise ValueError(
                f"flow.block_type_dims has unknown key(s) {', '.join(unknown)}; "
                f"the keys are {', '.join(FLUX_TYPE_DIMS)}"
            )
        negative = [k for k, v in value.items() if v < 0]
        if negative:
            raise ValueError(f"flow.block_type_dims: {', '.join(negative)} must be 0 (left out) or a rank above 0")
        return value

    @field_validator("double_block_indices", "single_block_indices")
    @classmethod
    def _indices(cls, value: list[int] | None) -> list[int] | None:
        if value is not None and any(i < 0 for i in value):
            raise ValueError("block indices are 0-based and not negative, e.g. [0, 1, 2]")
        return value


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
    every_n_epochs: int = param(
        0,
        description="Also save a LoRA at the end of every N-th epoch (0: never).",
        group="saving",
        kohya="save_every_n_epochs",
        unit="epochs",
        ge=0,
    )
    keep_last_n: int = param(
        0,
        description="Keep only the last N of the LoRAs (and states) saved every N steps/epochs, deleting older "
        "ones (0: keep all). The final LoRA and the ones asked for with save_now are never deleted.",
        group="saving",
        advanced=True,
        kohya="save_last_n_epochs",
        unit="files",
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
    lora_format: LoraFormat = param(
        LoraFormat.KOHYA,
        description="Flux/SD3 file layout: kohya (sd-scripts' names, fused q/k/v: what ComfyUI, Forge and sd-scripts "
        "load) or diffusers (peft keys `transformer.…lora_A.weight`, for diffusers' load_lora_weights).",
        group="saving",
        advanced=True,
        families=FLOW_FAMILIES,
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
        if not v or v in (".", "..") or any(c in v for c in "/\\\0") or len(v) > 200:
            raise ValueError('must be a plain file name without slashes, such as "mychar"')
        return v


class SamplingSection(_Section):
    prompts: list[str] = param(
        default_factory=list,
        description="Prompts rendered as sample images during training, one image each, in sd-scripts' syntax: "
        '"a photo of mychar --n blurry --w 512 --h 768 --s 28 --l 7.5 --d 42 --ss euler_a" (negative prompt, '
        "width, height, steps, CFG scale, seed, sampler; all optional). Defaults: the training resolution, 30 "
        "steps, scale 7.5, seed training.seed + the prompt's index, sampling.sampler.",
        group="sampling",
        kohya="sample_prompts",
        example='["a photo of mychar --w 512 --h 512 --d 1"]',
    )
    every_n_steps: int = param(
        0,
        description="Render samples every N steps (0: never).",
        group="sampling",
        kohya="sample_every_n_steps",
        unit="steps",
        ge=0,
    )
    every_n_epochs: int = param(
        0,
        description="Render samples at the end of every N-th epoch (0: never). Like sd-scripts, when set it "
        "replaces sampling.every_n_steps.",
        group="sampling",
        advanced=True,
        kohya="sample_every_n_epochs",
        unit="epochs",
        ge=0,
    )
    sample_at_first: bool = param(
        False,
        description="Also render samples before the first step (what the base model makes of the prompts).",
        group="sampling",
        kohya="sample_at_first",
    )
    sampler: Sampler = param(
        Sampler.DDIM,
        description="Sampler (diffusers scheduler) for the samples, by sd-scripts' names; a prompt's --ss "
        "overrides it.",
        group="sampling",
        advanced=True,
        kohya="sample_sampler",
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


class QualitySection(_Section):
    """The automatic checks of a native run (`trainers/native/quality.py`, docs/quality.md). Nyx-only: the kohya
    backends run without them (a changed value exports with a warning saying so)."""

    divergence_check: bool = param(
        True,
        description="Stop the run early when the loss diverges: NaN/inf, or the smoothed loss above "
        "quality.explosion_factor × its best smoothed value for quality.patience_steps steps in a row (after "
        "quality.warmup_steps). Checkpoints saved before the loss went up are kept; the job fails with a hint "
        "(a lower learning rate, or `nyx lr-find`). A NaN/inf loss stops the run even when this is off.",
        group="quality",
    )
    explosion_factor: float = param(
        5.0,
        description="How many times its best smoothed value the smoothed loss may reach before it counts as exploding.",
        group="quality",
        advanced=True,
        unit="×",
        gt=1.0,
    )
    smoothing_steps: int = param(
        20,
        description="Span of the exponential moving average that smooths the training loss for the quality "
        "checks and the run report (diffusion losses jump from step to step with the timestep).",
        group="quality",
        advanced=True,
        unit="steps",
        ge=1,
    )
    warmup_steps: int = param(
        50,
        description="Steps before the explosion check starts: the best smoothed loss is only taken from here on "
        "(NaN/inf stops the run at any step).",
        group="quality",
        advanced=True,
        unit="steps",
        ge=0,
    )
    patience_steps: int = param(
        20,
        description="Steps in a row the smoothed loss must stay above the explosion threshold before the run "
        "stops (a short spike is forgiven).",
        group="quality",
        advanced=True,
        unit="steps",
        ge=1,
    )
    overfit_check: bool = param(
        True,
        description="Flag overfitting: the validation loss (dataset.validation_split) rose at "
        "quality.overfit_patience validations in a row while the smoothed training loss fell. Flagged as a "
        "warning and in the run report, not stopped, unless quality.stop_on_overfit.",
        group="quality",
    )
    overfit_patience: int = param(
        3,
        description="Validations in a row at which the validation loss rose before overfitting is flagged.",
        group="quality",
        advanced=True,
        unit="validations",
        ge=1,
    )
    stop_on_overfit: bool = param(
        False,
        description="Stop the run (saving it, as a stop does) when overfitting is flagged; the run report names "
        "the checkpoint to keep.",
        group="quality",
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
    quality: QualitySection = QualitySection()
    backend: BackendSection = BackendSection()

    @model_validator(mode="after")
    def _family_defaults(self) -> TrainingConfig:
        """Settings left out follow the family: dataset.resolution is the family's native one (SDXL 1024) unless
        the config sets it. It stays "not set" (model_fields_set), so changing the family changes it again;
        a saved config writes it out, and loads back the same."""
        if "resolution" not in self.dataset.model_fields_set:
            native = FAMILY_DEFAULTS[self.model.family].resolution
            if self.dataset.resolution != native:
                dataset = self.dataset.model_copy(update={"resolution": native})
                dataset.__pydantic_fields_set__.discard("resolution")
                object.__setattr__(self, "dataset", dataset)  # not self.dataset = …: that would validate again
        return self

    @model_validator(mode="after")
    def _network_blocks(self) -> TrainingConfig:
        """Block-wise lists have one number per UNet block of the family (sd-scripts' numbering)."""
        count = UNET_BLOCK_COUNTS.get(self.model.family)
        for name in BLOCK_FIELDS:
            values = getattr(self.network, name)
            if values is None:
                continue
            if count is None:
                raise ValueError(
                    f"network.{name} is for the UNet families (sd15, sd2, sdxl), not {self.model.family.value}; "
                    f"remove network.{name}"
                )
            if len(values) != count:
                order = "12 in, 1 mid, 12 out" if count == 25 else "embedding, 9 in, 3 mid, 9 out, out"
                raise ValueError(
                    f"network.{name} has {len(values)} numbers; {self.model.family.value} has {count} UNet blocks "
                    f"(sd-scripts' order: {order}), so give {count} numbers"
                )
        return self

    @model_validator(mode="after")
    def _cross_field(self) -> TrainingConfig:
        tr = self.training
        if bool(tr.max_steps) == bool(tr.max_epochs):
            fix = (
                f"set max_steps = 0 to train {tr.max_epochs} epochs, or max_epochs = 0 to train {tr.max_steps} steps"
                if tr.max_steps
                else "set one of them, e.g. max_steps = 1000"
            )
            raise ValueError(f"training.max_steps and training.max_epochs: exactly one decides the run's length; {fix}")
        if tr.validate_every_n_steps and not self.dataset.validation_split:
            raise ValueError(
                "training.validate_every_n_steps needs held-out images: set dataset.validation_split, e.g. to 0.1"
            )
        if self.training.max_steps and self.scheduler.warmup_steps >= self.training.max_steps:
            raise ValueError(
                f"scheduler.warmup_steps ({self.scheduler.warmup_steps}) must be below training.max_steps "
                f"({self.training.max_steps}); lower the warmup, e.g. to {self.training.max_steps // 10}"
            )
        if tr.cpu_offload_checkpointing and not tr.gradient_checkpointing:
            raise ValueError(
                "training.cpu_offload_checkpointing offloads what gradient checkpointing keeps: set "
                "training.gradient_checkpointing = true, or cpu_offload_checkpointing = false"
            )
        if tr.cpu_offload_checkpointing and self.flow.blocks_to_swap:
            raise ValueError(
                "training.cpu_offload_checkpointing and flow.blocks_to_swap do not work together (as in sd-scripts); "
                "keep blocks_to_swap (it saves more) and set cpu_offload_checkpointing = false"
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
