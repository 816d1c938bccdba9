"""Worker of a compare job: `python -m nyx_tui.lora.compare_job JOB_DIR` (the supervisor passes `.`).

The options come from `spec.json` (`compare`, written by `compare.start_compare_job`). The base model is
loaded the way training loads it (`models.load_model`, `flow_files.load_flow_model`) and rendered through the
pipeline and renderer training samples use (`sampling.build_pipeline`, `SampleRenderer.render_one`): the same
sampler, defaults and seeding, so a compare tile and a training sample of the same prompt and seed match.

LoRAs: SD1.5/SD2/SDXL files are loaded by diffusers (`load_lora_weights`, kohya or diffusers keys), each as
its own peft adapter, all at once; Flux/SD3 files go through Nyx's own kohya-Flux/SD3 loader
(`init_weights.load_flow_lora`, which also reads tiny test models that diffusers' converter cannot), one at a
time, with the model loaded again for the next LoRA. A column's strength is peft's scale of its adapter
(alpha / rank × strength) with every other adapter off; the base column has every adapter off. LoHa/LoKr files
load in neither and end the job with an error that says so.

Events: `start` (total = tiles), `progress` per tile, a `sample` per finished column (its `step` is the column
index, `column` its label), `artifact` what=image for the grid, `log` for notes. `stop`/`cancel` are obeyed
between tiles: the grid is written with what was rendered (grey squares for the rest) and the worker exits 0.
Exit codes: 0 done or stopped; 1 an error (one line on stderr and a `log` event with `error`); 2 bad usage.
"""

from __future__ import annotations

import shutil
import sys
import traceback
from pathlib import Path
from typing import Any

from nyx_tui.jobs.control import ControlReader
from nyx_tui.jobs.events import EventWriter
from nyx_tui.jobs.jobdir import JobDir


class CompareFailed(Exception):
    """A failure the worker can explain in one line."""


class _Commands:
    def __init__(self, job: JobDir, events: EventWriter) -> None:
        self.reader = ControlReader(job.control_path)
        self.events = events
        self.requested: str | None = None

    def __call__(self) -> bool:
        for cmd in self.reader.poll():
            what = cmd.get("command")
            if what in ("stop", "cancel") and self.requested is None:
                self.requested = str(what)
                self.events.emit(
                    "log", level="info", message=f"{what} received: the grid is written with the tiles done", ack=what
                )
            elif what in ("save_now", "sample_now"):
                self.events.emit("log", level="warning", message=f"{what} means nothing to a compare job", ack=what)
        return self.requested is not None


def _config(spec: dict[str, Any]) -> Any:
    from nyx_tui.config.model import TrainingConfig

    return TrainingConfig.model_validate({"model": {"family": spec["family"], "pretrained": spec["model"]}})


def _load(cfg: Any) -> tuple[Any, Any, Any]:
    """The model on the best device, in eval mode, with its device and dtype."""
    import torch

    from nyx_tui.config.fields import FLOW_FAMILIES

    if torch.cuda.is_available():
        device = torch.device("cuda")
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    else:
        device, dtype = torch.device("cpu"), torch.float32
    if cfg.model.family in FLOW_FAMILIES:
        from nyx_tui.trainers.native import flow_files, flow_models

        model: Any = flow_files.load_flow_model(cfg.model)
        flow_models.place(model, device, dtype)
    else:
        from nyx_tui.trainers.native import models

        model = models.load_model(cfg.model)
        models.place(model, device, dtype)
    for part in model.parts:
        part.requires_grad_(False)
        part.eval()
    return model, device, dtype


def _tuner_layers(model: Any) -> list[Any]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for part in model.parts for m in part.modules() if isinstance(m, BaseTunerLayer)]


