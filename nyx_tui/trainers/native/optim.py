"""Optimizers and learning-rate schedules, built from the config: every one a kohya user relies on.

| `optimizer.type`     | class (library)                                   | sd-scripts `optimizer_type` |
|----------------------|---------------------------------------------------|-----------------------------|
| adamw                | torch.optim.AdamW                                 | AdamW                       |
| adamw8bit            | bitsandbytes.optim.AdamW8bit                      | AdamW8bit                   |
| lion                 | lion_pytorch.Lion                                 | Lion                        |
| lion8bit             | bitsandbytes.optim.Lion8bit                       | Lion8bit                    |
| prodigy              | prodigyopt.Prodigy                                | Prodigy                     |
| came                 | came_pytorch.CAME                                 | came_pytorch.CAME           |
| adafactor            | transformers.optimization.Adafactor               | Adafactor                   |
| adamw_schedulefree   | schedulefree.AdamWScheduleFree                    | AdamWScheduleFree           |
| custom               | `optimizer.class_path`                            | the same dotted path        |

These are the libraries sd-scripts itself uses (CAME: its authors' package), so one `optimizer.args` table
means the same to both backends. bitsandbytes (0.50+) runs the 8-bit ones on the CPU too; tensors under
4,096 elements keep 32-bit state there as on a GPU.

This module imports no torch at module level: `optimizer_problems` (pre-flight, run by the TUI's form)
and `schedule_factor` must stay light. `build_optimizer`, `build_scheduler` and the mode helpers import
torch when called.

How the engine uses it (one optimizer step per `lr_scheduler.step()`):

    optimizer = optim.build_optimizer(cfg.optimizer, network.param_groups())   # in train mode already
    lr_scheduler = optim.build_scheduler(cfg.scheduler, optimizer, total_steps)
    ...  accelerator.prepare / register_for_checkpointing / load_state (resume)  ...
    optim.train_mode(optimizer)       # after a resume: a state saved in eval mode loads in eval mode
    loop:  optimizer.step(); lr_scheduler.step()   # lrs for the dashboard: optim.effective_lrs(optimizer)
    around sampling, a validation loss and writing a LoRA:  optim.eval_mode(optimizer) ... optim.train_mode(optimizer)

A training state (`accelerator.save_state`) is best written in train mode: the weights the optimizer steps
on plus its state, resumed exactly. For schedule-free optimizers the weights the model holds while
training (y) are not the ones to keep: `eval_mode` swaps in the averaged weights (x) that sampling,
validation and the saved LoRA must see; `train_mode` swaps back (exactly up to float rounding).
For every other optimizer both are no-ops.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from nyx_tui.config.errors import Problem
from nyx_tui.config.model import (
    BackendKind,
    OptimizerKind,
    OptimizerSection,
    SchedulerKind,
    SchedulerSection,
    TrainingConfig,
)

if TYPE_CHECKING:
    import torch


class OptimizerError(ValueError):
    """The optimizer or schedule cannot be built from this config; the message names the field and the fix."""


# ------------------------------------------------------------------------------------------- the table

_ADAM_KEYS = ("weight_decay", "betas", "eps")
_DEFAULT_BETAS: tuple[float, float] = OptimizerSection.model_fields["betas"].default


@dataclass(frozen=True)
class OptimizerSpec:
    """What Nyx knows about one optimizer kind."""

    class_path: str  # where the class is defined (its __module__ + "." + __qualname__), as sd-scripts records it
    package: str  # the pip distribution that brings it
    kohya: str  # sd-scripts' optimizer_type
    section_keys: tuple[str, ...] = ()  # OptimizerSection fields passed as keyword arguments
    defaults: dict[str, Any] = field(default_factory=dict)  # Nyx's defaults; optimizer.args override them

    @property
    def module(self) -> str:
        return self.class_path.rsplit(".", 1)[0]

    @property
    def name(self) -> str:
        return self.class_path.rsplit(".", 1)[1]


SPECS: dict[OptimizerKind, OptimizerSpec] = {
    OptimizerKind.ADAMW: OptimizerSpec("torch.optim.adamw.AdamW", "torch", "AdamW", _ADAM_KEYS),
    OptimizerKind.ADAMW8BIT: OptimizerSpec(
        "bitsandbytes.optim.adamw.AdamW8bit", "bitsandbytes", "AdamW8bit", _ADAM_KEYS
    ),
    # Lion: betas only when the user changed them from the Adam default (Lion's own are 0.9, 0.99)
    OptimizerKind.LION: OptimizerSpec("lion_pytorch.lion_pytorch.Lion", "lion-pytorch", "Lion", ("weight_decay",)),
    OptimizerKind.LION8BIT: OptimizerSpec(
        "bitsandbytes.optim.lion.Lion8bit", "bitsandbytes", "Lion8bit", ("weight_decay",)
    ),
    OptimizerKind.PRODIGY: OptimizerSpec("prodigyopt.prodigy.Prodigy", "prodigyopt", "Prodigy", _ADAM_KEYS),
    # CAME's betas and eps are triples/pairs of its own (optimizer.args: betas = "0.9,0.999,0.9999")
    OptimizerKind.CAME: OptimizerSpec("came_pytorch.CAME.CAME", "came-pytorch", "came_pytorch.CAME", ("weight_decay",)),
    # with a learning rate given (always, in Nyx): kohya users' usual "fixed lr" Adafactor
    OptimizerKind.ADAFACTOR: OptimizerSpec(
        "transformers.optimization.Adafactor",
        "transformers",
        "Adafactor",
        ("weight_decay",),
        {"relative_step": False, "scale_parameter": False, "warmup_init": False},
    ),
    OptimizerKind.ADAMW_SCHEDULEFREE: OptimizerSpec(
        "schedulefree.adamw_schedulefree.AdamWScheduleFree", "schedulefree", "AdamWScheduleFree", _ADAM_KEYS
    ),
}

_LION_KINDS = (OptimizerKind.LION, OptimizerKind.LION8BIT)
SCHEDULE_FREE_KINDS = (OptimizerKind.ADAMW_SCHEDULEFREE,)
# schedules a schedule-free optimizer works with: it replaces the decay (a warmup is the same as its own)
SCHEDULE_FREE_SCHEDULES = (SchedulerKind.CONSTANT, SchedulerKind.CONSTANT_WITH_WARMUP)
DECAYING_SCHEDULES = (
    SchedulerKind.LINEAR,
    SchedulerKind.COSINE,
    SchedulerKind.COSINE_WITH_RESTARTS,
    SchedulerKind.POLYNOMIAL,
    SchedulerKind.REX,
)


def class_path(opt: OptimizerSection) -> str:
    """The dotted path of the optimizer class this section builds."""
    if opt.type is OptimizerKind.CUSTOM:
        return (opt.class_path or "").strip()
    return SPECS[opt.type].class_path


def kohya_optimizer_type(opt: OptimizerSection) -> str:
    """sd-scripts' `optimizer_type` for this section (a dotted path for custom ones)."""
    if opt.type is OptimizerKind.CUSTOM:
        return class_path(opt)
    return SPECS[opt.type].kohya


