"""`nyx lora merge`: several LoRAs into one, or LoRAs baked into a base model's weights.

LoRA + LoRA (`merge_loras`), each file with a weight wᵢ; a module's update is ΔWᵢ = upᵢ·downᵢ·αᵢ/rᵢ:
- `concat` (exact): the merged module has rank R = Σ rᵢ (the files that have it), downs stacked and ups side
  by side, and alpha A = s·R with s the first file's αᵢ/rᵢ, so loaders scale by s. File i's pair is multiplied
  by cᵢ = wᵢ·(αᵢ/rᵢ)/s, split as sign(cᵢ)·√|cᵢ| on the up and √|cᵢ| on the down (balanced magnitudes for fp16),
  so the merged ΔW = Σ wᵢ·ΔWᵢ exactly. Modules in only some files are kept with those files' share. (sd-scripts'
  `merge_lora.py --concat` multiplies both matrices by √(αᵢ/α₁)·wᵢ and keeps alpha α₁ for the summed rank:
  that plays each file at r₁/R of its strength and wᵢ·|wᵢ| instead of wᵢ; Nyx's is the exact sum.)
- `svd` (sd-scripts' `svd_merge_lora.py`): ΔW = Σ wᵢ·ΔWᵢ, then its SVD cut to `rank` (convolutions wider than
  1×1: `conv_rank`, default the same), capped at min(out, in·kh·kw) as there and at Σ rᵢ (past which ΔW has no
  more rank); up = U·diag(S), down = Vh, alpha = the new rank (scale 1). sd-scripts also clamps up and down to
  their 0.99 quantile of |values|; `clamp_quantile=0.99` does that, by default nothing is clamped (the result
  is then the best rank-k approximation).

LoRA → base model (`bake`): W ← W + Σ wᵢ·ΔWᵢ on the module each file names, as sd-scripts' merge scripts do.
The base is a diffusers folder (SD1.5/SDXL: unet, text_encoder[, text_encoder_2]; Flux/SD3: transformer and
the CLIP text encoders, Flux's T5 as `lora_te3`) written as a diffusers folder with only the weight files that
change rewritten, or a single-file checkpoint in the original key names (BFL Flux: `double_blocks.0.img_attn.qkv`;
LDM/SGM SD1.5/SDXL: `model.diffusion_model.…`, `cond_stage_model.…`, `conditioner.embedders.…`) written as one
file. The names come from Nyx's tables: diffusers → kohya (`networks.text_encoder_name`), SGM spelling
(`kohya_names.sgm_path`), Flux/SD3 fused modules (`flow_names.flow_modules`: the file module's ΔW split by rows
into its diffusers Linears, SD3's swapped adaLN halves put back). A LoRA module that names no module of the base
is an error (the wrong base, or the wrong family), listed with examples.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nyx_tui.lora.resize import LoraFileError, Module, dtype_for, lora_modules, read_lora, unsupported

if TYPE_CHECKING:
    import torch

MODES = ("concat", "svd")
MAX_LISTED = 5


@dataclass(frozen=True)
class Source:
    """One LoRA to merge and its weight."""

    path: Path
    weight: float = 1.0


def parse_source(text: str) -> Source:
    """`IN[:WEIGHT]`: a path with an optional weight after the last colon (a colon in the path stays part of it
    when what follows is no number)."""
    path, sep, tail = text.rpartition(":")
    if sep and path:
        try:
            return Source(Path(path), float(tail))
        except ValueError:
            pass
    return Source(Path(text), 1.0)


@dataclass
class Loaded:
    source: Source
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]
    modules: dict[str, Module]


def load_sources(sources: Iterable[Source], what: str) -> list[Loaded]:
    """Read every file; LoraFileError for a missing file, a LoHa/LoKr/DoRA, a file with no LoRA modules, or
    files of different model families."""
    from nyx_tui import families

    loaded: list[Loaded] = []
    for src in sources:
        tensors, metadata = read_lora(src.path)
        why = unsupported(tensors, what)
        if why:
            raise LoraFileError(f"{src.path.name}: {why}")
        modules = lora_modules(tensors)
        if not modules:
            raise LoraFileError(f"{src.path.name} has no LoRA modules (no .lora_down/.lora_up tensors)")
        loaded.append(Loaded(src, tensors, metadata, modules))
    seen: list[tuple[str, tuple[Any, ...]]] = []
    for item in loaded:
        det = families.detect(item.source.path)
        if det.families:
            seen.append((item.source.path.name, tuple(det.families)))
    if len(seen) > 1:
        common = set(seen[0][1])
        for _, fams in seen[1:]:
            common &= set(fams)
        if not common:
            said = "; ".join(f"{name}: {'/'.join(f.value for f in fams)}" for name, fams in seen)
            raise LoraFileError(f"the LoRAs are for different model families ({said}): merge LoRAs of one family")
    return loaded


def _shape_check(loaded: list[Loaded]) -> None:
    """The same module must have the same input and output shape in every file."""
    shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...], str]] = {}
    for item in loaded:
        for name, m in item.modules.items():
            sig = (tuple(m.up.shape[:1]), tuple(m.down.shape[1:]))
            if name in shapes and shapes[name][:2] != sig:
                first = shapes[name]
                raise LoraFileError(
                    f"{name} is out {first[0][0]} × in {first[1]} in {first[2]} but out {sig[0][0]} × in {sig[1]} "
                    f"in {item.source.path.name}: the files are for different models; merge LoRAs of one base model"
                )
            shapes.setdefault(name, (*sig, item.source.path.name))


# --------------------------------------------------------------------------------------------- LoRA + LoRA


@dataclass
class MergedModule:
    name: str
    rank: int
    alpha: float
    files: int


@dataclass
class MergeReport:
    """What `merge_loras` / `bake` did."""

    output: str
    mode: str
    sources: list[tuple[str, float]]
    modules: list[MergedModule] = field(default_factory=list)
    fro_retained: dict[str, float] = field(default_factory=dict)  # svd mode: per module
    baked: dict[str, int] = field(default_factory=dict)  # bake: modules baked per file
    metadata: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


def _merged_metadata(
    loaded: list[Loaded], output: Path, mode: str, dims: set[int], alphas: set[float]
) -> dict[str, str]:
    """The first file's metadata (base model, architecture, training facts) with the network's new numbers,
    a comment naming the sources, modelspec's title and merged_from; old hashes dropped (new ones are written)."""
    first = loaded[0].metadata
    meta = {k: v for k, v in first.items() if not k.startswith("sshs_")}
    names = ", ".join(f"{x.source.path.name}×{x.source.weight:g}" for x in loaded)
    meta["ss_network_dim"] = str(next(iter(dims))) if len(dims) == 1 else "Dynamic"
    meta["ss_network_alpha"] = f"{next(iter(alphas)):g}" if len(alphas) == 1 else "Dynamic"
    meta["ss_training_comment"] = f"merged ({mode}) from {names}; {first.get('ss_training_comment', '')}"
    meta["ss_output_name"] = output.stem
    meta["modelspec.title"] = output.stem
    meta["modelspec.merged_from"] = ", ".join(x.source.path.stem for x in loaded)
    return meta


