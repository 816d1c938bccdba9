"""Workflow and sweep files (TOML) turned into checked plans: one complete training config per stage or trial.

Everything a run can know before it starts is checked here, in the CLI, before any job exists: the file's
shape, every overlay key against the config's declarations, and every stage's or trial's full config
through the same pre-flight as `nyx train`. A conflict in stage 2 is reported before stage 1 spends an
hour. What only a finished stage can supply (its LoRA, its state folder) is filled in by the orchestrator
(`workflows.run`). Torch-free: the CLI imports this at start-up.

A workflow file::

    [workflow]
    name = "portrait"            # optional; default: the file's name
    base = "base.toml"           # the config every stage overlays (relative to this file)

    [[stage]]
    name = "512, with the text encoder"
    [stage.set]                  # any config keys; dotted keys are tables in TOML
    dataset.resolution = 512
    network.train_text_encoder = true

    [[stage]]
    name = "1024, UNet only"
    from = "lora"                # continue from the previous stage's LoRA ("state": its training state;
    [stage.set]                  # "none": start fresh). Default for every stage after the first: "lora"
    dataset.resolution = 1024

A sweep file::

    [sweep]
    base = "base.toml"
    method = "grid"              # or "random" (then `trials` draws, seeded by `seed`)
    steps = 300                  # the shared short budget: training.max_steps of every trial
    [sweep.params]
    optimizer.learning_rate = [1e-4, 3e-4]
    network.dim = [8, 16]
    # random: a list is a choice; {log_uniform = [1e-5, 1e-3]}, {uniform = [a, b]}, {int_uniform = [a, b]}
"""

from __future__ import annotations

import copy
import itertools
import math
import random
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nyx_tui.config.errors import Problem, has_errors

FROM_CHOICES = ("lora", "state", "none")
METHODS = ("grid", "random")
DISTRIBUTIONS = ("log_uniform", "uniform", "int_uniform", "choice")
MAX_TRIALS = 64  # more than this is a mistake in a grid, not a sweep anyone waits for
DEFAULT_VALIDATION_SPLIT = 0.2


class PlanError(ValueError):
    """A workflow or sweep file that cannot run; `problems` names each problem and its fix."""

    def __init__(self, problems: list[Problem]) -> None:
        super().__init__("; ".join(f"{p.field}: {p.message}" for p in problems))
        self.problems = problems


@dataclass
class Stage:
    """One stage or trial: its label, its complete config (TOML text) and where it starts from."""

    name: str
    config_toml: str
    start_from: str = "none"  # lora | state | none
    overlay: dict[str, Any] = field(default_factory=dict)  # the dotted keys this stage sets, for the record
    params: dict[str, Any] = field(default_factory=dict)  # a sweep trial's values

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "config_toml": self.config_toml,
            "from": self.start_from,
            "set": self.overlay,
            "params": self.params,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Stage:
        return cls(
            name=str(data["name"]),
            config_toml=str(data["config_toml"]),
            start_from=str(data.get("from", "none")),
            overlay=dict(data.get("set") or {}),
            params=dict(data.get("params") or {}),
        )


@dataclass
class Plan:
    """A checked workflow (stages in order) or sweep (trials, run as the queue allows)."""

    kind: str  # workflow | sweep
    name: str
    source: str  # the file it came from
    stages: list[Stage]
    notes: list[str] = field(default_factory=list)  # what the plan changed on its own, said once at the start
    params: list[str] = field(default_factory=list)  # a sweep's swept keys, in order

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "name": self.name,
            "source": self.source,
            "stages": [s.to_json() for s in self.stages],
            "notes": self.notes,
            "params": self.params,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Plan:
        return cls(
            kind=str(data["kind"]),
            name=str(data["name"]),
            source=str(data.get("source", "")),
            stages=[Stage.from_json(s) for s in data["stages"]],
            notes=[str(n) for n in data.get("notes", [])],
            params=[str(p) for p in data.get("params", [])],
        )


# ---------------------------------------------------------------------------------------------- helpers


def short_params(params: Any) -> str:
    """`k=v` pairs; dotted keys shortened to their last part (`network.dim` → `dim`) when that stays unique."""
    if not isinstance(params, dict):
        return ""
    short = [str(k).rsplit(".", 1)[-1] for k in params]
    keys = short if len(set(short)) == len(short) else [str(k) for k in params]
    return " ".join(f"{k}={v}" for k, v in zip(keys, params.values(), strict=True))


