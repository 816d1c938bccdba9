"""Native engine vs a bare diffusers + peft loop: time per optimizer step, same model, data and settings.

    .venv/bin/python bench/train_speed.py [--steps 150] [--batch 2] [--resolution 64] [--cuda]

Both sides train the same LoRA (rank, alpha, target modules, AdamW, lr) on the same tiny SD1.5-shaped
model and synthetic dataset (`nyx_tui.demo_assets`). The engine runs as the real worker process on a job
directory and its step times come from its own `step` events; the baseline is the smallest loop that does
the same work (VAE encode, text encode, UNet forward/backward, AdamW step) on pixels already in memory.
Prints the median seconds per step of each (first 10 steps skipped as warm-up) and their ratio: the
engine's overhead (data loading, events, control polling, accelerate) is the ratio above 1.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WARMUP = 10


def engine_step_times(ws: Path, steps: int, batch: int, resolution: int) -> list[float]:
    from nyx_tui.config.io import dumps_config
    from nyx_tui.config.model import SubsetConfig, TrainingConfig
    from nyx_tui.jobs.jobdir import create_job

    cfg = TrainingConfig()
    cfg.model.pretrained = str(ws / "model")
    cfg.dataset.subsets = [SubsetConfig(image_dir=str(ws / "dataset"))]
    cfg.dataset.resolution = resolution
    cfg.training.batch_size = batch
    cfg.training.max_steps = steps
    cfg.optimizer.learning_rate = 1e-3
    job = create_job("train", "bench", argv=[], config_toml=dumps_config(cfg), root=ws / "jobs")
    subprocess.run([sys.executable, "-m", "nyx_tui.trainers.native", str(job.path)], check=True,
                   stdout=subprocess.DEVNULL)
    t = [e["t"] for e in job.events() if e["kind"] == "step"]
    return [b - a for a, b in zip(t[WARMUP:], t[WARMUP + 1 :], strict=False)]


def bare_step_times(ws: Path, steps: int, batch: int, resolution: int, device: str) -> list[float]:
    import numpy as np
    import torch
    import torch.nn.functional as F
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from peft import LoraConfig
    from PIL import Image
    from transformers import CLIPTextModel, CLIPTokenizer

    root = ws / "model"
    tok = CLIPTokenizer.from_pretrained(root, subfolder="tokenizer")
    te = CLIPTextModel.from_pretrained(root, subfolder="text_encoder").to(device).eval().requires_grad_(False)
    vae = AutoencoderKL.from_pretrained(root, subfolder="vae").to(device).eval().requires_grad_(False)
    unet = UNet2DConditionModel.from_pretrained(root, subfolder="unet").requires_grad_(False)
    sched = DDPMScheduler.from_pretrained(root, subfolder="scheduler")
    unet.add_adapter(LoraConfig(r=16, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                init_lora_weights="gaussian"))
    unet.to(device).train()
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01)

    images = sorted((ws / "dataset").glob("*.png"))
    pixels = torch.stack([
        torch.from_numpy(np.array(Image.open(p).convert("RGB").resize((resolution, resolution)))).permute(2, 0, 1)
        for p in images
    ]).float() / 127.5 - 1
    captions = [p.with_suffix(".txt").read_text().strip() for p in images]

    times = []
    for step in range(steps):
        t0 = time.perf_counter()
        idx = torch.randint(0, len(images), (batch,))
        with torch.no_grad():
            lat = vae.encode(pixels[idx].to(device)).latent_dist.sample() * vae.config.scaling_factor
            ids = tok([captions[i] for i in idx], padding="max_length", max_length=tok.model_max_length,
                      truncation=True, return_tensors="pt").input_ids.to(device)
            hidden = te(ids)[0]
        noise = torch.randn_like(lat)
        t = torch.randint(0, sched.config.num_train_timesteps, (batch,), device=device)
        loss = F.mse_loss(unet(sched.add_noise(lat, noise, t), t, hidden).sample, noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        if step >= WARMUP:
            times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--resolution", type=int, default=64)
    ap.add_argument("--workspace", help="reuse a demo workspace (model/ and dataset/)")
    args = ap.parse_args()

    import torch

    from nyx_tui.demo_assets import build_tiny_sd15, make_shapes_dataset

    device = "cuda" if torch.cuda.is_available() else "cpu"
    ws = Path(args.workspace) if args.workspace else Path(tempfile.mkdtemp(prefix="nyx-bench-"))
    if not (ws / "model" / "model_index.json").exists():
        build_tiny_sd15(ws / "model")
    if not any((ws / "dataset").glob("*.png")):
        make_shapes_dataset(ws / "dataset")

    bare = statistics.median(bare_step_times(ws, args.steps, args.batch, args.resolution, device))
    engine = statistics.median(engine_step_times(ws, args.steps, args.batch, args.resolution))
    print(f"device {device}, torch threads {torch.get_num_threads()}, batch {args.batch}, "
          f"{args.resolution}px, {args.steps} steps (median after {WARMUP} warm-up)")
    print(f"bare diffusers+peft loop: {bare * 1000:8.1f} ms/step")
    print(f"nyx native engine:        {engine * 1000:8.1f} ms/step")
    print(f"ratio engine/bare:        {engine / bare:8.2f}")


if __name__ == "__main__":
    main()
