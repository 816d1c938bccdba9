"""`nyx lora resize`: a LoRA/LoCon file brought to a lower rank, fixed or chosen per module, the way sd-scripts'
`networks/resize_lora.py` does it, so a file resized here has the ranks, alphas and strength that tool gives.

Per module the full update ΔW = up · down (a LoCon convolution's down (r, in, kh, kw) flattened to (r, in·kh·kw),
its up (out, r, 1, 1) to (out, r)) is decomposed, ΔW = U·diag(S)·Vh, and cut to k singular values: the new up is
U[:, :k]·diag(S[:k]) (reshaped to (out, k, 1, 1) for a convolution), the new down Vh[:k] (reshaped to
(k, in, kh, kw)). The alpha keeps the module's strength: new alpha = old alpha / old rank × k (alpha absent:
alpha = rank, as loaders take it), so up·down·alpha/rank is the truncated SVD of the original scaled update.

The rank k (sd-scripts' rule, exactly; S has min(out, in·kh·kw) values, largest first, n = len(S)):
- fixed (`--rank R`): k = R;
- `sv_ratio` X: c = #{i : S[i] > S[0] / X};                      k = clamp(c, 1, n−1) + 1
- `sv_cumulative` X: c = #{i : cumsum(S)[i] / ΣS < X};           k = clamp(c + 1, 1, n−1) + 1
- `sv_fro` X: c = #{i : cumsum(S²)[i] / ΣS² < X²};               k = clamp(c + 1, 1, n−1) + 1
  (sd-scripts' searchsorted of the target in the normalised cumulative sums counts exactly these; its index
  functions add 1 for cumulative/fro, clamp to [1, n−1], and `rank_resize` adds 1 more for every method);
- then k = 1 when S[0] ≤ 1e-6 (a zero module), else k = min(k, cap), where cap is `--max-rank` for dynamic
  methods (sd-scripts' `--new_rank`), `--rank` for a fixed one, and `--conv-rank` (default: the same) for
  convolutions of any kernel (sd-scripts' `--new_conv_rank` applies to every 4-D module, 1×1 ones too).
One addition: Nyx never goes above the module's own rank. Past it ΔW has only zero singular values (rounding
noise), so sd-scripts' output there is the same ΔW padded with empty ranks; Nyx leaves the padding out. With
`--max-rank` unset, the cap is the module's own rank: the ranks are then sd-scripts' with `--new_rank` equal
to that rank.

Metadata: what sd-scripts writes (`ss_network_dim`/`ss_network_alpha` the new values, "Dynamic" for a dynamic
resize; `ss_training_comment` prefixed with "dimension is resized from A to B; " or "Dynamic resize with
METHOD: X from A; "), the `sshs_*` hashes recomputed for the new tensors (`lora_io.safetensors_hashes`, via
`lora_io.save_lora`, which writes atomically). LoHa, LoKr and DoRA files are refused (`unsupported`). torch is
imported inside the functions: the CLI imports this module lazily, but keep it light anyway.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

DYNAMIC_METHODS = ("sv_ratio", "sv_fro", "sv_cumulative")
PRECISIONS = ("fp16", "bf16", "fp32")
MIN_SV = 1e-6  # sd-scripts': a module whose largest singular value is at most this is a zero module (rank 1)

# a LoRA module's down key: kohya (`name.lora_down.weight`) or peft/diffusers (`name.lora_A.weight`)
_DOWN_KEY = re.compile(r"^(?P<name>.+)\.(?P<down>lora_down|lora_A)(?P<suffix>\.weight|)$")
_UP_OF = {"lora_down": "lora_up", "lora_A": "lora_B"}


class LoraFileError(ValueError):
    """The file cannot be resized or merged: the message names the problem and what to do instead."""


# --------------------------------------------------------------------------------------------- reading


def read_lora(path: Path | str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A safetensors LoRA's tensors and metadata; LoraFileError for a missing or unreadable file."""
    import safetensors
    import safetensors.torch

    path = Path(path)
    if not path.is_file():
        raise LoraFileError(f"{path}: no such file (give the path of a .safetensors LoRA)")
    try:
        tensors = safetensors.torch.load_file(str(path))
        with safetensors.safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
    except Exception as e:  # safetensors raises its own error types for a bad header
        raise LoraFileError(
            f"{path}: not a readable safetensors file ({e}); .ckpt/.pt LoRAs must be converted to .safetensors first"
        ) from e
    return tensors, metadata