def merge_loras(
    sources: list[Source],
    output: Path | str,
    *,
    mode: str = "concat",
    rank: int | None = None,
    conv_rank: int | None = None,
    precision: str | None = None,
    device: str = "cpu",
    clamp_quantile: float | None = None,
) -> MergeReport:
    """Merge LoRA files into one (module docstring: the math). `rank` is needed for `svd`."""
    import torch

    from nyx_tui.lora.resize import device_for, retained, save

    output = Path(output)
    if mode not in MODES:
        raise LoraFileError(f"--mode {mode!r}: use concat or svd")
    if not sources:
        raise LoraFileError("give at least one LoRA to merge")
    if mode == "svd" and (rank is None or rank < 1):
        raise LoraFileError("--mode svd needs --rank R (the merged LoRA's rank, at least 1)")
    if mode == "concat" and (rank is not None or conv_rank is not None):
        raise LoraFileError("--rank applies to --mode svd; concat's rank is the sum of the files' ranks")
    if any(output.resolve() == s.path.resolve() for s in sources):
        raise LoraFileError(f"-o {output} is one of the inputs: write the merge to a new file")
    dev = device_for(device)
    loaded = load_sources(sources, "merged")
    _shape_check(loaded)
    save_dtype, precision_name = dtype_for(precision, loaded[0].tensors)
    report = MergeReport(str(output), mode, [(str(x.source.path), x.source.weight) for x in loaded])
    names = list(dict.fromkeys(n for x in loaded for n in x.modules))
    out: dict[str, torch.Tensor] = {}
    dims: set[int] = set()
    alphas: set[float] = set()
    with torch.no_grad():
        for name in names:
            parts = [(x.source.weight, x.modules[name]) for x in loaded if name in x.modules]
            first = parts[0][1]
            peft = first.alpha is None and ".lora_A" in first.down_key  # peft-style keys: files carry no alpha
            if mode == "concat":
                s = 1.0 if peft else first.scale  # a peft-style file has no alpha: the scale goes into up/down
                downs, ups = [], []
                for w, m in parts:
                    c = w * m.scale / s
                    root = abs(c) ** 0.5
                    downs.append(m.down.to(torch.float32) * root)
                    ups.append(m.up.to(torch.float32) * (root if c >= 0 else -root))
                down, up = torch.cat(downs, 0), torch.cat(ups, 1)
                k = int(down.shape[0])
                alpha = s * k
            else:
                total = sum(w * m.scale * m.delta().to(dev) for w, m in parts)
                assert isinstance(total, torch.Tensor)
                conv3 = first.conv and tuple(first.down.shape[2:]) != (1, 1)
                want = conv_rank if conv3 and conv_rank is not None else rank
                assert want is not None
                k = min(want, total.shape[0], total.shape[1], sum(m.rank for _, m in parts))
                u, sv, vh = torch.linalg.svd(total, full_matrices=False)
                up, down = (u[:, :k] * sv[:k]), vh[:k]
                if clamp_quantile is not None:
                    hi = torch.quantile(torch.cat([up.flatten(), down.flatten()]).float().cpu(), clamp_quantile)
                    up, down = up.clamp(-float(hi), float(hi)), down.clamp(-float(hi), float(hi))
                up, down = up.cpu(), down.cpu()
                if first.conv:
                    up = up.reshape(first.up.shape[0], k, 1, 1)
                    down = down.reshape(k, *first.down.shape[1:])
                alpha = float(k)
                report.fro_retained[name] = retained(sv.cpu(), k)[0]
            out[first.down_key] = down.to(save_dtype).contiguous()  # the first file's key style
            out[first.up_key] = up.to(save_dtype).contiguous()
            if not peft:
                out[first.alpha_key] = torch.tensor(alpha, dtype=save_dtype)
            dims.add(k)
            alphas.add(round(alpha, 6))
            report.modules.append(MergedModule(name, k, alpha, len(parts)))
    meta = _merged_metadata(loaded, output, mode, dims, alphas)
    meta["ss_mixed_precision"] = meta.get("ss_mixed_precision", precision_name)
    report.metadata = save(output, out, meta)
    return report


