"""The templates library: the shipped presets plus the user's own templates, with what each is for.

A template is a config to start from. The built-in ones are the presets (`config/presets/*.toml`, partial
overlays on the defaults); a user's are complete configs saved from a form or a file into
`<config dir>/templates/NAME.toml`. Both say what they are for in the same place: the comment block at the
top of the file (TOML comments, so the config loader never sees them and `TrainingConfig` gains no field).
The first sentence of that block is the short "for" shown in tables; the block is the description.

What a template applies to and what it needs are not written down by hand, they are derived from the
resolved config: the family from `model.family`, the VRAM from `nyx_tui.vram`'s estimate (arithmetic, no
torch), so they can never disagree with the config itself.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nyx_tui import paths
from nyx_tui.config.errors import ConfigError
from nyx_tui.config.io import dumps_config, parse_config
from nyx_tui.config.model import TrainingConfig

SUFFIX = ".toml"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
NAME_RULE = "1–64 letters, digits, '.', '_' or '-', starting with a letter or digit (e.g. my-flux-style)"


class TemplateError(ValueError):
    """A template operation that cannot be done: `message` says why, `fix` what to do instead."""

    def __init__(self, message: str, fix: str) -> None:
        super().__init__(f"{message}; {fix}")
        self.message, self.fix = message, fix


@dataclass(frozen=True)
class Template:
    """One entry of the library. `error` is set (and the derived fields empty) for a user file that no
    longer loads: it is listed so it can be seen and deleted, not silently skipped."""

    name: str
    builtin: bool
    description: str = ""
    families: tuple[str, ...] = ()
    vram_gib: float | None = None
    vram_tier_gb: int | None = None
    path: Path | None = None
    error: str | None = None
    settings: dict[str, str] = field(default_factory=dict)

    @property
    def summary(self) -> str:
        """What the template is for, in a few words: the first sentence of its description."""
        return summary_of(self.name, self.description)

    @property
    def source(self) -> str:
        return "built-in" if self.builtin else "user"

    @property
    def vram_text(self) -> str:
        if self.vram_gib is None:
            return "?"
        tier = f" ({self.vram_tier_gb} GB)" if self.vram_tier_gb else " (> any card)"
        return f"≈{self.vram_gib:.1f} GiB{tier}"


# ------------------------------------------------------------------------------------------ locations


def templates_dir() -> Path:
    """Where user templates live: `<config dir>/templates` (NYX_HOME moves it)."""
    return paths.config_dir() / "templates"


def _builtin_names() -> list[str]:
    from nyx_tui.config.presets import builtin_presets

    return builtin_presets()


def user_template_names() -> list[str]:
    """The user templates' names (valid file names only), sorted; built-in names are never shadowed."""
    folder = templates_dir()
    if not folder.is_dir():
        return []
    builtin = set(_builtin_names())
    names = []
    for p in folder.iterdir():
        name = p.name[: -len(SUFFIX)]
        if p.name.endswith(SUFFIX) and p.is_file() and NAME_RE.match(name) and name not in builtin:
            names.append(name)
    return sorted(names)


def user_template_path(name: str) -> Path:
    return templates_dir() / f"{name}{SUFFIX}"


def check_name(name: str) -> str:
    """The name, stripped, if it can be a user template's name; TemplateError otherwise."""
    name = name.strip()
    if name.endswith(SUFFIX):
        name = name[: -len(SUFFIX)]
    if not NAME_RE.match(name):
        raise TemplateError(f"{name!r} is not a valid template name", f"use {NAME_RULE}")
    if name in _builtin_names():
        raise TemplateError(f"{name!r} is a built-in preset", "choose another name for your template")
    return name


# ------------------------------------------------------------------------------------------ descriptions


def description_of(text: str) -> str:
    """The leading comment block of a TOML text, without the `#` marks (lines joined into paragraphs)."""
    lines: list[str] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line.startswith("#"):
            break
        lines.append(line[1:].strip())
    paragraphs, current = [], []
    for line in lines:
        if line:
            current.append(line)
        elif current:
            paragraphs.append(" ".join(current))
            current = []
    if current:
        paragraphs.append(" ".join(current))
    return "\n".join(paragraphs)


def summary_of(name: str, description: str) -> str:
    """The first sentence of `description` up to its first `: `, `. ` or `(`, without a leading `NAME: `."""
    text = description.split("\n", 1)[0].strip()
    if text.lower().startswith(name.lower() + ":"):
        text = text[len(name) + 1 :].strip()
    cut = len(text)
    for mark in (": ", ". ", " ("):
        at = text.find(mark)
        if 0 < at < cut:
            cut = at
    return text[:cut].rstrip(".").strip()


