"""The native training loop for SD1.5-family LoRAs: load, then step, report, obey commands, save.

One function, `train`, reads top to bottom like nanoGPT's loop: build the data, load the model, add the
adapter, make the optimizer and schedule, then per optimizer step: accumulate gradients over micro-
batches, clip, step, emit a `step` event, look at `control.jsonl`, save when due.

A save writes the LoRA and, unless `saving.save_state` is off (a `stop` always writes it), the training
state next to it: `<name>-state/`, accelerate's `save_state` folder (the LoRA weights only, the optimizer,
the schedule, the seeded generators, the RNG states) plus `nyx_state.json` (step, epoch), written last.

Why `accelerate`: it is the thing that makes the same loop run under `accelerate launch` on several GPUs
(DDP wrapping, `no_sync` during accumulation, autocast for fp16/bf16, a gradient scaler for fp16) without
a second code path. On the CPU with one process it wraps nothing but the optimizer, in a thin shim (the
demo still runs at ~19 ms a step on 2 cores), so it stays on there too. The learning-rate schedule is
*not* handed to `accelerator.prepare`: the wrapped scheduler steps once per process, and ours counts
optimizer steps. Mixed precision is a GPU feature: on the CPU a request for fp16/bf16 is logged as a
warning and the run is fp32.

Reproducibility: `torch.manual_seed(seed)` before the adapter is created (its init is random), one seeded
`torch.Generator` for the data order and per-item augmentation, another for VAE sampling, noise and
timesteps. Same seed, data and config → the same losses.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections import deque
from collections.abc import Iterator
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from diffusers.optimization import get_scheduler

from nyx_tui.config.model import TrainingConfig
from nyx_tui.jobs.control import ControlReader
from nyx_tui.jobs.events import EventWriter
from nyx_tui.jobs.jobdir import JobDir, atomic_write
from nyx_tui.trainers.native import LOAD_STAGES, data, latents, lora_io, losses, models, networks

STATE_INFO = "nyx_state.json"  # in a training-state folder: step, epoch, max_steps, the LoRA saved with it


class Reporter:
    """Events for the views, plus a human line on stdout (the supervisor copies it to output.log).

    Only the main process reports, so several GPUs do not write every event several times.
    """

    def __init__(self, events: EventWriter, enabled: bool = True) -> None:
        self.events, self.enabled = events, enabled

    def emit(self, kind: str, **fields: Any) -> None:
        if self.enabled:
            self.events.emit(kind, **fields)

    def log(self, message: str, level: str = "info", **fields: Any) -> None:
        if self.enabled:
            self.events.emit("log", level=level, message=message, **fields)
            print(f"[{level}] {message}", flush=True)

    def stage(self, index: int) -> None:
        """Loading progress: stage `index` of LOAD_STAGES begins (index == len(LOAD_STAGES): training)."""
        message = LOAD_STAGES[index] if index < len(LOAD_STAGES) else "training"
        if self.enabled:
            self.events.emit("progress", done=index, total=len(LOAD_STAGES), unit="stage", message=message)
            print(f"{message}…", flush=True)


class SeededGenerators:
    """The run's seeded generators (data order, noise) as one object accelerate can checkpoint."""

    def __init__(self, **generators: torch.Generator) -> None:
        self.generators = generators

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: g.get_state() for name, g in self.generators.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for name, value in state.items():
            self.generators[name].set_state(value)


