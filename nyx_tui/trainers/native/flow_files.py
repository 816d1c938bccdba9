"""Loading Flux and SD3 models: from a diffusers folder, a cached repo id, or the separate files users have.

**Where a model comes from** (`load_flow_model`):
- a diffusers folder (FluxPipeline / StableDiffusion3Pipeline layout) or a repo id in the local Hugging Face
  cache: every part from its subfolder (`load_flow_folder`), except those `model.vae`, `model.clip_l`,
  `model.clip_g`, `model.t5xxl` replace;
- **single files**, as ComfyUI lays them out (`load_flow_files`): `model.pretrained` is the transformer — Flux
  in BFL names (`double_blocks.0.img_attn.qkv.weight`), SD3 in SGM names (`joint_blocks.…`), either possibly
  prefixed `model.diffusion_model.`, or a transformer saved by diffusers — which may carry text encoders
  (`text_encoders.clip_l.transformer.…`) and a VAE (`first_stage_model.…`, `vae.…`) inside. What it lacks comes
  from `model.clip_l`, `model.clip_g`, `model.t5xxl` (transformers-keyed files: ComfyUI's clip_l.safetensors,
  t5xxl_fp16.safetensors) and `model.vae` (Flux's ae.safetensors in the original autoencoder layout, a
  diffusers-keyed file, or a folder); a field that is set wins over the piece inside the file. The configs and
  tokenizers, which no such file holds, come from `model.flow_config` (a folder or cached repo id) or the
  variant's reference repo in the cache (only its JSON, text and sentencepiece files); without either, the
  error names the `hf download` command. `flow_check` (torch-free) says all of this before anything loads.

**Told from the weights, not the config**: Flux dev (a guidance embedding) or schnell; SD3 medium, 3.5 medium
(dual attention) or 3.5 large (qk norms) — and the transformer's shape (widths, block counts, heads where the
norms tell them). A reference config of the wrong variant therefore still loads the file as it is; only what
weights cannot tell (Flux's RoPE axes, SD3's head width without qk norms) is read from the config.

**Weights**: diffusers' own Flux converter hard-codes the full-size width (3072), so the BFL names are
converted here, for any width (the inverse of the layout, checked against tiny models in the tests); SD3
goes through diffusers' `convert_sd3_transformer_checkpoint_to_diffusers` and the autoencoder through its
`convert_ldm_vae_checkpoint`. Networks are built on the meta device and take the file's tensors (no random
initialisation of billions of weights, no second copy). A file keeps its dtype; fp8 weights are widened,
exactly, to the file's other dtype (bf16 for an all-fp8 file: half of float32's memory for a 12B model), and
ComfyUI's scaled fp8 (`scale_weight` multiplies each weight) is multiplied out in float32, which makes such a
file float32; the engine casts to the training's dtype later. Every part is in eval mode.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from nyx_tui.config.fields import Family
from nyx_tui.config.model import ModelSection
from nyx_tui.trainers.native import models
from nyx_tui.trainers.native.flow_check import (
    CONFIG_PATTERNS,
    ENCODER_NAMES,
    ENCODER_PREFIXES,
    FAMILY_ENCODERS,
    FAMILY_NAMES,
    FlowFile,
    describe_flow_file,
    download_command,
    encoder_kind,
    flux_variant_of,
    missing_config_parts,
    missing_pieces,
    read_header,
    reference_candidates,
    sd3_variant_of,
    variant_name,
    what_is,
)
from nyx_tui.trainers.native.flow_models import FlowModel

# T5 tokens per caption when flow.t5_max_token_length is empty (sd-scripts' defaults)
T5_DEFAULT_TOKENS = {"dev": 512, "schnell": 256, "sd3": 256}
# the schedulers of the two Flux variants (their reference repos' scheduler configs)
FLUX_SCHEDULERS: dict[str, dict[str, Any]] = {
    "dev": {"shift": 3.0, "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15,
            "base_image_seq_len": 256, "max_image_seq_len": 4096},
    "schnell": {"shift": 1.0, "use_dynamic_shifting": False},
}  # fmt: skip
# which config subfolder describes each text encoder, per family
ENCODER_SUBFOLDERS: dict[Family, dict[str, str]] = {
    Family.FLUX: {"clip_l": "text_encoder", "t5xxl": "text_encoder_2"},
    Family.SD3: {"clip_l": "text_encoder", "clip_g": "text_encoder_2", "t5xxl": "text_encoder_3"},
}


def flux_variant(transformer: Any) -> str:
    """ "dev" when the transformer has a guidance embedding (guidance-distilled), else "schnell"."""
    return "dev" if getattr(transformer.config, "guidance_embeds", False) else "schnell"


def sd3_variant(transformer: Any) -> str:
    """SD3 "medium", "3.5-medium" or "3.5-large" from a diffusers SD3 transformer's config."""
    config = transformer.config
    hidden = int(config.num_attention_heads) * int(config.attention_head_dim)
    return sd3_variant_of(bool(config.get("dual_attention_layers")), bool(config.get("qk_norm")), hidden)