def activate(model: Any, adapter: str | None, strength: float) -> int:
    """Only `adapter` on, at `strength` (None: every adapter off, the base model). The layers it is on."""
    on = 0
    for layer in _tuner_layers(model):
        if adapter is not None and adapter in getattr(layer, "scaling", {}):
            layer.enable_adapters(True)
            layer.set_adapter(adapter)
            layer.set_scale(adapter, strength)
            on += 1
        else:
            layer.enable_adapters(False)
    return on


def _load_lora(model: Any, pipe: Any, path: str, adapter: str, flow: bool) -> list[str]:
    """Put the file on the model as `adapter`; the notes for the log. Raises CompareFailed."""
    name = Path(path).name
    try:
        if flow:
            from nyx_tui.trainers.native.init_weights import load_flow_lora
            from nyx_tui.trainers.native.networks import ADAPTER_NAME

            unused = load_flow_lora(model, Path(path))
            if adapter != ADAPTER_NAME:
                raise CompareFailed(f"internal: flow LoRAs load as {ADAPTER_NAME!r}")
            return [f"{len(unused)} modules of {name} match nothing in this model and are left out"] if unused else []
        pipe.load_lora_weights(path, adapter_name=adapter)
        return []
    except CompareFailed:
        raise
    except Exception as e:
        raise CompareFailed(
            f"{name} could not be put on the model ({type(e).__name__}: {e}). Compare loads LoRA, LoCon and DoRA "
            "files in kohya or diffusers keys; LoHa/LoKr files do not load in diffusers"
        ) from e


def _defaults(spec: dict[str, Any], model: Any) -> tuple[int, int, int, float]:
    """(width, height, steps, scale) with the training samples' defaults for what the spec leaves out."""
    from nyx_tui.config.fields import Family
    from nyx_tui.families import defaults
    from nyx_tui.trainers.native import sampling

    family = Family(spec["family"])
    if spec["flow"]:
        fallback = "sd3" if family == Family.SD3 else "dev"
        variant = model.variant if model.variant in sampling.FLOW_DEFAULTS else fallback
        steps, scale = sampling.FLOW_DEFAULTS[variant]
        multiple = sampling.FLOW_SIZE_MULTIPLE
    else:
        steps, scale, multiple = sampling.DEFAULT_STEPS, sampling.DEFAULT_SCALE, 8
    res = defaults(family).resolution
    width = int(spec.get("width") or res)
    height = int(spec.get("height") or res)
    width, height = max(64, width - width % multiple), max(64, height - height % multiple)
    steps = int(spec.get("steps") or steps)
    scale = float(spec["scale"]) if spec.get("scale") is not None else scale
    return width, height, steps, scale


