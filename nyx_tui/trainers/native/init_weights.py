"""`network.weights`: the attached adapter starts from a LoRA file's weights (sd-scripts' `--network_weights`).

The file is in kohya names, the ones `Network.kohya_state_dict` writes: `lora_io.to_kohya_keys` gives each
adapted module's name in the file (SDXL's UNet modules in SGM spelling; the diffusers spelling is taken
too), and each module's tensors are its trainable parameters under their kohya suffixes (`Adapted.named`):

- lora, dora (peft): `lora_down.weight`/`lora_up.weight` are lora_A/lora_B, `dora_scale` the magnitude (the
  file's (out, 1[, 1, 1]) layout reshaped to peft's (out,) / (1, out, 1, 1));
- locon, loha, lokr (lycoris): their own parameter names, which are the file's (`lora_down.weight`,
  `hada_w1_a`, `lokr_w1`, …; their `scalar` is the constant 1, so the saved tensors are the parameters).

Nothing is baked in: peft scales by alpha/rank at run time, lycoris by its `scale`, both set from the config
when the network was built; the file's `.alpha` must be that alpha (LyCORIS' LoKr writes the rank for
modules kept as whole matrices: the module's own alpha buffer says which), else the weights would act at
another strength. A module without `.alpha` counts as alpha = rank, as the loaders take it.

Everything is checked before a tensor is copied (shapes, alphas, tensors a module lacks or has beyond the
network's); errors come together in one ValueError that names the setting to change. File modules that
match no adapted module, and adapted modules the file lacks (they keep their fresh init), are warnings.
The pre-flight (`init_check`) says most of this before the model loads; this is the exact check.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, cast

import torch

from nyx_tui.trainers.native import lora_io
from nyx_tui.trainers.native.networks import Adapted, Network

MAX_LISTED = 3


def module_names(network: Network) -> dict[str, Adapted]:
    """Each adapted module by its name in a kohya file: the name `kohya_state_dict` writes and, for SDXL's
    UNet, also the diffusers spelling (`Adapted.name`) that some tools write."""
    # to_kohya_keys renames keys and passes values through untouched: the values here are the modules
    placeholders = cast(dict[str, torch.Tensor], {f"{a.name}.weight": a for a in network.adapted})
    renamed = lora_io.to_kohya_keys(network.cfg.model.family, placeholders, unet_config=network.model.unet.config)
    out: dict[str, Adapted] = {}
    for key, value in renamed.items():
        adapted = cast(Adapted, value)
        out[key.rsplit(".", 1)[0]] = adapted
        out.setdefault(adapted.name, adapted)
    return out


def _alpha(a: Adapted) -> float:
    """The alpha the adapter scales by, as its file would carry it."""
    if a.lycoris is not None:
        return float(cast(Any, a.lycoris).alpha)
    return a.alpha


def _some(names: list[str]) -> str:
    more = f" … ({len(names)} in all)" if len(names) > MAX_LISTED else ""
    return ", ".join(names[:MAX_LISTED]) + more


def _rank(tensors: dict[str, torch.Tensor]) -> int | None:
    for key in ("lora_down.weight", "hada_w1_b", "lokr_w2_b", "lokr_w1_b"):
        if key in tensors and tensors[key].dim() > 0:
            return int(tensors[key].shape[0])
    return None


def _plan(
    network: Network, state: dict[str, torch.Tensor], name: str
) -> tuple[list[tuple[torch.nn.Parameter, torch.Tensor]], list[str], list[str]]:
    """(parameter, file tensor) pairs to copy, file modules matching nothing, adapted modules the file lacks;
    ValueError when the file does not fit."""
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        module, _, suffix = key.partition(".")
        grouped.setdefault(module, {})[suffix] = value
    names_of: dict[int, list[str]] = {}
    for module_name, adapted in module_names(network).items():
        names_of.setdefault(id(adapted), []).append(module_name)
    kind = network.kind.value
    copies: list[tuple[torch.nn.Parameter, torch.Tensor]] = []
    errors: list[str] = []
    used: set[str] = set()
    missing: list[str] = []
    for a in network.adapted:
        names = names_of[id(a)]
        found = next((n for n in names if n in grouped), None)
        if found is None:
            missing.append(names[0])
            continue
        used.add(found)
        tensors = grouped[found]
        lacking = [s for s in a.named if s not in tensors]
        extra = sorted(set(tensors) - set(a.named) - {"alpha"})
        if lacking or extra:
            parts = ([f"lacks {', '.join(lacking)}"] if lacking else []) + (
                [f"has {', '.join(extra)} beyond them"] if extra else []
            )
            errors.append(
                f"{found}: a {kind} module has {', '.join(a.named)}; the file's {' and '.join(parts)} "
                f"(set network.kind to the file's kind)"
            )
            continue
        for suffix, param in a.named.items():
            value = tensors[suffix]
            if tuple(value.shape) != tuple(param.shape):
                if suffix == "dora_scale" and value.numel() == param.numel():  # LyCORIS' layout → peft's
                    value = value.reshape(param.shape)
                else:
                    rank = _rank(tensors)
                    hint = f" (the file's rank is {rank}, this module's {a.dim})" if rank not in (None, a.dim) else ""
                    errors.append(
                        f"{found}.{suffix}: {tuple(value.shape)} in the file, {tuple(param.shape)} here{hint}"
                    )
                    continue
            copies.append((param, value))
        want = _alpha(a)
        got = float(tensors["alpha"]) if "alpha" in tensors else float(_rank(tensors) or 0)
        if not math.isclose(got, want, rel_tol=1e-3, abs_tol=1e-6):  # alphas saved in fp16/bf16 are rounded
            errors.append(f"{found}.alpha: {got:g} in the file, {want:g} here")
    unused = [n for n in grouped if n not in used]
    if errors:
        raise ValueError(
            f"network.weights: {name} does not fit this network ({len(errors)} problems):\n  "
            + "\n  ".join(errors[:10])
            + ("\n  …" if len(errors) > 10 else "")
            + "\nfix: set network.kind, dim, alpha, conv_dim, conv_alpha (and block lists) as the file was trained "
            "(its metadata, ss_network_dim / ss_network_alpha / ss_network_args, says how), or use another file"
        )
    if not used:
        raise ValueError(
            f"network.weights: none of the {len(grouped)} modules of {name} is one this network adapts "
            f"(the file has e.g. {_some(unused)}; the network e.g. {_some(missing)})\n"
            "fix: use a LoRA of this model family in kohya names, with the network's target_modules"
        )
    return copies, unused, missing


def load_into(network: Network, path: Path) -> list[tuple[str, str]]:
    """Copy the file's weights into the attached adapter; returns (message, level) lines for the log.
    Raises ValueError, naming what differs, when the file does not fit the network."""
    import safetensors.torch

    path = Path(path)
    state = safetensors.torch.load_file(str(path))
    copies, unused, missing = _plan(network, state, path.name)
    with torch.no_grad():
        for param, value in copies:
            param.copy_(value.to(device=param.device, dtype=param.dtype))
    total = len(network.adapted)
    lines = [(f"the adapter starts from {path}: {total - len(missing)} of {total} modules loaded", "info")]
    if unused:
        lines.append(
            (
                f"{len(unused)} modules of {path.name} match no module of this network and are left out: "
                f"{_some(unused)}",
                "warning",
            )
        )
    if missing:
        lines.append((f"{len(missing)} modules are not in {path.name} and start fresh: {_some(missing)}", "warning"))
    return lines
