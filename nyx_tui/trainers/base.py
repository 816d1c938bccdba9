"""Trainer backends: what each can train, how its worker is started, and the one way to start a training job.

A backend is a small object, not a subclass tree: its name, the worker command for a job directory and
`problems(cfg)` — what it cannot do with this config, reported before anything loads. No backend module
imports torch here; the worker process does that.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Protocol

from nyx_tui.config.errors import Problem
from nyx_tui.config.fields import Family
from nyx_tui.config.io import dumps_config
from nyx_tui.config.model import BackendKind, NetworkKind, OptimizerKind, TrainingConfig
from nyx_tui.jobs.jobdir import JobDir, create_job
from nyx_tui.trainers.native.network_check import network_problems  # torch-free
from nyx_tui.trainers.native.state import resume_problems  # torch-free: reads nyx_state.json


class Trainer(Protocol):
    @property
    def name(self) -> str: ...

    def argv(self, cfg: TrainingConfig) -> list[str]:
        """The worker command for `cfg`; the supervisor runs it with the job directory as its working directory."""
        ...

    def problems(self, cfg: TrainingConfig) -> list[Problem]: ...


@dataclass(frozen=True)
class NativeTrainer:
    """Nyx's own engine (`python -m nyx_tui.trainers.native JOB_DIR`)."""

    name: str = BackendKind.NATIVE.value
    # trainers.native.models loads the UNet families, trainers.native.flow_files the flow-matching ones
    families: tuple[Family, ...] = (Family.SD15, Family.SD2, Family.SDXL, Family.FLUX, Family.SD3)
    networks: tuple[NetworkKind, ...] = tuple(NetworkKind)  # trainers.native.networks builds every one
    optimizers: tuple[OptimizerKind, ...] = tuple(OptimizerKind)  # trainers.native.optim builds every one

    def argv(self, cfg: TrainingConfig) -> list[str]:
        """One process, or with `training.num_processes` > 1 one per GPU through `accelerate launch` (DDP; the
        engine itself is the same). The flags are all given so accelerate asks nothing and warns about no
        default; its own config file (`accelerate config`) is not needed. A busy default port makes it pick
        a free one."""
        worker = ["-m", "nyx_tui.trainers.native", "."]
        n = cfg.training.num_processes
        if n <= 1:
            return [sys.executable, *worker]
        launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(n)]
        launch += ["--num_machines", "1", "--mixed_precision", cfg.training.mixed_precision.value]
        return [*launch, "--dynamo_backend", "no", *worker]

    def problems(self, cfg: TrainingConfig) -> list[Problem]:
        out: list[Problem] = []

        def choice(field: str, value: str, allowed: tuple[str, ...]) -> None:
            out.append(
                Problem(
                    field,
                    f"the native engine does not train {value!r} yet (it trains: {', '.join(allowed)})",
                    f"set {field} to one of: {', '.join(allowed)}",
                )
            )

        if cfg.model.family not in self.families:
            allowed = ", ".join(f.value for f in self.families)
            out.append(
                Problem(
                    "model.family",
                    f"the native engine trains {allowed} models; {cfg.model.family.value} (a flow-matching "
                    "transformer) is not supported by it yet",
                    f"set model.family to one of: {allowed}, or use a kohya backend for {cfg.model.family.value}",
                )
            )
        if cfg.network.kind not in self.networks:
            choice("network.kind", cfg.network.kind.value, tuple(n.value for n in self.networks))
        if cfg.optimizer.type not in self.optimizers:
            choice("optimizer.type", cfg.optimizer.type.value, tuple(o.value for o in self.optimizers))
        out += network_problems(cfg)
        out += resume_problems(cfg)
        return out


from nyx_tui.trainers.kohya.runner import KohyaCustomTrainer, KohyaTrainer  # noqa: E402  (torch-free)

TRAINERS: dict[str, Trainer] = {
    BackendKind.NATIVE.value: NativeTrainer(),
    BackendKind.KOHYA.value: KohyaTrainer(),
    BackendKind.KOHYA_CUSTOM.value: KohyaCustomTrainer(),
}


def get_trainer(cfg: TrainingConfig) -> Trainer | None:
    return TRAINERS.get(cfg.backend.name.value)


def backend_problems(cfg: TrainingConfig) -> list[Problem]:
    trainer = get_trainer(cfg)
    if trainer is None:
        available = ", ".join(TRAINERS)
        return [
            Problem(
                "backend.name",
                f"the {cfg.backend.name.value!r} backend is not available in this version of Nyx",
                f'set backend.name = "native" (available: {available})',
            )
        ]
    return trainer.problems(cfg)


def create_training_job(cfg: TrainingConfig, queue: bool = False, extra: dict[str, object] | None = None) -> JobDir:
    """A queued training job for a config that has passed its checks: a job dir with the resolved config
    snapshot and the backend's worker command. Nothing runs until a supervisor is spawned for it; with
    `queue` the spec marks it for the scheduler (`jobs.queue.enqueue`); `extra` goes into the spec too (a
    workflow's stage: `parent`, `stage`)."""
    trainer = get_trainer(cfg)
    if trainer is None:
        raise ValueError(f"no trainer for backend {cfg.backend.name.value!r}")
    name = f"{cfg.model.family.value}-{cfg.saving.output_name}"
    spec: dict[str, object] = {"backend": trainer.name, "resource": "gpu", "gpus": cfg.training.num_processes}
    if queue:
        spec["queue"] = True
    spec.update(extra or {})
    return create_job("train", name, argv=trainer.argv(cfg), config_toml=dumps_config(cfg), extra=spec)