def default_t5_tokens(family: Family, variant: str) -> int:
    """T5 tokens per caption when the config leaves it empty: 512 for Flux dev, 256 for schnell and SD3."""
    return T5_DEFAULT_TOKENS["sd3"] if family == Family.SD3 else T5_DEFAULT_TOKENS.get(variant, 512)


def load_flow_model(cfg: ModelSection, t5_max_token_length: int | None = None) -> FlowModel:
    """The Flux or SD3 model of `cfg`; `t5_max_token_length` None: the detected model's default."""
    models._quiet()
    source = models.resolve(cfg.pretrained, "model.pretrained")
    if source.is_dir():
        model = load_flow_folder(source, cfg.family)
        for name, attribute in ENCODER_SUBFOLDERS[cfg.family].items():  # a file set in its field replaces the folder's
            value = getattr(cfg, name)
            if value:
                setattr(model, attribute, load_text_encoder(name, cfg.family, value, source, inside=False))
                model.source[name] = value
        if cfg.vae:
            model.vae = load_vae(cfg.vae, None, source, cfg.family)
            model.source["vae"] = cfg.vae
    else:
        model = load_flow_files(source, cfg)
    for part in model.parts:
        part.eval()
    model.t5_max_token_length = t5_max_token_length or default_t5_tokens(model.family, model.variant)
    return model


# ------------------------------------------------------------------------------------------ folders


def load_flow_folder(root: Path, family: Family) -> FlowModel:
    """Every part of a diffusers Flux/SD3 folder (FluxPipeline / StableDiffusion3Pipeline layout)."""
    import diffusers
    import transformers

    d: Any = diffusers
    t: Any = transformers  # Any: the lazy modules hide their classes from mypy
    flux = family == Family.FLUX
    if not (root / "transformer").is_dir():
        raise models.ModelLoadError(
            f"{root} has no transformer/ folder: it is not a diffusers {FAMILY_NAMES.get(family, family.value)} "
            "model. Give a diffusers folder, a transformer .safetensors file, or a cached repo id as model.pretrained"
        )
    transformer_cls = d.FluxTransformer2DModel if flux else d.SD3Transformer2DModel
    te1 = t.CLIPTextModel if flux else t.CLIPTextModelWithProjection
    te2 = t.T5EncoderModel if flux else t.CLIPTextModelWithProjection
    tok2 = t.T5TokenizerFast if flux else t.CLIPTokenizer
    try:
        parts: dict[str, Any] = {
            "transformer": transformer_cls.from_pretrained(root, subfolder="transformer"),
            "vae": d.AutoencoderKL.from_pretrained(root, subfolder="vae"),
            "noise_scheduler": d.FlowMatchEulerDiscreteScheduler.from_pretrained(root, subfolder="scheduler"),
            "tokenizer": t.CLIPTokenizer.from_pretrained(root, subfolder="tokenizer"),
            "text_encoder": te1.from_pretrained(root, subfolder="text_encoder"),
            "tokenizer_2": tok2.from_pretrained(root, subfolder="tokenizer_2"),
            "text_encoder_2": te2.from_pretrained(root, subfolder="text_encoder_2"),
        }
        if not flux:
            parts["tokenizer_3"] = t.T5TokenizerFast.from_pretrained(root, subfolder="tokenizer_3")
            parts["text_encoder_3"] = t.T5EncoderModel.from_pretrained(root, subfolder="text_encoder_3")
    except (OSError, ValueError) as e:
        raise models.ModelLoadError(f"could not load the {family.value} model in {root}: {e}") from e
    variant = flux_variant(parts["transformer"]) if flux else sd3_variant(parts["transformer"])
    return FlowModel(family=family, variant=variant, source={"model": str(root)}, **parts)


