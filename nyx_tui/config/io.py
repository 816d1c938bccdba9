"""TOML in and out for `TrainingConfig`, with every mistake turned into a `Problem` a user can act on.

`parse_config` is the one door a config comes in through (files, presets, the TUI's editor): whatever the
text holds, it returns a valid `TrainingConfig` or raises `ConfigError` — never a pydantic or TOML
traceback. Relative paths are resolved against the config file's folder on the way in, so a job directory's
snapshot (`config.toml`) means the same thing wherever the worker runs.
"""

from __future__ import annotations

import datetime as dt
import difflib
import os
import re
import tomllib
import types
import typing
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import tomli_w
from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails

from nyx_tui.config.errors import ConfigError, Problem
from nyx_tui.config.fields import Param, iter_params, meta_of
from nyx_tui.config.model import TrainingConfig

# Path fields whose value may also be a Hugging Face repo id (`owner/name`), kept as written.
REPO_ID_FIELDS: frozenset[str] = frozenset({"model.pretrained", "model.vae", "model.single_file_config"})

_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


# ------------------------------------------------------------------------------------------------- public


def parse_config(text: str, base_dir: Path | None = None, source: str = "<config>") -> TrainingConfig:
    """A validated config from TOML text, or `ConfigError` listing every problem.

    With `base_dir` (the config file's folder) relative path fields are made absolute and `~` expanded;
    without it paths are kept exactly as written (so text → config → text round-trips).
    """
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError([_toml_problem(str(e), source)], source) from None
    except Exception as e:  # RecursionError on absurd nesting, and anything else tomllib may throw
        raise ConfigError([_unreadable(e, source)], source) from None
    return validate_data(data, base_dir=base_dir, source=source)


def validate_data(data: Any, base_dir: Path | None = None, source: str = "<config>") -> TrainingConfig:
    """Like `parse_config`, for data already read (a preset overlay, a form's values)."""
    if not isinstance(data, dict):
        raise ConfigError(
            [Problem(source, "the config must be a TOML document of tables", "start from: nyx config new")], source
        )
    try:
        cfg = TrainingConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_translate_all(e), source) from None
    except Exception as e:  # never let a validator bug or a recursion limit escape as a traceback
        raise ConfigError([_unreadable(e, source)], source) from None
    if base_dir is None:
        return cfg
    problems: list[Problem] = []
    resolved = _resolve_model(cfg, "", Path(base_dir), problems)
    if problems:
        raise ConfigError(problems, source)
    assert isinstance(resolved, TrainingConfig)
    return resolved


def load_config(path: Path) -> TrainingConfig:
    """Read a config file; relative paths in it are relative to the file's folder."""
    path = Path(path)
    name = str(path)
    try:
        raw = path.expanduser().read_bytes()
    except FileNotFoundError:
        raise ConfigError(
            [
                Problem(
                    name, "file not found", f"check the path, or create a config there with: nyx config new -o {name}"
                )
            ],
            name,
        ) from None
    except IsADirectoryError:
        raise ConfigError(
            [Problem(name, "is a folder, not a config file", "pass the .toml file inside it")], name
        ) from None
    except PermissionError:
        raise ConfigError(
            [Problem(name, "cannot be read (permission denied)", f"check its permissions, e.g. chmod u+r {name}")], name
        ) from None
    except (OSError, ValueError) as e:
        raise ConfigError(
            [Problem(name, f"cannot be read: {e}", "check that the path names a readable file")]
        ) from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ConfigError(
            [Problem(name, f"is not UTF-8 text (byte {e.start})", "save it as a UTF-8 TOML file")], name
        ) from None
    return parse_config(text, base_dir=path.expanduser().absolute().parent, source=name)


def dumps_config(config: TrainingConfig) -> str:
    """The complete config as TOML (every section and key; unset optional values left out)."""
    return tomli_w.dumps(config.dump())


def save_config(config: TrainingConfig, path: Path) -> None:
    """Write the config atomically: a reader (a job starting) sees the old file or the new one, never half."""
    from nyx_tui.jobs.jobdir import atomic_write

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, dumps_config(config))


def looks_like_repo_id(value: str) -> bool:
    """`owner/name` as the Hugging Face hub spells repo ids (no leading `.`, `/` or `~`, one slash)."""
    return bool(_REPO_ID.match(value))


