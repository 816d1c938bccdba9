"""The config layer: TOML in/out, user-facing errors, presets, pre-flight, the generated docs.

Fast and offline: no model loads, no network. Hypothesis throws garbage at the parser and the checker
(they must answer with problems, never a traceback) and valid random configs at the round trip.
"""

from __future__ import annotations

import datetime as dt
import string
import types
import typing
from enum import Enum
from pathlib import Path
from typing import Any

import pytest
import tomli_w
from annotated_types import Ge, Gt, Le, Lt
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nyx_tui.config.check import check_file, preflight
from nyx_tui.config.docs import parameters_markdown
from nyx_tui.config.errors import ConfigError, Problem
from nyx_tui.config.fields import Family, iter_params
from nyx_tui.config.io import all_params, dumps_config, load_config, parse_config, save_config
from nyx_tui.config.model import BLOCK_FIELDS, UNET_BLOCK_COUNTS, SubsetConfig, TrainingConfig
from nyx_tui.config.presets import builtin_presets, load_preset, preset_data

ROOT = Path(__file__).resolve().parent.parent


def problems_of(text: str, base_dir: Path | None = None) -> list[Problem]:
    with pytest.raises(ConfigError) as info:
        parse_config(text, base_dir=base_dir)
    assert info.value.problems
    return info.value.problems


def only(text: str) -> Problem:
    problems = problems_of(text)
    assert len(problems) == 1, problems
    return problems[0]


# ----------------------------------------------------------------------------------------- errors


def test_problem_and_error_text() -> None:
    p = Problem("network.dim", "must be greater than 0 (got 0)", "set network.dim to a positive number, e.g. 16")
    assert str(p) == "network.dim: must be greater than 0 (got 0)\n  fix: set network.dim to a positive number, e.g. 16"
    err = ConfigError([p, Problem("a.b", "bad", "fix it", severity="warning")], "x.toml")
    text = str(err)
    assert "x.toml" in text and "network.dim" in text and "a.b" in text and "fix it" in text


# ------------------------------------------------------------------------------------ round trips


def test_defaults_round_trip() -> None:
    cfg = TrainingConfig()
    assert parse_config(dumps_config(cfg)) == cfg


def test_shipped_presets_exist() -> None:
    names = builtin_presets()
    assert {"sd15-lora", "sdxl-lora"} <= set(names)


@pytest.mark.parametrize("name", builtin_presets())
def test_every_preset_loads_and_round_trips(name: str) -> None:
    cfg = load_preset(name)
    assert parse_config(dumps_config(cfg)) == cfg
    # a preset is an overlay: it must not restate every default
    assert len(tomli_w.dumps(preset_data(name))) < len(dumps_config(cfg))


def test_sd15_preset_values() -> None:
    cfg = load_preset("sd15-lora")
    assert cfg.model.family.value == "sd15"
    assert cfg.model.pretrained == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert (cfg.dataset.resolution, cfg.network.dim, cfg.network.alpha) == (512, 16, 8.0)
    assert cfg.optimizer.type.value == "adamw" and cfg.optimizer.learning_rate == 1e-4
    assert cfg.scheduler.type.value == "cosine" and cfg.scheduler.warmup_steps == 100
    assert (cfg.training.max_steps, cfg.training.batch_size) == (2000, 2)
    assert cfg.training.mixed_precision.value == "bf16" and cfg.training.gradient_checkpointing
    assert cfg.saving.every_n_steps == 500
    assert [s.image_dir for s in cfg.dataset.subsets] == ["./images"]
    sdxl = load_preset("sdxl-lora")
    assert sdxl.model.family.value == "sdxl" and sdxl.dataset.resolution == 1024 and sdxl.network.dim == 32


def test_preset_files_start_with_a_comment() -> None:
    for path in (ROOT / "nyx_tui/config/presets").glob("*.toml"):
        if path.stem in ("sd15-lora", "sdxl-lora"):
            assert path.read_text().startswith("#"), path