# ------------------------------------------------------------------------------------------ single files


def load_flow_files(path: Path, cfg: ModelSection) -> FlowModel:
    """A Flux/SD3 model from a transformer file plus the pieces it lacks (see the module docstring)."""
    import transformers

    t: Any = transformers
    family = cfg.family
    flow = _transformer_file(path, family)
    missing = missing_pieces(cfg, flow)
    if missing:
        raise models.ModelLoadError("; ".join(f"{p.message} ({p.fix})" for p in missing))
    root = flow_config_root(cfg, flow)
    lacking = missing_config_parts(root, family)
    if lacking:
        raise models.ModelLoadError(
            f"the configs and tokenizers in {root} are not a diffusers {FAMILY_NAMES[family]} model's: "
            f"{', '.join(lacking)} missing; set model.flow_config to a diffusers {FAMILY_NAMES[family]} folder"
        )
    source: dict[str, str] = {"model": str(path), "config": str(root)}
    transformer = load_transformer(path, flow, root)
    encoders: dict[str, Any] = {}
    for name in FAMILY_ENCODERS[family]:
        field_value = getattr(cfg, name)
        encoders[name] = load_text_encoder(name, family, field_value or path, root, inside=not field_value)
        source[name] = str(field_value) if field_value else f"{path} (inside)"
    if cfg.vae:
        vae = load_vae(cfg.vae, None, root, family)
        source["vae"] = cfg.vae
    else:
        vae = load_vae(str(path), flow.vae_prefix, root, family)
        source["vae"] = f"{path} (inside)"
    scheduler = flow_scheduler(root, family, flow.variant)
    flux = family == Family.FLUX
    try:
        tokenizers: dict[str, Any] = {"tokenizer": t.CLIPTokenizer.from_pretrained(root, subfolder="tokenizer")}
        if flux:
            tokenizers["tokenizer_2"] = t.T5TokenizerFast.from_pretrained(root, subfolder="tokenizer_2")
        else:
            tokenizers["tokenizer_2"] = t.CLIPTokenizer.from_pretrained(root, subfolder="tokenizer_2")
            tokenizers["tokenizer_3"] = t.T5TokenizerFast.from_pretrained(root, subfolder="tokenizer_3")
    except (OSError, ValueError) as e:
        raise models.ModelLoadError(f"could not read the tokenizers in {root}: {e}") from e
    if flux:
        parts = {"text_encoder": encoders["clip_l"], "text_encoder_2": encoders["t5xxl"]}
    else:
        parts = {
            "text_encoder": encoders["clip_l"],
            "text_encoder_2": encoders["clip_g"],
            "text_encoder_3": encoders["t5xxl"],
        }
    return FlowModel(
        family=family,
        transformer=transformer,
        vae=vae,
        noise_scheduler=scheduler,
        variant=flow.variant,
        source=source,
        **tokenizers,
        **parts,
    )


def _transformer_file(path: Path, family: Family) -> FlowFile:
    """The facts of `model.pretrained` as a transformer file, or the error that says what it is instead."""
    name = FAMILY_NAMES.get(family, family.value)
    if path.suffix.lower() != ".safetensors":
        raise models.ModelLoadError(
            f"model.pretrained = {path}: a {name} model file must be .safetensors (pickled .ckpt/.pt files are "
            "not read for Flux/SD3); convert it, or use a diffusers folder"
        )
    try:
        header = read_header(path)
    except Exception as e:
        raise models.ModelLoadError(f"model.pretrained = {path} is not a readable .safetensors file ({e})") from e
    flow = describe_flow_file(header)
    if flow is None:
        raise models.ModelLoadError(
            f"model.pretrained = {path} is {what_is(header)}, not a {name} transformer: point model.pretrained at "
            "the transformer (diffusion model) file, and the encoders and VAE at model.clip_l / model.t5xxl / "
            "model.vae"
        )
    if flow.family != family:
        other = FAMILY_NAMES[flow.family]
        raise models.ModelLoadError(
            f"model.pretrained = {path} is a {other} transformer but model.family is {family.value}: "
            f"set model.family = {flow.family.value!r}"
        )
    return flow