def resolve_path(value: str, base_dir: Path, *, allow_repo_id: bool = False) -> str:
    """`value` made absolute against `base_dir` (with `~` expanded); repo ids kept when allowed and no such
    local path exists next to the config."""
    if not value:
        return value
    if allow_repo_id and looks_like_repo_id(value) and not _exists(base_dir / value):
        return value
    expanded = Path(value).expanduser()
    return os.path.normpath(base_dir / expanded)


def toml_value(value: Any) -> str:
    """How `value` is written in TOML (`16`, `"./images"`, `[0.9, 0.999]`), for fix messages."""
    if isinstance(value, Enum):
        value = value.value
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    try:
        return tomli_w.dumps({"x": value}).split("=", 1)[1].strip()
    except Exception:
        return repr(value)


# -------------------------------------------------------------------------------------------- paths


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except (OSError, ValueError):
        return False


def _resolve_model(obj: BaseModel, prefix: str, base_dir: Path, problems: list[Problem]) -> BaseModel:
    """A copy of `obj` with its path fields resolved (sections and lists of sections walked); a path that
    cannot be resolved (`~nosuchuser/x`) becomes a problem."""
    update: dict[str, Any] = {}
    for name, info in type(obj).model_fields.items():
        value = getattr(obj, name)
        meta = meta_of(info)
        if meta is not None and meta.path and isinstance(value, str) and value:
            field = f"{prefix}{name}"
            try:
                new = resolve_path(value, base_dir, allow_repo_id=field.replace("[]", "") in REPO_ID_FIELDS)
            except (OSError, ValueError, RuntimeError) as e:
                problems.append(
                    Problem(
                        field,
                        f"cannot be resolved: {value!r} ({e})",
                        "use an absolute path or one relative to the config file's folder",
                    )
                )
                continue
            if new != value:
                update[name] = new
        elif isinstance(value, BaseModel):
            update[name] = _resolve_model(value, f"{prefix}{name}.", base_dir, problems)
        elif isinstance(value, list) and value and all(isinstance(v, BaseModel) for v in value):
            update[name] = [_resolve_model(v, f"{prefix}{name}[{i}].", base_dir, problems) for i, v in enumerate(value)]
    return obj.model_copy(update=update) if update else obj


# ---------------------------------------------------------------------------------------------- TOML


def _toml_problem(message: str, source: str) -> Problem:
    found = re.search(r"\(at line (\d+), column (\d+)\)", message)
    reason = re.sub(r"\s*\(at (line \d+, column \d+|end of document)\)", "", message).strip() or "invalid TOML"
    if found:
        line, column = found.group(1), found.group(2)
        return Problem(
            f"{source}:{line}",
            f"invalid TOML at line {line}, column {column}: {reason}",
            f"check the TOML syntax near line {line} (strings need quotes, tables look like [network])",
        )
    return Problem(
        source,
        f"invalid TOML at the end of the file: {reason}",
        "check the end of the file for an unclosed string, array or table",
    )


def _unreadable(e: BaseException, source: str) -> Problem:
    what = "it is nested too deeply" if isinstance(e, RecursionError) else f"{type(e).__name__}: {e}"
    return Problem(source, f"the config could not be read: {what}", "start from a fresh one: nyx config new")


# -------------------------------------------------------------------------------- pydantic → Problem


@dataclass
class _Where:
    """Where a pydantic error location points, in the config's terms."""

    field: str  # dotted display key, e.g. `dataset.subsets[0].image_dir`
    key: str | None = None  # the last key as written
    owner: type[BaseModel] | None = None  # the section the last key was looked up in
    owner_field: str = ""  # display key of that section ("" at the top level)
    annotation: Any = None  # type of the leaf field, when it is one
    info: Any = None  # its FieldInfo
    section: type[BaseModel] | None = None  # when the location is a whole section / subset table
    is_list: bool = False  # the location is a list of sections (dataset.subsets)


def _section_of(annotation: Any) -> tuple[type[BaseModel] | None, bool]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation, False
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is list and args and isinstance(args[0], type) and issubclass(args[0], BaseModel):
        return args[0], True
    if origin in (typing.Union, types.UnionType):
        for arg in args:
            model, is_list = _section_of(arg)
            if model is not None:
                return model, is_list
    return None, False


def _join(parent: str, key: str) -> str:
    return f"{parent}.{key}" if parent else key


