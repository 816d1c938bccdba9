"""The base model: loading SD1.5, SD2.x and SDXL, encoding captions, and the denoiser's prediction.

**Where a model comes from** (`load_model`): a diffusers folder; a Hugging Face repo id, read from the local
hub cache only (training never downloads: a repo that is not cached is an error that says how to fetch
it); or a single-file checkpoint in the original (LDM/SGM) layout. A `.safetensors` file is converted by
diffusers' `from_single_file`, which needs the diffusers configs and tokenizers of the model's family —
small JSON/text files that are not in the checkpoint. They come from `model.single_file_config` (a folder
or a cached repo id), else from the family's reference repo in the hub cache; without either the error
names the exact download. `.ckpt`/`.pt` files are pickles: they are only ever read with
`torch.load(weights_only=True)`, which refuses anything but tensors. `model.vae` replaces the model's VAE
(a folder, a cached repo id or a single file).

Components are loaded one by one (not through a pipeline) so nothing the training does not need (safety
checker, feature extractor) is touched, and the noise scheduler is always a `DDPMScheduler` built from the
model's scheduler config, whatever sampler class it names: training adds noise with the DDPM formulation
and only its betas and prediction type matter. SD2-768 models say `prediction_type = "v_prediction"`
there, which makes the loss target the velocity (`losses.training_loss`).

**Text** (`encode_text`), as sd-scripts and diffusers' pipelines do it:
- SD1.5 and SD2: the text encoder's last hidden state (diffusers' SD2 encoder already stops at OpenCLIP's
  penultimate layer: it was converted with 23 of its 24 layers).
- SDXL: the penultimate hidden states of both encoders, concatenated on the feature axis, and the pooled,
  projected output of the second encoder (`Conditioning.pooled`).
- `dataset.max_token_length` 150 or 225: sd-scripts' chunking. The caption is tokenized to that many tokens,
  cut into 75-token windows that each get BOS and EOS (for tokenizers that pad with something else than
  EOS — SD2's and SDXL's second — a window that ends inside the text ends in EOS, and one that starts in
  padding starts with EOS), every window is encoded on its own, and the states are joined as
  `BOS, the 75 states inside each window, the last window's final state`: 2 + 75·n positions (152 or
  227). The pooled output comes from the first window.
No `torch.no_grad()` here: with text-encoder adapters the gradient flows through; the caller decides.

**SDXL's size conditioning** (`predict`): six time ids per image — original size (h, w), crop top-left
(top, left), target size (h, w) — from the batch (`original_sizes`, `crop_top_lefts`, `target_sizes`),
defaulting to the latent size in pixels and no crop.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import diffusers
import torch
import transformers
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from peft import LoraConfig
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from nyx_tui.config.fields import Family
from nyx_tui.config.io import looks_like_repo_id
from nyx_tui.config.model import ModelSection, NetworkSection

TOKENS_PER_WINDOW = 75  # CLIP's 77 positions less BOS and EOS
NATIVE_FAMILIES = (Family.SD15, Family.SD2, Family.SDXL)
# the diffusers repos whose configs and tokenizers describe a family's single-file checkpoints
REFERENCE_REPOS: dict[Family, str] = {
    Family.SD15: "stable-diffusion-v1-5/stable-diffusion-v1-5",
    Family.SD2: "stabilityai/stable-diffusion-2-1",
    Family.SDXL: "stabilityai/stable-diffusion-xl-base-1.0",
}
SAFETENSORS = ".safetensors"
PICKLES = (".ckpt", ".pt", ".pth", ".bin")
CONFIG_PATTERNS = ["*.json", "*.txt", "*.model"]  # configs, tokenizer vocab/merges: no weights
ACCEPTS = {  # what each path field takes, for the error when it points nowhere
    "model.pretrained": "it takes a diffusers model folder (with model_index.json), a .safetensors checkpoint "
    "(or a .ckpt, read weights-only), or a Hugging Face repo id (owner/name) in the local cache",
    "model.vae": "it takes a VAE folder (config.json), a model folder (vae/), a VAE file, or a cached repo id",
    "model.single_file_config": "it takes a diffusers model folder (model_index.json and its component configs) "
    "or a cached repo id",
}


class ModelLoadError(RuntimeError):
    """A model that cannot be loaded, with what to do about it in the message."""


@dataclass
class SDModel:
    """The parts of a loaded model. Typed `Any`: diffusers' lazy-import modules hide their classes'
    methods from type checkers (they would all read as errors). SDXL has a second tokenizer and text
    encoder (`text_encoder_2`, a `CLIPTextModelWithProjection`); the others leave them None."""

    tokenizer: Any
    text_encoder: Any
    vae: Any
    unet: Any
    noise_scheduler: Any
    family: Family = Family.SD15
    tokenizer_2: Any = None
    text_encoder_2: Any = None
    max_token_length: int = TOKENS_PER_WINDOW  # caption tokens without BOS/EOS: 75, 150 or 225
    source: dict[str, str] = field(default_factory=dict)  # where each part came from, for the log

    @property
    def prediction_type(self) -> str:
        return str(self.noise_scheduler.config.get("prediction_type", "epsilon"))

    @property
    def text_encoders(self) -> list[Any]:
        return [e for e in (self.text_encoder, self.text_encoder_2) if e is not None]

    @property
    def parts(self) -> list[Any]:
        """Every network of the model: text encoder(s), VAE, UNet."""
        return [*self.text_encoders, self.vae, self.unet]

    @property
    def vae_scale_factor(self) -> int:
        return int(2 ** (len(self.vae.config.block_out_channels) - 1))


@dataclass
class Conditioning:
    """What the denoiser is conditioned on for one batch: the text encoders' hidden states, and for
    families that use them (SDXL) the pooled text embedding."""

    hidden: torch.Tensor
    pooled: torch.Tensor | None = None


# ------------------------------------------------------------------------------------------ loading


def load_model(cfg: ModelSection, max_token_length: int = TOKENS_PER_WINDOW) -> SDModel:
    """The base model of `cfg`, whatever its family and form (folder, repo id, single file), with
    `model.vae` in place of its own VAE when set."""
    family = cfg.family
    if family not in NATIVE_FAMILIES:
        raise ModelLoadError(f"the native engine loads sd15, sd2 and sdxl models, not {family.value}")
    if max_token_length % TOKENS_PER_WINDOW or not 1 <= max_token_length // TOKENS_PER_WINDOW <= 3:
        raise ValueError(f"max_token_length must be 75, 150 or 225, not {max_token_length}")
    _quiet()
    source = resolve(cfg.pretrained, "model.pretrained")
    model = load_folder(source, family) if source.is_dir() else load_single_file(source, family, cfg.single_file_config)
    if cfg.vae:
        model.vae = load_vae(cfg.vae, model)
        model.source["vae"] = cfg.vae
    model.max_token_length = max_token_length
    return model


def describe(model: SDModel) -> str:
    """One log line: the family, where the parts came from, what the model predicts."""
    parts = [f"{model.family.value} model from {model.source.get('model', '?')}"]
    if "config" in model.source:
        parts.append(f"configs and tokenizers from {model.source['config']}")
    if "vae" in model.source:
        parts.append(f"VAE from {model.source['vae']}")
    parts.append(f"predicts {model.prediction_type}")
    if model.max_token_length != TOKENS_PER_WINDOW:
        parts.append(f"captions up to {model.max_token_length} tokens")
    return "; ".join(parts)


def load_sd15(pretrained: str | Path) -> SDModel:
    """An SD1.5 model from a diffusers folder (kept for callers that predate `load_model`)."""
    _quiet()
    return load_folder(resolve(str(pretrained), "model.pretrained"), Family.SD15)


def _quiet() -> None:
    transformers.utils.logging.disable_progress_bar()  # output.log is for the run, not loading bars
    diffusers.utils.logging.disable_progress_bar()


def resolve(value: str, field_name: str, patterns: list[str] | None = None) -> Path:
    """A local path for `value`: itself when it exists, else the snapshot of a repo id in the local
    Hugging Face cache (`patterns`: only these files need to be there)."""
    if not value:
        raise ModelLoadError(f"{field_name} is empty: set it to a diffusers folder, a checkpoint file or a repo id")
    path = Path(value).expanduser()
    if path.exists():
        return path
    if not looks_like_repo_id(value):
        raise ModelLoadError(f"{field_name} = {value!r}: no such file or folder; {ACCEPTS.get(field_name, '')}")
    return cached_repo(value, field_name, patterns)


def cached_repo(repo: str, field_name: str, patterns: list[str] | None = None) -> Path:
    """The folder of `repo` in the local Hugging Face cache; training never downloads."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo, local_files_only=True, allow_patterns=patterns))
    except LocalEntryNotFoundError as e:
        what = " (its configs and tokenizers: " + " ".join(repr(p) for p in patterns) + ")" if patterns else ""
        include = "".join(f" --include {p!r}" for p in patterns) if patterns else ""
        raise ModelLoadError(
            f"{field_name}: {repo} is no local path, and as a repo id it is not in the Hugging Face cache "
            f"({constants.HF_HUB_CACHE}); training never downloads. Download it first{what}: "
            f"`hf download {repo}{include}` (the huggingface_hub CLI; set HF_TOKEN for gated repos), or point "
            f"{field_name} at a local copy"
        ) from e


