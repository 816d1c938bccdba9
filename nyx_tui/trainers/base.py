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


class Trainer(Protocol):
    @property
    def name(self) -> str: ...

    def argv(self) -> list[str]:
        """The worker command; the supervisor runs it with the job directory as its working directory."""
        ...

    def problems(self, cfg: TrainingConfig) -> list[Problem]: ...


@dataclass(frozen=True)
class NativeTrainer:
    """Nyx's own engine (`python -m nyx_tui.trainers.native JOB_DIR`)."""

    name: str = BackendKind.NATIVE.value
    families: tuple[Family, ...] = (Family.SD15,)
    networks: tuple[NetworkKind, ...] = (NetworkKind.LORA,)
    optimizers: tuple[OptimizerKind, ...] = (OptimizerKind.ADAMW,)

    def argv(self) -> list[str]:
        return [sys.executable, "-m", "nyx_tui.trainers.native", "."]

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
            choice("model.family", cfg.model.family.value, tuple(f.value for f in self.families))
        if cfg.network.kind not in self.networks:
            choice("network.kind", cfg.network.kind.value, tuple(n.value for n in self.networks))
        if cfg.optimizer.type not in self.optimizers:
            choice("optimizer.type", cfg.optimizer.type.value, tuple(o.value for o in self.optimizers))
        if cfg.network.train_text_encoder:
            out.append(
                Problem(
                    "network.train_text_encoder",
                    "the native engine trains the UNet only for now",
                    "set network.train_text_encoder = false",
                )
            )
        if not cfg.network.train_unet:
            out.append(
                Problem(
                    "network.train_unet",
                    "the native engine trains the UNet; with train_unet = false there is nothing to train",
                    "set network.train_unet = true",
                )
            )
        if cfg.model.vae:
            out.append(
                Problem(
                    "model.vae",
                    "the native engine uses the base model's own VAE for now",
                    "remove model.vae",
                )
            )
        if cfg.sampling.every_n_steps > 0:
            out.append(
                Problem(
                    "sampling.every_n_steps",
                    "the native engine does not render samples during training yet",
                    "set sampling.every_n_steps = 0",
                )
            )
        return out


TRAINERS: dict[str, Trainer] = {BackendKind.NATIVE.value: NativeTrainer()}


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


def create_training_job(cfg: TrainingConfig, queue: bool = False) -> JobDir:
    """A queued training job for a config that has passed its checks: a job dir with the resolved config
    snapshot and the backend's worker command. Nothing runs until a supervisor is spawned for it; with
    `queue` the spec marks it for the scheduler (`jobs.queue.enqueue`)."""
    trainer = get_trainer(cfg)
    if trainer is None:
        raise ValueError(f"no trainer for backend {cfg.backend.name.value!r}")
    name = f"{cfg.model.family.value}-{cfg.saving.output_name}"
    extra: dict[str, object] = {"backend": trainer.name, "resource": "gpu"}
    if queue:
        extra["queue"] = True
    return create_job("train", name, argv=trainer.argv(), config_toml=dumps_config(cfg), extra=extra)