def _comment(description: str) -> str:
    """`description` as a leading comment block; each of its lines a paragraph (read back by description_of)."""
    lines = [line.strip() for line in description.strip().splitlines() if line.strip()] or [""]
    return "#\n".join(f"# {line}\n" for line in lines)


# ------------------------------------------------------------------------------------------ reading


def template_text(name: str) -> str:
    """The TOML text of a built-in preset or a user template; ConfigError naming the choices if unknown."""
    from nyx_tui.config.presets import preset_text

    return preset_text(name)


def load_template(name: str) -> TrainingConfig:
    """The template's config. Relative paths stay as written (as with presets)."""
    return parse_config(template_text(name), base_dir=None, source=f"template {name}")


def key_settings(cfg: TrainingConfig) -> dict[str, str]:
    """The few settings that tell templates apart, as display text."""

    def get(obj: Any, name: str) -> Any:
        value = getattr(obj, name, None)
        return getattr(value, "value", value)

    out: dict[str, str] = {
        "family": str(get(cfg.model, "family")),
        "base model": str(cfg.model.pretrained),
        "resolution": str(get(cfg.dataset, "resolution")),
        "network": f"{get(cfg.network, 'kind')} rank {get(cfg.network, 'dim')} alpha {get(cfg.network, 'alpha')}",
        "optimizer": f"{get(cfg.optimizer, 'type')} lr {get(cfg.optimizer, 'learning_rate')}",
        "steps": f"{get(cfg.training, 'max_steps')} at batch {get(cfg.training, 'batch_size')}",
        "precision": str(get(cfg.training, "mixed_precision")),
    }
    quant = get(cfg.training, "base_quantization")
    if quant not in (None, "none"):
        out["base quantization"] = str(quant)
    flow = getattr(cfg, "flow", None)
    swap = get(flow, "blocks_to_swap") if flow is not None else None
    if swap:
        out["blocks to swap"] = str(swap)
    return out


def _describe(name: str, builtin: bool) -> Template:
    path = None if builtin else user_template_path(name)
    try:
        text = template_text(name)
    except (ConfigError, OSError) as e:
        return Template(name, builtin, path=path, error=str(e))
    description = description_of(text)
    try:
        cfg = parse_config(text, base_dir=None, source=f"template {name}")
    except ConfigError as e:
        first = e.problems[0] if e.problems else None
        why = f"{first.field}: {first.message}" if first else "it does not load"
        return Template(name, builtin, description=description, path=path, error=why)
    vram_gib, tier = None, None
    try:
        from nyx_tui import vram

        found = vram.estimate(cfg)
        vram_gib, tier = found.total_gib, vram.smallest_tier(found.total_gib)
    except Exception:  # an estimate never hides a template
        pass
    return Template(
        name,
        builtin,
        description=description,
        families=(str(cfg.model.family.value),),
        vram_gib=vram_gib,
        vram_tier_gb=tier,
        path=path,
        settings=key_settings(cfg),
    )


def list_templates() -> list[Template]:
    """Every template: the built-in presets (sorted), then the user's (sorted)."""
    return [_describe(n, True) for n in _builtin_names()] + [_describe(n, False) for n in user_template_names()]


def get_template(name: str) -> Template:
    """One template's entry; TemplateError when there is none of that name."""
    if name in _builtin_names():
        return _describe(name, True)
    if name in user_template_names():
        return _describe(name, False)
    raise TemplateError(f"there is no template {name!r}", "`nyx config presets` lists them")


# ------------------------------------------------------------------------------------------ writing


def save_template(name: str, config: TrainingConfig, description: str = "", *, overwrite: bool = False) -> Path:
    """Write `config` as the user template `name`, `description` as its leading comment. Atomic; refuses a
    built-in name, a bad name, and (unless `overwrite`) an existing user template."""
    from nyx_tui.jobs.jobdir import atomic_write

    name = check_name(name)
    path = user_template_path(name)
    if path.exists() and not overwrite:
        raise TemplateError(f"a user template {name!r} exists", "choose another name, or overwrite it (--force)")
    body = dumps_config(config)
    text = _comment(description or f"{name}: a user template") + "\n" + body
    tomllib.loads(text)  # what is written must read back
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, text)
    return path


def delete_template(name: str) -> Path:
    """Remove the user template `name`; built-in presets cannot be deleted."""
    if name in _builtin_names():
        raise TemplateError(f"{name!r} is a built-in preset and cannot be deleted", "only user templates can")
    path = user_template_path(name)
    if not NAME_RE.match(name) or not path.is_file():
        raise TemplateError(f"there is no user template {name!r}", "`nyx config presets` lists them")
    path.unlink()
    return path


__all__ = [
    "Template",
    "TemplateError",
    "check_name",
    "delete_template",
    "description_of",
    "get_template",
    "key_settings",
    "list_templates",
    "load_template",
    "save_template",
    "summary_of",
    "templates_dir",
    "user_template_names",
]