def flatten(table: dict[str, Any], prefix: str = "", leaf: Any = None) -> dict[str, Any]:
    """Nested tables as dotted keys (`{"network": {"dim": 8}}` → `{"network.dim": 8}`). A table for which
    `leaf(table)` is true stays whole (a sweep's `{log_uniform = [...]}`); lists are values."""
    out: dict[str, Any] = {}
    for key, value in table.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value and not (leaf and leaf(value)):
            out.update(flatten(value, path + ".", leaf))
        else:
            out[path] = value
    return out


def nest(dotted: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for path, value in dotted.items():
        *parents, last = path.split(".")
        node = out
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return out


def deep_merge(base: dict[str, Any], overlay: dict[str, Any]) -> dict[str, Any]:
    """`overlay` on a copy of `base`: tables merge key by key; anything else (lists too) replaces."""
    out = copy.deepcopy(base)
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _leaf_paths() -> dict[str, Any]:
    """Every settable key of the config (`network.dim`) → its declaration."""
    from nyx_tui.config.io import all_params

    return {p.path: p for p in all_params()}


def _unknown_keys(keys: list[str], where: str) -> list[Problem]:
    import difflib

    known = _leaf_paths()
    problems = []
    for key in keys:
        if key in known or (key.split(".")[0] == "dataset" and key.startswith("dataset.subsets")):
            continue
        near = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
        fix = f"did you mean {near[0]}?" if near else "`nyx config docs` lists every key"
        problems.append(Problem(f"{where}.{key}", "is not a config key", fix))
    return problems


def _read_toml(path: Path, what: str) -> dict[str, Any]:
    name = str(path)
    try:
        return tomllib.loads(path.expanduser().read_text(encoding="utf-8-sig"))
    except FileNotFoundError:
        raise PlanError([Problem(name, "file not found", f"check the path of the {what} file")]) from None
    except (OSError, UnicodeDecodeError) as e:
        raise PlanError([Problem(name, f"cannot be read ({e})", "check that it is a readable UTF-8 file")]) from None
    except tomllib.TOMLDecodeError as e:
        raise PlanError([Problem(name, f"is not valid TOML: {e}", "fix the line it names")]) from None


def _base(section: dict[str, Any], path: Path, where: str) -> tuple[dict[str, Any], Path]:
    """The base config's data, with its relative paths made absolute (as `nyx train` reads it)."""
    from nyx_tui.config.errors import ConfigError
    from nyx_tui.config.io import load_config

    base = section.get("base")
    if not isinstance(base, str) or not base:
        raise PlanError(
            [Problem(f"{where}.base", "is missing", 'name the training config to start from, e.g. base = "base.toml"')]
        )
    base_path = Path(base).expanduser()
    if not base_path.is_absolute():
        base_path = path.parent / base_path
    try:
        cfg = load_config(base_path)
    except ConfigError as e:
        raise PlanError(list(e.problems)) from None
    # only what the file sets (paths made absolute): a full dump would make every default look chosen, and the
    # checks warn about chosen keys that do nothing
    return cfg.model_dump(mode="json", exclude_none=True, exclude_unset=True), base_path


def _config_toml(data: dict[str, Any], base_dir: Path, label: str, problems: list[Problem]) -> str | None:
    """The stage's data validated and pre-flighted like `nyx train` would; None (and problems) when it fails."""
    from nyx_tui.config.check import check_config
    from nyx_tui.config.errors import ConfigError
    from nyx_tui.config.io import dumps_config, validate_data

    try:
        cfg = validate_data(data, base_dir=base_dir, source=label)
    except ConfigError as e:
        problems.extend(Problem(f"{label}: {p.field}", p.message, p.fix, p.severity) for p in e.problems)
        return None
    found = check_config(cfg)
    problems.extend(Problem(f"{label}: {p.field}", p.message, p.fix, p.severity) for p in found)
    return None if has_errors(found) else dumps_config(cfg)


def _name(section: dict[str, Any], path: Path, where: str) -> str:
    name = section.get("name", path.stem)
    if not isinstance(name, str) or not name.strip():
        raise PlanError([Problem(f"{where}.name", "must be a non-empty string", f'e.g. name = "{path.stem}"')])
    return name.strip()


# --------------------------------------------------------------------------------------------- workflows


def load_workflow(path: Path) -> Plan:
    """A checked workflow plan from a workflow file; `PlanError` lists every problem."""
    path = Path(path).expanduser().absolute()
    data = _read_toml(path, "workflow")
    section = data.get("workflow")
    if not isinstance(section, dict):
        raise PlanError([Problem("workflow", "the file has no [workflow] table", 'add [workflow] with base = "…"')])
    extra = sorted(set(data) - {"workflow", "stage"})
    if extra:
        raise PlanError(
            [
                Problem(k, "is not a workflow table", "a workflow file has [workflow] and [[stage]] tables")
                for k in extra
            ]
        )
    name = _name(section, path, "workflow")
    base, base_path = _base(section, path, "workflow")
    raw = data.get("stage")
    if not isinstance(raw, list) or not raw:
        raise PlanError([Problem("stage", "the workflow has no stages", "add at least one [[stage]] table")])
    problems: list[Problem] = []
    stages: list[Stage] = []
    notes: list[str] = []
    for i, st in enumerate(raw, 1):
        where = f"stage {i}"
        if not isinstance(st, dict):
            problems.append(Problem(where, "must be a table", "write it as [[stage]]"))
            continue
        unknown = sorted(set(st) - {"name", "from", "set"})
        problems += [Problem(f"{where}.{k}", "is not a stage key", "a stage has name, from and set") for k in unknown]
        label = st.get("name", f"stage {i}")
        label = f"stage {i} ({label})" if "name" in st else where
        start = st.get("from", "lora" if i > 1 else "none")
        if start not in FROM_CHOICES:
            problems.append(Problem(f"{where}.from", f"is {start!r}", f"use one of {', '.join(FROM_CHOICES)}"))
            start = "none"
        if i == 1 and start != "none":
            problems.append(Problem(f"{where}.from", "the first stage has no stage before it", 'use from = "none"'))
            start = "none"
        overlay = st.get("set", {})
        if not isinstance(overlay, dict):
            problems.append(Problem(f"{where}.set", "must be a table of config keys", "e.g. [stage.set]"))
            overlay = {}
        dotted = flatten(overlay)
        problems += _unknown_keys(list(dotted), f"{where}.set")
        blocked = [k for k in dotted if k in ("network.weights", "training.resume") and start != "none"]
        problems += [
            Problem(f"{where}.set.{k}", f'is set by from = "{start}"', 'remove it, or use from = "none"')
            for k in blocked
        ]
        merged = deep_merge(base, overlay)
        if "output_name" not in overlay.get("saving", {}):  # each stage's files keep their own name
            merged.setdefault("saving", {})["output_name"] = (
                f"{base.get('saving', {}).get('output_name', 'lora')}-stage{i}"
            )
        toml = _config_toml(merged, path.parent, label, problems)
        stages.append(Stage(str(st.get("name", f"stage {i}")), toml or "", start, dotted))
    if not problems:
        problems += _chain_problems(stages, notes)
    if has_errors(problems):
        raise PlanError(problems)
    notes += [f"{p.field}: {p.message}" for p in problems]  # warnings: said at the start, never lost
    notes.insert(0, f"base config: {base_path}")
    return Plan("workflow", name, str(path), stages, notes)


def _chain_problems(stages: list[Stage], notes: list[str]) -> list[Problem]:
    """What a stage needs of the one before it: the same adapter shape to load its LoRA or resume its state;
    a state saved at the end (switched on here, and said); for `state`, more steps than the stage before."""
    from nyx_tui.config.io import parse_config

    problems: list[Problem] = []
    cfgs = [parse_config(s.config_toml) for s in stages]
    for i in range(1, len(stages)):
        start = stages[i].start_from
        if start == "none":
            continue
        prev, cur = cfgs[i - 1].network, cfgs[i].network
        label = f"stage {i + 1}"
        for key in ("kind", "dim", "conv_dim"):
            a, b = getattr(prev, key), getattr(cur, key)
            if a != b:
                problems.append(
                    Problem(
                        f"{label}: network.{key}",
                        f'is {b} but stage {i} trains {a}: from = "{start}" needs the same adapter shape',
                        f'keep network.{key} = {a}, or start this stage fresh with from = "none"',
                    )
                )
        if prev.train_text_encoder and not cur.train_text_encoder:
            notes.append(
                f"{label} trains no text encoder: stage {i}'s text-encoder modules are not carried into its LoRA "
                f"(stage {i}'s own LoRA keeps them)"
            )
        if start == "state":
            if not cfgs[i - 1].saving.save_state:
                data = tomllib.loads(stages[i - 1].config_toml)
                data.setdefault("saving", {})["save_state"] = True
                from nyx_tui.config.io import dumps_config, validate_data

                stages[i - 1].config_toml = dumps_config(validate_data(data))
                notes.append(f"stage {i} saves its training state (saving.save_state) for stage {i + 1} to resume")
            a_steps, b_steps = cfgs[i - 1].training.max_steps, cfgs[i].training.max_steps
            if a_steps and b_steps and b_steps <= a_steps:
                problems.append(
                    Problem(
                        f"{label}: training.max_steps",
                        f'is {b_steps}: with from = "state" it is the run\'s total and stage {i} ends at {a_steps}',
                        f"set it above {a_steps}, e.g. {a_steps * 2}",
                    )
                )
    return problems


# ------------------------------------------------------------------------------------------------ sweeps


def _is_distribution(value: Any) -> bool:
    return isinstance(value, dict) and len(value) == 1 and next(iter(value)) in DISTRIBUTIONS


def _param_problems(key: str, value: Any, method: str) -> list[Problem]:
    where = f"sweep.params.{key}"
    if isinstance(value, list):
        if not value:
            return [Problem(where, "has no values", "give at least one value")]
        return []
    if _is_distribution(value) and method == "random":
        kind, bounds = next(iter(value.items()))
        if kind == "choice":
            ok = isinstance(bounds, list) and bounds
            return [] if ok else [Problem(where, "choice needs a list of values", "e.g. {choice = [4, 8, 16]}")]
        if not (isinstance(bounds, list) and len(bounds) == 2 and all(isinstance(b, int | float) for b in bounds)):
            return [Problem(where, f"{kind} needs [low, high]", f"e.g. {{{kind} = [1e-5, 1e-3]}}")]
        low, high = bounds
        if not low < high or (kind == "log_uniform" and low <= 0):
            return [
                Problem(where, f"{kind} bounds {bounds} are not a range", "low must be below high (and > 0 for log)")
            ]
        return []
    if _is_distribution(value):
        return [Problem(where, 'ranges are for method = "random"', "list the values for a grid, e.g. [1e-4, 3e-4]")]
    return [Problem(where, f"is {value!r}", "give a list of values, e.g. [1e-4, 3e-4] (or a range for random)")]


def draw(value: Any, rng: random.Random) -> Any:
    """One value of a random sweep's parameter."""
    if isinstance(value, list):
        return rng.choice(value)
    kind, bounds = next(iter(value.items()))
    if kind == "choice":
        return rng.choice(bounds)
    low, high = bounds
    if kind == "log_uniform":
        return float(f"{math.exp(rng.uniform(math.log(low), math.log(high))):.3g}")
    if kind == "int_uniform":
        return rng.randint(int(low), int(high))
    return float(f"{rng.uniform(low, high):.4g}")


def combinations(params: dict[str, Any], method: str, trials: int, seed: int) -> list[dict[str, Any]]:
    """The trials' values: every combination (grid, in the file's order), or `trials` seeded draws
    without repeats (random; fewer when the space is smaller)."""
    keys = list(params)
    if method == "grid":
        return [dict(zip(keys, values, strict=True)) for values in itertools.product(*params.values())]
    rng = random.Random(seed)
    out: list[dict[str, Any]] = []
    for _ in range(trials * 20):
        if len(out) == trials:
            break
        pick = {k: draw(params[k], rng) for k in keys}
        if pick not in out:
            out.append(pick)
    return out


def load_sweep(path: Path) -> Plan:
    """A checked sweep plan from a sweep file; `PlanError` lists every problem."""
    path = Path(path).expanduser().absolute()
    data = _read_toml(path, "sweep")
    section = data.get("sweep")
    if not isinstance(section, dict):
        raise PlanError([Problem("sweep", "the file has no [sweep] table", 'add [sweep] with base = "…"')])
    allowed = {"name", "base", "method", "trials", "seed", "steps", "validation_split", "params", "set"}
    problems = [
        Problem(f"sweep.{k}", "is not a sweep key", f"one of {', '.join(sorted(allowed))}") for k in section
        if k not in allowed
    ]  # fmt: skip
    name = _name(section, path, "sweep")
    method = section.get("method", "grid")
    if method not in METHODS:
        problems.append(Problem("sweep.method", f"is {method!r}", 'use "grid" or "random"'))
        method = "grid"
    trials = section.get("trials", 8)
    if method == "random" and (not isinstance(trials, int) or not 1 <= trials <= MAX_TRIALS):
        problems.append(Problem("sweep.trials", f"is {trials!r}", f"a whole number from 1 to {MAX_TRIALS}"))
        trials = 1
    seed = section.get("seed", 0)
    steps = section.get("steps")
    if steps is not None and (not isinstance(steps, int) or isinstance(steps, bool) or steps < 1):
        problems.append(Problem("sweep.steps", f"is {steps!r}", "a whole number of steps, e.g. steps = 300"))
        steps = None
    raw = section.get("params")
    params = flatten(raw, leaf=_is_distribution) if isinstance(raw, dict) else {}
    if not params:
        problems.append(
            Problem("sweep.params", "names nothing to sweep", "e.g. optimizer.learning_rate = [1e-4, 3e-4]")
        )
    problems += _unknown_keys(list(params), "sweep.params")
    for key, value in params.items():
        problems += _param_problems(key, value, method)
    overlay = section.get("set", {})
    if not isinstance(overlay, dict):
        problems.append(Problem("sweep.set", "must be a table of config keys", "e.g. [sweep.set]"))
        overlay = {}
    problems += _unknown_keys(list(flatten(overlay)), "sweep.set")
    if has_errors(problems):
        raise PlanError(problems)
    base, base_path = _base(section, path, "sweep")
    base = deep_merge(base, overlay)
    notes = [f"base config: {base_path}"]
    # the shared budget: every trial trains the same steps, validated on the same held-out images
    if steps is not None:
        tr = base.setdefault("training", {})
        tr["max_steps"], tr["max_epochs"] = steps, 0
        warmup = base.get("scheduler", {}).get("warmup_steps", 0)
        if warmup and warmup >= steps:
            base["scheduler"]["warmup_steps"] = steps // 10
            notes.append(f"scheduler.warmup_steps {warmup} ≥ the budget of {steps} steps: {steps // 10} for the sweep")
    ds = base.setdefault("dataset", {})
    split = section.get("validation_split")
    if split is not None:
        ds["validation_split"] = split
    elif not ds.get("validation_split"):
        ds["validation_split"] = DEFAULT_VALIDATION_SPLIT
        notes.append(
            f"the base config holds out no images: {DEFAULT_VALIDATION_SPLIT:.0%} are held out so the trials can be "
            "compared by validation loss (set sweep.validation_split to choose)"
        )
    base.setdefault("saving", {})["save_state"] = False
    combos = combinations(params, method, int(trials), int(seed) if isinstance(seed, int) else 0)
    if len(combos) > MAX_TRIALS:
        raise PlanError(
            [Problem("sweep.params", f"makes {len(combos)} trials", f"at most {MAX_TRIALS}: fewer values, or random")]
        )
    stages: list[Stage] = []
    base_name = base.get("saving", {}).get("output_name", "lora")
    for i, combo in enumerate(combos, 1):
        trial = deep_merge(base, nest(combo))
        trial.setdefault("saving", {})["output_name"] = f"{base_name}-trial{i:02d}"
        label = f"trial {i} ({' '.join(f'{k}={v}' for k, v in combo.items())})"
        toml = _config_toml(trial, path.parent, label, problems)
        stages.append(Stage(f"trial {i}", toml or "", "none", combo, combo))
    if has_errors(problems):
        raise PlanError(problems)
    notes += [f"{p.field}: {p.message}" for p in problems]
    return Plan("sweep", name, str(path), stages, notes, list(params))
