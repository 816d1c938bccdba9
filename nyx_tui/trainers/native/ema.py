"""An exponential moving average of the trained (LoRA) weights: `training.ema_decay`.

After every optimizer step `ema = decay * ema + (1 - decay) * weights`, starting from the adapter's
initial weights (no warm-up or bias correction: with decay d the average spans about 1 / (1 - d) steps,
so choose d with 1 / (1 - d) well below the run's length). The saved LoRA holds the averaged weights; the
training state keeps both (the raw weights in accelerate's `model.safetensors`, the average in
`ema.safetensors`), so a resumed run continues both.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

EMA_FILE = "ema.safetensors"


class LoraEMA:
    def __init__(self, params: list[torch.nn.Parameter], decay: float) -> None:
        self.params, self.decay = params, decay
        self.shadow = [p.detach().clone().float() for p in params]

    @torch.no_grad()
    def update(self) -> None:
        """One step of the average (ema + (1 - d)(w - ema), the same formula, in place for every tensor)."""
        torch._foreach_lerp_(self.shadow, [p.detach().float() for p in self.params], 1.0 - self.decay)

    @contextmanager
    def swapped(self) -> Iterator[None]:
        """The averaged weights in the model for the duration (to save or validate them); the trained weights
        are put back exactly afterwards."""
        backup = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for p, s in zip(self.params, self.shadow, strict=True):
                p.copy_(s)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, b in zip(self.params, backup, strict=True):
                    p.copy_(b)

    def save(self, folder: Path) -> None:
        tensors = {f"{i:05d}": s.cpu().contiguous() for i, s in enumerate(self.shadow)}
        save_file(tensors, str(Path(folder) / EMA_FILE), metadata={"decay": str(self.decay)})

    def load(self, folder: Path) -> bool:
        """Restore the average from a state folder; False when the state has none (the run had no EMA)."""
        path = Path(folder) / EMA_FILE
        if not path.is_file():
            return False
        tensors = load_file(str(path))
        if len(tensors) != len(self.shadow):
            raise ValueError(f"{path} holds {len(tensors)} tensors, the network has {len(self.shadow)}")
        for i, s in enumerate(self.shadow):
            saved = tensors[f"{i:05d}"]
            if saved.shape != s.shape:
                raise ValueError(f"{path}: tensor {i} is {tuple(saved.shape)}, the network's is {tuple(s.shape)}")
            s.copy_(saved)
        return True
