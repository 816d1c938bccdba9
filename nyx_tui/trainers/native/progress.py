"""How long a run is and where it stands: the step plan (steps or epochs), the stream of training batches
grouped into optimizer steps, and the seeded generators as they are saved for an exact resume.

Epochs and optimizer steps stay aligned: a step takes `gradient_accumulation_steps` micro-batches, and the
last step of an epoch takes what is left of it (as sd-scripts with accelerate does). So an epoch is always
`ceil(batches / accumulation)` steps, `saving.every_n_epochs` saves at a step boundary, and a state saved at
any step says exactly which batches of its epoch were used.

Exact resume of the data order: the data generator is drawn from when an epoch's batch order is made. A
state therefore keeps the data generator's state *at the start of the current epoch* plus the number of
micro-batches already used; a resumed run restores it, replays the epoch's order and skips those batches
at the sampler (no image is loaded for a skipped batch). The noise generator is kept as it is at the
save, one per process.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sized
from dataclasses import dataclass
from typing import Any

import torch

from nyx_tui.config.model import TrainingSection


@dataclass(frozen=True)
class Plan:
    """The run's length. `batches_per_epoch` is per process (what one rank's sampler yields)."""

    batches_per_epoch: int
    steps_per_epoch: int
    total_steps: int
    total_epochs: int
    by_epochs: bool

    @classmethod
    def make(cls, tr: TrainingSection, batches_per_epoch: int) -> Plan:
        batches = max(1, batches_per_epoch)
        per_epoch = math.ceil(batches / tr.gradient_accumulation_steps)
        if tr.max_epochs:
            return cls(batches, per_epoch, tr.max_epochs * per_epoch, tr.max_epochs, True)
        return cls(batches, per_epoch, tr.max_steps, math.ceil(tr.max_steps / per_epoch), False)

    def describe(self) -> str:
        epochs = f"{self.total_epochs} epoch{'s' if self.total_epochs != 1 else ''}"
        decided = epochs if self.by_epochs else f"{self.total_steps} steps"
        return (
            f"{self.steps_per_epoch} steps an epoch ({self.batches_per_epoch} batches a process); "
            f"{self.total_steps} steps, {epochs} ({decided} asked for)"
        )


class SkipBatches:
    """Wraps a batch sampler: the next pass over it first consumes (and drops) `skip` batches. Consuming,
    not slicing, replays the sampler's random draws exactly."""

    def __init__(self, inner: Iterable[list[Any]]) -> None:
        self.inner = inner
        self.skip = 0

    def __len__(self) -> int:
        return len(self.inner) if isinstance(self.inner, Sized) else 0

    def __iter__(self) -> Iterator[list[Any]]:
        it = iter(self.inner)
        skip, self.skip = self.skip, 0
        for _ in range(skip):
            if next(it, None) is None:
                return
        yield from it


class SeededGenerators:
    """The run's seeded generators (`data`: order and augmentation, `noise`: VAE sampling, noise,
    timesteps) as one object accelerate checkpoints (`custom_checkpoint_1.pkl`).

    Saved: `data` as it was at the start of the current epoch (see the module doc), `noise` once per
    process (`gather_noise` collects them before a save with several processes; accelerate writes custom
    objects from the main process only)."""

    def __init__(self, data: torch.Generator, noise: torch.Generator, rank: int = 0) -> None:
        self.data, self.noise, self.rank = data, noise, rank
        self.data_epoch_start = data.get_state()
        self.all_noise: list[torch.Tensor] | None = None
        self.noise_restored = True

    def mark_epoch_start(self) -> None:
        self.data_epoch_start = self.data.get_state()

    def state_dict(self) -> dict[str, Any]:
        noise = self.all_noise if self.all_noise is not None else [self.noise.get_state()]
        return {"data": self.data_epoch_start, "noise": noise}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.data.set_state(state["data"])
        self.data_epoch_start = state["data"]
        noise = state["noise"]
        if isinstance(noise, torch.Tensor):  # a state from a single-process run of an earlier version
            noise = [noise]
        self.noise_restored = self.rank < len(noise)
        if self.noise_restored:
            self.noise.set_state(noise[self.rank])


class BatchStream:
    """The training micro-batches, one optimizer step's worth at a time (`step_batches`).

    `epoch` (1-based) and `batches_done` (micro-batches of that epoch used) are where the stream stands;
    a stream made with a resumed state's values continues where that run was.
    """

    def __init__(
        self,
        loader: Iterable[dict[str, Any]],
        sampler: SkipBatches,
        gens: SeededGenerators,
        plan: Plan,
        accumulation: int,
        epoch: int = 1,
        batches_done: int = 0,
    ) -> None:
        self.loader, self.sampler, self.gens, self.plan = loader, sampler, gens, plan
        self.accumulation = accumulation
        self.epoch, self.batches_done = epoch, batches_done
        self._it: Iterator[dict[str, Any]] | None = None

    @property
    def epoch_finished(self) -> bool:
        return self.batches_done >= self.plan.batches_per_epoch

    def _open_epoch(self) -> None:
        """Start iterating the current epoch from `batches_done` (resume), or the next one."""
        if self._it is not None:
            for _ in self._it:  # run the old pass to its end (its sampler's last draws), normally nothing left
                pass
            self.epoch += 1
            self.batches_done = 0
        else:
            self.gens.data.set_state(self.gens.data_epoch_start)
        self.gens.mark_epoch_start()
        self.sampler.skip = self.batches_done
        self._it = iter(self.loader)

    def step_batches(self) -> Iterator[tuple[dict[str, Any], int]]:
        """The micro-batches of the next optimizer step, each with the number of them in this step."""
        if self._it is None:
            self._open_epoch()
        if self.epoch_finished:
            self._open_epoch()
        count = min(self.accumulation, self.plan.batches_per_epoch - self.batches_done)
        for _ in range(count):
            assert self._it is not None
            batch = next(self._it, None)
            if batch is None:  # the sampler yielded fewer batches than it announced: go on with the next epoch
                self.batches_done = self.plan.batches_per_epoch
                self._open_epoch()
                batch = next(self._it)
            self.batches_done += 1
            yield batch, count
