"""Quick inference: the same prompts and seed rendered with and without LoRAs, side by side in one grid.

A compare is a job (kind `compare`, resource `gpu`): this module checks the options, resolves every path,
and writes them to `spec.json`; the worker (`compare_job`) loads the model, renders and writes the grid.
Torch-free, so the CLI and the TUI can import it.

The grid's columns (`plan_columns`): a `base` column (no LoRA at all) first, unless `no_base`; then for every
LoRA, in order, one column per strength. The LoRAs are the ones given, after the checkpoints of `run` (every
`artifact` event with what=lora of that training job, in step order: epoch against epoch). The rows are the
prompts. Every tile of a row uses the same seed, so the tiles differ by the LoRA and its strength only.
Strengths: `0.5, 1` for a single LoRA, `1` for several (checkpoints, A against B), unless given.
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from nyx_tui.config.fields import FLOW_FAMILIES, Family

MAX_TILES = 256  # a grid larger than this is almost surely a typo in --strength or --run


class CompareError(ValueError):
    """Options that cannot make a grid; the message names the problem and the fix."""


@dataclass
class CompareOptions:
    loras: list[str] = field(default_factory=list)
    model: str | None = None
    family: str | None = None
    run: str | None = None
    prompts: list[str] = field(default_factory=list)
    negative: str = ""
    strengths: list[float] | None = None
    seed: int = 42
    steps: int | None = None
    width: int | None = None
    height: int | None = None
    scale: float | None = None
    output: str | None = None
    no_base: bool = False


@dataclass(frozen=True)
class Column:
    label: str
    lora: str | None  # absolute path; None: the base model
    strength: float


def parse_strengths(text: str) -> list[float]:
    """`0,0.5,1` → [0.0, 0.5, 1.0]; CompareError for anything else."""
    try:
        values = [float(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise CompareError(f"--strength {text!r}: give numbers separated by commas, e.g. --strength 0,0.5,1") from None
    if not values:
        raise CompareError("--strength is empty: give numbers separated by commas, e.g. --strength 0,0.5,1")
    if any(not -4.0 <= v <= 4.0 for v in values):
        raise CompareError(f"--strength {text!r}: strengths go from -4 to 4 (1 is the LoRA as trained)")
    return values


def parse_size(text: str) -> tuple[int, int]:
    """`512x768` → (512, 768); a single number is a square."""
    parts = text.lower().replace("×", "x").split("x")
    try:
        sizes = [int(p) for p in parts]
    except ValueError:
        raise CompareError(f"--size {text!r}: give WIDTHxHEIGHT in pixels, e.g. --size 1024x1024") from None
    if len(sizes) == 1:
        sizes *= 2
    if len(sizes) != 2 or any(not 64 <= s <= 4096 for s in sizes):
        raise CompareError(f"--size {text!r}: give WIDTHxHEIGHT, each from 64 to 4096 px, e.g. --size 512x512")
    return sizes[0], sizes[1]


def _fmt(strength: float) -> str:
    return f"{strength:g}"


def run_checkpoints(ref: str) -> tuple[list[tuple[str, str]], dict[str, Any]]:
    """(label, absolute path) of every LoRA a training job saved, in step order, and what its config says of
    the model (`pretrained`, `family`; empty when it has no readable config)."""
    from nyx_tui.jobs.jobdir import find_job

    try:
        job = find_job(ref)
    except LookupError as e:
        raise CompareError(f"--run {ref}: {e}") from None
    found: list[tuple[int, str, str]] = []
    for a in job.artifacts():
        if a.get("what") != "lora":
            continue
        file = Path(str(a["path"]))
        file = file if file.is_absolute() else job.path / file
        if not file.is_file():
            continue
        step = a.get("step")
        label = f"step {step}" if isinstance(step, int) else file.stem
        found.append((step if isinstance(step, int) else 1 << 62, label, str(file.resolve())))
    if not found:
        raise CompareError(f"--run {ref}: job {job.id} has no saved LoRA (no artifact with what=lora) to compare")
    found.sort(key=lambda t: t[0])
    model: dict[str, Any] = {}
    if job.config_path.is_file():
        try:
            from nyx_tui.config.io import load_config

            cfg = load_config(job.config_path)
            model = {"pretrained": cfg.model.pretrained, "family": cfg.model.family.value}
        except Exception:  # an unreadable config only loses the default model
            model = {}
    # the same file saved under two steps (a final copy) is one column
    seen: set[str] = set()
    out = []
    for _, label, path in found:
        if path not in seen:
            seen.add(path)
            out.append((label, path))
    return out, model


def plan_columns(loras: list[tuple[str, str]], strengths: list[float], base: bool) -> list[Column]:
    """The grid's columns: base first (unless not wanted), then each LoRA at each strength."""
    columns = [Column("base", None, 0.0)] if base else []
    single = len(loras) == 1
    for label, path in loras:
        for s in strengths:
            columns.append(Column(f"strength {_fmt(s)}" if single else f"{label} @ {_fmt(s)}", path, s))
    return columns


