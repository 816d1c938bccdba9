"""One declaration per parameter.

Every training parameter is a pydantic field made by `param()`, which carries — beside pydantic's own
default, description and constraints — the UI group, the "advanced" flag, the families it applies to, its
unit and its sd-scripts name. The TOML keys, validation, the config form, the kohya translation and the
docs table are all read from here (`iter_params`), never written out a second time.
"""

from __future__ import annotations

import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, Field
from pydantic.fields import FieldInfo


class Family(StrEnum):
    """Model families Nyx knows. The value is what TOML and the CLI use."""

    SD15 = "sd15"
    SD2 = "sd2"
    SDXL = "sdxl"
    FLUX = "flux"
    SD3 = "sd3"


ALL_FAMILIES: tuple[Family, ...] = tuple(Family)
UNET_FAMILIES: tuple[Family, ...] = (Family.SD15, Family.SD2, Family.SDXL)
FLOW_FAMILIES: tuple[Family, ...] = (Family.FLUX, Family.SD3)


@dataclass(frozen=True)
class ParamMeta:
    """What Nyx knows about a parameter beyond its type and default."""

    group: str
    advanced: bool = False
    families: tuple[Family, ...] = ALL_FAMILIES
    kohya: str | None = None
    unit: str | None = None
    path: bool = False  # a filesystem path, resolved against the config file's folder on load
    example: str | None = None  # a value to suggest in fix messages


def param(
    default: Any = ...,
    *,
    description: str,
    group: str,
    advanced: bool = False,
    families: tuple[Family, ...] = ALL_FAMILIES,
    kohya: str | None = None,
    unit: str | None = None,
    path: bool = False,
    example: str | None = None,
    default_factory: Any = None,
    **constraints: Any,
) -> Any:
    """A pydantic Field with Nyx's metadata in `json_schema_extra["nyx"]` (JSON-clean: the JSON schema has it too)."""
    extra: dict[str, Any] = {
        "nyx": {
            "group": group,
            "advanced": advanced,
            "families": [f.value for f in families],
            "kohya": kohya,
            "unit": unit,
            "path": path,
            "example": example,
        }
    }
    if default_factory is not None:
        return Field(default_factory=default_factory, description=description, json_schema_extra=extra, **constraints)
    return Field(default, description=description, json_schema_extra=extra, **constraints)


def meta_of(info: FieldInfo) -> ParamMeta | None:
    extra = info.json_schema_extra
    if not isinstance(extra, dict) or "nyx" not in extra:
        return None
    raw: dict[str, Any] = extra["nyx"]  # type: ignore[assignment]
    return ParamMeta(
        group=str(raw["group"]),
        advanced=bool(raw["advanced"]),
        families=tuple(Family(f) for f in raw["families"]),
        kohya=raw.get("kohya"),
        unit=raw.get("unit"),
        path=bool(raw.get("path", False)),
        example=raw.get("example"),
    )


@dataclass(frozen=True)
class Param:
    """One leaf parameter: `path` is its dotted TOML key (`network.dim`, `dataset.subsets[].image_dir`)."""

    path: str
    name: str
    info: FieldInfo
    meta: ParamMeta
    annotation: Any

    @property
    def description(self) -> str:
        return self.info.description or ""

    @property
    def default(self) -> Any:
        return self.info.get_default(call_default_factory=True)


def _section_model(annotation: Any) -> tuple[type[BaseModel] | None, bool]:
    """(model class, is_list) when the annotation is a section model or a list of them."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation, False
    origin = typing.get_origin(annotation)
    if origin in (list, tuple):
        args = typing.get_args(annotation)
        if args and isinstance(args[0], type) and issubclass(args[0], BaseModel):
            return args[0], True
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(annotation):
            model, is_list = _section_model(arg)
            if model is not None:
                return model, is_list
    return None, False


def iter_params(model: type[BaseModel], prefix: str = "") -> Iterator[Param]:
    """Every declared leaf parameter of `model`, depth first, in declaration order."""
    for name, info in model.model_fields.items():
        key = f"{prefix}{name}"
        meta = meta_of(info)
        sub, is_list = _section_model(info.annotation)
        if meta is not None:
            # a declared list of tables (`dataset.subsets`) is a parameter and so is each key inside it
            yield Param(path=key, name=name, info=info, meta=meta, annotation=info.annotation)
            if sub is not None and is_list:
                yield from iter_params(sub, f"{key}[].")
        elif sub is not None:
            yield from iter_params(sub, f"{key}[]." if is_list else f"{key}.")


def field_names(model: type[BaseModel]) -> list[str]:
    return list(model.model_fields)