def flow_config_root(cfg: ModelSection, flow: FlowFile) -> Path:
    """The folder whose configs and tokenizers describe the single file: model.flow_config, else the first of
    the variant's reference repos in the local cache (the variant's own first)."""
    if cfg.flow_config:
        return models.resolve(cfg.flow_config, "model.flow_config", CONFIG_PATTERNS)
    from huggingface_hub import constants

    candidates = reference_candidates(cfg.family, flow.variant)
    for repo in candidates:
        try:
            return models.cached_repo(repo, "model.flow_config", CONFIG_PATTERNS)
        except models.ModelLoadError:
            continue
    repo = candidates[0]
    raise models.ModelLoadError(
        f"this {variant_name(cfg.family, flow.variant)} file holds weights only; loading it needs the diffusers "
        f"configs and tokenizers of its model, from {repo} (a few MB of JSON and text, no weights), which is not in "
        f"the Hugging Face cache ({constants.HF_HUB_CACHE}); training never downloads. Fetch them once: "
        f"`{download_command(repo)}` (set HF_TOKEN for a gated repo), or set model.flow_config to a diffusers "
        f"{FAMILY_NAMES[cfg.family]} folder"
    )


def flow_scheduler(root: Path, family: Family, variant: str) -> Any:
    """The flow-matching scheduler of the config folder, set to the file's Flux variant when the reference is
    the other one (dev shifts by resolution, schnell does not)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    config = dict(FlowMatchEulerDiscreteScheduler.load_config(root, subfolder="scheduler"))
    if family == Family.FLUX:
        config.update(FLUX_SCHEDULERS[variant])
    return FlowMatchEulerDiscreteScheduler.from_config(config)


# ------------------------------------------------------------------------------------------ tensors


def read_tensors(path: Path | str, prefix: str = "", exclude: tuple[str, ...] = ()) -> dict[str, Any]:
    """The tensors of `path` whose keys start with `prefix` (stripped) and not with one of `exclude` (checked
    after stripping; those are never read). fp8 tensors are widened to the file's other floating dtype — bf16,
    fp16 and fp32 all hold every fp8 value exactly — or to bf16 in an all-fp8 file; ComfyUI's scaled fp8
    (weight × `scale_weight`) is multiplied out in float32. A dict left with mixed dtypes becomes float32."""
    import torch
    from safetensors import safe_open

    out: dict[str, Any] = {}
    scales: dict[str, Any] = {}
    with safe_open(str(path), framework="pt") as f:
        for key in f.keys():  # noqa: SIM118 (safe_open is no dict)
            if not key.startswith(prefix):
                continue
            name = key[len(prefix) :]
            if exclude and name.startswith(exclude):
                continue
            if name == "scaled_fp8" or name.endswith(".scale_input"):
                continue  # markers of ComfyUI's scaled fp8: the input scale is for fp8 matmuls, not weights
            tensor = f.get_tensor(key)
            if name.endswith(".scale_weight"):
                scales[name[: -len(".scale_weight")] + ".weight"] = tensor
                continue
            out[name] = tensor
    for name, scale in scales.items():
        if name in out:
            out[name] = out[name].float() * scale.float()
    floats = {v.dtype for v in out.values() if v.is_floating_point()}
    wide = {dt for dt in floats if dt.itemsize > 1}
    if len(wide) > 1:
        target = torch.float32
    elif len(wide) == 1:
        target = next(iter(wide))
    else:
        target = torch.bfloat16
    if floats - {target}:
        out = {k: v.to(target) if v.is_floating_point() else v for k, v in out.items()}
    return out


def _on_meta(build: Any) -> Any:
    """A network built without allocating or initialising its weights (they come from the file next)."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        return build()


def _assign(module: Any, state: dict[str, Any], what: str, ignore: tuple[str, ...] = ()) -> Any:
    """Load `state` into a meta-built `module` (taking the tensors as they are); any missing or unexpected key
    is an error naming `what`."""
    result = module.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in result.missing_keys if not k.endswith(ignore)]
    unexpected = [k for k in result.unexpected_keys if not k.endswith(ignore)]
    meta = [n for n, p in module.named_parameters() if p.is_meta]
    if missing or unexpected or meta:
        raise models.ModelLoadError(
            f"{what} does not match the architecture described by its config: "
            + ", ".join(
                f"{label} {', '.join(keys[:4])}{' …' if len(keys) > 4 else ''} ({len(keys)})"
                for label, keys in (("missing", missing or meta), ("unexpected", unexpected))
                if keys
            )
            + ". Is it the right file for this field, and model.flow_config the same model?"
        )
    return module.eval()