def _locate(loc: tuple[int | str, ...]) -> _Where:
    model: type[BaseModel] | None = TrainingConfig
    where = _Where(field="")
    items = list(loc)
    i = 0
    while i < len(items):
        item = items[i]
        if model is None:  # inside a leaf: one list index or dict key is meaningful, union tags are not
            if isinstance(item, int):
                where.field += f"[{item}]"
            elif typing.get_origin(_strip_optional(where.annotation)) is dict:
                where.field = _join(where.field, str(item))
            break
        if isinstance(item, str) and item in model.model_fields:
            info = model.model_fields[item]
            where.owner, where.owner_field, where.key = model, where.field, item
            where.field = _join(where.field, item)
            sub, is_list = _section_of(info.annotation)
            if sub is None:
                where.annotation, where.info, where.section, where.is_list = info.annotation, info, None, False
                model = None
            elif is_list:
                where.section, where.is_list, where.annotation, where.info = sub, True, info.annotation, info
                if i + 1 < len(items) and isinstance(items[i + 1], int):
                    i += 1
                    where.field += f"[{items[i]}]"
                    where.is_list = False
                    model = sub
                else:
                    model = None
            else:
                where.section, where.is_list, where.annotation, where.info = sub, False, info.annotation, info
                model = sub
        else:  # a key the section does not have
            where.owner, where.owner_field, where.key = model, where.field, str(item)
            where.field = _join(where.field, str(item))
            where.annotation = where.info = where.section = None
            break
        i += 1
    if not items:
        where.section = TrainingConfig
    return where


def _strip_optional(annotation: Any) -> Any:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def _enum_of(annotation: Any) -> type[Enum] | None:
    ann = _strip_optional(annotation)
    return ann if isinstance(ann, type) and issubclass(ann, Enum) else None