def unsupported(tensors: dict[str, Any], what: str = "resized") -> str | None:
    """Why the file's network can't be `what` (None when it can): LoHa, LoKr and DoRA are no up·down pair
    whose SVD can be cut and split back into the same kind of network."""
    keys = list(tensors)
    if any(".hada_w1_a" in k or ".hada_w1_b" in k for k in keys):
        return (
            f"a LoHa (LyCORIS) file can't be {what}: its update is a Hadamard product (w1a·w1b)⊙(w2a·w2b), "
            "whose truncated SVD is no longer a Hadamard product of two low-rank pairs — it would become a "
            "plain LoRA, another network. Extract a LoRA from the model merged with it instead"
        )
    if any(".lokr_w1" in k or ".lokr_w2" in k for k in keys):
        return (
            f"a LoKr (LyCORIS) file can't be {what}: its update is a Kronecker product w1⊗w2, whose rank is not "
            "a LoRA rank and whose truncated SVD is no Kronecker product. Extract a LoRA from the model merged "
            "with it instead"
        )
    if any(k.endswith((".dora_scale", ".lora_magnitude_vector", ".lora_magnitude_vector.weight")) for k in keys):
        return (
            f"a DoRA file can't be {what}: its magnitude (dora_scale) rescales each column of W + ΔW by that "
            "column's norm, which depends on the base model's weights the file does not hold; a changed ΔW "
            "would be normalised differently and the magnitudes would no longer fit. Resize needs plain LoRA/LoCon"
        )
    return None


@dataclass
class Module:
    """One LoRA module of a file: its down/up tensors (as stored), alpha (None: absent), and the key names."""

    name: str
    down: torch.Tensor
    up: torch.Tensor
    alpha: float | None
    down_key: str
    up_key: str
    alpha_key: str

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        """alpha / rank, the factor loaders multiply up·down by (alpha absent: 1)."""
        return (self.alpha if self.alpha is not None else self.rank) / self.rank

    @property
    def conv(self) -> bool:
        return self.down.dim() == 4

    @property
    def kind(self) -> str:
        if not self.conv:
            return "linear"
        return "conv1x1" if tuple(self.down.shape[2:]) == (1, 1) else f"conv{self.down.shape[2]}x{self.down.shape[3]}"

    def delta(self) -> torch.Tensor:
        """up · down as a 2-D float32 matrix (out, in·kh·kw), without the alpha/rank scale."""
        import torch

        up = self.up.to(torch.float32).reshape(self.up.shape[0], -1)
        down = self.down.to(torch.float32).reshape(self.rank, -1)
        if up.shape[1] != self.rank:
            raise LoraFileError(
                f"{self.name}: up {tuple(self.up.shape)} and down {tuple(self.down.shape)} have different ranks"
            )
        return up @ down


def lora_modules(tensors: dict[str, torch.Tensor]) -> dict[str, Module]:
    """Every up/down pair in the file by module name (kohya `lora_down`/`lora_up`, or peft `lora_A`/`lora_B`)."""
    out: dict[str, Module] = {}
    for key, value in tensors.items():
        m = _DOWN_KEY.match(key)
        if m is None:
            continue
        name = m.group("name")
        up_key = f"{name}.{_UP_OF[m.group('down')]}{m.group('suffix')}"
        if up_key not in tensors:
            raise LoraFileError(f"{key} has no {up_key}: the file is incomplete")
        alpha_key = f"{name}.alpha"
        alpha = float(tensors[alpha_key].float()) if alpha_key in tensors else None
        out[name] = Module(name, value, tensors[up_key], alpha, key, up_key, alpha_key)
    return out


# --------------------------------------------------------------------------------------------- the rank rule


def rank_for(
    singular_values: Any, method: str | None, param: float | None, cap: int, own_rank: int | None = None
) -> int:
    """The new rank sd-scripts' `rank_resize` picks for these singular values (largest first; a tensor or a
    sequence): the module docstring has the rule. `method` None: fixed at `cap`. `own_rank`: Nyx's extra cap
    at the module's original rank (None: none, as in sd-scripts)."""
    import torch

    s = torch.as_tensor(singular_values).flatten().to(torch.float32)  # sd-scripts decides in float32
    n = int(s.numel())
    if method is None:
        k = cap
    else:
        if param is None:
            raise ValueError(f"{method} needs a parameter")
        if method == "sv_ratio":
            count = int(torch.sum(s > s[0] / param).item())
        elif method == "sv_cumulative":
            count = int(torch.searchsorted(torch.cumsum(s, 0) / float(s.sum()), param)) + 1
        elif method == "sv_fro":
            squares = s.pow(2)
            count = int(torch.searchsorted(torch.cumsum(squares, 0) / float(squares.sum()), param**2)) + 1
        else:
            raise ValueError(f"unknown dynamic method {method!r}: use one of {', '.join(DYNAMIC_METHODS)}")
        k = max(1, min(count, n - 1)) + 1
    if float(s[0]) <= MIN_SV:
        k = 1
    elif k > cap:
        k = cap
    if own_rank is not None:
        k = min(k, own_rank)
    return max(1, min(k, n))