def parse_arg(value: Any) -> Any:
    """An `optimizer.args` value as sd-scripts reads `optimizer_args`: a string that is a Python literal becomes
    that literal ("0.9,0.99" → (0.9, 0.99), "None" → None); any other string stays as it is."""
    if not isinstance(value, str):
        return value
    try:
        parsed = ast.literal_eval(value.strip())
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return value
    return tuple(parsed) if isinstance(parsed, list) else parsed


def optimizer_kwargs(opt: OptimizerSection) -> dict[str, Any]:
    """The keyword arguments (besides params and lr) the optimizer class gets: Nyx's defaults for the kind, the
    section's fields it takes, then `optimizer.args` over them. No torch needed (metadata and checks use it)."""
    if opt.type is OptimizerKind.CUSTOM:
        kwargs: dict[str, Any] = {}
    else:
        spec = SPECS[opt.type]
        kwargs = dict(spec.defaults)
        for key in spec.section_keys:
            value = getattr(opt, key)
            kwargs[key] = tuple(value) if isinstance(value, tuple) else value
        if opt.type in _LION_KINDS and tuple(opt.betas) != tuple(_DEFAULT_BETAS):
            kwargs["betas"] = tuple(opt.betas)
    kwargs.update({k: parse_arg(v) for k, v in opt.args.items()})
    return kwargs


def metadata_name(opt: OptimizerSection) -> str:
    """sd-scripts' `ss_optimizer`: the class path and its keyword arguments, `module.Class(k=v,...)`."""
    args = ",".join(f"{k}={v}" for k, v in optimizer_kwargs(opt).items())
    return f"{class_path(opt)}({args})"