def test_unknown_preset_suggests() -> None:
    with pytest.raises(ConfigError) as info:
        load_preset("sd15-lorra")
    fix = info.value.problems[0].fix
    assert "sd15-lora" in fix and "sdxl-lora" in fix
    with pytest.raises(ConfigError):
        preset_data("../model")


def test_preset_data_is_a_fresh_copy() -> None:
    data = preset_data("sd15-lora")
    data["network"]["dim"] = 999
    assert preset_data("sd15-lora")["network"]["dim"] == 16


def test_save_and_load(tmp_path: Path) -> None:
    cfg = load_preset("sdxl-lora")
    path = tmp_path / "sub" / "run.toml"
    save_config(cfg, path)
    loaded = load_config(path)
    # relative paths are resolved against the file's folder on load
    assert loaded.dataset.subsets[0].image_dir == str(tmp_path / "sub" / "images")
    assert loaded.model.pretrained == cfg.model.pretrained  # a hub id stays one
    assert load_config(path) == loaded
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]


# ------------------------------------------------------------------------------------ bad configs


def test_unknown_key_same_section() -> None:
    p = only("[network]\ndimm = 8\n")
    assert p.field == "network.dimm"
    assert "unknown key `network.dimm`" in p.message
    assert "did you mean `network.dim`?" in p.fix


def test_unknown_key_other_section() -> None:
    p = only("[network]\nlearning_rate = 1e-4\n")
    assert "`optimizer.learning_rate`" in p.fix
    p = only("[netwrk]\ndim = 8\n")
    assert p.field == "netwrk" and "`network`" in p.fix
    p = only("[[dataset.subsets]]\nimage_dir = 'x'\nnum_repeat = 2\n")
    assert p.field == "dataset.subsets[0].num_repeat" and "num_repeats" in p.fix


def test_unknown_key_without_a_near_name_lists_the_keys() -> None:
    p = only("[network]\nzzzzzz = 1\n")
    assert "dim" in p.fix and "alpha" in p.fix


def test_dim_zero_names_field_and_fix() -> None:
    p = only("[network]\ndim = 0\n")
    assert p.field == "network.dim"
    assert "greater than 0" in p.message and "(got 0)" in p.message
    assert "network.dim" in p.fix and "e.g. 16" in p.fix


def test_bad_enum_lists_choices() -> None:
    p = only('[network]\nkind = "loar"\n')
    assert p.field == "network.kind"
    for choice in ("lora", "locon", "loha", "lokr", "dora"):
        assert choice in p.fix


def test_wrong_type_and_missing() -> None:
    p = only('[network]\ndim = "abc"\n')
    assert p.field == "network.dim" and "expected an integer (got 'abc')" in p.message
    p = only("[[dataset.subsets]]\nnum_repeats = 2\n")
    assert p.field == "dataset.subsets[0].image_dir" and p.fix.startswith("add image_dir =")
    p = only("[training]\nseed = 1979-05-27\n")
    assert p.field == "training.seed"


def test_all_problems_at_once() -> None:
    problems = problems_of("[network]\ndim = 0\nalpha = -1\n[optimizer]\ntype = 'adam'\n")
    assert {p.field for p in problems} == {"network.dim", "network.alpha", "optimizer.type"}


def test_custom_and_cross_field_validators() -> None:
    p = only("[dataset]\nresolution = 500\n")
    assert p.field == "dataset.resolution" and "multiple of 8" in p.message and "496" in p.fix
    p = only("[scheduler]\nwarmup_steps = 2000\n")
    assert p.field == "scheduler.warmup_steps"


def test_infinite_numbers_are_refused() -> None:
    p = only("[network]\nalpha = inf\n")
    assert p.field == "network.alpha"


def test_toml_syntax_error_names_the_line() -> None:
    p = only("[network]\ndim = 8\nalpha = = 3\n")
    assert "line 3" in p.message and "near line 3" in p.fix


def test_toml_non_table_and_unreadable(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "nope.toml")
    assert "nope.toml" in info.value.problems[0].field and "not found" in info.value.problems[0].message
    with pytest.raises(ConfigError):
        load_config(tmp_path)
    binary = tmp_path / "bin.toml"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ConfigError):
        load_config(binary)
    p = only("network = 5\n")
    assert p.field == "network" and "table" in p.message


