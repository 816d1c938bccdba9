"""The native training loop for SD1.5, SD2, SDXL, Flux.1 and SD3 LoRAs: load, then step, report, obey commands, save.

One function, `train`, reads top to bottom like nanoGPT's loop: build the data (and the validation split),
load the model, add the adapter, make the optimizer and schedule, resume a saved state if asked, then per
optimizer step: look at `control.jsonl` (the main process; the decision is broadcast to all), accumulate
gradients over micro-batches, clip, step, update the EMA, emit a `step` event, save and validate when due.
The pieces live beside it: `progress` (steps or epochs, the batch stream, the seeded generators), `state`
(the state folder's `nyx_state.json`, keep-last-N), `ema`, `validation`, `distributed`, `losses` (noise and
loss options), `sampling` (sample images every N steps/epochs and on `sample_now`).

A save writes the LoRA and, unless `saving.save_state` is off (a `stop` always writes it), the training
state next to it: `<name>-state/`, accelerate's `save_state` folder (the LoRA weights only, the optimizer,
the schedule, the seeded generators, the RNG states of every process, the EMA) plus `nyx_state.json`
(step, epoch, batches of the epoch done, the network), written last. `training.resume` loads such a folder
and continues exactly: same weights, optimizer, schedule, data order position and noise stream.

Why `accelerate`: it is the thing that makes the same loop run under `accelerate launch` on several GPUs
(DDP wrapping, `no_sync` during accumulation, autocast for fp16/bf16, a gradient scaler for fp16) without
a second code path. On the CPU with one process it wraps nothing but the optimizer, in a thin shim (the
demo still runs at ~19 ms a step on 2 cores), so it stays on there too. The learning-rate schedule is
*not* handed to `accelerator.prepare`: the wrapped scheduler steps once per process, and ours counts
optimizer steps. Mixed precision is a GPU feature: on the CPU a request for fp16/bf16 is logged as a
warning and the run is fp32.

Flux and SD3 (`model.family` in FLOW_FAMILIES) take the same loop with three pieces swapped: the model
comes from `flow_files.load_flow_model` (a `FlowModel`, whose `.unet` is the transformer, so adapters,
checkpointing and `accelerator.prepare` need no second path), captions are encoded by
`flow_models.encode_text` and the loss is `flow_losses.training_loss` (flow matching with sd-scripts'
`flow.*` options). Memory modes for them, in this order before the adapter attaches: the frozen transformer
quantized (`training.base_quantization`), T5 kept on the CPU (`flow.t5_on_cpu`), the text encoders' outputs
cached and the encoders moved off the device when they do not train, blocks swapped to the CPU
(`flow.blocks_to_swap`) and CPU-offloaded checkpointing (`training.cpu_offload_checkpointing`), the
quantization, swapping and offloading built from `memory`'s pieces.

Reproducibility: `torch.manual_seed(seed)` before the adapter is created (its init is random), one seeded
`torch.Generator` for the data order and per-item augmentation, another for VAE sampling, noise and
timesteps. Same seed, data and config → the same losses.
"""

from __future__ import annotations

import json
import random
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, gather_object

from nyx_tui.config.fields import FLOW_FAMILIES
from nyx_tui.config.model import TrainingConfig
from nyx_tui.jobs.control import ControlReader
from nyx_tui.jobs.events import EventWriter
from nyx_tui.jobs.jobdir import JobDir, atomic_write
from nyx_tui.trainers.native import (
    LOAD_STAGES,
    data,
    distributed,
    flow_files,
    flow_losses,
    flow_models,
    flow_names,
    latents,
    lora_io,
    losses,
    memory,
    models,
    networks,
    optim,
    progress,
    quality,
    sampling,
    validation,
)
from nyx_tui.trainers.native.ema import LoraEMA
from nyx_tui.trainers.native.progress import SeededGenerators
from nyx_tui.trainers.native.state import STATE_INFO, Retention, StateInfo, network_signature

__all__ = ["STATE_INFO", "SeededGenerators", "Setup", "keep_trainable_weights", "optimizer_step", "prepare", "train"]


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