# -------------------------------------------------------------------------------------------- building


def _import_class(opt: OptimizerSection) -> type:
    path = class_path(opt)
    what = f"optimizer.type = {opt.type.value!r}"
    if opt.type is OptimizerKind.CUSTOM:
        what = f"optimizer.class_path = {path!r}"
        if "." not in path:
            raise OptimizerError(f"{what}: give the class as a dotted path, e.g. pytorch_optimizer.CAME")
    module_name, _, name = path.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        package = SPECS[opt.type].package if opt.type in SPECS else module_name.split(".")[0]
        raise OptimizerError(
            f"{what} needs the {package!r} package, which is not installed ({e}); install it: pip install {package}"
        ) from e
    cls = getattr(module, name, None)
    if not isinstance(cls, type):
        raise OptimizerError(f"{what}: {module_name} has no class {name!r}")
    import torch

    if not issubclass(cls, torch.optim.Optimizer):
        raise OptimizerError(f"{what}: {path} is not a torch.optim.Optimizer")
    return cls


def _check_arg_names(cls: type, label: str, kwargs: dict[str, Any]) -> None:
    """Unknown keyword arguments are named before the class sees them (not for classes that take **kwargs)."""
    try:
        params = inspect.signature(cls).parameters
    except (TypeError, ValueError):
        return
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    accepted = [n for n, p in params.items() if n not in ("self", "params", "lr") and p.kind is not p.VAR_POSITIONAL]
    bad = [k for k in kwargs if k not in params]
    if bad:
        verb = "is not an argument" if len(bad) == 1 else "are not arguments"
        raise OptimizerError(
            f"optimizer.args: {', '.join(repr(k) for k in bad)} {verb} of {label}; it takes: {', '.join(accepted)}"
        )