# --------------------------------------------------------------------------------------------- LoRA → base


@dataclass(frozen=True)
class Target:
    """Where a LoRA module lands in the base: a weight key of one weight file, the rows of the module's ΔW
    that belong there (None: all), whether ΔW's output halves are swapped first (SD3's context adaLN), and,
    for OpenCLIP's fused in_proj, the rows of the base weight the ΔW goes to."""

    file: str
    key: str
    rows: tuple[int, int] | None = None
    swap: bool = False
    dest_rows: tuple[int, int] | None = None


@dataclass
class Base:
    """A base model as weight files and the kohya name → targets table."""

    kind: str  # "folder" or "file"
    family: str
    files: dict[str, Path]  # id → path (an id is the file's path relative to the base)
    targets: dict[str, list[Target]]


def _weight_files(folder: Path) -> list[Path]:
    """The .safetensors weight files of a component folder (every variant; shards included)."""
    files = sorted(folder.glob("*.safetensors"))
    if not files and any(folder.glob("*.bin")):
        raise LoraFileError(
            f"{folder} holds only .bin (pickle) weights: save the model as safetensors first "
            "(diffusers: pipe.save_pretrained(..., safe_serialization=True))"
        )
    return files


def _keys(path: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return list(f.keys())


def _shape(path: Path, key: str) -> list[int]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return list(f.get_slice(key).get_shape())


def _json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise LoraFileError(f"{path}: unreadable ({e})") from e
    return data if isinstance(data, dict) else {}


def _add(targets: dict[str, list[Target]], name: str, target: Target) -> None:
    existing = targets.setdefault(name, [])
    if target not in existing:
        existing.append(target)


def _unet_targets(base: Path, targets: dict[str, list[Target]], files: dict[str, Path], sdxl: bool) -> None:
    from nyx_tui.trainers.native.kohya_names import UNetLayout, sgm_path

    folder = base / "unet"
    layout = UNetLayout.from_config(_json(folder / "config.json")) if sdxl else None
    for path in _weight_files(folder):
        fid = str(path.relative_to(base))
        files[fid] = path
        for key in _keys(path):
            if not key.endswith(".weight"):
                continue
            module = key.removesuffix(".weight")
            target = Target(fid, key)
            _add(targets, "lora_unet_" + module.replace(".", "_"), target)
            if layout is not None:  # sd-scripts' SDXL files use the SGM spelling
                _add(targets, "lora_unet_" + sgm_path(module, layout).replace(".", "_"), target)


def _encoder_targets(
    base: Path, sub: str, prefix: str, targets: dict[str, list[Target]], files: dict[str, Path]
) -> None:
    from nyx_tui.trainers.native.networks import text_encoder_name

    folder = base / sub
    if not folder.is_dir():
        return
    t5 = prefix == "lora_te3"
    for path in _weight_files(folder):
        fid = str(path.relative_to(base))
        files[fid] = path
        for key in _keys(path):
            if not key.endswith(".weight"):
                continue
            module = key.removesuffix(".weight")
            name = f"{prefix}_{module.replace('.', '_')}" if t5 else text_encoder_name(prefix, module)
            _add(targets, name, Target(fid, key))


def _meta_transformer(folder: Path, family: str) -> Any:
    """The transformer built on the meta device from its config: module names and widths, no weights."""
    import diffusers
    import torch

    d: Any = diffusers
    cls = d.FluxTransformer2DModel if family == "flux" else d.SD3Transformer2DModel
    config = {k: v for k, v in _json(folder / "config.json").items() if not k.startswith("_")}
    with torch.device("meta"):
        return cls.from_config(config)


def _transformer_targets(base: Path, family: str, targets: dict[str, list[Target]], files: dict[str, Path]) -> None:
    from nyx_tui.trainers.native import flow_names

    folder = base / "transformer"
    key_file: dict[str, str] = {}
    for path in _weight_files(folder):
        fid = str(path.relative_to(base))
        files[fid] = path
        for key in _keys(path):
            key_file.setdefault(key, fid)
    transformer = _meta_transformer(folder, family)
    for fm in flow_names.flow_modules(family, transformer):
        row = 0
        for p, size in zip(fm.paths, flow_names.out_sizes(transformer, fm), strict=True):
            key = f"{p}.weight"
            if key in key_file:
                rows = (row, row + size) if fm.fused else None
                _add(targets, fm.name, Target(key_file[key], key, rows, fm.swap_halves))
            row += size


def folder_base(base: Path) -> Base:
    """A diffusers folder's weight files and kohya-name table; its family from its layout."""
    files: dict[str, Path] = {}
    targets: dict[str, list[Target]] = {}
    if (base / "transformer").is_dir():
        cls = str(_json(base / "transformer" / "config.json").get("_class_name", ""))
        family = "flux" if cls.startswith("Flux") else "sd3" if cls.startswith("SD3") else ""
        if not family:
            raise LoraFileError(f"{base}/transformer is a {cls or 'unknown'} model: Nyx bakes into Flux and SD3 ones")
        _transformer_targets(base, family, targets, files)
        _encoder_targets(base, "text_encoder", "lora_te1", targets, files)
        if family == "flux":
            _encoder_targets(base, "text_encoder_2", "lora_te3", targets, files)  # T5, as sd-scripts names it
        else:
            _encoder_targets(base, "text_encoder_2", "lora_te2", targets, files)
            _encoder_targets(base, "text_encoder_3", "lora_te3", targets, files)
    elif (base / "unet").is_dir():
        sdxl = (base / "text_encoder_2").is_dir()
        family = "sdxl" if sdxl else "sd15"
        _unet_targets(base, targets, files, sdxl)
        if sdxl:
            _encoder_targets(base, "text_encoder", "lora_te1", targets, files)
            _encoder_targets(base, "text_encoder_2", "lora_te2", targets, files)
        else:
            _encoder_targets(base, "text_encoder", "lora_te", targets, files)
    else:
        raise LoraFileError(
            f"{base} is no diffusers model folder (no unet/ or transformer/): give a diffusers folder or a "
            ".safetensors checkpoint as --base"
        )
    return Base("folder", family, files, targets)


_OPENCLIP = re.compile(r"^conditioner\.embedders\.1\.model\.transformer\.resblocks\.(\d+)\.(.+)$")
_OPENCLIP_PARTS = {"attn.out_proj.weight": "self_attn_out_proj", "mlp.c_fc.weight": "mlp_fc1",
                   "mlp.c_proj.weight": "mlp_fc2"}  # fmt: skip


def _sd15_unet_names() -> dict[str, str]:
    """SD1.5's LDM UNet path (`input_blocks.1.1.proj_in`) → diffusers path, from a meta UNet of SD1.5's layout."""
    import diffusers
    import torch

    from nyx_tui.trainers.native.kohya_names import UNetLayout, sgm_path

    d: Any = diffusers
    with torch.device("meta"):
        unet = d.UNet2DConditionModel(cross_attention_dim=768, attention_head_dim=8)
    layout = UNetLayout.from_config(unet.config)
    return {
        sgm_path(path, layout): path
        for path, module in unet.named_modules()
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d))
    }


