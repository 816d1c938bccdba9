"""The templates library: built-in presets plus user templates, their descriptions, families and VRAM; the CLI."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from nyx_tui import vram
from nyx_tui.config.errors import ConfigError
from nyx_tui.config.io import load_config
from nyx_tui.config.model import TrainingConfig
from nyx_tui.config.presets import builtin_presets, list_presets, load_preset
from nyx_tui.config.templates import (
    TemplateError,
    delete_template,
    description_of,
    get_template,
    list_templates,
    load_template,
    save_template,
    summary_of,
    templates_dir,
)
from tests.conftest import run_nyx


@pytest.fixture(autouse=True)
def _home(nyx_home: Path) -> Path:
    return nyx_home


def flux_config() -> TrainingConfig:
    cfg = load_preset("flux-lora-16gb")
    return cfg.model_copy(update={"network": cfg.network.model_copy(update={"dim": 24})})


def test_builtin_presets_are_described_with_family_and_vram() -> None:
    templates = {t.name: t for t in list_templates()}
    assert sorted(templates) == builtin_presets()
    for name, t in templates.items():
        assert t.builtin and t.source == "built-in" and t.error is None
        assert t.description and t.summary, name
        cfg = load_preset(name)
        assert t.families == (cfg.model.family.value,)
        assert t.vram_gib == pytest.approx(vram.estimate(cfg).total_gib)
    assert templates["flux-lora-12gb"].summary == "Flux.1 dev LoRA at 768 px for a 12 GB card"
    assert templates["flux-lora-12gb"].vram_tier_gb == 12 and templates["flux-lora-24gb"].vram_gib > 16
    assert templates["sdxl-lora"].families == ("sdxl",)
    assert templates["demo-tiny-cpu"].summary.startswith("the embedded default")  # no "name:" prefix
    assert "rank 16" in templates["flux-lora-16gb"].settings["network"]


def test_description_and_summary_parsing() -> None:
    text = "# First line: more.\n# still first paragraph\n#\n# second\n\n[model]\n# not part of it\n"
    assert description_of(text) == "First line: more. still first paragraph\nsecond"
    assert summary_of("x", "x: the thing. Other") == "the thing"
    assert summary_of("y", "A LoRA (big) for cards") == "A LoRA"


def test_save_load_list_delete_a_user_template() -> None:
    cfg = flux_config()
    path = save_template("my-flux", cfg, "My Flux faces. Trained at 1024 px.\nSecond paragraph.")
    assert path == templates_dir() / "my-flux.toml" and path.parent.name == "templates"
    assert path.read_text().startswith("# My Flux faces. Trained at 1024 px.\n#\n# Second paragraph.\n")
    assert not list(path.parent.glob(".*.tmp"))
    assert load_template("my-flux").network.dim == 24
    from_file = load_config(path)  # a complete config: loads as a file too (paths then resolve next to it)
    assert from_file.network == cfg.network and from_file.flow == cfg.flow and from_file.model == cfg.model
    t = get_template("my-flux")
    assert (t.builtin, t.source, t.families, t.summary) == (False, "user", ("flux",), "My Flux faces")
    assert t.description == "My Flux faces. Trained at 1024 px.\nSecond paragraph."
    assert t.vram_gib == pytest.approx(vram.estimate(cfg).total_gib)
    assert [x.name for x in list_templates()][-1] == "my-flux"
    assert list_presets() == [*builtin_presets(), "my-flux"]
    assert load_preset("my-flux").network.dim == 24  # every preset path takes user templates

    with pytest.raises(TemplateError, match="exists"):
        save_template("my-flux", cfg, "again")
    save_template("my-flux", load_preset("sd15-lora"), "now SD1.5", overwrite=True)
    assert get_template("my-flux").families == ("sd15",)

    assert delete_template("my-flux") == path and not path.exists()
    assert "my-flux" not in list_presets()
    with pytest.raises(TemplateError, match="no user template"):
        delete_template("my-flux")


@pytest.mark.parametrize("bad", ["", "../evil", "a b", "-x", "x" * 65, "dir/name"])
def test_bad_names_are_refused_with_the_rule(bad: str) -> None:
    with pytest.raises(TemplateError) as e:
        save_template(bad, TrainingConfig(), "")
    assert "not a valid template name" in e.value.message and "letters" in e.value.fix
    assert not templates_dir().exists() or not list(templates_dir().iterdir())


def test_builtin_names_cannot_be_overwritten_or_deleted() -> None:
    before = load_preset("sd15-lora")
    with pytest.raises(TemplateError, match="built-in"):
        save_template("sd15-lora", flux_config(), "mine")
    with pytest.raises(TemplateError, match="built-in"):
        save_template("sd15-lora", flux_config(), "mine", overwrite=True)
    with pytest.raises(TemplateError, match="cannot be deleted"):
        delete_template("sd15-lora")
    assert load_preset("sd15-lora") == before


def test_a_broken_user_file_is_listed_not_fatal() -> None:
    folder = templates_dir()
    folder.mkdir(parents=True)
    (folder / "broken.toml").write_text("# Broken one\n[network]\ndim = 'many'\n")
    (folder / "notes.txt").write_text("ignored")
    t = get_template("broken")
    assert t.error and "network.dim" in t.error and t.description == "Broken one"
    assert [x.name for x in list_templates() if not x.builtin] == ["broken"]
    with pytest.raises(ConfigError):
        load_template("broken")
    with pytest.raises(ConfigError, match="unknown preset"):
        load_preset("nope")


def test_cli_save_template_new_preset_and_presets_listing(nyx_home: Path, tmp_path: Path) -> None:
    src = tmp_path / "cfg.toml"
    assert run_nyx("config", "new", "--preset", "flux-lora-12gb", "-o", str(src), home=nyx_home).returncode == 0
    text = src.read_text().replace("dim = 16", "dim = 40", 1)
    src.write_text(text)

    r = run_nyx("config", "save-template", str(src), "--name", "team-flux", "--description",
                "Team Flux style. Checked on a 3060.", home=nyx_home)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert (nyx_home / "config" / "templates" / "team-flux.toml").is_file()

    out = tmp_path / "from-template.toml"
    r = run_nyx("config", "new", "--preset", "team-flux", "-o", str(out), home=nyx_home)
    assert r.returncode == 0, r.stderr
    assert tomllib.loads(out.read_text())["network"]["dim"] == 40

    r = run_nyx("config", "presets", home=nyx_home)
    assert r.returncode == 0, r.stderr
    lines = {line.split()[0]: line for line in r.stdout.splitlines()}
    assert set(lines) == {*builtin_presets(), "team-flux"}
    assert "user" in lines["team-flux"] and "flux" in lines["team-flux"] and "Team Flux style" in lines["team-flux"]
    tier = vram.smallest_tier(vram.estimate(load_preset("flux-lora-12gb")).total_gib)
    assert f"({tier} GB)" in lines["team-flux"] and "GiB" in lines["team-flux"]
    assert "built-in" in lines["sdxl-lora"] and "sdxl" in lines["sdxl-lora"]
    names = run_nyx("config", "presets", "--names", home=nyx_home).stdout.split()
    assert names == [*builtin_presets(), "team-flux"]

    r = run_nyx("config", "save-template", str(src), "--name", "sdxl-lora", home=nyx_home)
    assert r.returncode == 2 and "built-in" in r.stderr and "fix" in r.stderr
    r = run_nyx("config", "save-template", str(src), "--name", "team-flux", home=nyx_home)
    assert r.returncode == 2 and "--force" in r.stderr
    assert run_nyx("config", "save-template", str(src), "--name", "team-flux", "--force",
                   home=nyx_home).returncode == 0  # fmt: skip
    bad = tmp_path / "bad.toml"
    bad.write_text("[network]\ndim = 'x'\n")
    r = run_nyx("config", "save-template", str(bad), "--name", "other", home=nyx_home)
    assert r.returncode == 2 and "network.dim" in r.stderr
    assert not (nyx_home / "config" / "templates" / "other.toml").exists()