def run(job: JobDir, events: EventWriter) -> int:
    spec: dict[str, Any] = job.spec()["compare"]
    columns: list[dict[str, Any]] = spec["columns"]
    prompts: list[str] = spec["prompts"]
    total = len(columns) * len(prompts)
    events.emit("start", job=job.id, job_kind="compare", total=total, model=spec["model"], family=spec["family"])
    events.emit("progress", done=0, total=total, unit="images", message="loading the model")
    print(f"{len(columns)} columns × {len(prompts)} prompts; loading {spec['model']}…", flush=True)

    import torch

    from nyx_tui.config.model import Sampler
    from nyx_tui.lora.grid import make_grid, save_png
    from nyx_tui.trainers.native import sampling

    cfg = _config(spec)
    flow = bool(spec["flow"])
    model, _device, _dtype = _load(cfg)
    tiles_dir = job.output_dir / "tiles"
    tiles_dir.mkdir(parents=True, exist_ok=True)
    renderer = sampling.SampleRenderer(cfg, model, tiles_dir)
    renderer.name = "tile"
    renderer.pipe = sampling.build_pipeline(model)
    for message, level in renderer.notes:
        events.log(message, level=level)
    width, height, steps, scale = _defaults(spec, model)
    events.log(f"{width}x{height}, {steps} steps, guidance {scale:g}, seed {spec['seed']}")

    commands = _Commands(job, events)
    tiles: list[list[Path | None]] = [[None] * len(columns) for _ in prompts]
    adapters: dict[str, str] = {}  # LoRA path → adapter name
    current_flow_lora: str | None = None
    done = 0
    stopped = False
    with torch.no_grad():
        for c, column in enumerate(columns):
            lora = column.get("lora")
            if lora is None:
                activate(model, None, 0.0)
            else:
                if flow and current_flow_lora not in (None, lora):
                    # one flow LoRA at a time: a fresh model for the next one
                    events.emit("progress", done=done, total=total, unit="images", message="reloading the model")
                    model, _device, _dtype = _load(cfg)
                    renderer = sampling.SampleRenderer(cfg, model, tiles_dir)
                    renderer.name = "tile"
                    renderer.pipe = sampling.build_pipeline(model)
                    adapters.clear()
                if lora not in adapters:
                    from nyx_tui.trainers.native.networks import ADAPTER_NAME

                    adapter = ADAPTER_NAME if flow else f"lora{len(adapters)}"
                    events.emit("progress", done=done, total=total, unit="images", message=f"loading {Path(lora).name}")
                    for note in _load_lora(model, renderer.pipe, lora, adapter, flow):
                        events.log(note, level="warning")
                    adapters[lora] = adapter
                    current_flow_lora = lora
                if activate(model, adapters[lora], float(column["strength"])) == 0:
                    raise CompareFailed(f"{Path(lora).name} put no adapter on this model: its keys fit none of it")
            images: list[str] = []
            for r, prompt in enumerate(prompts):
                if commands():
                    stopped = True
                    break
                sjob = sampling.Job(
                    index=r,
                    prompt=prompt,
                    negative=str(spec.get("negative") or ""),
                    width=width,
                    height=height,
                    steps=steps,
                    scale=scale,
                    seed=int(spec["seed"]),
                    sampler=Sampler.DDIM,
                )
                made = renderer.render_one(sjob, c)
                tile = tiles_dir / f"r{r:02d}-c{c:02d}.png"
                made.replace(tile)
                tiles[r][c] = tile
                images.append(str(tile))
                done += 1
                events.emit("progress", done=done, total=total, unit="images", message=f"rendering {column['label']}")
            if images:
                events.emit("sample", step=c, images=images, prompts=prompts[: len(images)], column=column["label"])
            if stopped:
                break
    if done == 0:
        events.log("stopped before the first image: no grid was written")
        return 0
    grid = make_grid(tiles, [str(col["label"]) for col in columns], prompts)
    own = save_png(grid, job.output_dir / "compare.png")
    final = own
    if spec.get("output"):
        target = Path(spec["output"])
        tmp = target.with_name(f".{target.name}.tmp")
        shutil.copyfile(own, tmp)
        tmp.replace(target)
        final = target
    events.emit("artifact", path=str(final), what="image", columns=[c["label"] for c in columns], rows=len(prompts))
    print(f"grid: {final}", flush=True)
    if stopped:
        events.log(f"stopped after {done} of {total} images; the grid shows them (grey: not rendered)")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m nyx_tui.lora.compare_job JOB_DIR", file=sys.stderr)
        return 2
    job = JobDir(Path(args[0]).resolve())
    try:
        with EventWriter(job.events_path) as events:
            try:
                return run(job, events)
            except CompareFailed as e:
                events.emit("log", level="error", message=str(e), error=str(e))
                print(f"error: {e}", file=sys.stderr, flush=True)
                return 1
            except Exception as e:
                from nyx_tui.trainers.native.models import ModelLoadError

                if isinstance(e, ModelLoadError):
                    events.emit("log", level="error", message=str(e), error=str(e))
                    print(f"error: {e}", file=sys.stderr, flush=True)
                    return 1
                raise
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr, flush=True)
        return 130
    except Exception:
        traceback.print_exc()
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