def file_base(path: Path) -> Base:
    """A single-file checkpoint in original key names (BFL Flux; LDM/SGM SD1.5 and SDXL)."""
    fid = path.name
    keys = _keys(path)
    targets: dict[str, list[Target]] = {}
    if any(k.startswith(("double_blocks.", "model.diffusion_model.double_blocks.")) for k in keys):
        family = "flux"
        for key in keys:
            if key.endswith(".weight"):  # sd-scripts' flux_merge_lora rule: lora_unet_ + the BFL path
                module = key.removesuffix(".weight").removeprefix("model.diffusion_model.")
                _add(targets, "lora_unet_" + module.replace(".", "_"), Target(fid, key))
        return Base("file", family, {fid: path}, targets)
    if not any(k.startswith("model.diffusion_model.input_blocks.") for k in keys):
        raise LoraFileError(
            f"{path.name} is no checkpoint Nyx can bake into: it has neither BFL Flux keys (double_blocks.…) nor "
            "LDM/SGM UNet keys (model.diffusion_model.input_blocks.…); give a diffusers folder as --base"
        )
    sdxl = any(k.startswith("conditioner.embedders.") for k in keys)
    family = "sdxl" if sdxl else "sd15"
    sd15_names = {} if sdxl else _sd15_unet_names()
    for key in keys:
        if key.startswith("model.diffusion_model.") and key.endswith(".weight"):
            ldm = key.removeprefix("model.diffusion_model.").removesuffix(".weight")
            name = ldm if sdxl else sd15_names.get(ldm)
            if name is not None:
                _add(targets, "lora_unet_" + name.replace(".", "_"), Target(fid, key))
        elif key.startswith("cond_stage_model.transformer.") and key.endswith(".weight"):
            module = key.removeprefix("cond_stage_model.transformer.").removesuffix(".weight")
            _add(targets, "lora_te_" + module.replace(".", "_"), Target(fid, key))
        elif key.startswith("conditioner.embedders.0.transformer.") and key.endswith(".weight"):
            module = key.removeprefix("conditioner.embedders.0.transformer.").removesuffix(".weight")
            _add(targets, "lora_te1_" + module.replace(".", "_"), Target(fid, key))
        elif m := _OPENCLIP.match(key):
            layer, rest = m.group(1), m.group(2)
            prefix = f"lora_te2_text_model_encoder_layers_{layer}_"
            if rest == "attn.in_proj_weight":  # q, k, v stacked along the output
                width = _shape(path, key)[0] // 3
                for i, part in enumerate(("q", "k", "v")):
                    dest = (i * width, (i + 1) * width)
                    _add(targets, f"{prefix}self_attn_{part}_proj", Target(fid, key, dest_rows=dest))
            elif rest in _OPENCLIP_PARTS:
                _add(targets, prefix + _OPENCLIP_PARTS[rest], Target(fid, key))
    return Base("file", family, {fid: path}, targets)