# --------------------------------------------------------------------------------------------- resizing


@dataclass
class ModuleReport:
    """One module's resize: ranks and alphas old → new, and how much of ΔW the new rank keeps (Frobenius norm
    and sum of singular values, as fractions; max_ratio is S[0] / S[k−1], as sd-scripts prints it)."""

    name: str
    kind: str
    old_rank: int
    new_rank: int
    old_alpha: float
    new_alpha: float
    fro_retained: float
    sum_retained: float
    max_ratio: float


@dataclass
class ResizeReport:
    """What `resize_lora` did: per module, and for the file."""

    source: str
    output: str
    method: str
    param: float | None
    precision: str
    modules: list[ModuleReport] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)  # tensors that are no up/down/alpha, copied unchanged
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def mean_fro(self) -> float:
        values = [m.fro_retained for m in self.modules if not math.isnan(m.fro_retained)]
        return sum(values) / len(values) if values else float("nan")

    def to_json(self) -> str:
        data = asdict(self)
        data["mean_fro_retained"] = self.mean_fro
        data["old_size"] = sum(m.old_rank for m in self.modules)
        data["new_size"] = sum(m.new_rank for m in self.modules)
        return json.dumps(data, indent=2)


@dataclass
class Split:
    """A truncated SVD of one module's ΔW: the new tensors and the numbers the report shows."""

    up: torch.Tensor
    down: torch.Tensor
    rank: int
    fro_retained: float
    sum_retained: float
    max_ratio: float


def retained(s: torch.Tensor, k: int) -> tuple[float, float, float]:
    """(Frobenius fraction, sum fraction, S[0]/S[k−1]) kept by the first k singular values."""
    s = s.double()
    fro = float(s[:k].pow(2).sum().sqrt() / s.pow(2).sum().sqrt()) if float(s.sum()) > 0 else float("nan")
    total = float(s.abs().sum())
    part = float(s[:k].abs().sum()) / total if total > 0 else float("nan")
    ratio = float(s[0] / s[k - 1]) if float(s[k - 1]) > 0 else float("inf")
    return fro, part, ratio


def device_for(name: str) -> torch.device:
    """The torch device for `--device`; a clear error for cuda without a usable GPU."""
    import torch

    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda":
        if not torch.cuda.is_available():
            build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
            raise LoraFileError(f"--device cuda: torch ({build}) sees no CUDA GPU here; use --device cpu")
        return torch.device("cuda")
    raise LoraFileError(f"--device {name!r}: use cpu or cuda")