# ------------------------------------------------------------------------------------------ transformer


def load_transformer(path: Path, flow: FlowFile, root: Path) -> Any:
    """The transformer of a Flux/SD3 file, its shape told by its weights (the config only fills what they cannot)."""
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    raw = read_tensors(path, flow.prefix, exclude=(*ENCODER_PREFIXES.values(), "first_stage_model.", "vae."))
    reference = _json(root / "transformer" / "config.json")
    what = f"the {FAMILY_NAMES[flow.family]} transformer in {path}"
    try:
        if flow.family == Family.FLUX:
            state = flux_bfl_to_diffusers(raw) if flow.layout == "bfl" else raw
            config = flux_config(state, reference)
            module = _on_meta(lambda: FluxTransformer2DModel.from_config(config))
        else:
            if flow.layout == "sgm":
                from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

                state = convert_sd3_transformer_checkpoint_to_diffusers(raw)
            else:
                state = raw
            config = sd3_config(state, reference)
            module = _on_meta(lambda: SD3Transformer2DModel.from_config(config))
    except (KeyError, ValueError, IndexError) as e:
        raise models.ModelLoadError(
            f"{what} is incomplete or not in a layout Nyx knows ({type(e).__name__}: {e})"
        ) from e
    return _assign(module, state, what)


def _json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _blocks(state: dict[str, Any], prefix: str) -> int:
    """How many numbered blocks `prefix.N.` the state dict has."""
    numbers = {int(k[len(prefix) :].split(".", 1)[0]) for k in state if k.startswith(prefix)}
    return max(numbers) + 1 if numbers else 0


def flux_config(state: dict[str, Any], reference: dict[str, Any]) -> dict[str, Any]:
    """A FluxTransformer2DModel config from diffusers-keyed weights; `reference` gives the RoPE axes."""
    hidden, in_channels = state["x_embedder.weight"].shape
    norm = next(k for k in state if k.endswith("attn.norm_q.weight"))
    head_dim = int(state[norm].shape[0])
    axes = tuple(reference.get("axes_dims_rope") or (16, 56, 56))
    if sum(axes) != head_dim:
        raise ValueError(
            f"the reference config's RoPE axes {axes} do not add up to the file's head width {head_dim}: "
            "model.flow_config must describe the same model"
        )
    return {
        "patch_size": 1,
        "in_channels": int(in_channels),
        "out_channels": int(state["proj_out.weight"].shape[0]),
        "num_layers": _blocks(state, "transformer_blocks."),
        "num_single_layers": _blocks(state, "single_transformer_blocks."),
        "attention_head_dim": head_dim,
        "num_attention_heads": int(hidden) // head_dim,
        "joint_attention_dim": int(state["context_embedder.weight"].shape[1]),
        "pooled_projection_dim": int(state["time_text_embed.text_embedder.linear_1.weight"].shape[1]),
        "guidance_embeds": flux_variant_of(state) == "dev",
        "axes_dims_rope": axes,
    }


def sd3_config(state: dict[str, Any], reference: dict[str, Any]) -> dict[str, Any]:
    """An SD3Transformer2DModel config from diffusers-keyed weights; `reference` gives the head width when no
    qk norm tells it (64 in every released SD3) and the default sample size."""
    hidden, in_channels, patch, _ = state["pos_embed.proj.weight"].shape
    norm = next((k for k in state if k.endswith("attn.norm_q.weight")), None)
    head_dim = int(state[norm].shape[0]) if norm else int(reference.get("attention_head_dim") or 64)
    if hidden % head_dim:
        raise ValueError(f"the transformer's width {hidden} is not a multiple of the config's head width {head_dim}")
    layers = _blocks(state, "transformer_blocks.")
    dual = tuple(i for i in range(layers) if f"transformer_blocks.{i}.attn2.to_q.weight" in state)
    return {
        "sample_size": int(reference.get("sample_size") or 128),
        "patch_size": int(patch),
        "in_channels": int(in_channels),
        "num_layers": layers,
        "attention_head_dim": head_dim,
        "num_attention_heads": int(hidden) // head_dim,
        "joint_attention_dim": int(state["context_embedder.weight"].shape[1]),
        "caption_projection_dim": int(state["context_embedder.weight"].shape[0]),
        "pooled_projection_dim": int(state["time_text_embed.text_embedder.linear_1.weight"].shape[1]),
        "out_channels": int(state["proj_out.weight"].shape[0]) // int(patch) ** 2,
        "pos_embed_max_size": math.isqrt(int(state["pos_embed.pos_embed"].shape[1])),
        "dual_attention_layers": dual,
        "qk_norm": "rms_norm" if norm else None,
    }