@dataclass
class Setup:
    """Everything `prepare` builds for a run: the accelerator and the reporter, the data (training stream and
    validation loader), the model with its adapter, the optimizer and schedule (a resumed state loaded), and
    `step`, where the run starts. `train` runs the loop over it; the LR range test
    (`nyx_tui.workflows.lr_find`) runs its own short sweep over the same pieces with `optimizer_step`."""

    job: JobDir
    cfg: TrainingConfig
    accelerator: Accelerator
    report: Reporter
    cuda: bool
    mixed: str
    device: torch.device
    weight_dtype: torch.dtype
    items: list[Any]
    val_items: list[Any]
    val_loader: Any
    plan: progress.Plan
    model: models.SDModel | flow_models.FlowModel
    flow: bool
    network: Any
    params: list[torch.nn.Parameter]
    optimizer: Any
    lr_scheduler: Any
    unet: Any
    ema: LoraEMA | None
    gens: SeededGenerators
    noise_gen: torch.Generator
    stream: progress.BatchStream
    latent_cache: Any
    text_cache: Any
    step: int

    def batch_loss(self, denoiser: Any, batch: dict[str, Any], gen: torch.Generator) -> torch.Tensor:
        """The loss of one batch (latents, text conditioning, then noise and timesteps from `gen`); training
        passes the (DDP-wrapped) UNet, validation the bare one."""
        model, cfg, tr, network, device = self.model, self.cfg, self.cfg.training, self.network, self.device
        weight_dtype, latent_cache, text_cache = self.weight_dtype, self.latent_cache, self.text_cache
        lat = latents.batch_latents(model, batch, gen, device, weight_dtype, latent_cache)
        if isinstance(model, flow_models.FlowModel):
            if text_cache is not None:  # SD3's encoder dropout on the cached rows, drawn as without the cache
                fcond = flow_models.drop_encoders(
                    model, text_cache.conditioning(batch["captions"], device), cfg.flow, gen
                )
            else:
                with nullcontext() if network.trains_text_encoder else torch.no_grad():
                    fcond = flow_models.encode_text(model, batch["captions"], device, cfg.flow, gen)
            return flow_losses.training_loss(
                model, denoiser, lat, fcond, batch, gen, tr, cfg.flow, device, weight_dtype
            )
        if text_cache is not None:
            cond = text_cache.conditioning(batch["captions"], device)
        else:
            with nullcontext() if network.trains_text_encoder else torch.no_grad():
                cond = models.encode_text(model, batch["captions"], device)
        return losses.training_loss(model, denoiser, lat, cond, batch, gen, tr, device, weight_dtype)