def build_optimizer(opt: OptimizerSection, param_groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
    """The optimizer of `opt.type` over `param_groups`, each group keeping its own "lr" (text encoder, UNet and
    block-wise rates are groups; a group without one gets `opt.learning_rate`). Schedule-free optimizers come
    back in train mode. Raises `OptimizerError` (a ValueError) naming the optimizer and the bad setting."""
    cls = _import_class(opt)
    label = f"{cls.__name__} (optimizer.type = {opt.type.value!r})"
    for key in ("params", "lr"):
        if key in opt.args:
            fix = "optimizer.learning_rate" if key == "lr" else "nothing: the engine passes the adapter's weights"
            raise OptimizerError(f"optimizer.args: {key!r} cannot be set here; set {fix}")
    kwargs = optimizer_kwargs(opt)
    _check_arg_names(cls, label, kwargs)
    groups = [dict(g) for g in param_groups]
    for g in groups:
        g.setdefault("lr", opt.learning_rate)
    lr: float | None = opt.learning_rate
    if opt.type is OptimizerKind.PRODIGY:
        lrs = sorted({float(g["lr"]) for g in groups if float(g["lr"]) != 0.0})
        if len(lrs) > 1:
            raise OptimizerError(
                f"{label} takes one learning rate for every parameter group (0 leaves a group out), got "
                f"{', '.join(f'{x:g}' for x in lrs)}; set network.text_encoder_lr and network.block_lr_weights so "
                "that every trained group has optimizer.learning_rate"
            )
    if opt.type is OptimizerKind.ADAFACTOR and kwargs.get("relative_step"):
        lr = None  # Adafactor's own time-dependent step size; it refuses a manual lr beside it
    try:
        optimizer = cls(groups, lr=lr, **kwargs)
    except TypeError as e:
        raise OptimizerError(f"optimizer.args for {label}: {e}") from e
    except (ValueError, RuntimeError) as e:
        raise OptimizerError(f"{label}: {e}") from e
    train_mode(optimizer)
    return optimizer


# ----------------------------------------------------------------------------------- schedule-free modes


def _unwrap(optimizer: Any) -> Any:
    """The optimizer itself under accelerate's AcceleratedOptimizer (which has train/eval of its own)."""
    for _ in range(4):
        inner = getattr(optimizer, "optimizer", None)
        if inner is None or not hasattr(inner, "param_groups"):
            break
        optimizer = inner
    return optimizer


def is_schedule_free(optimizer: Any) -> bool:
    """A schedule-free optimizer: its groups carry a train/eval flag and it has train() and eval()."""
    inner = _unwrap(optimizer)
    groups = getattr(inner, "param_groups", [])
    return bool(groups) and "train_mode" in groups[0] and callable(getattr(inner, "eval", None))


def train_mode(optimizer: Any) -> None:
    """Before training steps: schedule-free optimizers move the model to the weights they step on (y).
    A no-op for other optimizers and when already in train mode."""
    if is_schedule_free(optimizer):
        _unwrap(optimizer).train()


def eval_mode(optimizer: Any) -> None:
    """Before sampling, a validation loss and saving (the LoRA or the training state): schedule-free optimizers
    move the model to the averaged weights (x), the ones to keep. A no-op for other optimizers."""
    if is_schedule_free(optimizer):
        _unwrap(optimizer).eval()


def effective_lrs(optimizer: Any) -> list[float]:
    """The step size of each group as the dashboard should show it: Prodigy's d·lr, relative-step Adafactor's own
    rate, else the group's lr."""
    inner = _unwrap(optimizer)
    out: list[float] = []
    for group in inner.param_groups:
        lr = float(group["lr"] or 0.0)
        if "d" in group and "d0" in group:  # Prodigy
            lr *= float(group["d"])
        elif group.get("relative_step"):  # Adafactor finds its own
            state = next((inner.state[p] for p in group["params"] if inner.state.get(p)), None)
            if state is not None:
                lr = float(type(inner)._get_lr(group, state))
        out.append(lr)
    return out


# ------------------------------------------------------------------------------------------- schedules


def warmup_steps(sched: SchedulerSection, total_steps: int) -> int:
    """Warmup in optimizer steps; a value below 1 is a fraction of the run (sd-scripts' lr_warmup_steps)."""
    w = sched.warmup_steps
    if isinstance(w, float) and 0 < w < 1:
        return int(w * total_steps)
    return int(w)


def schedule_factor(sched: SchedulerSection, step: int, total_steps: int) -> float:
    """The factor each group's own learning rate is multiplied by after `step` optimizer steps. Pure (no torch):
    the scheduler uses it and a view could draw the curve with it. The formulas are diffusers'
    (`diffusers.optimization`) for the shared kinds, so a schedule means the same as in sd-scripts, plus a floor
    of `min_lr_ratio` on the decaying ones."""
    kind = sched.type
    warm = warmup_steps(sched, total_steps)
    if kind is SchedulerKind.CONSTANT:
        return 1.0  # as in diffusers and sd-scripts, no warmup (pre-flight warns when one is set)
    if step < warm:
        return step / max(1, warm)
    if kind is SchedulerKind.CONSTANT_WITH_WARMUP:
        return 1.0
    t = (step - warm) / max(1, total_steps - warm)  # progress after the warmup, 0 → 1
    t = min(max(t, 0.0), 1.0)
    if kind is SchedulerKind.LINEAR:
        f = 1.0 - t
    elif kind is SchedulerKind.COSINE:
        f = 0.5 * (1.0 + math.cos(math.pi * t))
    elif kind is SchedulerKind.COSINE_WITH_RESTARTS:
        f = 0.0 if t >= 1.0 else 0.5 * (1.0 + math.cos(math.pi * ((sched.num_cycles * t) % 1.0)))
    elif kind is SchedulerKind.POLYNOMIAL:
        f = (1.0 - t) ** sched.power
    elif kind is SchedulerKind.REX:
        # REX, "Revisiting Budgeted Training with an Improved Schedule" (Chen, Wolfe & Kyrillidis, MLSys 2022,
        # arXiv:2107.04197): f(z) = (1 - z) / (1/2 + (1 - z)/2) for progress z in [0, 1]: 1 at the start, 2/3
        # halfway, 0 at the end — it stays higher than linear for longer and drops at the end.
        f = (1.0 - t) / (0.5 + 0.5 * (1.0 - t))
    else:  # pragma: no cover - every kind is handled above
        raise OptimizerError(f"scheduler.type = {kind.value!r} is not known")
    m = sched.min_lr_ratio
    return m + (1.0 - m) * f


def build_scheduler(
    sched: SchedulerSection, optimizer: torch.optim.Optimizer, total_steps: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """A LambdaLR stepping once per optimizer step; each group follows its own base lr times `schedule_factor`.
    A loaded state restores the old learning rates with the step count: `use_config_lrs` puts the config's back."""
    from torch.optim.lr_scheduler import LambdaLR

    if total_steps <= 0:
        raise OptimizerError(f"the schedule needs a positive number of optimizer steps, got {total_steps}")
    if is_schedule_free(optimizer) and sched.type not in SCHEDULE_FREE_SCHEDULES:
        raise OptimizerError(
            f"scheduler.type = {sched.type.value!r} with a schedule-free optimizer: it replaces the schedule; "
            'set scheduler.type = "constant" (or "constant_with_warmup")'
        )

    def factor(step: int) -> float:
        return schedule_factor(sched, step, total_steps)

    lr_lambda: Callable[[int], float] = factor
    return LambdaLR(_unwrap(optimizer), lr_lambda)


def use_config_lrs(optimizer: Any, scheduler: Any, base_lrs: list[float]) -> None:
    """After a training state was loaded: the learning rates of the config this run was started with, at the
    loaded step of the schedule. (Loading restores the saved run's: the optimizer's param groups carry `lr`
    and `initial_lr`, and LambdaLR's state its `base_lrs`; a resume with a changed learning_rate,
    text_encoder_lr or block_lr_weights would otherwise silently keep the old ones.)"""
    inner = _unwrap(optimizer)
    scheduler.base_lrs = list(base_lrs)
    step = scheduler.last_epoch
    for group, base, factor in zip(inner.param_groups, base_lrs, scheduler.lr_lambdas, strict=True):
        group["initial_lr"] = base
        group["lr"] = base * factor(step)
    scheduler._last_lr = [group["lr"] for group in inner.param_groups]


# ------------------------------------------------------------------------------------------- pre-flight


def _module_missing(module: str) -> bool:
    """Whether a top-level package cannot be found (without importing it: the TUI checks configs too)."""
    try:
        return importlib.util.find_spec(module.split(".")[0]) is None
    except (ImportError, ValueError):
        return True


def _group_lrs(cfg: TrainingConfig) -> set[float]:
    """The learning rates the trained parameter groups will have (0 = a block left out, not counted)."""
    lr = cfg.optimizer.learning_rate
    net = cfg.network
    lrs = {lr} if net.train_unet else set()
    weights = getattr(net, "block_lr_weights", None)
    if net.train_unet and weights:
        dims = net.block_dims or [net.dim] * len(weights)  # a block of rank 0 has no parameters: no group
        lrs = {lr * w for w, d in zip(weights, dims, strict=False) if w > 0 and d > 0}
    te_lr = getattr(net, "text_encoder_lr", None)
    if net.train_text_encoder:
        lrs.add(te_lr if te_lr is not None else lr)
    return lrs


def optimizer_problems(cfg: TrainingConfig) -> list[Problem]:
    """What is wrong or doubtful in the optimizer and scheduler sections, before anything loads. Never raises."""
    try:
        return _optimizer_problems(cfg)
    except Exception as e:  # a check's bug must not become a traceback in the form
        return [
            Problem(
                "optimizer",
                f"the optimizer check itself failed ({type(e).__name__}: {e})",
                "report this as a bug in Nyx; the config may still be fine",
                severity="warning",
            )
        ]


def _optimizer_problems(cfg: TrainingConfig) -> list[Problem]:
    opt, sched = cfg.optimizer, cfg.scheduler
    out: list[Problem] = []
    native = cfg.backend.name is BackendKind.NATIVE  # kohya backends bring their own libraries

    def add(key: str, message: str, fix: str, severity: str = "error") -> None:
        out.append(Problem(key, message, fix, severity="warning" if severity == "warning" else "error"))

    # -- which class
    if opt.type is OptimizerKind.CUSTOM:
        path = class_path(opt)
        module, _, name = path.rpartition(".")
        if not path:
            add(
                "optimizer.class_path",
                'optimizer.type = "custom" needs the optimizer class',
                'set optimizer.class_path to its dotted path, e.g. class_path = "pytorch_optimizer.CAME"',
            )
        elif not module or not name.isidentifier() or not all(p.isidentifier() for p in module.split(".")):
            add(
                "optimizer.class_path",
                f"{path!r} is not a dotted class path",
                'write the module and the class, e.g. class_path = "pytorch_optimizer.CAME"',
            )
        elif native and _module_missing(module):
            add(
                "optimizer.class_path",
                f"the module {module.split('.')[0]!r} of {path} is not installed",
                "install the package that provides it (pip install …) or choose a built-in optimizer.type",
            )
    else:
        if opt.class_path:
            add(
                "optimizer.class_path",
                f"is ignored with optimizer.type = {opt.type.value!r}",
                'remove optimizer.class_path, or set optimizer.type = "custom" to use it',
                "warning",
            )
        spec = SPECS[opt.type]
        if native and _module_missing(spec.module):
            add(
                "optimizer.type",
                f"{opt.type.value} needs the {spec.package!r} package, which is not installed",
                f"install it: pip install {spec.package}",
            )

    # -- extra arguments
    for key, fix in (("lr", "set optimizer.learning_rate instead"), ("params", "remove it")):
        if key in opt.args:
            add(f"optimizer.args.{key}", "cannot be set in optimizer.args", fix)
    args = {k: parse_arg(v) for k, v in opt.args.items()}

    # -- per optimizer
    if opt.type is OptimizerKind.PRODIGY:
        if opt.learning_rate < 0.1:
            add(
                "optimizer.learning_rate",
                f"{opt.learning_rate:g} with Prodigy, which finds the step size itself and multiplies it by this",
                "set optimizer.learning_rate = 1.0 (tune Prodigy with optimizer.args.d_coef instead)",
                "warning",
            )
        lrs = _group_lrs(cfg)
        if len(lrs) > 1:
            add(
                "optimizer.type",
                f"Prodigy takes one learning rate for every trained group, but this config gives "
                f"{', '.join(f'{x:g}' for x in sorted(lrs))} (network.text_encoder_lr / network.block_lr_weights)",
                "leave network.text_encoder_lr empty and block_lr_weights at 1 (or 0), or choose another optimizer",
            )
    if opt.type is OptimizerKind.ADAFACTOR:
        relative = bool(args.get("relative_step", False))
        if args.get("warmup_init") and not relative:
            add(
                "optimizer.args.warmup_init",
                "Adafactor's warmup_init works only with relative_step = true",
                "remove warmup_init, or set relative_step = true in optimizer.args",
            )
        if relative:
            add(
                "optimizer.args.relative_step",
                "with relative_step = true Adafactor sets its own step size: optimizer.learning_rate, per-group "
                "learning rates and the scheduler have no effect",
                "remove relative_step to train at optimizer.learning_rate, or accept Adafactor's own rate",
                "warning",
            )
    if opt.type in SCHEDULE_FREE_KINDS:
        if sched.type not in SCHEDULE_FREE_SCHEDULES:
            add(
                "scheduler.type",
                f"{sched.type.value!r} with {opt.type.value}: a schedule-free optimizer replaces the schedule, and "
                "a decaying one works against it",
                'set scheduler.type = "constant" (or "constant_with_warmup" for a warmup)',
            )
        if "warmup_steps" in args and sched.warmup_steps > 0:
            add(
                "optimizer.args.warmup_steps",
                "the optimizer's own warmup and scheduler.warmup_steps would both apply",
                "keep one: remove optimizer.args.warmup_steps or set scheduler.warmup_steps = 0",
                "warning",
            )

    # -- schedule settings that would have no effect
    if sched.type is SchedulerKind.CONSTANT and sched.warmup_steps > 0:
        add(
            "scheduler.warmup_steps",
            f'{sched.warmup_steps} steps are ignored by scheduler.type = "constant" (sd-scripts refuses them)',
            'set scheduler.type = "constant_with_warmup", or warmup_steps = 0',
            "warning",
        )
    if sched.num_cycles != 1 and sched.type is not SchedulerKind.COSINE_WITH_RESTARTS:
        add(
            "scheduler.num_cycles",
            f"only cosine_with_restarts uses it, not {sched.type.value}",
            'set scheduler.type = "cosine_with_restarts", or num_cycles = 1',
            "warning",
        )
    if sched.power != 1.0 and sched.type is not SchedulerKind.POLYNOMIAL:
        add(
            "scheduler.power",
            f"only polynomial uses it, not {sched.type.value}",
            'set scheduler.type = "polynomial", or power = 1',
            "warning",
        )
    if sched.min_lr_ratio > 0 and sched.type not in DECAYING_SCHEDULES:
        add(
            "scheduler.min_lr_ratio",
            f"{sched.type.value} does not decay, so the floor has no effect",
            "choose a decaying scheduler.type (cosine, linear, rex, …), or min_lr_ratio = 0",
            "warning",
        )
    return out