# ------------------------------------------------------------------------------------------ paths


def test_relative_paths_resolve_against_base_dir(tmp_path: Path) -> None:
    text = "[[dataset.subsets]]\nimage_dir = './imgs'\n[saving]\noutput_dir = '../out'\n"
    cfg = parse_config(text, base_dir=tmp_path / "cfg")
    assert cfg.dataset.subsets[0].image_dir == str(tmp_path / "cfg" / "imgs")
    assert cfg.saving.output_dir == str(tmp_path / "out")
    home = parse_config("[model]\npretrained = '~/models/x.safetensors'\n", base_dir=tmp_path)
    assert home.model.pretrained == str(Path("~/models/x.safetensors").expanduser())
    absolute = parse_config(f"[model]\npretrained = '{tmp_path}/m'\n", base_dir=Path("/elsewhere"))
    assert absolute.model.pretrained == f"{tmp_path}/m"
    with pytest.raises(ConfigError) as info:
        parse_config("[[dataset.subsets]]\nimage_dir = '~nosuchuser-nyx/x'\n", base_dir=tmp_path)
    assert info.value.problems[0].field == "dataset.subsets[0].image_dir"
    # without a base dir paths stay exactly as written
    assert parse_config(text).dataset.subsets[0].image_dir == "./imgs"


def test_hf_repo_id_kept_unless_a_local_folder_has_that_name(tmp_path: Path) -> None:
    text = "[model]\npretrained = 'stabilityai/stable-diffusion-xl-base-1.0'\n"
    assert parse_config(text, base_dir=tmp_path).model.pretrained == "stabilityai/stable-diffusion-xl-base-1.0"
    (tmp_path / "stabilityai" / "stable-diffusion-xl-base-1.0").mkdir(parents=True)
    local = parse_config(text, base_dir=tmp_path).model.pretrained
    assert local == str(tmp_path / "stabilityai" / "stable-diffusion-xl-base-1.0")
    assert parse_config("[model]\npretrained = './a/b'\n", base_dir=tmp_path).model.pretrained == str(
        tmp_path / "a" / "b"
    )


# -------------------------------------------------------------------------------------- pre-flight


def _model_dir(tmp_path: Path) -> Path:
    model = tmp_path / "model"
    (model / "unet").mkdir(parents=True)
    (model / "model_index.json").write_text("{}")
    return model


def _cfg(model: Path | str, *dirs: Path) -> TrainingConfig:
    return TrainingConfig.model_validate(
        {"model": {"pretrained": str(model)}, "dataset": {"subsets": [{"image_dir": str(d)} for d in dirs]}}
    )