def prepare(job: JobDir, cfg: TrainingConfig, events: EventWriter) -> Setup:
    """Build a run up to its first step: accelerator, data, model and adapter, optimizer and schedule, a
    resumed state. Emits the loading stages and the logs that describe the run."""
    # paths are absolute here: `load_config` resolved relative ones against the config file's folder
    tr = cfg.training
    cuda = torch.cuda.is_available()
    mixed = tr.mixed_precision.value
    if not cuda and mixed != "no":
        mixed_note = f"mixed_precision = {mixed!r} needs a GPU; training in fp32 on the CPU" + (
            " (with full_bf16: in bf16, without autocast)" if tr.full_bf16 else ""
        )
        mixed = "no"
    else:
        mixed_note = ""
    accelerator = Accelerator(mixed_precision=mixed, cpu=not cuda)
    report = Reporter(events, enabled=accelerator.is_main_process)
    if mixed_note:
        report.log(mixed_note, "warning")
    device = accelerator.device
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed, torch.float32)
    if tr.full_bf16:  # the pre-flight made sure mixed_precision is bf16; on the CPU it runs without autocast
        weight_dtype = torch.bfloat16
    report.log(
        f"device {device}, {torch.get_num_threads()} CPU threads, precision {mixed}, "
        f"{accelerator.num_processes} process(es)"
    )

    # ---------------------------------------------------------------- data
    report.stage(1)
    all_items = data.scan(cfg.dataset)
    items, val_items = validation.split(all_items, cfg.dataset.validation_split, tr.seed)
    cache_latents = tr.cache_latents or tr.cache_latents_to_disk  # then batches carry no pixels
    item_options: dict[str, Any] = {
        "prior_loss_weight": tr.prior_loss_weight,
        "masks": tr.masked_loss,
        "pixels": not cache_latents,
    }
    dataset = data.ImageCaptionDataset(items, cfg.dataset, **item_options)
    data_gen = torch.Generator().manual_seed(tr.seed)
    noise_gen = torch.Generator().manual_seed(tr.seed + 1 + accelerator.process_index)
    gens = SeededGenerators(data=data_gen, noise=noise_gen, rank=accelerator.process_index)
    epoch_batches = data.EpochBatches(
        data.bucket_keys(items), tr.batch_size, data_gen, accelerator.process_index, accelerator.num_processes
    )
    sampler = progress.SkipBatches(epoch_batches)
    # every DataLoader gets a generator of its own: by default each pass over it draws a seed from the global
    # torch RNG, which the adapter's dropout uses too, and a resumed run would be one draw off
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=data.collate,
        num_workers=cfg.dataset.num_workers,
        persistent_workers=cfg.dataset.num_workers > 0,
        generator=torch.Generator(),
    )
    val_loader = None
    if val_items and accelerator.is_main_process:
        val_loader = torch.utils.data.DataLoader(
            data.ImageCaptionDataset(val_items, cfg.dataset, **item_options),
            batch_sampler=validation.FixedBatches(len(val_items), tr.batch_size, tr.seed, data.bucket_keys(val_items)),
            collate_fn=data.collate,
            generator=torch.Generator(),
        )
    plan = progress.Plan.make(tr, len(sampler))
    if optim.warmup_steps(cfg.scheduler, plan.total_steps) >= plan.total_steps:
        raise ValueError(
            f"scheduler.warmup_steps ({cfg.scheduler.warmup_steps}) must be below the run's {plan.total_steps} "
            f"steps ({plan.total_epochs} epochs of {plan.steps_per_epoch}); lower the warmup"
        )
    n_images = len(dict.fromkeys(i.image for i in items))
    held_out = f" (+{len(val_items)} held out for validation)" if val_items else ""
    report.log(f"{n_images} images{held_out}, {len(items)} with repeats; {plan.describe()}")
    if cfg.dataset.enable_bucket or any(i.is_reg for i in items):
        report.log(data.describe(items))

    # ---------------------------------------------------------------- model + adapter
    report.stage(2)
    flow = cfg.model.family in FLOW_FAMILIES
    model: models.SDModel | flow_models.FlowModel
    swapper: memory.BlockSwapper | None = None  # flow.blocks_to_swap
    keep_placed = False  # the flow memory modes place the transformer themselves: accelerate must not move it
    if flow:
        model = flow_files.load_flow_model(cfg.model, cfg.flow.t5_max_token_length)
        report.log(flow_models.describe(model))
        for level, message in flow_losses.check(tr, cfg.flow):
            report.log(message, level)
        flow_models.freeze(model)
        keep_placed = tr.base_quantization.value != "none" or bool(cfg.flow.blocks_to_swap)
        # with those modes the transformer stays on the CPU here: only compact or non-swapped weights move
        flow_models.place(model, device, weight_dtype, t5_on_cpu=cfg.flow.t5_on_cpu, transformer=not keep_placed)
        quantize_base(model, cfg, device, weight_dtype, report)  # before the adapters: they wrap the quantized layers
    else:
        model = models.load_model(cfg.model, max_token_length=cfg.dataset.max_token_length)
        report.log(models.describe(model))
        for level, message in losses.prepare_noise_schedule(model, tr):  # zero terminal SNR; checks needing the model
            report.log(message, level)
        models.freeze(model)
        models.place(model, device, weight_dtype)  # every part, SDXL's second text encoder too
    latent_cache = latents.prepare_latent_cache(
        model,
        items + val_items,
        cfg,
        device=device,
        report=report,
        is_main=accelerator.is_main_process,
        wait_for_everyone=accelerator.wait_for_everyone,
    )
    text_cache = latents.prepare_text_cache(model, [i.caption for i in items + val_items], cfg, device, report)
    if isinstance(model, flow_models.FlowModel) and text_cache is not None and not cfg.network.train_text_encoder:
        unload_text_encoders(model, report, keep=bool(cfg.sampling.prompts))
    report.stage(3)
    seed_everything(tr.seed)
    network = networks.attach(model, cfg)
    if cfg.network.weights:  # start from a LoRA file's weights (a resumed state's are loaded over them later)
        from nyx_tui.trainers.native import init_weights

        for message, level in init_weights.load_into(network, Path(cfg.network.weights)):
            report.log(message, level)
    params = network.params
    if tr.full_bf16:  # the trained weights too: their gradients and the optimizer state follow their dtype
        for p in params:
            p.data = p.data.to(torch.bfloat16)
    if isinstance(model, flow_models.FlowModel):
        if cfg.flow.blocks_to_swap:  # after the adapters (their weights stay on the device), before the optimizer
            swapper = memory.make_block_swapper(model.transformer, cfg.flow.blocks_to_swap, device)
            assert swapper is not None
            swapper.place(model.transformer)
            report.log(
                f"block swap: {len(swapper.swapped)} of {len(swapper.blocks)} transformer blocks live on the CPU "
                f"({swapper.offloaded_bytes() / 2**20:.1f} MiB) and visit {device} one at a time"
            )
        memory.checkpointing(model.transformer, tr.gradient_checkpointing, tr.cpu_offload_checkpointing)
        if tr.cpu_offload_checkpointing:
            report.log("gradient checkpointing keeps each block's inputs in CPU memory (cpu_offload_checkpointing)")
    elif tr.gradient_checkpointing:
        model.unet.enable_gradient_checkpointing()
    network.train()  # the parts with adapters train (UNet, text encoders if trained); frozen ones stay in eval
    report.log(network.describe())

    # ---------------------------------------------------------------- optimizer + schedule
    report.stage(4)
    opt = cfg.optimizer
    optimizer = optim.build_optimizer(opt, network.param_groups())  # schedule-free ones: in train mode
    lr_scheduler = optim.build_scheduler(cfg.scheduler, optimizer, plan.total_steps)
    if keep_placed:  # accelerate would move every weight to the device, the swapped and the CPU-quantized too
        unet, optimizer = accelerator.prepare(model.unet, optimizer, device_placement=[False, True])
    else:
        unet, optimizer = accelerator.prepare(model.unet, optimizer)
    accelerator.register_for_checkpointing(lr_scheduler, gens, *network.checkpoint_objects())  # + TE adapters
    accelerator.register_save_state_pre_hook(keep_trainable_weights)
    ema = LoraEMA(params, tr.ema_decay) if tr.ema_decay else None

    # ---------------------------------------------------------------- resume
    step, start_epoch, batches_done = 0, 1, 0
    if tr.resume:
        config_lrs = [float(lr) for lr in lr_scheduler.base_lrs]
        info = resume_state(Path(tr.resume), accelerator, gens, ema, plan, report)
        optim.use_config_lrs(optimizer, lr_scheduler, config_lrs)  # a changed learning rate applies
        step, start_epoch, batches_done = info.step, info.epoch, info.batches_done
    optim.train_mode(optimizer)  # a no-op: states are saved in train mode (older ones may not be)
    accum = tr.gradient_accumulation_steps
    stream = progress.BatchStream(loader, sampler, gens, plan, accum, start_epoch, batches_done)
    epoch_batches.epoch = start_epoch - 1  # its next pass is the stream's epoch (caption_dropout_every_n_epochs)
    return Setup(
        job=job,
        cfg=cfg,
        accelerator=accelerator,
        report=report,
        cuda=cuda,
        mixed=mixed,
        device=device,
        weight_dtype=weight_dtype,
        items=items,
        val_items=val_items,
        val_loader=val_loader,
        plan=plan,
        model=model,
        flow=flow,
        network=network,
        params=params,
        optimizer=optimizer,
        lr_scheduler=lr_scheduler,
        unet=unet,
        ema=ema,
        gens=gens,
        noise_gen=noise_gen,
        stream=stream,
        latent_cache=latent_cache,
        text_cache=text_cache,
        step=step,
    )