def load_folder(root: Path, family: Family) -> SDModel:
    """Tokenizer(s), text encoder(s), VAE, UNet and a DDPM noise scheduler from a diffusers folder."""
    if not (root / "model_index.json").is_file() and not (root / "unet").is_dir():
        raise ModelLoadError(
            f"{root} is not a diffusers model folder (no model_index.json); give a diffusers folder, a "
            ".safetensors checkpoint or a Hugging Face repo id as model.pretrained"
        )
    sdxl = family == Family.SDXL
    has_te2 = (root / "text_encoder_2").is_dir()
    if sdxl != has_te2:
        kind = "has a second text encoder (an SDXL model)" if has_te2 else "has no text_encoder_2 (not an SDXL model)"
        raise ModelLoadError(f"model.family is {family.value} but {root} {kind}; set model.family to match it")
    try:
        model = SDModel(
            tokenizer=CLIPTokenizer.from_pretrained(root, subfolder="tokenizer"),
            text_encoder=CLIPTextModel.from_pretrained(
                root, subfolder="text_encoder", **_variant(root, "text_encoder")
            ),
            vae=AutoencoderKL.from_pretrained(root, subfolder="vae", **_variant(root, "vae")),
            unet=UNet2DConditionModel.from_pretrained(root, subfolder="unet", **_variant(root, "unet")),
            noise_scheduler=ddpm_scheduler(DDPMScheduler.load_config(root, subfolder="scheduler")),
            family=family,
        )
        if sdxl:
            model.tokenizer_2 = CLIPTokenizer.from_pretrained(root, subfolder="tokenizer_2")
            model.text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(
                root, subfolder="text_encoder_2", **_variant(root, "text_encoder_2")
            )
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"could not load the model in {root}: {e}") from e
    model.source["model"] = str(root)
    return model