def keep_trainable_weights(models: list[torch.nn.Module], weights: list[dict[str, Any]], output_dir: str) -> None:
    """accelerate's save-state hook: a state keeps only the trainable (LoRA) weights. The base model is
    frozen and comes from `model.pretrained`; saving it would add gigabytes to every state. So a state is
    loaded with `accelerator.load_state(folder, strict=False)`."""
    for model, state in zip(models, weights, strict=False):
        trainable = {name for name, p in model.named_parameters() if p.requires_grad}
        for key in [k for k in state if k not in trainable]:
            del state[key]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def train(job: JobDir, cfg: TrainingConfig, events: EventWriter) -> int:
    """Run the whole training job; returns the process exit code (0 also for `stop` and `cancel`)."""
    # paths are absolute here: `load_config` resolved relative ones against the config file's folder
    tr = cfg.training
    cuda = torch.cuda.is_available()
    mixed = tr.mixed_precision.value
    if not cuda and mixed != "no":
        mixed_note = f"mixed_precision = {mixed!r} needs a GPU; training in fp32 on the CPU"
        mixed = "no"
    else:
        mixed_note = ""
    accelerator = Accelerator(mixed_precision=mixed, cpu=not cuda)
    report = Reporter(events, enabled=accelerator.is_main_process)
    if mixed_note:
        report.log(mixed_note, "warning")
    device = accelerator.device
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed, torch.float32)
    report.log(
        f"device {device}, {torch.get_num_threads()} CPU threads, precision {mixed}, "
        f"{accelerator.num_processes} process(es)"
    )

    # ---------------------------------------------------------------- data
    report.stage(1)
    items = data.scan(cfg.dataset)
    dataset = data.ImageCaptionDataset(items, cfg.dataset)
    data_gen = torch.Generator().manual_seed(tr.seed)
    noise_gen = torch.Generator().manual_seed(tr.seed + 1 + accelerator.process_index)
    sampler = data.EpochBatches(
        len(items), tr.batch_size, data_gen, accelerator.process_index, accelerator.num_processes
    )
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=data.collate,
        num_workers=cfg.dataset.num_workers,
        persistent_workers=cfg.dataset.num_workers > 0,
    )
    per_epoch = data.steps_per_epoch(
        len(items), tr.batch_size, tr.gradient_accumulation_steps, accelerator.num_processes
    )
    num_epochs = math.ceil(tr.max_steps / per_epoch)
    n_images = len(dict.fromkeys(i.image for i in items))
    report.log(f"{n_images} images, {len(items)} with repeats; {per_epoch} steps an epoch, {num_epochs} epochs")

    # ---------------------------------------------------------------- model + adapter
    report.stage(2)
    model = models.load_model(cfg.model)
    models.freeze(model)
    for part in (model.text_encoder, model.vae, model.unet):
        part.to(device) if weight_dtype == torch.float32 else part.to(device, weight_dtype)
    report.stage(3)
    seed_everything(tr.seed)
    network = networks.attach(model, cfg)
    params = network.params
    if tr.gradient_checkpointing:
        model.unet.enable_gradient_checkpointing()
    model.unet.train()
    report.log(network.describe())

    # ---------------------------------------------------------------- optimizer + schedule
    report.stage(4)
    opt = cfg.optimizer
    extra: dict[str, Any] = dict(opt.args)  # passed as they are (e.g. amsgrad = true, fused = true)
    optimizer = torch.optim.AdamW(
        network.param_groups(),
        lr=opt.learning_rate,
        weight_decay=opt.weight_decay,
        betas=(opt.betas[0], opt.betas[1]),
        eps=opt.eps,
        **extra,
    )
    lr_scheduler = get_scheduler(
        cfg.scheduler.type.value,
        optimizer,
        num_warmup_steps=cfg.scheduler.warmup_steps,
        num_training_steps=tr.max_steps,
        num_cycles=cfg.scheduler.num_cycles,
        power=cfg.scheduler.power,
    )
    unet, optimizer = accelerator.prepare(model.unet, optimizer)
    accelerator.register_for_checkpointing(lr_scheduler, SeededGenerators(data=data_gen, noise=noise_gen))
    accelerator.register_save_state_pre_hook(keep_trainable_weights)

    # ---------------------------------------------------------------- saving
    out_dir = Path(cfg.saving.output_dir) if cfg.saving.output_dir else job.output_dir
    save_dtype = lora_io.SAVE_DTYPES[cfg.saving.precision.value]
    started_at = time.time()

    def save(step: int, epoch: int, final: bool, state: bool) -> None:
        """The LoRA `<name>.safetensors`, then (with `state`) the training state `<name>-state/`."""
        name = cfg.saving.output_name + ("" if final else f"-step{step:06d}")
        lora = out_dir / f"{name}.safetensors"
        if accelerator.is_main_process:
            save_lora(lora, step, epoch)
        if state:
            save_training_state(out_dir / f"{name}-state", lora, step, epoch)

    def save_lora(path: Path, step: int, epoch: int) -> None:
        tensors = network.kohya_state_dict(save_dtype)
        meta = lora_io.build_metadata(
            cfg,
            step=step,
            num_train_images=len(items),
            tag_frequency=data.tag_frequency(items),
            started_at=started_at,
            mixed_precision=mixed,
            prediction_type=model.prediction_type,
            epoch=epoch,
            num_epochs=num_epochs,
        )
        path = lora_io.save_lora(path, tensors, meta)
        report.emit("artifact", path=str(path), what="lora", step=step)
        print(f"saved {path}", flush=True)

    def save_training_state(path: Path, lora: Path, step: int, epoch: int) -> None:
        """Every process writes its part (its RNG state; the main one the rest). No barrier: the processes
        may read a command at different steps. `nyx_state.json` comes last: without it, it is incomplete."""
        accelerator.save_state(str(path))
        if not accelerator.is_main_process:
            return
        info = {"step": step, "epoch": epoch, "max_steps": tr.max_steps, "lora": str(lora), "saved": time.time()}
        atomic_write(path / STATE_INFO, json.dumps(info, indent=1) + "\n")
        report.emit("artifact", path=str(path), what="state", step=step)
        print(f"saved the training state {path}", flush=True)

    # ---------------------------------------------------------------- the loop
    def batches() -> Iterator[tuple[int, dict[str, Any]]]:
        epoch = 0
        while True:
            epoch += 1
            for batch in loader:
                yield epoch, batch

    stream = batches()
    control = ControlReader(job.control_path)
    recent: deque[float] = deque(maxlen=cfg.logging.loss_avg_window)
    times: deque[float] = deque(maxlen=21)
    accum = tr.gradient_accumulation_steps
    print_every = max(1, tr.max_steps // 20)
    step, epoch = 0, 1
    stopped = False
    report.stage(len(LOAD_STAGES))
    times.append(time.perf_counter())
    while step < tr.max_steps:
        # -- commands (cheap: one read of a small file)
        for cmd in control.poll():
            what = cmd.get("command")
            if what == "cancel":
                report.log("cancel received: exiting without saving", ack=what)
                return 0
            if what == "stop":
                report.log(f"stop received at step {step}: saving (LoRA and training state) and exiting", ack=what)
                stopped = True
            elif what == "save_now":
                report.log(f"save_now received: saving at step {step}", ack=what)
                save(step, epoch, final=False, state=cfg.saving.save_state)
            elif what == "sample_now":
                report.log("sample_now received: the native engine does not render samples yet", "warning", ack=what)
        if stopped:
            break

        # -- one optimizer step over `accum` micro-batches
        loss_sum = 0.0
        for micro in range(accum):
            epoch, batch = next(stream)
            sync = micro == accum - 1
            with nullcontext() if sync else accelerator.no_sync(unet), accelerator.autocast():
                lat = latents.batch_latents(model, batch, noise_gen, device, weight_dtype)
                with torch.no_grad():
                    cond = models.encode_text(model, batch["captions"], device)
                loss = losses.training_loss(model, unet, lat, cond, batch, noise_gen, tr, device, weight_dtype)
                accelerator.backward(loss / accum)
            loss_sum += loss.detach().item()
        if opt.max_grad_norm > 0:
            accelerator.clip_grad_norm_(params, opt.max_grad_norm)
        lrs = [float(g["lr"]) for g in optimizer.param_groups]
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1

        # -- report
        step_loss = loss_sum / accum
        if not math.isfinite(step_loss):
            raise FloatingPointError(
                f"the loss became {step_loss} at step {step}; lower optimizer.learning_rate or use fp32/bf16"
            )
        recent.append(step_loss)
        times.append(time.perf_counter())
        it_s = (len(times) - 1) / (times[-1] - times[0])
        loss_avg = sum(recent) / len(recent)
        report.emit(
            "step",
            step=step,
            total=tr.max_steps,
            epoch=epoch,
            loss=step_loss,
            loss_avg=loss_avg,
            lr=lrs,
            it_s=round(it_s, 4),
            eta_s=round((tr.max_steps - step) / it_s, 1),
        )
        if accelerator.is_main_process and (step % print_every == 0 or step in (1, tr.max_steps)):
            print(
                f"step {step}/{tr.max_steps} epoch {epoch} loss {step_loss:.4f} avg {loss_avg:.4f} "
                f"lr {lrs[0]:.3g} {it_s:.2f} it/s",
                flush=True,
            )
        if cfg.saving.every_n_steps and step % cfg.saving.every_n_steps == 0 and step < tr.max_steps:
            save(step, epoch, final=False, state=cfg.saving.save_state)

    save(step, epoch, final=True, state=stopped or cfg.saving.save_state)  # a stopped run is meant to go on
    accelerator.wait_for_everyone()
    report.log(f"{'stopped' if stopped else 'finished'} at step {step} in {time.time() - started_at:.1f} s")
    return 0