def optimizer_step(s: Setup, first: bool = False) -> tuple[float, list[float]]:
    """One optimizer step over its micro-batches (`gradient_accumulation_steps`, fewer at the end of an
    epoch): forward, backward, clip, step, schedule, EMA. Returns (the step's loss — with several processes
    the mean of theirs —, the learning rates it stepped with). `first`: log each process's first batch."""
    accelerator, stream, unet = s.accelerator, s.stream, s.unet
    loss_sum, micro = 0.0, 0
    for batch, count in stream.step_batches():
        micro += 1
        sync = micro == count
        with nullcontext() if sync else accelerator.no_sync(unet), accelerator.autocast():
            loss = s.batch_loss(unet, batch, s.noise_gen)
            accelerator.backward(loss / count)
        loss_sum += loss.detach().item()
        if first and micro == 1 and accelerator.num_processes > 1:
            shards = distributed.shard_summary(accelerator, list(batch["captions"]))
            for rank, captions in enumerate(shards or []):
                s.report.log(f"process {rank} of {accelerator.num_processes}: first batch {captions}")
    s.network.reduce_text_encoder_grads(accelerator)  # the UNet's are reduced by DDP
    if s.cfg.optimizer.max_grad_norm > 0:
        accelerator.clip_grad_norm_(s.params, s.cfg.optimizer.max_grad_norm)
    lrs = optim.effective_lrs(s.optimizer)
    s.optimizer.step()
    s.lr_scheduler.step()
    s.optimizer.zero_grad(set_to_none=True)
    if s.ema is not None:
        s.ema.update()
    step_loss = loss_sum / micro
    if accelerator.num_processes > 1:
        step_loss = float(accelerator.reduce(torch.tensor(step_loss, device=s.device), reduction="mean").item())
    return step_loss, lrs