def test_preflight_good_dataset(tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    (images / "a.png").write_bytes(b"png")
    (images / "a.txt").write_text("a cat")
    assert preflight(_cfg(_model_dir(tmp_path), images)) == []


def test_preflight_dataset_problems(tmp_path: Path) -> None:
    model = _model_dir(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.md").write_text("x")
    uncaptioned = tmp_path / "uncaptioned"
    uncaptioned.mkdir()
    for name in ("a.png", "b.JPG", "c.webp"):
        (uncaptioned / name).write_bytes(b"x")
    (uncaptioned / "a.txt").write_text("caption")
    a_file = tmp_path / "file.png"
    a_file.write_bytes(b"x")
    problems = preflight(_cfg(model, tmp_path / "missing", empty, uncaptioned, a_file))
    by_field = {p.field: p for p in problems}
    assert "not found" in by_field["dataset.subsets[0].image_dir"].message
    assert "no images" in by_field["dataset.subsets[1].image_dir"].message
    warning = by_field["dataset.subsets[2].image_dir"]
    assert warning.severity == "warning" and "2 of 3" in warning.message
    assert by_field["dataset.subsets[3].image_dir"].severity == "error"


def test_preflight_no_subsets_shows_the_toml(tmp_path: Path) -> None:
    (p,) = preflight(_cfg(_model_dir(tmp_path)))
    assert p.field == "dataset.subsets" and "[[dataset.subsets]]" in p.fix


def test_preflight_model_sources(tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    (images / "a.png").write_bytes(b"x")
    (images / "a.txt").write_text("x")
    ckpt = tmp_path / "m.safetensors"
    ckpt.write_bytes(b"x")
    not_model = tmp_path / "folder"
    not_model.mkdir()
    wrong_file = tmp_path / "m.onnx"
    wrong_file.write_bytes(b"x")
    assert preflight(_cfg(ckpt, images)) == []
    (not_cached,) = preflight(_cfg("owner/some-model", images))  # training reads the HF cache only
    assert not_cached.severity == "warning" and "hf download owner/some-model" in not_cached.fix
    for bad in ("", str(tmp_path / "missing"), str(not_model), str(wrong_file)):
        problems = preflight(_cfg(bad, images))
        assert [p.field for p in problems] == ["model.pretrained"], (bad, problems)


def test_preflight_output_dir_must_not_be_a_file(tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    (images / "a.png").write_bytes(b"x")
    (images / "a.txt").write_text("x")
    cfg = _cfg(_model_dir(tmp_path), images)
    cfg.saving.output_dir = str(images / "a.txt")
    assert [p.field for p in preflight(cfg)] == ["saving.output_dir"]


def test_check_file(tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    (images / "a.png").write_bytes(b"x")
    model = _model_dir(tmp_path)
    path = tmp_path / "run.toml"
    path.write_text(f"[model]\npretrained = '{model}'\n[[dataset.subsets]]\nimage_dir = 'images'\n")
    result = check_file(path)
    assert result.config is not None
    assert [p.severity for p in result.problems if p.field.startswith("dataset")] == ["warning"]
    path.write_text("[network]\ndimm = 3\n")
    bad = check_file(path)
    assert not bad.ok and bad.config is None and bad.problems[0].field == "network.dimm"
    missing = check_file(tmp_path / "none.toml")
    assert not missing.ok and missing.problems


# --------------------------------------------------------------------------------------------- docs


def test_docs_are_generated_and_current() -> None:
    text = parameters_markdown()
    assert (ROOT / "docs" / "config.md").read_text() == text, "run: nyx config docs"
    assert text.startswith("<!-- Generated by `nyx config docs`")
    for p in iter_params(TrainingConfig):
        assert f"`{p.name}`" in text
    assert "## `[[dataset.subsets]]`" in text and "`image_dir`" in text and "`network_dim`" in text


def test_all_params_reaches_into_subsets() -> None:
    paths = {p.path for p in all_params()}
    assert {"network.dim", "dataset.subsets[].image_dir", "dataset.subsets[].num_repeats"} <= paths


# --------------------------------------------------------------------------------- hypothesis: garbage

_NAMES = sorted({p.name for p in all_params()} | set(TrainingConfig.model_fields) | {"subsets", "zz", "dimm", "netwrk"})
_keys = st.sampled_from(_NAMES) | st.text(min_size=1, max_size=10)
_scalars = (
    st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats()
    | st.text(max_size=16)
    | st.booleans()
    | st.dates()
    | st.datetimes()
    | st.times()
    | st.sampled_from(["lora", "sdxl", "adamw", "./images", "owner/name", "~", "", ".txt", "\x00"])
)
_values = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_keys, inner, max_size=4),
    max_leaves=16,
)
# documents shaped like configs: sections of real-ish keys, sometimes subsets
_section = st.dictionaries(_keys, _values, max_size=5)
_documents = st.dictionaries(
    _keys, _section | _values | st.lists(_section, max_size=2), max_size=6
) | st.fixed_dictionaries({"dataset": st.fixed_dictionaries({"subsets": st.lists(_section, max_size=2)})})


def _write_any(path: Path, doc: Any) -> None:
    try:
        path.write_text(tomli_w.dumps(doc))
    except (TypeError, ValueError):
        path.write_text(repr(doc))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(doc=_documents)
def test_check_file_never_raises_on_any_toml(doc: dict[str, Any], tmp_path: Path) -> None:
    path = tmp_path / "any.toml"
    _write_any(path, doc)
    result = check_file(path)
    assert isinstance(result.problems, list)
    assert all(isinstance(p, Problem) and p.field and p.message and p.fix for p in result.problems)
    if not result.ok:
        assert result.problems
    else:
        assert result.config is not None


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(max_size=200) | st.binary(max_size=200).map(lambda b: b.decode("latin-1")))
def test_check_file_never_raises_on_any_text(text: str, tmp_path: Path) -> None:
    path = tmp_path / "any.toml"
    path.write_text(text, encoding="utf-8", errors="surrogateescape")
    result = check_file(path)
    assert result.ok or result.problems


@settings(max_examples=150, deadline=None)
@given(text=st.text(max_size=300))
def test_parse_config_raises_only_config_error(text: str) -> None:
    try:
        parse_config(text, base_dir=Path("/tmp"))
    except ConfigError as e:
        assert e.problems


# ---------------------------------------------------------------------------- hypothesis: valid configs

_plain_text = st.text(alphabet=string.ascii_letters + string.digits + " _-./é★\"'\\\t", max_size=20)


def _leaf_strategy(annotation: Any, metadata: list[Any]) -> st.SearchStrategy[Any]:
    """Values of a leaf parameter that satisfy its declared type and bounds."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        base = _leaf_strategy(rest[0], metadata)
        return base | st.none() if len(rest) < len(args) else base
    if isinstance(annotation, type) and issubclass(annotation, Enum):
        return st.sampled_from([m.value for m in annotation])
    if annotation is bool:
        return st.booleans()
    bounds: dict[str, Any] = {}
    for c in metadata:
        if isinstance(c, Gt):
            bounds["gt"] = c.gt
        elif isinstance(c, Ge):
            bounds["ge"] = c.ge
        elif isinstance(c, Lt):
            bounds["lt"] = c.lt
        elif isinstance(c, Le):
            bounds["le"] = c.le
    if annotation is int:
        lo = bounds.get("ge", bounds.get("gt", -(2**40) - 1) + 1)
        hi = bounds.get("le", bounds.get("lt", 2**40 + 1) - 1)
        return st.integers(min_value=lo, max_value=hi)
    if annotation is float:
        lo = bounds.get("ge", bounds.get("gt", -1e12))
        hi = bounds.get("le", bounds.get("lt", 1e12))
        return st.floats(
            min_value=lo,
            max_value=hi,
            exclude_min="gt" in bounds,
            exclude_max="lt" in bounds,
            allow_nan=False,
            allow_infinity=False,
        )
    if annotation is str:
        return _plain_text
    if origin is list and args and args[0] is str:
        return st.lists(_plain_text, max_size=3)
    if origin is tuple:
        return st.tuples(*(st.floats(0, 1, exclude_max=True) for _ in args))
    if origin is dict:
        return st.dictionaries(
            _plain_text,
            st.booleans()
            | st.integers(-(2**62), 2**62)
            | st.floats(allow_nan=False, allow_infinity=False)
            | _plain_text,
            max_size=3,
        )
    raise AssertionError(f"no strategy for {annotation}")


_OVERRIDES: dict[str, st.SearchStrategy[Any]] = {
    "dataset.resolution": st.integers(8, 512).map(lambda n: n * 8),
    "dataset.max_token_length": st.sampled_from([75, 150, 225]),
    "dataset.caption_extension": _plain_text.map(lambda s: "." + s.replace("/", "") + "x"),
    "dataset.subsets[].caption_extension": st.none() | st.just(".caption"),
    "saving.output_name": st.text(alphabet=string.ascii_letters + "-_ ", min_size=1, max_size=20).filter(
        lambda s: s not in (".", "..")
    ),
    "network.target_modules": st.lists(
        st.sampled_from(["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj"]), min_size=1
    ),
    "network.train_unet": st.just(True),
    # block-wise lists: 25 numbers here, cut to the family's count (or dropped) by _with_valid_blocks
    "network.block_dims": st.none() | st.lists(st.integers(0, 64), min_size=25, max_size=25),
    "network.conv_block_dims": st.none() | st.lists(st.integers(0, 64), min_size=25, max_size=25),
    "network.block_alphas": st.none() | st.lists(st.floats(0.125, 64), min_size=25, max_size=25),
    "network.conv_block_alphas": st.none() | st.lists(st.floats(0.125, 64), min_size=25, max_size=25),
    "network.block_lr_weights": st.none() | st.lists(st.floats(0, 4), min_size=25, max_size=25),
    "flow.double_block_indices": st.none() | st.lists(st.integers(0, 18), max_size=4),
    "flow.single_block_indices": st.none() | st.lists(st.integers(0, 37), max_size=4),
    "flow.block_type_dims": st.none()
    | st.dictionaries(st.sampled_from(["img_attn", "txt_attn", "single", "single_mod"]), st.integers(0, 64)),
}


def _section_strategy(model: type[Any], prefix: str) -> st.SearchStrategy[dict[str, Any]]:
    required: dict[str, st.SearchStrategy[Any]] = {}
    optional: dict[str, st.SearchStrategy[Any]] = {}
    for p in iter_params(model, prefix):
        if "[]." in p.path[len(prefix) :]:
            continue  # keys inside a list of tables: generated with the list below
        if p.path in _OVERRIDES:
            strategy = _OVERRIDES[p.path]
        elif p.path == f"{prefix}subsets":
            strategy = st.lists(_section_strategy(SubsetConfig, f"{prefix}subsets[]."), max_size=2)
        else:
            strategy = _leaf_strategy(p.annotation, list(p.info.metadata))
        (required if p.info.is_required() else optional)[p.name] = strategy
    return st.fixed_dictionaries(required, optional=optional)


def _with_valid_warmup(data: dict[str, Any]) -> dict[str, Any]:
    training = data.setdefault("training", {})
    if training.get("max_epochs"):  # exactly one of max_steps / max_epochs decides
        training["max_steps"] = 0
    elif not training.get("max_steps", 1000):
        training["max_steps"] = 1
    if training.get("validate_every_n_steps"):  # validation needs held-out images
        data.setdefault("dataset", {})["validation_split"] = 0.1
    if training.get("cpu_offload_checkpointing"):  # it offloads what checkpointing keeps, and not with block swap
        training["gradient_checkpointing"] = True
        data.setdefault("flow", {})["blocks_to_swap"] = 0
    steps = training.get("max_steps", 1000) or 1000
    scheduler = data.setdefault("scheduler", {})
    scheduler["warmup_steps"] = scheduler.get("warmup_steps", 0) % steps
    return data


def _with_valid_blocks(data: dict[str, Any]) -> dict[str, Any]:
    """Block-wise lists have one number per UNet block of the family and none for the others."""
    count = UNET_BLOCK_COUNTS.get(Family(data.get("model", {}).get("family", "sd15")))
    network = data.get("network", {})
    for name in BLOCK_FIELDS:
        if network.get(name) is not None:
            if count is None:
                del network[name]
            else:
                network[name] = network[name][:count]
    return data


_valid_configs = (
    st.fixed_dictionaries(
        {},
        optional={
            name: _section_strategy(typing.cast(type, info.annotation), f"{name}.")
            for name, info in TrainingConfig.model_fields.items()
        },
    )
    .map(_with_valid_warmup)
    .map(_with_valid_blocks)
    .map(TrainingConfig.model_validate)
)


@settings(max_examples=150, deadline=None)
@given(cfg=_valid_configs)
def test_valid_configs_round_trip(cfg: TrainingConfig) -> None:
    text = dumps_config(cfg)
    assert parse_config(text) == cfg


def test_dates_and_times_never_crash() -> None:
    for value in (dt.date(2020, 1, 1), dt.time(12, 0), dt.datetime(2020, 1, 1, tzinfo=dt.UTC)):
        for key in ("dim", "kind", "target_modules", "args"):
            with pytest.raises(ConfigError):
                parse_config(tomli_w.dumps({"network": {key: value}}))
