"""Time per training step: Nyx's engine against a bare diffusers + peft loop, and latent caching on vs off.

    .venv/bin/python bench/train_step.py [--steps 120] [--batch 2] [--resolution 64] [--workspace DIR] [--cpu-time]
    .venv/bin/python bench/train_step.py --real [--families sd15,sdxl] [--steps 40] [--batch 1] [--checkpointing]

Default: the tiny SD1.5-shaped model and shapes dataset of `nyx_tui.demo_assets`, on whatever device torch
has (the CPU here). `--real`: SD1.5- and SDXL-size models (UNet, text encoders and VAE at their real
architecture, random weights, built from configs and written as diffusers folders in the workspace, once)
at 512 / 1024 px in bf16 mixed precision on a CUDA GPU, reporting it/s and peak VRAM too. `--real` stops
with a clear message when there is no CUDA GPU.

Both sides do the same work each step: VAE-encode the batch (a posterior sample), encode the captions,
noise at uniform timesteps, UNet forward and backward through a LoRA (same rank, alpha, target modules),
clip to norm 1, AdamW step. The engine runs as the real worker process on a job folder; its step times
come from its own `step` events. The bare loop runs in this process on images already in memory (it has
no data loading at all), so the ratio engine/bare is everything the engine adds: data loading, events,
control polling, accelerate. The cached row is the engine with `training.cache_latents` (the VAE encodes
each image once, before training), which the bare loop does not have. Medians after 10 warm-up steps, the
rows alternated `--repeat` times, each keeping its best. On a busy shared machine wall time measures the
neighbours: `--cpu-time` reports single-thread CPU time per step instead (start-up differenced away).
This supersedes bench/train_speed.py.
Flux.1 (tiny model and memory modes; full size at the three presets, peak VRAM): bench/flux_step.py.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

WARMUP = 10
TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
RANK, ALPHA, LR = 16, 8.0, 1e-4


@dataclass
class Result:
    name: str
    ms: float | None = None  # median ms per optimizer step
    peak_gib: float | None = None
    error: str = ""


# ------------------------------------------------------------------------------------------- the engine


def engine_run(
    ws: Path, model: Path, dataset: Path, family: str, args: argparse.Namespace, *, cached: bool, mixed: str
) -> Result:
    """The engine as the worker process on a fresh job; ms per step from its `step` events."""
    from nyx_tui.config.io import dumps_config
    from nyx_tui.config.model import TrainingConfig
    from nyx_tui.jobs.events import read_events
    from nyx_tui.jobs.jobdir import create_job

    name = f"nyx engine{', cached latents' if cached else ''}"
    training: dict[str, Any] = {
        "max_steps": args.steps,
        "batch_size": args.batch,
        "mixed_precision": mixed,
        "gradient_checkpointing": args.checkpointing,
    }
    if cached:
        training["cache_latents"] = True
    cfg = TrainingConfig.model_validate(
        {
            "model": {"family": family, "pretrained": str(model)},
            "dataset": {"resolution": args.resolution, "subsets": [{"image_dir": str(dataset)}]},
            "network": {"dim": RANK, "alpha": ALPHA, "target_modules": TARGETS},
            "optimizer": {"type": "adamw", "learning_rate": LR, "max_grad_norm": 1.0},
            "scheduler": {"type": "constant", "warmup_steps": 0},
            "training": training,
            "saving": {"every_n_steps": 0, "save_state": False},
        }
    )
    job = create_job("train", "bench", argv=[], config_toml=dumps_config(cfg), root=ws / "jobs")
    log = job.path / "bench-output.log"
    with open(log, "w") as out:
        proc = subprocess.run(
            [sys.executable, "-m", "nyx_tui.trainers.native", str(job.path)], stdout=out, stderr=subprocess.STDOUT
        )
    events = read_events(job.events_path)
    if proc.returncode != 0:
        tail = log.read_text(errors="replace").strip().splitlines()[-3:]
        return Result(name, error=f"exit {proc.returncode}: {' | '.join(tail)} (log: {log})")
    t = [e["t"] for e in events if e["kind"] == "step"]
    steps = [b - a for a, b in zip(t[WARMUP:], t[WARMUP + 1 :], strict=False)]
    peak = [e["value"] for e in events if e["kind"] == "metric" and e["name"] == "peak_vram_gib"]
    return Result(name, statistics.median(steps) * 1000, peak[-1] if peak else None)


# --------------------------------------------------------------------------------------- the bare loop


def bare_run(model: Path, dataset: Path, family: str, args: argparse.Namespace, device: str, mixed: str) -> Result:
    """The smallest loop doing the same work, on pixels already in memory."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from peft import LoraConfig
    from PIL import Image
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    cuda = device == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed, torch.float32)
    sdxl = family == "sdxl"

    def frozen(m: Any) -> Any:  # transformers loads a text encoder in the dtype it was saved in: cast what differs
        m = m.to(device) if m.dtype == dtype else m.to(device, dtype)
        return m.eval().requires_grad_(False)

    tok = CLIPTokenizer.from_pretrained(model, subfolder="tokenizer")
    te = frozen(CLIPTextModel.from_pretrained(model, subfolder="text_encoder"))
    te2 = frozen(CLIPTextModelWithProjection.from_pretrained(model, subfolder="text_encoder_2")) if sdxl else None
    vae = frozen(AutoencoderKL.from_pretrained(model, subfolder="vae"))
    unet = frozen(UNet2DConditionModel.from_pretrained(model, subfolder="unet"))
    sched = DDPMScheduler.from_pretrained(model, subfolder="scheduler")
    unet.add_adapter(LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS, init_lora_weights="gaussian"))
    params = [p for p in unet.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    if args.checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.01)

    res = args.resolution
    images = sorted(dataset.glob("*.png"))
    pixels = (
        torch.stack(
            [
                torch.from_numpy(np.array(Image.open(p).convert("RGB").resize((res, res)))).permute(2, 0, 1)
                for p in images
            ]
        ).float()
        / 127.5
        - 1
    )
    captions = [p.with_suffix(".txt").read_text().strip() for p in images]
    time_ids = torch.tensor([[res, res, 0, 0, res, res]] * args.batch, device=device, dtype=dtype)

    def ids(texts: list[str]) -> Any:
        return tok(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids

    autocast = torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32)
    times = []
    for step in range(args.steps):
        t0 = time.perf_counter()
        idx = torch.randint(0, len(images), (args.batch,))
        with torch.no_grad():
            lat = vae.encode(pixels[idx].to(device, dtype)).latent_dist.sample() * vae.config.scaling_factor
            tokens = ids([captions[i] for i in idx]).to(device)
            if te2 is None:
                hidden, added = te(tokens)[0], None
            else:
                out1 = te(tokens, output_hidden_states=True)
                out2 = te2(tokens, output_hidden_states=True)
                hidden = torch.cat([out1.hidden_states[-2], out2.hidden_states[-2]], dim=-1)
                added = {"text_embeds": out2.text_embeds, "time_ids": time_ids}
        noise = torch.randn_like(lat)
        t = torch.randint(0, sched.config.num_train_timesteps, (args.batch,), device=device)
        with autocast:
            pred = unet(sched.add_noise(lat, noise, t), t, hidden, added_cond_kwargs=added).sample
        loss = F.mse_loss(pred.float(), noise.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()  # the engine reads the loss every step (a device sync)
        if cuda:
            torch.cuda.synchronize()
        if step >= WARMUP:
            times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    del unet, vae, te, te2, opt, params
    if cuda:
        torch.cuda.empty_cache()
    return Result("bare diffusers+peft", statistics.median(times) * 1000, peak)


# ------------------------------------------------------------------------------ real-size models (--real)


def _real_parts(family: str) -> dict[str, Any]:
    """The real architectures (SD1.5: runwayml v1-5; SDXL: stabilityai base 1.0) from their configs, random
    weights. Built on the default device (the GPU under --real), so even SDXL takes seconds."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from nyx_tui.demo_assets import _tokenizer

    tokenizer = _tokenizer()

    def clip(hidden: int, layers: int, heads: int, act: str, projection: int) -> CLIPTextConfig:
        return CLIPTextConfig(
            vocab_size=49408,
            hidden_size=hidden,
            intermediate_size=hidden * 4,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            max_position_embeddings=77,
            hidden_act=act,
            projection_dim=projection,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )

    scheduler = DDPMScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False, steps_offset=1
    )
    vae_blocks = {
        "down_block_types": ("DownEncoderBlock2D",) * 4,
        "up_block_types": ("UpDecoderBlock2D",) * 4,
        "block_out_channels": (128, 256, 512, 512),
        "layers_per_block": 2,
        "latent_channels": 4,
    }
    if family == "sd15":
        unet = UNet2DConditionModel(
            sample_size=64,
            block_out_channels=(320, 640, 1280, 1280),
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            layers_per_block=2,
            cross_attention_dim=768,
            attention_head_dim=8,
        )
        return {
            "unet": unet,
            "vae": AutoencoderKL(**vae_blocks, sample_size=512, scaling_factor=0.18215),
            "text_encoder": CLIPTextModel(clip(768, 12, 12, "quick_gelu", 768)),
            "tokenizer": tokenizer,
            "scheduler": scheduler,
        }
    unet = UNet2DConditionModel(
        sample_size=128,
        block_out_channels=(320, 640, 1280),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        layers_per_block=2,
        transformer_layers_per_block=(1, 2, 10),
        attention_head_dim=(5, 10, 20),
        cross_attention_dim=2048,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,
    )
    return {
        "unet": unet,
        "vae": AutoencoderKL(**vae_blocks, sample_size=1024, scaling_factor=0.13025),
        "text_encoder": CLIPTextModel(clip(768, 12, 12, "quick_gelu", 768)),
        "text_encoder_2": CLIPTextModelWithProjection(clip(1280, 32, 20, "gelu", 1280)),
        "tokenizer": tokenizer,
        "tokenizer_2": tokenizer,
        "scheduler": scheduler,
    }


def build_real_model(folder: Path, family: str, device: str) -> Path:
    """A diffusers folder of the real-size architecture with random weights, in fp16 (written once)."""
    if (folder / "model_index.json").is_file():
        return folder
    import torch
    import transformers
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    transformers.utils.logging.disable_progress_bar()
    t0 = time.perf_counter()
    torch.manual_seed(0)
    with torch.device(device):
        parts = _real_parts(family)
    for key, part in parts.items():
        if isinstance(part, torch.nn.Module):
            parts[key] = part.to("cpu", torch.float16).eval()
    pipe: Any
    if family == "sd15":
        pipe = StableDiffusionPipeline(
            **parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False
        )
    else:
        pipe = StableDiffusionXLPipeline(**parts)
    tmp = folder.with_name(folder.name + ".tmp")
    pipe.save_pretrained(tmp, safe_serialization=True)
    tmp.rename(folder)
    n = sum(p.numel() for m in parts.values() if isinstance(m, torch.nn.Module) for p in m.parameters())
    print(f"built {family} ({n / 1e9:.2f} B parameters) in {time.perf_counter() - t0:.0f} s: {folder}", flush=True)
    return folder


# ----------------------------------------------------------------------------------------------- main


def measure(
    ws: Path, model: Path, dataset: Path, family: str, args: argparse.Namespace, device: str, mixed: str
) -> list[Result]:
    """Every row `--repeat` times, the rows alternating (bare, engine, cached, bare, …); each row keeps its
    fastest median, so a burst of load on a shared machine skews no row more than another."""
    best: dict[str, Result] = {}
    for _ in range(args.repeat):
        rows = [bare_run(model, dataset, family, args, device, mixed)]
        rows.append(engine_run(ws, model, dataset, family, args, cached=False, mixed=mixed))
        if not args.no_cache_row:
            rows.append(engine_run(ws, model, dataset, family, args, cached=True, mixed=mixed))
        for r in rows:
            old = best.get(r.name)
            if old is None or old.ms is None or (r.ms is not None and r.ms < old.ms):
                best[r.name] = r
    return list(best.values())


def cpu_time_rows(ws: Path, args: argparse.Namespace) -> list[Result]:
    """CPU milliseconds per step, one thread (`OMP_NUM_THREADS=1`), each side run for `steps` and for 20 steps
    in child processes and the difference divided by the step difference (start-up cancels out). On a shared
    machine wall-clock medians measure the neighbours; single-thread CPU time barely moves with them."""
    short, long = 20, max(args.steps, 40) + 20
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    here = str(Path(__file__).resolve().parent)

    def cpu_seconds(call: str, steps: int) -> float:
        code = (
            f"import sys, argparse, torch; sys.path.insert(0, {here!r}); import train_step as b; "
            f"from pathlib import Path; torch.set_num_threads(1); ws = Path({str(ws)!r}); "
            f"a = argparse.Namespace(steps={steps}, batch={args.batch}, resolution={args.resolution}, "
            f"checkpointing={args.checkpointing}); r = {call}; assert r.ms is not None, r.error"
        )
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        return (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)

    calls = {
        "bare diffusers+peft": "b.bare_run(ws / 'model', ws / 'dataset', 'sd15', a, 'cpu', 'no')",
        "nyx engine": "b.engine_run(ws, ws / 'model', ws / 'dataset', 'sd15', a, cached=False, mixed='no')",
    }
    if not args.no_cache_row:
        calls["nyx engine, cached latents"] = calls["nyx engine"].replace("cached=False", "cached=True")
    best: dict[str, float] = {}
    for _ in range(args.repeat):
        for name, call in calls.items():
            ms = (cpu_seconds(call, long) - cpu_seconds(call, short)) / (long - short) * 1000
            best[name] = min(ms, best.get(name, ms))
    return [Result(name, ms) for name, ms in best.items()]


def print_table(title: str, rows: list[Result], real: bool) -> None:
    base = rows[0].ms
    print(f"\n{title}")
    head = f"{'':32}{'ms/step':>10}{'it/s':>9}{'vs bare':>9}" + (f"{'peak VRAM':>12}" if real else "")
    print(head)
    for r in rows:
        if r.ms is None:
            print(f"{r.name:32}failed: {r.error}")
            continue
        line = f"{r.name:32}{r.ms:10.1f}{1000 / r.ms:9.2f}{(r.ms / base if base else float('nan')):9.3f}"
        if real:
            line += f"{(f'{r.peak_gib:.2f} GiB' if r.peak_gib is not None else '-'):>12}"
        print(line)


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--steps", type=int, default=None, help="steps per run (default 120; 40 with --real)")
    ap.add_argument("--batch", type=int, default=None, help="batch size (default 2; 1 with --real)")
    ap.add_argument("--resolution", type=int, default=None, help="px (default 64; --real: 512 SD1.5, 1024 SDXL)")
    ap.add_argument("--workspace", help="keep/reuse models, data and jobs here (default: a temp folder)")
    ap.add_argument("--real", action="store_true", help="real SD1.5/SDXL-size models on a CUDA GPU")
    ap.add_argument("--families", default="sd15,sdxl", help="with --real: which (sd15, sdxl)")
    ap.add_argument("--checkpointing", action="store_true", help="gradient checkpointing on both sides")
    ap.add_argument("--no-cache-row", action="store_true", help="skip the cached-latents engine run")
    ap.add_argument(
        "--repeat",
        type=int,
        default=None,
        help="alternate the runs N times, keep each row's best (default 3; 1 with --real)",
    )
    ap.add_argument(
        "--cpu-time",
        action="store_true",
        help="tiny model: CPU time per step on one thread instead of wall time (for a busy shared machine)",
    )
    ap.add_argument("--allow-cpu", action="store_true", help=argparse.SUPPRESS)  # to check --real's code path
    args = ap.parse_args()

    import torch

    from nyx_tui.demo_assets import build_tiny_sd15, make_shapes_dataset

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    if args.real and not cuda and not args.allow_cpu:
        print(
            "bench/train_step.py --real needs a CUDA GPU: torch.cuda.is_available() is False here "
            f"(torch {torch.__version__}). Run it on a GPU machine, or leave out --real for the tiny CPU benchmark.",
            file=sys.stderr,
        )
        return 2
    ws = Path(args.workspace) if args.workspace else Path(tempfile.mkdtemp(prefix="nyx-bench-"))
    ws.mkdir(parents=True, exist_ok=True)
    gpu = torch.cuda.get_device_name() if cuda else "none"
    print(f"device {device} ({gpu}), torch {torch.__version__}, {torch.get_num_threads()} CPU threads, workspace {ws}")

    if not args.real:
        args.steps, args.batch, args.resolution = args.steps or 120, args.batch or 2, args.resolution or 64
        args.repeat = args.repeat or 3
        model, dataset = ws / "model", ws / "dataset"
        if not (model / "model_index.json").exists():
            build_tiny_sd15(model)
        if not any(dataset.glob("*.png")):
            make_shapes_dataset(dataset)
        mixed = "no"
        title = f"tiny SD1.5, batch {args.batch}, {args.resolution} px, fp32"
        if args.cpu_time:
            rows = cpu_time_rows(ws, args)
            print_table(f"{title}: CPU time per step, 1 thread (best of {args.repeat})", rows, real=False)
        else:
            rows = measure(ws, model, dataset, "sd15", args, device, mixed)
            print_table(f"{title}, {args.steps} steps: median wall time (best of {args.repeat})", rows, real=False)
        return 0

    steps, batch, asked_resolution = args.steps or 40, args.batch or 1, args.resolution
    args.repeat = args.repeat or 1
    for family in [f.strip() for f in args.families.split(",") if f.strip()]:
        if family not in ("sd15", "sdxl"):
            print(f"unknown family {family!r} (sd15, sdxl)", file=sys.stderr)
            return 2
        args.steps, args.batch = steps, batch
        args.resolution = asked_resolution or (512 if family == "sd15" else 1024)
        model = build_real_model(ws / f"real-{family}", family, device)
        dataset = ws / f"dataset-{args.resolution}"
        if not any(dataset.glob("*.png")):
            make_shapes_dataset(dataset, n=8, size=args.resolution)
        mixed = "bf16" if cuda else "no"
        rows = measure(ws, model, dataset, family, args, device, mixed)
        ckpt = ", gradient checkpointing" if args.checkpointing else ""
        print_table(
            f"{family} real size, batch {batch}, {args.resolution} px, {mixed}{ckpt}, {steps} steps", rows, real=True
        )
        print(json.dumps({"family": family, **{r.name: {"ms": r.ms, "peak_gib": r.peak_gib} for r in rows}}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