def train(job: JobDir, cfg: TrainingConfig, events: EventWriter) -> int:
    """Run the whole training job; returns the process exit code (0 also for `stop` and `cancel`; 1 when the
    loss diverged: the quality check stopped it, see `quality`)."""
    s = prepare(job, cfg, events)
    tr = cfg.training
    accelerator, report, cuda, mixed, device = s.accelerator, s.report, s.cuda, s.mixed, s.device
    items, val_loader, plan, model, flow, network = s.items, s.val_loader, s.plan, s.model, s.flow, s.network
    params, optimizer, ema, gens, noise_gen, stream = s.params, s.optimizer, s.ema, s.gens, s.noise_gen, s.stream
    num_epochs, step = plan.total_epochs, s.step

    # ---------------------------------------------------------------- saving
    sv = cfg.saving
    out_dir = Path(sv.output_dir) if sv.output_dir else job.output_dir
    save_dtype = lora_io.SAVE_DTYPES[sv.precision.value]
    started_at = time.time()
    retention = Retention(sv.keep_last_n)

    @contextmanager
    def weights_to_keep() -> Iterator[None]:
        """For saving a LoRA and validating: a schedule-free optimizer's averaged weights (x) in the model (a
        no-op for other optimizers). Afterwards the weights it steps on (y) are put back exactly: its own
        eval()/train() round trip is off by rounding, and a run that saved would drift from one that did not."""
        if not optim.is_schedule_free(optimizer):
            yield
            return
        backup = [p.detach().clone() for p in params]
        optim.eval_mode(optimizer)
        try:
            yield
        finally:
            optim.train_mode(optimizer)
            with torch.no_grad():
                for p, b in zip(params, backup, strict=True):
                    p.copy_(b)

    def save(step: int, final: bool, state: bool, tag: str = "step", keep: bool = False) -> None:
        """The LoRA `<name>.safetensors`, then (with `state`) the training state `<name>-state/`. Intermediate
        saves are named `-stepNNNNNN` (`-epochNNNNNN` at an epoch end); keep_last_n prunes them unless `keep`."""
        suffix = "" if final else f"-{tag}{(stream.epoch if tag == 'epoch' else step):06d}"
        name = sv.output_name + suffix
        lora = out_dir / f"{name}.safetensors"
        state_dir = out_dir / f"{name}-state" if state else None
        with weights_to_keep():
            if accelerator.is_main_process:
                save_lora(lora, step, stream.epoch)
        if state_dir is not None:  # in train mode: the weights the optimizer steps on, for an exact resume
            save_training_state(state_dir, lora, step)
        if accelerator.is_main_process and not final and not keep:
            for path in retention.add(lora, state_dir):
                report.log(f"removed {path} (saving.keep_last_n = {sv.keep_last_n})")

    def save_lora(path: Path, step: int, epoch: int) -> None:
        meta = lora_io.build_metadata(
            cfg,
            step=step,
            num_train_images=sum(1 for i in items if not i.is_reg),  # sd-scripts counts repeats, not reg images
            tag_frequency=data.tag_frequency(items),
            started_at=started_at,
            mixed_precision=mixed,
            prediction_type=model.prediction_type,
            epoch=epoch,
            num_epochs=num_epochs,
            max_train_steps=plan.total_steps,
            model_type=flow_names.model_type(model) if flow else None,
        )
        # the saved LoRA holds the EMA weights when there is one; written inside the swap, since the state
        # dict's tensors may be the parameters themselves (fp32 on the CPU: `.to` returns them as they are)
        with ema.swapped() if ema else nullcontext():
            path = lora_io.save_lora(path, network.file_state_dict(save_dtype), meta)
        report.emit("artifact", path=str(path), what="lora", step=step)
        record.checkpoint(str(path), step, divergence_watch.smoothed)
        print(f"saved {path}", flush=True)

    def save_training_state(path: Path, lora: Path, step: int) -> None:
        """Every process writes its part (its RNG state; the main one the rest: weights, optimizer, schedule,
        generators of all processes, EMA). All processes save at the same step (the commands are broadcast),
        so they meet before `nyx_state.json` is written last: without it, a state is incomplete."""
        if accelerator.num_processes > 1:
            gens.all_noise = gather_object([noise_gen.get_state()])
        accelerator.save_state(str(path))
        gens.all_noise = None
        if ema is not None and accelerator.is_main_process:
            ema.save(path)
        accelerator.wait_for_everyone()
        if not accelerator.is_main_process:
            return
        info = StateInfo(
            step=step,
            epoch=stream.epoch,
            batches_done=stream.batches_done,
            total_steps=plan.total_steps,
            steps_per_epoch=plan.steps_per_epoch,
            num_processes=accelerator.num_processes,
            lora=str(lora),
            saved=time.time(),
            ema=ema is not None,
            network=network_signature(cfg),
        )
        atomic_write(path / STATE_INFO, info.to_json())
        report.emit("artifact", path=str(path), what="state", step=step)
        print(f"saved the training state {path}", flush=True)

    # ---------------------------------------------------------------- the loss, validation
    def validate(step: int) -> bool:
        """`val_loss` of the held-out images at the weights that would be saved now (the EMA when on), fed to
        the overfitting check. True when that check asks the run to stop (quality.stop_on_overfit), on every
        process (only the main one validates)."""
        overfit = None
        if val_loader is not None and step not in record.val_losses:
            network.eval()  # no adapter dropout: nothing random but the fixed-seed generator
            try:
                with weights_to_keep(), ema.swapped() if ema else nullcontext(), accelerator.autocast():
                    value = validation.validation_loss(model.unet, val_loader, s.batch_loss, tr.seed)
            finally:
                network.train()
            report.emit("metric", name="val_loss", value=value, step=step)
            print(f"step {step} val_loss {value:.4f}", flush=True)
            record.validated(step, value)
            overfit = overfit_watch.update(step, value, divergence_watch.smoothed if step else None)
            if overfit is not None:
                record.overfit = overfit
                stopping = " (quality.stop_on_overfit: saving and stopping)" if qc.stop_on_overfit else ""
                report.log(
                    f"{overfit.describe()}: the LoRA starts to memorise the training images; the run report "
                    f"names the checkpoint to keep{stopping}",
                    "warning",
                )
                report.emit("metric", name="overfitting", value=float(overfit.from_step), step=step)
        if not qc.stop_on_overfit:
            return False
        return distributed_flag(accelerator, overfit is not None)

    # ---------------------------------------------------------------- samples
    sample_jobs = sampling.jobs(cfg)  # parsed on every process (cheap); only the main one renders
    renderer = sampling.SampleRenderer(cfg, model, out_dir / "samples") if accelerator.is_main_process else None
    for message, level in getattr(renderer, "notes", []):  # flow models: what their samples do unlike the config
        report.log(message, level)

    def render_samples(step: int) -> None:
        """`sampling.prompts` at the weights that would be saved now (the EMA, a schedule-free optimizer's
        average), rendered by the main process while the others wait. A failure is logged, not raised: a long
        run should not die for a sample. The time it takes is left out of it/s and the ETA."""
        if renderer is not None and renderer.jobs:
            started = time.perf_counter()
            network.eval()
            try:
                with weights_to_keep(), ema.swapped() if ema else nullcontext(), accelerator.autocast():
                    done = renderer.render(step)
            except Exception as e:
                report.log(f"rendering the samples at step {step} failed: {type(e).__name__}: {e}", "error")
            else:
                report.emit("sample", step=step, images=[str(p) for p in done.images], prompts=done.prompts)
                record.samples[step] = [str(p) for p in done.images]
                print(f"step {step}: {len(done.images)} sample(s) in {done.images[0].parent}", flush=True)
            finally:
                network.train()
            elapsed = time.perf_counter() - started
            for i in range(len(times)):
                times[i] += elapsed
        accelerator.wait_for_everyone()

    # ---------------------------------------------------------------- the end of a run
    def write_report(state: str, step: int) -> None:
        """`report.json` in the job folder (the main process): the checkpoint to keep, flags, samples."""
        if not accelerator.is_main_process:
            return
        data = quality.build_report(record, job=job.id, state=state, step=step, total_steps=plan.total_steps)
        path = job.path / "report.json"
        atomic_write(path, json.dumps(data, indent=1, allow_nan=False, default=str) + "\n")
        report.emit("artifact", path=str(path), what="report", step=step)
        report.log(quality.summary(data))

    def end_diverged(d: quality.Divergence) -> int:
        """The loss diverged: nothing more is saved (the saves before it stay), the report says which one to
        keep, and a `log` event with `error` and `hint` becomes the job's failure (exit 1)."""
        record.divergence = d
        write_report("diverged", d.step)
        error = f"{d.describe()}: training stopped early"
        hint = quality.divergence_hint(float(cfg.optimizer.learning_rate), fp16=mixed == "fp16")
        report.log(f"{error}. Fix: {hint}", "error", error=error, hint=hint)
        accelerator.wait_for_everyone()
        return 1

    # ---------------------------------------------------------------- quality checks, the run report
    qc = cfg.quality
    divergence_watch = quality.DivergenceWatch(
        qc.explosion_factor, qc.warmup_steps, qc.patience_steps, qc.smoothing_steps, enabled=qc.divergence_check
    )
    overfit_watch = quality.OverfitWatch(qc.overfit_patience, enabled=qc.overfit_check)
    record = quality.RunRecord()

    # ---------------------------------------------------------------- the loop
    commands = distributed.CommandChannel(accelerator, ControlReader(job.control_path))
    recent: deque[float] = deque(maxlen=cfg.logging.loss_avg_window)
    times: deque[float] = deque(maxlen=21)
    total = plan.total_steps
    print_every = max(1, total // 20)
    validate_every = tr.validate_every_n_steps
    stopped = overfit_stop = False
    diverged: quality.Divergence | None = None
    report.stage(len(LOAD_STAGES))
    if step >= total:
        report.log(f"the resumed state is at step {step}; this run has {total} steps: nothing left to train", "warning")
    elif step == 0:
        validate(0)  # the baseline of the validation curve (a resumed run has it already)
        if cfg.sampling.sample_at_first:
            render_samples(0)
    times.append(time.perf_counter())
    while step < total:
        # -- commands (cheap: one read of a small file on the main process, a tiny broadcast with several)
        for cmd in commands.poll():
            what = cmd.get("command")
            if what == "cancel":
                report.log("cancel received: exiting without saving", ack=what)
                return 0
            if what == "stop":
                report.log(f"stop received at step {step}: saving (LoRA and training state) and exiting", ack=what)
                stopped = True
            elif what == "save_now":
                report.log(f"save_now received: saving at step {step}", ack=what)
                save(step, final=False, state=sv.save_state, keep=True)
            elif what == "sample_now":
                if sample_jobs:
                    report.log(f"sample_now received: rendering {len(sample_jobs)} sample(s) at step {step}", ack=what)
                    render_samples(step)
                else:
                    report.log("sample_now received, but sampling.prompts has no prompt to render", "warning", ack=what)
        if stopped:
            break

        # -- one optimizer step over its micro-batches (`accum`, fewer at the end of an epoch)
        step_loss, lrs = optimizer_step(s, first=step == s.step)
        step += 1

        # -- the divergence check (the loss is the same on every process: they all decide alike)
        diverged = divergence_watch.update(step, step_loss)
        if diverged is not None:
            break
        recent.append(step_loss)
        times.append(time.perf_counter())
        it_s = (len(times) - 1) / (times[-1] - times[0])
        loss_avg = sum(recent) / len(recent)
        report.emit(
            "step",
            step=step,
            total=total,
            epoch=stream.epoch,
            loss=step_loss,
            loss_avg=loss_avg,
            lr=lrs,
            it_s=round(it_s, 4),
            eta_s=round((total - step) / it_s, 1),
        )
        if accelerator.is_main_process and (step % print_every == 0 or step in (1, total)):
            print(
                f"step {step}/{total} epoch {stream.epoch} loss {step_loss:.4f} avg {loss_avg:.4f} "
                f"lr {lrs[0]:.3g} {it_s:.2f} it/s",
                flush=True,
            )

        # -- samples, save and validate when due (validated at every save too: the report ranks the saves)
        if sampling.due(cfg.sampling, step, stream.epoch, stream.epoch_finished):
            render_samples(step)
        saved_now = False
        if step < total:
            by_epoch = bool(sv.every_n_epochs) and stream.epoch_finished and stream.epoch % sv.every_n_epochs == 0
            by_step = bool(sv.every_n_steps) and step % sv.every_n_steps == 0
            if by_epoch or by_step:
                # while the loss is above the explosion threshold, earlier saves are not pruned for this one
                keep = divergence_watch.alarmed
                save(step, final=False, state=sv.save_state, tag="epoch" if by_epoch else "step", keep=keep)
                saved_now = True
        due = (validate_every and step % validate_every == 0) or step == total or saved_now
        if due and validate(step):
            stopped = overfit_stop = True
            break

    if diverged is not None:
        return end_diverged(diverged)
    if stopped and not overfit_stop:
        validate(step)  # the stopped run's final LoRA gets its validation loss for the report (if not measured)
    save(step, final=True, state=stopped or sv.save_state)  # a stopped run is meant to go on
    if accelerator.num_processes > 1:
        same = len(set(distributed.digests(accelerator, params))) == 1
        report.log(
            f"the trained weights are {'identical' if same else 'DIFFERENT'} on the {accelerator.num_processes} "
            "processes",
            "info" if same else "error",
        )
    write_report("stopped" if stopped else "finished", step)
    accelerator.wait_for_everyone()
    if cuda:
        peak = torch.cuda.max_memory_allocated(device) / 2**30
        report.emit("metric", name="peak_vram_gib", value=round(peak, 3), step=step)
    report.log(f"{'stopped' if stopped else 'finished'} at step {step} in {time.time() - started_at:.1f} s")
    return 0


def distributed_flag(accelerator: Accelerator, flag: bool) -> bool:
    """The main process's `flag` on every process (a decision only it can make, such as the overfitting
    check, which sees the validation loss only there)."""
    if accelerator.num_processes <= 1:
        return flag
    box = [flag]
    broadcast_object_list(box, from_process=0)
    return bool(box[0])


def unload_text_encoders(model: flow_models.FlowModel, report: Reporter, keep: bool = False) -> None:
    """Once every caption's text-encoder outputs are cached and no encoder trains, the encoders leave the
    device (T5-XXL alone is ~9 GB in bf16): they move to the CPU, where a caption the cache has not seen is
    still encoded (`flow_models.encode_text` runs each encoder where its weights are). Moved, not deleted:
    sampling builds its pipeline from them, and that pipeline encodes on the transformer's device, so with
    sample prompts (`keep`) they stay where they are."""
    if keep:
        report.log("text-encoder outputs cached; the encoders stay on the device for sampling.prompts")
        return
    moved = [e for e in model.text_encoders if next(e.parameters()).device.type != "cpu"]
    for encoder in moved:
        encoder.to("cpu")
    if moved and torch.cuda.is_available():
        torch.cuda.empty_cache()
    report.log(
        f"text encoders unloaded from the device ({len(moved)} moved to the CPU): their outputs are cached"
        if moved
        else "text-encoder outputs cached; the encoders are on the CPU already"
    )


def quantize_base(
    model: flow_models.FlowModel, cfg: TrainingConfig, device: torch.device, dtype: torch.dtype, report: Reporter
) -> None:
    """`training.base_quantization`: the frozen transformer blocks' linear layers stored as fp8/int8/nf4 and
    upcast to `dtype` per layer (`memory.quantize_frozen`), before the adapters attach. Without block swapping
    the compact layers go to the device as they are made (a bf16 Flux never has to fit there whole) and the
    rest of the transformer follows; with it everything stays on the CPU until the swapper places it."""
    mode = cfg.training.base_quantization.value
    if mode == "none":
        if not cfg.flow.blocks_to_swap:
            model.transformer.to(device)
        return
    memory.check_adapter_support(mode, cfg.network.kind.value)
    swap = bool(cfg.flow.blocks_to_swap)
    done = memory.quantize_frozen(model.transformer, mode, dtype, device=None if swap else device)
    if not swap:
        model.transformer.to(device)
    report.log(f"base quantization: {done.describe()}")


def resume_state(
    folder: Path,
    accelerator: Accelerator,
    gens: SeededGenerators,
    ema: LoraEMA | None,
    plan: progress.Plan,
    report: Reporter,
) -> StateInfo:
    """Load a training state into the prepared model, optimizer, schedule and generators; say what
    differs from the run that saved it (a resumed run is exact only with the same data, batch and processes)."""
    info = StateInfo.read(folder)  # the pre-flight check made sure it is there and matches the network
    accelerator.load_state(str(folder), strict=False)
    report.log(
        f"resumed from {folder} at step {info.step} (epoch {info.epoch}, {info.batches_done} of its "
        f"{plan.batches_per_epoch} batches done)"
    )
    if not gens.noise_restored:
        report.log(
            f"the state has no noise generator for process {accelerator.process_index} (it was saved by "
            f"{info.num_processes} process(es)): this process's noise starts afresh",
            "warning",
        )
    if info.num_processes != accelerator.num_processes:
        report.log(
            f"the state was saved by {info.num_processes} process(es), this run has {accelerator.num_processes}",
            "warning",
        )
    if info.steps_per_epoch and info.steps_per_epoch != plan.steps_per_epoch:
        report.log(
            f"an epoch was {info.steps_per_epoch} steps in the saved run and is {plan.steps_per_epoch} now (other "
            "data, batch size or accumulation): the data order does not continue exactly",
            "warning",
        )
    if info.total_steps and info.total_steps != plan.total_steps:
        report.log(
            f"the saved run was {info.total_steps} steps long, this one is {plan.total_steps}: the schedule "
            "continues with the new length"
        )
    if ema is not None and not ema.load(folder):
        ema.shadow = [p.detach().clone().float() for p in ema.params]
        report.log("the state has no EMA: the average starts from the resumed weights", "warning")
    return info