def open_base(base: Path | str) -> Base:
    base = Path(base)
    if not base.exists():
        raise LoraFileError(f"--base {base}: no such file or folder")
    if base.is_dir():
        return folder_base(base)
    if base.suffix != ".safetensors":
        raise LoraFileError(f"--base {base.name}: only .safetensors checkpoints (or diffusers folders) can be baked")
    return file_base(base)


def _check_fit(module: Module, target: Target, shape: list[int]) -> None:
    """LoraFileError when the module's update can't land on the target weight (another model's LoRA)."""
    out = int(module.up.shape[0])
    if target.rows is not None:
        out = target.rows[1] - target.rows[0]
    rows = shape[0] if target.dest_rows is None else target.dest_rows[1] - target.dest_rows[0]
    cols = 1
    for d in module.down.shape[1:]:
        cols *= int(d)
    want_cols = 1
    for d in shape[1:]:
        want_cols *= int(d)
    if (out, cols) != (rows, want_cols) or (target.rows is not None and target.rows[1] > module.up.shape[0]):
        raise LoraFileError(
            f"{module.name}: its update is out {module.up.shape[0]} × in {tuple(module.down.shape[1:])}, the base's "
            f"{target.key} is {tuple(shape)}: the LoRA is for another model"
        )


def _delta_for(module: Module, target: Target, shape: list[int]) -> torch.Tensor:
    """The module's scaled ΔW (float32) in the target weight's shape: its rows for a fused piece."""
    import torch

    delta = module.delta() * module.scale
    if target.swap:
        first, second = delta.chunk(2, dim=0)
        delta = torch.cat([second, first], 0)
    if target.rows is not None:
        delta = delta[target.rows[0] : target.rows[1]]
    rows = shape[0] if target.dest_rows is None else target.dest_rows[1] - target.dest_rows[0]
    want = [rows, *shape[1:]]
    if delta.numel() != int(torch.Size(want).numel()):
        raise LoraFileError(
            f"{module.name}: its update is {tuple(delta.shape)} (up {tuple(module.up.shape)}, down "
            f"{tuple(module.down.shape)}), the base's {target.key} is {tuple(want)}: the LoRA is for another model"
        )
    return delta.reshape(want)