def dtype_for(precision: str | None, tensors: dict[str, torch.Tensor]) -> tuple[torch.dtype, str]:
    """The save dtype and its name: `precision` (fp16, bf16, fp32) or, when None, the input's (its first
    floating-point tensor's; float32 when there is none)."""
    import torch

    names = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
    if precision is None:
        dtype = next((v.dtype for k, v in tensors.items() if v.dtype in names and v.dim() > 0), torch.float32)
        return dtype, names[dtype]
    table = {v: k for k, v in names.items()}
    if precision not in table:
        raise LoraFileError(f"--precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    return table[precision], precision


def resize_module(
    module: Module,
    *,
    method: str | None,
    param: float | None,
    cap: int,
    device: torch.device,
) -> Split:
    """The resized up/down of one module (float32, on the CPU), shaped as the original's."""
    import torch

    delta = module.delta().to(device)
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    k = rank_for(s.cpu(), method, param, cap, own_rank=module.rank)
    up = (u[:, :k] * s[:k]).cpu()
    down = vh[:k].cpu()
    if module.conv:
        up = up.reshape(module.up.shape[0], k, 1, 1)
        down = down.reshape(k, *module.down.shape[1:])
    fro, part, ratio = retained(s.cpu(), k)
    return Split(up.contiguous(), down.contiguous(), k, fro, part, ratio)


def _fmt(value: float) -> str:
    return f"{value:g}"


def resize_metadata(
    metadata: dict[str, str],
    *,
    method: str | None,
    param: float | None,
    old_dim: int,
    rank: int | None,
    conv_rank: int | None,
    new_alpha: float | None,
) -> dict[str, str]:
    """sd-scripts' metadata update of a resize (the old hashes dropped: `save_lora` writes the new ones)."""
    out = {k: v for k, v in metadata.items() if not k.startswith("sshs_")}
    comment = metadata.get("ss_training_comment", "")
    if method is None:
        conv = "" if conv_rank in (None, rank) else f" (conv: {conv_rank})"
        out["ss_training_comment"] = f"dimension is resized from {old_dim} to {rank}{conv}; {comment}"
        out["ss_network_dim"] = str(rank)
        out["ss_network_alpha"] = _fmt(new_alpha) if new_alpha is not None else "Dynamic"
    else:
        out["ss_training_comment"] = f"Dynamic resize with {method}: {_fmt(param or 0)} from {old_dim}; {comment}"
        out["ss_network_dim"] = "Dynamic"
        out["ss_network_alpha"] = "Dynamic"
    return out


def resize_lora(
    source: Path | str,
    output: Path | str,
    *,
    rank: int | None = None,
    dynamic: str | None = None,
    param: float | None = None,
    max_rank: int | None = None,
    conv_rank: int | None = None,
    device: str = "cpu",
    precision: str | None = None,
) -> ResizeReport:
    """Resize the LoRA/LoCon file `source` into `output` (module docstring: the rules). Either `rank` (fixed)
    or `dynamic` with `param`; `max_rank` caps a dynamic rank (default: each module's own rank); `conv_rank`
    replaces `rank`/`max_rank` for convolutions. Raises LoraFileError for input it can't take."""
    import torch

    source, output = Path(source), Path(output)
    if (rank is None) == (dynamic is None):
        raise LoraFileError("give either a fixed rank (--rank R) or a dynamic method (--dynamic METHOD --param X)")
    if dynamic is not None:
        if dynamic not in DYNAMIC_METHODS:
            raise LoraFileError(f"--dynamic {dynamic!r}: use one of {', '.join(DYNAMIC_METHODS)}")
        if param is None or not param > 0:
            raise LoraFileError(f"--dynamic {dynamic} needs --param X > 0 (e.g. sv_fro 0.9, sv_ratio 20)")
        if dynamic in ("sv_fro", "sv_cumulative") and param > 1:
            raise LoraFileError(f"--param for {dynamic} is a fraction of the whole (0 < X ≤ 1), not {param:g}")
    for label, given in (("--rank", rank), ("--max-rank", max_rank), ("--conv-rank", conv_rank)):
        if given is not None and given < 1:
            raise LoraFileError(f"{label} must be at least 1, not {given}")
    if output.resolve() == source.resolve():
        raise LoraFileError(f"-o {output} is the input file: write the resized LoRA to a new file")
    dev = device_for(device)
    tensors, metadata = read_lora(source)
    why = unsupported(tensors)
    if why:
        raise LoraFileError(f"{source.name}: {why}")
    modules = lora_modules(tensors)
    if not modules:
        raise LoraFileError(f"{source.name} has no LoRA modules (no .lora_down/.lora_up or lora_A/lora_B tensors)")
    save_dtype, precision_name = dtype_for(precision, tensors)
    report = ResizeReport(str(source), str(output), dynamic or "fixed", param, precision_name)
    used = {k for m in modules.values() for k in (m.down_key, m.up_key, m.alpha_key)}
    out: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        if key not in used:
            out[key] = value
            report.kept.append(key)
    linear_alphas: set[float] = set()
    with torch.no_grad():
        for module in modules.values():
            limit = rank if dynamic is None else max_rank
            if module.conv and conv_rank is not None:
                limit = conv_rank
            cap = limit if limit is not None else module.rank
            split = resize_module(module, method=dynamic, param=param, cap=cap, device=dev)
            new_alpha = module.scale * split.rank
            out[module.down_key] = split.down.to(save_dtype).contiguous()
            out[module.up_key] = split.up.to(save_dtype).contiguous()
            if module.alpha is not None:  # a file without alphas stays so (alpha = rank, scale 1, either way)
                out[module.alpha_key] = torch.tensor(new_alpha, dtype=save_dtype)
            if not module.conv:
                linear_alphas.add(round(new_alpha, 6))
            report.modules.append(
                ModuleReport(
                    module.name,
                    module.kind,
                    module.rank,
                    split.rank,
                    module.alpha if module.alpha is not None else float(module.rank),
                    new_alpha,
                    split.fro_retained,
                    split.sum_retained,
                    split.max_ratio,
                )
            )
    for key in report.kept:
        value = out[key]
        if value.is_floating_point() and value.dtype != save_dtype:
            out[key] = value.to(save_dtype)
    old_dim = max(m.old_rank for m in report.modules)
    meta = resize_metadata(
        metadata,
        method=dynamic,
        param=param,
        old_dim=old_dim,
        rank=rank,
        conv_rank=conv_rank,
        new_alpha=next(iter(linear_alphas)) if len(linear_alphas) == 1 else None,
    )
    report.metadata = save(output, out, meta)
    return report


def save(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> dict[str, str]:
    """Write atomically with fresh `sshs_*` hashes (`lora_io.save_lora`); returns the metadata written."""
    from nyx_tui.trainers.native import lora_io

    lora_io.save_lora(path, tensors, metadata)
    return lora_io.read_metadata(path)