def _family(value: str | None, where: str) -> Family | None:
    if not value:
        return None
    try:
        return Family(value)
    except ValueError:
        names = ", ".join(f.value for f in Family)
        raise CompareError(f"{where} {value!r} is not a model family; one of {names}") from None


def build_spec(options: CompareOptions) -> dict[str, Any]:
    """Check the options and resolve them into the job's `compare` spec. Raises CompareError."""
    from nyx_tui.families import Kind, detect

    loras: list[tuple[str, str]] = []
    run_model: dict[str, Any] = {}
    if options.run:
        loras, run_model = run_checkpoints(options.run)
    for value in options.loras:
        file = Path(value).expanduser()
        if not file.is_file():
            raise CompareError(f"{value}: no such LoRA file; give .safetensors LoRA files (or --run JOB)")
        loras.append((file.stem, str(file.resolve())))
    if not loras:
        raise CompareError("nothing to compare: give one or more LoRA files, or --run JOB for a run's checkpoints")
    model = options.model or run_model.get("pretrained")
    if not model:
        raise CompareError("no base model: give --model (a diffusers folder, a checkpoint file or a cached repo id)")
    model_path = Path(model).expanduser()
    model_ref = str(model_path.resolve()) if model_path.exists() else model
    family = _family(options.family, "--family") or _family(run_model.get("family") if not options.model else None, "")
    if family is None:
        found = detect(model_ref)
        family = found.family
        if family is None:
            raise CompareError(
                f"--model {model}: cannot tell its family ({found.reason or 'unknown'}); give --family "
                "(sd15, sd2, sdxl, flux or sd3)"
            )
    for _label, path in loras:
        seen = detect(path)
        if seen.kind == Kind.LORA and seen.families and family not in seen.families:
            raise CompareError(
                f"{Path(path).name} is a LoRA for {', '.join(f.value for f in seen.families)}, but the base model is "
                f"{family.value}; compare it on a model of its family (--model)"
            )
    if not options.prompts:
        raise CompareError("no prompt: give --prompt TEXT (repeat it for more rows)")
    strengths = options.strengths if options.strengths is not None else ([0.5, 1.0] if len(loras) == 1 else [1.0])
    columns = plan_columns(loras, strengths, not options.no_base)
    tiles = len(columns) * len(options.prompts)
    if tiles > MAX_TILES:
        raise CompareError(
            f"{tiles} images ({len(columns)} columns × {len(options.prompts)} prompts) is too many "
            f"for one grid (at most {MAX_TILES}); give fewer strengths, LoRAs or prompts"
        )
    if options.steps is not None and not 1 <= options.steps <= 200:
        raise CompareError(f"--steps {options.steps}: give 1 to 200")
    output = Path(options.output).expanduser().resolve() if options.output else None
    if output is not None:
        if output.suffix.lower() != ".png":
            raise CompareError(f"-o {options.output}: the grid is a PNG; give a path ending in .png")
        if not output.parent.is_dir():
            raise CompareError(f"-o {options.output}: the folder {output.parent} does not exist")
    return {
        "model": model_ref,
        "family": family.value,
        "flow": family in FLOW_FAMILIES,
        "columns": [asdict(c) for c in columns],
        "prompts": list(options.prompts),
        "negative": options.negative,
        "seed": int(options.seed),
        "steps": options.steps,
        "width": options.width,
        "height": options.height,
        "scale": options.scale,
        "output": str(output) if output else None,
    }


def start_compare_job(options: CompareOptions) -> Any:
    """Check the options, create the `compare` job and spawn its supervisor. Returns the JobDir; raises
    CompareError (nothing created) for bad options."""
    from nyx_tui.jobs.jobdir import create_job
    from nyx_tui.jobs.launch import spawn_supervisor

    spec = build_spec(options)
    first = next((c["lora"] for c in spec["columns"] if c["lora"]), None)
    name = f"compare-{Path(first).stem}" if first else "compare"
    argv = [sys.executable, "-m", "nyx_tui.lora.compare_job", "."]
    job = create_job("compare", name, argv, extra={"compare": spec, "resource": "gpu"})
    spawn_supervisor(job)
    return job
