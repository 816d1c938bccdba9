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

Flux and SD3 files fuse several diffusers modules into one (`…_attn_qkv`, Flux's `single_blocks_N_linear1`):
they are split for the network's pieces first (`flow_names.unfuse`: the shared down matrix when the network
shares one, `flow.split_qkv = false`; the block-diagonal pieces when it does not), then checked the same way.
`load_flow_lora` puts such a file (Nyx's or sd-scripts') on a plain Flux/SD3 model as peft adapters, with no
network config: for checking a file, and for the round-trip tests.

Everything is checked before a tensor is copied (shapes, alphas, tensors a module lacks or has beyond the
network's); errors come together in one ValueError that names the setting to change. File modules that
match no adapted module, and adapted modules the file lacks (they keep their fresh init), are warnings.
The pre-flight (`init_check`) says most of this before the model loads; this is the exact check.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, cast

import torch

from nyx_tui.trainers.native import flow_names, lora_io
from nyx_tui.trainers.native.networks import (
    ADAPTER_NAME,
    Adapted,
    Network,
    _by_name,
    text_encoder_name,
    text_encoder_prefix,
    text_encoders,
)

MAX_LISTED = 3


def module_names(network: Network) -> dict[str, Adapted]:
    """Each adapted module by its name in a kohya file: the name `kohya_state_dict` writes and, for SDXL's
    UNet, also the diffusers spelling (`Adapted.name`) that some tools write. Flow networks: by `Adapted.key`
    (the pieces of fused modules apart; `split_flow_state` names the file's tensors so)."""
    if network.flow:
        return {a.key: a for a in network.adapted}
    # to_kohya_keys renames keys and passes values through untouched: the values here are the modules
    placeholders = cast(dict[str, torch.Tensor], {f"{a.name}.weight": a for a in network.adapted})
    renamed = lora_io.to_kohya_keys(network.cfg.model.family, placeholders, unet_config=network.model.unet.config)
    out: dict[str, Adapted] = {}
    for key, value in renamed.items():
        adapted = cast(Adapted, value)
        out[key.rsplit(".", 1)[0]] = adapted
        out.setdefault(adapted.name, adapted)
    return out


def _grouped(state: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        module, _, suffix = key.partition(".")
        grouped.setdefault(module, {})[suffix] = value
    return grouped


def _out_features(module: Any) -> int:
    """A Linear's output width, through peft's wrapper (lycoris leaves the Linear in place)."""
    base = module.get_base_layer() if hasattr(module, "get_base_layer") else module
    return int(base.out_features)


def split_flow_state(network: Network, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A Flux/SD3 file's tensors for the network's pieces: each fused file module the network has is split
    (`flow_names.unfuse`) into its pieces' tensors under `Adapted.key`, shared down or block-diagonal as the
    network trains them (`flow.split_qkv`); SD3's swapped adaLN rows are put back in diffusers' order. Other
    modules pass through."""
    grouped = _grouped(state)
    shared = not network.cfg.flow.split_qkv
    out: dict[str, torch.Tensor] = {}
    done: set[str] = set()
    for name, group in _by_name(network.adapted).items():
        tensors = grouped.get(name)
        lead = group[0]
        if tensors is None or (lead.part is None and not lead.swap) or "lora_up.weight" not in tensors:
            continue
        sizes = [_out_features(a.module) for a in group]
        pieces = flow_names.unfuse(tensors, sizes, shared=shared if lead.part is not None else None, swap=lead.swap)
        for a, piece in zip(group, pieces, strict=True):
            out.update({f"{a.key}.{suffix}": value for suffix, value in piece.items()})
        done.add(name)
    out.update({k: v for k, v in state.items() if k.partition(".")[0] not in done})
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
    if network.flow:
        state = split_flow_state(network, state)
    grouped = _grouped(state)
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


# ------------------------------------------------------------------------- a file on a plain flow model


def flow_file_modules(
    model: Any, state: dict[str, torch.Tensor]
) -> tuple[dict[str, dict[str, dict[str, torch.Tensor]]], list[str]]:
    """A kohya-layout Flux/SD3 file's modules on the model's diffusers modules: {root: {path: tensors}} with
    the fused ones split (`flow_names.unfuse`, either encoding) and SD3's swapped adaLN rows put back, plus
    the file's module names that match no module (T5's `lora_te3_…`, modules outside the blocks)."""
    family = model.family
    table = {fm.name: fm for fm in flow_names.flow_modules(family, model.transformer)}
    te_table: dict[str, tuple[str, str]] = {}
    encoders = text_encoders(model)
    for i, (root, encoder) in enumerate(encoders):
        prefix = text_encoder_prefix(family, i, len(encoders))
        for path, module in encoder.named_modules():
            if isinstance(module, torch.nn.Linear):
                te_table[text_encoder_name(prefix, path)] = (root, path)
    out: dict[str, dict[str, dict[str, torch.Tensor]]] = {}
    unused: list[str] = []
    for name, tensors in _grouped(state).items():
        if "lora_down.weight" not in tensors or "lora_up.weight" not in tensors:
            unused.append(name)
        elif name in table:
            fm = table[name]
            sizes = flow_names.out_sizes(model.transformer, fm)
            for path, piece in zip(fm.paths, flow_names.unfuse(tensors, sizes, swap=fm.swap_halves), strict=True):
                out.setdefault("unet", {})[path] = piece
        elif name in te_table:
            root, path = te_table[name]
            out.setdefault(root, {})[path] = dict(tensors)
        else:
            unused.append(name)
    return out, unused


def load_flow_lora(model: Any, path: Path | dict[str, torch.Tensor]) -> list[str]:
    """Put a kohya-layout Flux/SD3 LoRA file (Nyx's or sd-scripts', LoRA or DoRA) on a plain `FlowModel` as
    peft adapters: each diffusers module gets its piece at the piece's rank and alpha, so the model computes
    what the file's modules compute in ComfyUI or sd-scripts (scale alpha / rank). Returns the file's module
    names that were left out (T5, modules outside the transformer blocks)."""
    import safetensors.torch
    from peft import LoraConfig, inject_adapter_in_model

    state = path if isinstance(path, dict) else safetensors.torch.load_file(str(path))
    modules, unused = flow_file_modules(model, state)
    if not modules:
        raise ValueError(f"none of the file's modules is one of this {model.family.value} model's")
    for root_name, pieces in modules.items():
        root = model.unet if root_name == "unet" else getattr(model, root_name)
        ranks = {p: int(t["lora_down.weight"].shape[0]) for p, t in pieces.items()}
        alphas = {p: float(t["alpha"]) if "alpha" in t else float(ranks[p]) for p, t in pieces.items()}
        first = next(iter(pieces))
        config = LoraConfig(
            r=ranks[first],
            lora_alpha=alphas[first],  # type: ignore[arg-type]  # peft annotates int; a float alpha works
            target_modules=list(pieces),
            rank_pattern={re.escape(p): r for p, r in ranks.items()},
            alpha_pattern={re.escape(p): a for p, a in alphas.items()},
            use_dora=any("dora_scale" in t for t in pieces.values()),
        )
        if root_name == "unet":
            root.add_adapter(config)
        else:
            inject_adapter_in_model(config, root, adapter_name=ADAPTER_NAME)
        with torch.no_grad():
            for p, tensors in pieces.items():
                layer: Any = root.get_submodule(p)
                weight = layer.lora_A[ADAPTER_NAME].weight
                weight.copy_(tensors["lora_down.weight"].to(weight))
                up = layer.lora_B[ADAPTER_NAME].weight
                up.copy_(tensors["lora_up.weight"].to(up))
                if "dora_scale" in tensors:
                    magnitude = layer.lora_magnitude_vector[ADAPTER_NAME].weight
                    magnitude.copy_(tensors["dora_scale"].reshape(magnitude.shape).to(magnitude))
    return unused