def _variant(root: Path, sub: str) -> dict[str, Any]:
    """`variant="fp16"` when a component folder has only fp16 weights (a common partial download)."""
    folder = root / sub
    full = [p for p in folder.glob("*.safetensors") if ".fp16." not in p.name] + list(folder.glob("*.bin"))
    return {"variant": "fp16"} if not full and any(folder.glob("*.fp16.safetensors")) else {}


def ddpm_scheduler(config: Any) -> Any:
    """A DDPM scheduler with the betas and prediction type of `config` (whatever sampler it was written for);
    keys DDPM does not take (an Euler config's sigmas options) are left out rather than warned about."""
    import inspect

    accepted = set(inspect.signature(DDPMScheduler.__init__).parameters)
    return DDPMScheduler.from_config({k: v for k, v in dict(config).items() if k in accepted or k.startswith("_")})


def single_file_config(family: Family, configured: str | None) -> Path:
    """The diffusers folder whose configs and tokenizers describe a single-file checkpoint of `family`."""
    if configured:
        return resolve(configured, "model.single_file_config", CONFIG_PATTERNS)
    from huggingface_hub import constants

    repo = REFERENCE_REPOS[family]
    try:
        return cached_repo(repo, "model.pretrained", CONFIG_PATTERNS)
    except ModelLoadError as e:
        raise ModelLoadError(
            f"a single-file {family.value} checkpoint holds weights only; loading it needs the diffusers configs and "
            f"tokenizers of its family, from {repo} (a few MB of JSON and text, no weights), which is not in the "
            f"Hugging Face cache ({constants.HF_HUB_CACHE}); training never downloads. Fetch them once: "
            f"`hf download {repo} --include '*.json' '*.txt'`, or set model.single_file_config to a diffusers folder "
            "of the same family"
        ) from e