def _got(value: Any) -> str:
    """The offending input, short and in the user's terms."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        text = repr(value)
        return text if len(text) <= 60 else text[:57] + "...'"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dt.datetime | dt.date | dt.time):
        return f"a date/time ({value.isoformat()})"
    if isinstance(value, int) and abs(value) > 10**18:
        return "a very large number"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


_TYPE_WORDS: dict[str, str] = {
    "int_type": "an integer",
    "int_parsing": "an integer",
    "int_from_float": "a whole number",
    "int_parsing_size": "an integer of sensible size",
    "float_type": "a number",
    "float_parsing": "a number",
    "finite_number": "a finite number",
    "bool_type": "true or false",
    "bool_parsing": "true or false",
    "string_type": "text in quotes",
    "string_unicode": "text in quotes",
    "list_type": "a list",
    "tuple_type": "a list",
    "dict_type": "a table",
}


def _example(where: _Where) -> Any:
    """A value to put in a fix: the declared example, else the default."""
    if where.info is None:
        return None
    meta = meta_of(where.info)
    if meta is not None and meta.example is not None:
        return _coerce_example(meta.example, where.annotation)
    default = where.info.get_default(call_default_factory=True)
    if default is None or default is Ellipsis or repr(default) == "PydanticUndefined":
        return None
    return default


def _coerce_example(example: str, annotation: Any) -> Any:
    ann = _strip_optional(annotation)
    try:
        if ann is int:
            return int(example)
        if ann is float:
            return float(example)
    except ValueError:
        return example
    return example


def _set_fix(field: str, value: Any, annotation: Any = None) -> str:
    if value is None and _strip_optional(annotation) is str:
        return f'set {field} = "..." (text in quotes)'
    return f"set {field} = {toml_value(value)}" if value is not None else f"set {field} to a valid value"


def _bound_fix(where: _Where, kind: str, bound: Any) -> str:
    words = {"gt": "greater than", "ge": "at least", "lt": "less than", "le": "at most"}[kind]
    example = _example(where)
    ok = _satisfies(example, kind, bound)
    if not ok:
        example = _near(bound, kind, _strip_optional(where.annotation))
    return f"set {where.field} to a value {words} {bound}, e.g. {toml_value(example)}"


def _satisfies(value: Any, kind: str, bound: Any) -> bool:
    if not isinstance(value, int | float) or isinstance(value, bool):
        return False
    return bool({"gt": value > bound, "ge": value >= bound, "lt": value < bound, "le": value <= bound}[kind])


def _near(bound: Any, kind: str, annotation: Any) -> Any:
    step: Any = 1 if annotation is int else (abs(bound) * 0.1 or 0.1)
    if kind == "gt":
        return bound + step
    if kind == "lt":
        return bound - step
    return bound


def _translate(err: ErrorDetails) -> Problem:
    kind = err["type"]
    loc = tuple(err["loc"])
    ctx: dict[str, Any] = dict(err.get("ctx") or {})
    value = err.get("input")
    where = _locate(loc)
    field = where.field or "config"

    if kind == "extra_forbidden":
        return _unknown_key(where)
    if kind == "missing" and loc and isinstance(loc[-1], int):  # a fixed-length list (betas) is too short
        field = re.sub(r"\[\d+\]$", "", field)
        return Problem(field, "has too few values", _set_fix(field, _example(where)))
    if kind == "missing":
        example = _example(where)
        shown = toml_value(example) if example is not None else "..."
        table = f"[[{where.owner_field.split('[')[0]}]]" if "[" in where.owner_field else f"[{where.owner_field}]"
        return Problem(field, "is required but missing", f"add {where.key} = {shown} to this {table} table")
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        short = {"greater_than": "gt", "greater_than_equal": "ge", "less_than": "lt", "less_than_equal": "le"}[kind]
        bound = ctx.get(short)
        words = {"gt": "greater than", "ge": "at least", "lt": "less than", "le": "at most"}[short]
        return Problem(field, f"must be {words} {bound} (got {_got(value)})", _bound_fix(where, short, bound))
    if kind == "enum" or (_enum_of(where.annotation) is not None and kind.endswith(("_type", "_parsing"))):
        enum = _enum_of(where.annotation)
        choices = [str(m.value) for m in enum] if enum else [str(ctx.get("expected", ""))]
        hint = ""
        if isinstance(value, str):
            close = difflib.get_close_matches(value.lower(), choices, n=1, cutoff=0.6)
            if close:
                hint = f' (did you mean "{close[0]}"?)'
        return Problem(field, f"{_got(value)} is not a valid choice", f"use one of: {', '.join(choices)}{hint}")
    if kind in ("model_type", "model_attributes_type", "dataclass_type") or (
        where.section is not None and kind in ("dict_type", "list_type")
    ):
        return _table_problem(where, value)
    if kind in ("too_short", "too_long"):
        expected = ctx.get("max_length") if kind == "too_long" else ctx.get("min_length")
        actual = ctx.get("actual_length")
        return Problem(
            field,
            f"has {actual} item(s), {'at most' if kind == 'too_long' else 'at least'} {expected} expected",
            _set_fix(field, _example(where)),
        )
    if kind in ("value_error", "assertion_error"):
        return _validator_problem(where, str(ctx.get("error") or err["msg"]).removeprefix("Value error, "))
    if kind in _TYPE_WORDS:
        wanted = _TYPE_WORDS[kind]
        item = re.match(r"^(.*)\[\d+\]$", field)
        if item and where.info is not None:  # one item of a list is of the wrong type
            example = _example(where)
            fix = f"make every item of {item.group(1)} {wanted}"
            return Problem(
                field,
                f"expected {wanted} (got {_got(value)})",
                fix + (f", e.g. {toml_value(example)}" if example else ""),
            )
        return Problem(
            field, f"expected {wanted} (got {_got(value)})", _set_fix(field, _example(where), where.annotation)
        )
    return Problem(field, f"{err['msg']} (got {_got(value)})", _set_fix(field, _example(where)))


def _table_problem(where: _Where, value: Any) -> Problem:
    field = where.field or "config"
    if where.section is TrainingConfig or not where.field:
        return Problem(field, "the config must be a TOML document of tables", "start from: nyx config new")
    if where.is_list:
        return Problem(
            field,
            f"must be a list of [[{where.field}]] tables (got {_got(value)})",
            f'write each entry as a table:\n[[{where.field}]]\nimage_dir = "./images"',
        )
    name = where.field
    if re.search(r"\[\d+\]$", name):
        base = re.sub(r"\[\d+\]$", "", name)
        return Problem(
            field, f"must be a [[{base}]] table (got {_got(value)})", f"write it as:\n[[{base}]]\nkey = value"
        )
    return Problem(
        field, f"must be a table (got {_got(value)})", f"write it as a [{name}] section with one key = value a line"
    )


_FIELD_AT_START = re.compile(r"^([a-z_]+\.[a-z_]+(?:\[\d*\])?(?:\.[a-z_]+)?)\b")


def _validator_problem(where: _Where, text: str) -> Problem:
    """A custom validator's message: its own words; the part after the last `; ` is the fix when there."""
    field = where.field
    if not field:  # a whole-config rule names its field at the start of its message
        found = _FIELD_AT_START.match(text)
        field = found.group(1) if found else "config"
    message, sep, fix = text.rpartition("; ")
    if sep and fix.startswith("try "):
        fix = f"set {field} = {fix.removeprefix('try ')}"
    if not sep:
        message, fix = text, ""
        example = re.search(r"(?:e\.g\.|such as|try)\s+(.+)$", text)
        if example:
            fix = f"set {field} to a valid value, e.g. {example.group(1).rstrip('.')}"
        else:
            fix = f"change {field} so that it meets the rule above"
    return Problem(field, message, fix)