def _swap_halves(weight: Any) -> Any:
    """BFL's final modulation is (shift, scale); diffusers' AdaLayerNormContinuous wants (scale, shift)."""
    import torch

    first, second = weight.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def flux_bfl_to_diffusers(sd: dict[str, Any]) -> dict[str, Any]:
    """Flux transformer weights in BFL names → diffusers names, at any width (diffusers' converter assumes
    3072). q/k/v are split from the fused `qkv`; the single blocks' `linear1` is q, k, v and the MLP input."""
    sd = dict(sd)
    out: dict[str, Any] = {}

    def move(src: str, dst: str) -> None:
        for suffix in ("weight", "bias"):
            if f"{src}.{suffix}" in sd:
                out[f"{dst}.{suffix}"] = sd.pop(f"{src}.{suffix}")

    for src, dst in (
        ("time_in.in_layer", "time_text_embed.timestep_embedder.linear_1"),
        ("time_in.out_layer", "time_text_embed.timestep_embedder.linear_2"),
        ("vector_in.in_layer", "time_text_embed.text_embedder.linear_1"),
        ("vector_in.out_layer", "time_text_embed.text_embedder.linear_2"),
        ("guidance_in.in_layer", "time_text_embed.guidance_embedder.linear_1"),
        ("guidance_in.out_layer", "time_text_embed.guidance_embedder.linear_2"),
        ("txt_in", "context_embedder"),
        ("img_in", "x_embedder"),
        ("final_layer.linear", "proj_out"),
    ):
        move(src, dst)
    for suffix in ("weight", "bias"):
        out[f"norm_out.linear.{suffix}"] = _swap_halves(sd.pop(f"final_layer.adaLN_modulation.1.{suffix}"))
    hidden = int(out["x_embedder.weight"].shape[0])
    for i in range(_blocks(sd, "double_blocks.")):
        src, dst = f"double_blocks.{i}.", f"transformer_blocks.{i}."
        move(src + "img_mod.lin", dst + "norm1.linear")
        move(src + "txt_mod.lin", dst + "norm1_context.linear")
        for stream, names in (("img", ("to_q", "to_k", "to_v")), ("txt", ("add_q_proj", "add_k_proj", "add_v_proj"))):
            for suffix in ("weight", "bias"):
                for name, part in zip(names, sd.pop(f"{src}{stream}_attn.qkv.{suffix}").chunk(3, dim=0), strict=True):
                    out[f"{dst}attn.{name}.{suffix}"] = part
        out[dst + "attn.norm_q.weight"] = sd.pop(src + "img_attn.norm.query_norm.scale")
        out[dst + "attn.norm_k.weight"] = sd.pop(src + "img_attn.norm.key_norm.scale")
        out[dst + "attn.norm_added_q.weight"] = sd.pop(src + "txt_attn.norm.query_norm.scale")
        out[dst + "attn.norm_added_k.weight"] = sd.pop(src + "txt_attn.norm.key_norm.scale")
        move(src + "img_mlp.0", dst + "ff.net.0.proj")
        move(src + "img_mlp.2", dst + "ff.net.2")
        move(src + "txt_mlp.0", dst + "ff_context.net.0.proj")
        move(src + "txt_mlp.2", dst + "ff_context.net.2")
        move(src + "img_attn.proj", dst + "attn.to_out.0")
        move(src + "txt_attn.proj", dst + "attn.to_add_out")
    for i in range(_blocks(sd, "single_blocks.")):
        src, dst = f"single_blocks.{i}.", f"single_transformer_blocks.{i}."
        move(src + "modulation.lin", dst + "norm.linear")
        for suffix in ("weight", "bias"):
            fused = sd.pop(f"{src}linear1.{suffix}")
            mlp = int(fused.shape[0]) - 3 * hidden
            q, k, v, m = fused.split((hidden, hidden, hidden, mlp), dim=0)
            for name, part in (("attn.to_q", q), ("attn.to_k", k), ("attn.to_v", v), ("proj_mlp", m)):
                out[f"{dst}{name}.{suffix}"] = part
        out[dst + "attn.norm_q.weight"] = sd.pop(src + "norm.query_norm.scale")
        out[dst + "attn.norm_k.weight"] = sd.pop(src + "norm.key_norm.scale")
        move(src + "linear2", dst + "proj_out")
    if sd:
        keys = sorted(sd)
        raise ValueError(f"keys Nyx does not know in a BFL Flux file: {', '.join(keys[:4])} ({len(keys)})")
    return out