def _write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None) -> None:
    import safetensors.torch

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    safetensors.torch.save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def _file_metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def bake(
    sources: list[Source],
    base: Path | str,
    output: Path | str,
    *,
    precision: str | None = None,
    device: str = "cpu",
) -> MergeReport:
    """Bake the LoRAs into the base model (module docstring). A diffusers folder is written as a new folder
    `output` (which must not exist, or be empty); a checkpoint as the file `output`. `precision` None keeps
    each weight's dtype."""
    import safetensors.torch
    import torch

    from nyx_tui import families
    from nyx_tui.lora.resize import device_for

    base, output = Path(base), Path(output)
    if not sources:
        raise LoraFileError("give at least one LoRA to bake into the base")
    if output.exists() and output.resolve() == base.resolve():
        raise LoraFileError(f"-o {output} is the base: write the merged model to a new path")
    dev = device_for(device)
    model = open_base(base)
    if model.kind == "folder" and output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise LoraFileError(f"-o {output} exists: give a new folder for the merged diffusers model")
    if model.kind == "file" and output.is_dir():
        raise LoraFileError(f"-o {output} is a folder: a checkpoint base is written as one .safetensors file")
    loaded = load_sources(sources, "baked")
    base_families = {f.value for f in families.detect(base).families} | {model.family}
    for item in loaded:
        det = families.detect(item.source.path)
        if det.families and not base_families & {f.value for f in det.families}:
            raise LoraFileError(
                f"{item.source.path.name} is a LoRA for {'/'.join(f.value for f in det.families)}, the base "
                f"{base.name} a {model.family} model: bake it into a base of its family"
            )
    missing: list[str] = []
    plan: dict[str, list[tuple[Module, float, Target]]] = {}
    for item in loaded:
        for name, module in item.modules.items():
            found = model.targets.get(name)
            if not found:
                missing.append(f"{item.source.path.name}: {name}")
                continue
            for target in found:
                _check_fit(module, target, _shape(model.files[target.file], target.key))  # before any work
                plan.setdefault(target.file, []).append((module, item.source.weight, target))
    if missing:
        examples = ", ".join(missing[:MAX_LISTED]) + (
            f" … ({len(missing)} in all)" if len(missing) > MAX_LISTED else ""
        )
        if all(m.partition(": ")[2].startswith("lora_te") for m in missing):
            why = (
                "the base holds no such text encoder (a UNet/transformer-only checkpoint? bake into a diffusers folder)"
            )
        else:
            why = "the LoRA was trained on another model architecture"
        raise LoraFileError(
            f"{len(missing)} LoRA modules name no module of the {model.family} base {base.name} ({examples}): {why}"
        )
    report = MergeReport(str(output), "bake", [(str(x.source.path), x.source.weight) for x in loaded])
    save_dtype = dtype_for(precision, {})[0] if precision is not None else None

    def baked(fid: str) -> dict[str, torch.Tensor]:
        """One weight file with its planned updates applied (W + Σ w·ΔW in float32, back in W's dtype)."""
        weights = safetensors.torch.load_file(str(model.files[fid]))
        with torch.no_grad():
            for module, weight, target in plan.get(fid, []):
                w = weights[target.key]
                delta = _delta_for(module, target, list(w.shape)).to(dev) * weight
                new = w.to(dev, torch.float32)
                if target.dest_rows is None:
                    new = new + delta
                else:
                    a, b = target.dest_rows
                    new[a:b] += delta
                weights[target.key] = new.to("cpu", w.dtype)
        report.baked[fid] = len(plan.get(fid, []))
        if save_dtype is not None:
            weights = {k: v.to(save_dtype) if v.is_floating_point() else v for k, v in weights.items()}
        return weights

    if model.kind == "file":
        fid = next(iter(model.files))
        meta = _file_metadata(model.files[fid])
        meta["modelspec.merged_from"] = ", ".join([base.stem, *(x.source.path.stem for x in loaded)])
        _write_safetensors(output, baked(fid), meta)
        return report
    # a folder: copy what stays, write each changed file (one in memory at a time), then rename into place
    redo = set(plan) if save_dtype is None else set(model.files)  # --precision converts every weight file
    redo_paths = {model.files[f].resolve() for f in redo}
    tmp = output.with_name(f".{output.name}.{os.getpid()}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)

    def skip(folder: str, names: list[str]) -> list[str]:
        return [n for n in names if (Path(folder) / n).resolve() in redo_paths]

    try:
        shutil.copytree(base, tmp, ignore=skip)
        for fid in sorted(redo):
            _write_safetensors(tmp / fid, baked(fid), _file_metadata(model.files[fid]))
        report.baked = {k: v for k, v in report.baked.items() if v}
        if output.exists():
            output.rmdir()
        os.replace(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return report