# ------------------------------------------------------------------------------------------ unknown keys


def all_params(model: type[BaseModel] = TrainingConfig, prefix: str = "") -> list[Param]:
    """Every parameter as TOML sees it, list-of-table keys included (`dataset.subsets[].image_dir`)."""
    return list(iter_params(model, prefix))


def _all_leaf_paths() -> list[tuple[str, str]]:
    """(leaf name, dotted path) of every parameter, for "did you mean"."""
    return [(p.name, p.path) for p in all_params()]


def _unknown_key(where: _Where) -> Problem:
    key = where.key or where.field
    owner = where.owner or TrainingConfig
    here = list(owner.model_fields)
    scored: list[tuple[float, str]] = []
    lower = key.lower()
    for name in here:
        ratio = difflib.SequenceMatcher(None, lower, name).ratio()
        scored.append((ratio, _join(where.owner_field, name)))
    own_prefix = re.sub(r"\[\d+\]", "[]", where.owner_field)
    for name, path in _all_leaf_paths():
        if path.rsplit(".", 1)[0] == own_prefix:
            continue
        ratio = difflib.SequenceMatcher(None, lower, name).ratio()
        scored.append((ratio - 0.05, path))  # the same section wins a tie
    if owner is not TrainingConfig:
        for name in TrainingConfig.model_fields:  # `[training.network]`-style slips
            scored.append((difflib.SequenceMatcher(None, lower, name).ratio() - 0.1, name))
    best = max((s for s, _ in scored), default=0.0)
    picks: list[str] = []
    if best >= 0.6:
        for s, path in sorted(scored, key=lambda x: -x[0]):
            if s >= best - 0.001 and path not in picks:
                picks.append(path)
    table = f"[{where.owner_field}]" if where.owner_field else "the top level"
    message = f"unknown key `{where.field}`"
    if picks:
        shown = " or ".join(f"`{p}`" for p in picks[:3])
        return Problem(where.field, message, f"did you mean {shown}?")
    return Problem(where.field, message, f"remove it; the keys {table} takes are: {', '.join(here)}")


def _translate_all(e: ValidationError) -> list[Problem]:
    problems: list[Problem] = []
    seen: dict[str, int] = {}
    try:
        errors = e.errors(include_url=False)
    except Exception:
        return [Problem("config", str(e).splitlines()[0], "start from a fresh one: nyx config new")]
    for err in errors:
        try:
            problem = _translate(err)
        except Exception:  # translation must never hide the error itself
            field = ".".join(str(x) for x in err.get("loc", ())) or "config"
            problem = Problem(field, str(err.get("msg", "invalid value")), f"set {field} to a valid value")
        if problem.field in seen:  # one union input fails once per member: say it once
            idx = seen[problem.field]
            if problems[idx].message.startswith("expected") and problem.message.startswith("expected"):
                problems[idx] = _merge_union(problems[idx], problem)
            continue
        seen[problem.field] = len(problems)
        problems.append(problem)
    return problems or [Problem("config", "invalid config", "start from a fresh one: nyx config new")]


def _merge_union(a: Problem, b: Problem) -> Problem:
    def what(p: Problem) -> tuple[str, str]:
        body = p.message.removeprefix("expected ")
        wanted, _, got = body.partition(" (got ")
        return wanted, got

    wa, got = what(a)
    wb, _ = what(b)
    wanted = wa if wb in wa else f"{wa}, {wb}" if wa else wb
    return Problem(
        a.field, f"expected {wanted} (got {got}", f"set {a.field} to a single value: a number, true/false or text"
    )
