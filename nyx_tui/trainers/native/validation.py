"""The validation split and the validation loss (`dataset.validation_split`, `training.validate_every_n_steps`).

Held out are whole images (with all their repeats), chosen by the run's seed, so the same config always
holds out the same ones and no repeat of a held-out image is trained on. The loss is the training loss of
the held-out images computed with a generator seeded afresh every time: the same augmentation, VAE sample,
noise and timesteps at every validation, so two values differ only because the weights did. It runs with
the denoiser in eval mode (no adapter dropout) and without gradients, on the main process only.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from typing import Any, Protocol, TypeVar

import torch


class _HasImage(Protocol):
    @property
    def image(self) -> Any: ...


ItemT = TypeVar("ItemT", bound=_HasImage)


def split(items: list[ItemT], fraction: float, seed: int) -> tuple[list[ItemT], list[ItemT]]:
    """(training items, validation items): round(fraction × images) distinct images held out (at least one,
    never all), their repeats dropped from both sides' counts (validation sees each image once)."""
    images = list(dict.fromkeys(i.image for i in items))
    if fraction <= 0 or len(images) < 2:
        return items, []
    count = min(len(images) - 1, max(1, round(fraction * len(images))))
    held = set(random.Random(seed).sample(images, count))
    train = [i for i in items if i.image not in held]
    seen: set[Any] = set()
    val = []
    for i in items:
        if i.image in held and i.image not in seen:
            seen.add(i.image)
            val.append(i)
    return train, val


class FixedBatches:
    """A batch sampler for the validation set: the same batches of `(index, item_seed)` every pass. With
    `groups` (each item's bucket, `data.bucket_keys`) a batch holds one bucket's items, so they stack."""

    def __init__(self, n: int, batch_size: int, seed: int, groups: Sequence[Hashable] | None = None) -> None:
        rng = random.Random(seed)
        keys = [(i, rng.randrange(2**31 - 1)) for i in range(n)]
        by_group: dict[Hashable, list[tuple[int, int]]] = {}
        for key in keys:
            by_group.setdefault(groups[key[0]] if groups is not None else None, []).append(key)
        self.batches = [g[i : i + batch_size] for g in by_group.values() for i in range(0, len(g), batch_size)]

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        return iter(self.batches)


@torch.no_grad()
def validation_loss(
    unet: torch.nn.Module,
    loader: Iterable[dict[str, Any]],
    batch_loss: Callable[[Any, dict[str, Any], torch.Generator], torch.Tensor],
    seed: int,
) -> float:
    """The mean loss over the validation batches (weighted by batch size), noise from `seed`. The caller
    puts the model in eval mode (the network's adapters on the text encoders too)."""
    gen = torch.Generator().manual_seed(seed)
    total, count = 0.0, 0
    for batch in loader:
        n = len(batch["captions"])
        total += float(batch_loss(unet, batch, gen).item()) * n
        count += n
    return total / max(1, count)