# ------------------------------------------------------------------------------------------ text encoders


def load_text_encoder(name: str, family: Family, path: Path | str, root: Path, *, inside: bool) -> Any:
    """Text encoder `name` (clip_l, clip_g, t5xxl) from its own transformers-keyed file, or (`inside`) from the
    checkpoint's `text_encoders.NAME.transformer.` part, built from the config folder's matching subfolder."""
    import torch
    import transformers

    t: Any = transformers
    field_name = f"model.{name}"
    what = f"the {ENCODER_NAMES[name]} text encoder in {path}" if inside else f"{field_name} = {path}"
    if inside:
        state = read_tensors(path, ENCODER_PREFIXES[name])
    else:
        file = Path(path).expanduser()
        if not file.is_file():
            raise models.ModelLoadError(
                f"{field_name} = {path}: no such file; point it at the {ENCODER_NAMES[name]} file"
            )
        header = read_header(file)
        kind = encoder_kind(header)
        if kind is None or (kind != name and not (kind == "clip" and name != "t5xxl")):
            raise models.ModelLoadError(f"{field_name} = {path} is {what_is(header)}, not {ENCODER_NAMES[name]}")
        prefix = next((p for p in ENCODER_PREFIXES.values() if header.keys and header.keys[0].startswith(p)), "")
        state = read_tensors(file, prefix)
    sub = ENCODER_SUBFOLDERS[family][name]
    config = t.AutoConfig.from_pretrained(root, subfolder=sub)
    if name == "t5xxl":
        cls = t.T5EncoderModel
    else:
        cls = t.CLIPTextModel if family == Family.FLUX else t.CLIPTextModelWithProjection
        if cls is t.CLIPTextModelWithProjection and "text_projection.weight" not in state:
            # some CLIP files leave the projection out; ComfyUI and sd-scripts take it as the identity
            width = int(config.hidden_size)
            state["text_projection.weight"] = torch.eye(int(config.projection_dim), width)
        if cls is t.CLIPTextModel:
            state.pop("text_projection.weight", None)  # Flux uses the pooled output unprojected
    for target, src in dict(getattr(cls, "_tied_weights_keys", None) or {}).items():
        if target not in state and src in state:
            state[target] = state[src]
    module = _on_meta(lambda: cls(config))
    return _assign(module, state, what, ignore=("position_ids",))


# ------------------------------------------------------------------------------------------ VAE


def load_vae(value: str, inside_prefix: str | None, root: Path, family: Family) -> Any:
    """The VAE: `model.vae` (a folder, a cached repo id, or a file in the original autoencoder layout — Flux's
    ae.safetensors — or diffusers' names), or (`inside_prefix`) the part of the checkpoint under that prefix.
    A file's config is the config folder's vae/config.json."""
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    if inside_prefix is not None:
        path, what = Path(value), f"the VAE in {value}"
    else:
        path, what = models.resolve(value, "model.vae"), f"model.vae = {value}"
        if path.is_dir():
            sub = "vae" if (path / "vae" / "config.json").is_file() else None
            try:
                return AutoencoderKL.from_pretrained(path, subfolder=sub).eval()
            except (OSError, ValueError) as e:
                raise models.ModelLoadError(f"could not load {what}: {e}") from e
        if path.suffix.lower() != ".safetensors":
            raise models.ModelLoadError(f"{what}: a VAE file must be .safetensors")
    state = read_tensors(path, inside_prefix or "")
    config = dict(AutoencoderKL.load_config(root, subfolder="vae"))
    if not any(k.startswith("encoder.down_blocks.") or k.startswith("decoder.up_blocks.") for k in state):
        try:
            state = convert_ldm_vae_checkpoint(state, config)
        except Exception as e:
            raise models.ModelLoadError(f"{what} is not a VAE in a layout Nyx knows ({type(e).__name__}: {e})") from e
    module = _on_meta(lambda: AutoencoderKL.from_config(config))
    return _assign(module, state, what)