def check_pickle(path: Path) -> None:
    """A `.ckpt`/`.pt` is only ever read with `torch.load(weights_only=True)`: tensors and plain containers,
    never objects whose unpickling runs code. Say so clearly when a file needs more (diffusers would
    report it as a missing file)."""
    try:
        try:
            torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            torch.load(path, map_location="cpu", weights_only=True)  # an old (non-zip) pickle cannot be mapped
    except Exception as e:
        raise ModelLoadError(
            f"{path} could not be read with torch.load(weights_only=True), the only way Nyx opens pickled "
            f"checkpoints (unrestricted unpickling can run code from the file): {type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}. Use a .safetensors version of the model, or convert "
            "this file with a tool you trust"
        ) from e


def load_single_file(path: Path, family: Family, configured_config: str | None = None) -> SDModel:
    """A single-file checkpoint (original LDM/SGM keys) through diffusers' `from_single_file`, configured
    from a local diffusers folder (see `single_file_config`), never the hub."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    suffix = path.suffix.lower()
    if suffix not in (SAFETENSORS, *PICKLES):
        raise ModelLoadError(f"{path}: a checkpoint must be .safetensors (or .ckpt/.pt, read weights-only)")
    if suffix in PICKLES:
        check_pickle(path)
    config = single_file_config(family, configured_config)
    pipeline_class: Any = StableDiffusionXLPipeline if family == Family.SDXL else StableDiffusionPipeline
    extra: dict[str, Any] = {} if family == Family.SDXL else {"safety_checker": None, "requires_safety_checker": False}
    try:
        pipe = pipeline_class.from_single_file(str(path), config=str(config), local_files_only=True, **extra)
    except Exception as e:
        raise ModelLoadError(
            f"could not load the {family.value} checkpoint {path} with the configs of {config}: "
            f"{type(e).__name__}: {e}. Is model.family right for it?"
        ) from e
    model = SDModel(
        tokenizer=pipe.tokenizer,
        text_encoder=pipe.text_encoder,
        vae=pipe.vae,
        unet=pipe.unet,
        noise_scheduler=ddpm_scheduler(pipe.scheduler.config),
        family=family,
        tokenizer_2=getattr(pipe, "tokenizer_2", None),
        text_encoder_2=getattr(pipe, "text_encoder_2", None),
        source={"model": str(path), "config": str(config)},
    )
    return model


def load_vae(value: str, model: SDModel) -> Any:
    """`model.vae`: a VAE folder (its own config.json, or a model folder's vae/), a cached repo id, or a single
    file (original or diffusers keys; its config is the base model's VAE config)."""
    path = resolve(value, "model.vae")
    try:
        if path.is_dir():
            sub = "vae" if (path / "vae" / "config.json").is_file() else None
            return AutoencoderKL.from_pretrained(path, subfolder=sub)
        if path.suffix.lower() in PICKLES:
            check_pickle(path)
        config_root = _vae_config_root(model)
        return AutoencoderKL.from_single_file(
            str(path), config=str(config_root), subfolder="vae", local_files_only=True
        )
    except ModelLoadError:
        raise
    except Exception as e:
        raise ModelLoadError(f"could not load model.vae = {value}: {type(e).__name__}: {e}") from e


def _vae_config_root(model: SDModel) -> Path:
    """A folder with `vae/config.json` describing the base model's VAE (for a single-file VAE)."""
    for key in ("config", "model"):
        root = Path(model.source.get(key, ""))
        if model.source.get(key) and (root / "vae" / "config.json").is_file():
            return root
    raise ModelLoadError(
        "a single-file model.vae needs a VAE config; none was found beside the base model: use a diffusers VAE "
        "folder or repo id instead"
    )


def place(model: SDModel, device: torch.device, dtype: torch.dtype) -> None:
    """Move every part to `device` in the training's weight dtype. SDXL's own VAE overflows in fp16: with
    `force_upcast` in its config it stays fp32 there, as diffusers' SDXL pipeline keeps it (an fp16-fixed VAE
    says force_upcast = false); bf16 is safe, and so are the SD1.5/SD2 VAEs."""
    upcast = model.family == Family.SDXL and dtype == torch.float16 and bool(model.vae.config.get("force_upcast"))
    for part in model.parts:
        keep_fp32 = part is model.vae and upcast
        target = torch.float32 if keep_fp32 else dtype
        # cast only what differs: transformers loads a text encoder in the dtype it was saved in (fp16 for most
        # checkpoints), which an fp32 run must cast too; diffusers warns about any explicit cast
        part.to(device) if part.dtype == target else part.to(device, target)


def freeze(model: SDModel) -> None:
    """Nothing of the base model trains; frozen parts go to eval mode (dropout off, deterministic)."""
    for part in model.parts:
        part.requires_grad_(False)
    for part in (*model.text_encoders, model.vae):
        part.eval()


# ------------------------------------------------------------------------------------------ text


def tokenize(tokenizer: Any, captions: list[str], max_token_length: int = TOKENS_PER_WINDOW) -> torch.Tensor:
    """Token ids [batch, windows, 77]: one window for 75 tokens, sd-scripts' BOS/EOS windows for 150/225."""
    window = TOKENS_PER_WINDOW + 2  # CLIP's 77 positions (not model_max_length: a bare tokenizer folder says 1e30)
    if max_token_length <= window - 2:
        ids = tokenizer(captions, padding="max_length", max_length=window, truncation=True, return_tensors="pt")
        return ids.input_ids.unsqueeze(1)
    total = max_token_length + 2
    ids = tokenizer(captions, padding="max_length", max_length=total, truncation=True, return_tensors="pt").input_ids
    bos, last = ids[:, :1], ids[:, -1:]
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    windows = []
    for start in range(1, total - 1, window - 2):
        chunk = torch.cat([bos, ids[:, start : start + window - 2], last], dim=1)
        if pad != eos:  # SD2 / SDXL's second tokenizer: close a window cut inside the text; mark an empty one
            inside = (chunk[:, -2] != eos) & (chunk[:, -2] != pad)
            chunk[inside, -1] = eos
            chunk[chunk[:, 1] == pad, 1] = eos
        windows.append(chunk)
    return torch.stack(windows, dim=1)


def join_windows(states: torch.Tensor, windows: int) -> torch.Tensor:
    """[batch·windows, 77, d] encoder states → [batch, 2 + 75·windows, d]: BOS, each window's inside, last."""
    per = states.shape[1]
    states = states.reshape(-1, windows * per, states.shape[-1])
    if windows == 1:
        return states
    inner = [states[:, w * per + 1 : w * per + per - 1] for w in range(windows)]
    return torch.cat([states[:, :1], *inner, states[:, -1:]], dim=1)


def encode_text(model: SDModel, captions: list[str], device: torch.device) -> Conditioning:
    """The conditioning of `captions` (see the module docstring). Gradients flow when the encoders train."""
    ids = tokenize(model.tokenizer, captions, model.max_token_length)
    windows = ids.shape[1]
    flat = ids.reshape(-1, ids.shape[-1]).to(device)
    if model.text_encoder_2 is None:
        return Conditioning(hidden=join_windows(model.text_encoder(flat)[0], windows))
    first = model.text_encoder(flat, output_hidden_states=True).hidden_states[-2]
    ids_2 = tokenize(model.tokenizer_2, captions, model.max_token_length).reshape(-1, ids.shape[-1]).to(device)
    out_2 = model.text_encoder_2(ids_2, output_hidden_states=True)
    hidden = torch.cat([join_windows(first, windows), join_windows(out_2.hidden_states[-2], windows)], dim=-1)
    pooled = out_2.text_embeds.reshape(len(captions), windows, -1)[:, 0]
    return Conditioning(hidden=hidden, pooled=pooled)


# ------------------------------------------------------------------------------------------ the denoiser


def time_ids(model: SDModel, batch: dict[str, Any], latents: torch.Tensor) -> torch.Tensor:
    """SDXL's six size/crop numbers per image [batch, 6]: original (h, w), crop (top, left), target (h, w).
    Missing from the batch: the latents' size in pixels, uncropped."""
    n = latents.shape[0]
    size = tuple(int(s) * model.vae_scale_factor for s in latents.shape[-2:])
    original = batch.get("original_sizes") or [size] * n
    crop = batch.get("crop_top_lefts") or [(0, 0)] * n
    target = batch.get("target_sizes") or [size] * n
    rows = [[*o, *c, *t] for o, c, t in zip(original, crop, target, strict=True)]
    return torch.tensor(rows, dtype=torch.float32, device=latents.device)


def predict(
    model: SDModel, unet: Any, noisy: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning, batch: dict[str, Any]
) -> torch.Tensor:
    """The denoiser's prediction for `noisy` at `timesteps`. `unet` is the (possibly DDP-wrapped) UNet;
    `batch` carries per-image facts some families condition on (SDXL: original size and crop)."""
    if model.family != Family.SDXL:
        return unet(noisy, timesteps, cond.hidden).sample
    if cond.pooled is None:
        raise ValueError("an SDXL UNet needs the pooled text embedding (Conditioning.pooled)")
    added = {"text_embeds": cond.pooled, "time_ids": time_ids(model, batch, noisy).to(cond.pooled.dtype)}
    return unet(noisy, timesteps, cond.hidden, added_cond_kwargs=added).sample


# ------------------------------------------------------------------------------------------ legacy


def add_unet_lora(unet: Any, network: NetworkSection) -> list[torch.nn.Parameter]:
    """Put a LoRA adapter on the UNet's target modules; returns its trainable parameters.

    Gaussian init of the down matrix (up starts at zero, so the adapter starts as a no-op), as in
    diffusers' own LoRA training scripts. (The engine uses `networks.attach`; kept for small scripts.)
    """
    config = LoraConfig(
        r=network.dim,
        lora_alpha=network.alpha,  # type: ignore[arg-type]  # peft annotates int; a float alpha works
        lora_dropout=network.dropout,
        target_modules=list(network.target_modules),
        init_lora_weights="gaussian",
    )
    unet.add_adapter(config)
    params = [p for p in unet.parameters() if p.requires_grad]
    if not params:
        raise ValueError(
            f"network.target_modules {network.target_modules} matched no UNet module; "
            'use diffusers names such as ["to_q", "to_k", "to_v", "to_out.0"]'
        )
    return params
