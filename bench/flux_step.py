"""Flux.1 dev in the step benchmark: the engine against a bare flow-matching loop, the memory modes, and the
peak VRAM of the three Flux presets at full size beside the VRAM estimator's figures.

    .venv/bin/python bench/flux_step.py [--steps 60] [--batch 2] [--resolution 64] [--repeat N] [--no-modes]
    .venv/bin/python bench/flux_step.py --real [--preset 24gb|16gb|12gb|all] [--steps 12] [--workspace DIR]

Default (the CPU is fine): the tiny Flux dev of `nyx_tui.demo_assets.build_tiny_flux` and the shapes dataset at
64 px, fp32. Two sides doing the same work each step: VAE-encode the batch (a posterior sample, then the AE's
shift and scale), CLIP-L pooled output and T5 states at 512 tokens, sigmoid timestep sampling (σ =
sigmoid(N(0,1))), noise x_σ = (1-σ)·x + σ·ε, pack the latent 2×2, transformer forward (guidance 1.0) and
backward through a LoRA of the same rank and alpha on the same Linears (sd-scripts' Flux set,
`flow_names.flow_modules`), MSE against ε - x (raw prediction), clip to norm 1, AdamW step. The engine runs
as the real worker process on a job folder (as bench/train_step.py's `engine_run`); its step times come from
its own `step` events. The bare loop runs in this process on pixels already in memory with a peft LoRA (one
adapter per diffusers Linear; the engine shares one down matrix across a fused q/k/v, which is fewer
parameters, not less compute). The ratio engine/bare is what the engine adds. Then the engine again with
each memory mode on the tiny model: fp8 frozen base, flow.blocks_to_swap 2, gradient checkpointing, and
checkpointing with CPU offload, so their overhead shows as a ratio (on the CPU, swapping and offloading move
nothing across a bus: their ratio there is bookkeeping only). Medians after the warm-up steps (`--repeat N`: the rows
alternated N times, each keeping its best, so a burst of load on a shared machine skews no row more than
another); a ratio, not a timed assertion.

`--real` (a CUDA GPU; stops with a clear message without one): Flux.1 dev at its published size with random
weights, built once in bf16 on the GPU and written as a diffusers `FluxPipeline` folder in the workspace
(transformer: hidden 3072, 19 double and 38 single blocks, guidance embedding, 11.9 B parameters; CLIP-L:
768 wide, 12 layers; T5-XXL encoder: d_model 4096, d_ff 10240, 24 layers, 64 heads, gated-gelu; the AE: 16
latent channels, blocks (128, 256, 512, 512)). The tokenizers are `demo_assets`' tiny ones (only token ids
matter; the models' vocabularies cover them). Then for each preset (`nyx_tui/config/presets/flux-lora-*.toml`):
the preset as shipped, pointed at that folder and a generated dataset at the preset's resolution, for
`--steps` steps, run by the engine as a real job. Printed: the estimator's figure
(`nyx_tui.vram.estimate(cfg).total_gib`, which includes the CUDA context), the engine's `peak_vram_gib` metric
(`torch.cuda.max_memory_allocated`: tensors only, no CUDA context, no allocator cache), their ratio, the
card's own view (the most `nvidia-smi` saw in use during the run above what it saw before it: context and
allocator cache included; comparable with the estimate), and it/s. The whole `--real --preset all` is
meant to take about 8 minutes on an H200 (model building and the three runs' loading and caching included).

    .venv/bin/python bench/flux_step.py --real --preset all --workspace /tmp/nyx-flux-bench

A hidden `--allow-cpu` runs `--real`'s code path on the CPU with a shrunken model (hidden 256 with the real 19
double and 38 single blocks, narrow encoders and AE, 64 px, fp32, AdamW instead of 8-bit, 4 steps; the
estimate column stays the preset's own figure) to check it end to end without a GPU:

    .venv/bin/python bench/flux_step.py --real --allow-cpu --preset all
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))

from train_step import WARMUP, Result

RANK, ALPHA, LR = 16, 16, 1e-4
PRESETS = {"24gb": "flux-lora-24gb", "16gb": "flux-lora-16gb", "12gb": "flux-lora-12gb"}
FLOW: dict[str, Any] = {  # the tiny runs: what the bare loop does, said explicitly
    "timestep_sampling": "sigmoid",
    "sigmoid_scale": 1.0,
    "model_prediction_type": "raw",
    "guidance_scale": 1.0,
    "t5_max_token_length": 512,
    "apply_t5_attn_mask": False,
}
T5_TOKENS = 512
T0 = time.perf_counter()


def say(msg: str) -> None:
    """A progress line with the wall-clock time and the seconds since start."""
    print(f"[{time.strftime('%H:%M:%S')} +{time.perf_counter() - T0:5.0f}s] {msg}", flush=True)


@dataclass
class Run:
    result: Result
    it_s: float | None = None
    card_gib: float | None = None  # nvidia-smi's most in use during the run, above its use before


# ------------------------------------------------------------------------------------------- the engine


class CardWatch:
    """The most memory `nvidia-smi` reports in use on GPU 0 while a run goes, less what it reported before:
    what the worker process takes on the card, CUDA context and allocator cache included."""

    def __init__(self) -> None:
        self.ok = shutil.which("nvidia-smi") is not None
        self.base = self._used() if self.ok else None
        self.most = self.base
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _used(self) -> float | None:
        try:
            out = subprocess.run(
                ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"],
                capture_output=True,
                text=True,
                timeout=10,
            ).stdout.strip()
            return float(out.splitlines()[0]) / 1024  # MiB → GiB
        except (OSError, ValueError, IndexError, subprocess.SubprocessError):
            return None

    def _loop(self) -> None:
        while not self._stop.wait(0.25):
            used = self._used()
            if used is not None and (self.most is None or used > self.most):
                self.most = used

    def __enter__(self) -> CardWatch:
        if self.ok:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self.ok:
            self._thread.join()

    @property
    def gib(self) -> float | None:
        return None if self.base is None or self.most is None else self.most - self.base


def engine_job(ws: Path, cfg: Any, name: str, warmup: int, watch: bool = False) -> Run:
    """`cfg` (a TrainingConfig) as a fresh job run by the worker process; ms per step from its `step` events
    after `warmup` steps, the `peak_vram_gib` metric, it/s over the same steps."""
    from nyx_tui.config.io import dumps_config
    from nyx_tui.jobs.events import read_events
    from nyx_tui.jobs.jobdir import create_job

    job = create_job("train", "bench-flux", argv=[], config_toml=dumps_config(cfg), root=ws / "jobs")
    log = job.path / "bench-output.log"
    with CardWatch() if watch else _NoWatch() as card, open(log, "w") as out:
        proc = subprocess.run(
            [sys.executable, "-m", "nyx_tui.trainers.native", str(job.path)], stdout=out, stderr=subprocess.STDOUT
        )
    events = read_events(job.events_path)
    if proc.returncode != 0:
        tail = log.read_text(errors="replace").strip().splitlines()[-3:]
        return Run(Result(name, error=f"exit {proc.returncode}: {' | '.join(tail)} (log: {log})"))
    t = [e["t"] for e in events if e["kind"] == "step"]
    steps = [b - a for a, b in zip(t[warmup:], t[warmup + 1 :], strict=False)]
    if not steps:
        return Run(Result(name, error=f"too few steps ({len(t)}) after {warmup} warm-up (log: {log})"))
    peak = [e["value"] for e in events if e["kind"] == "metric" and e["name"] == "peak_vram_gib"]
    ms = statistics.median(steps) * 1000
    return Run(Result(name, ms, peak[-1] if peak else None), 1000 / ms, card.gib if watch else None)


class _NoWatch:
    gib = None

    def __enter__(self) -> _NoWatch:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


def tiny_config(model: Path, dataset: Path, args: argparse.Namespace, **changes: Any) -> Any:
    """The tiny Flux run both sides do, with `changes` as "section.field" = value (the memory modes)."""
    from nyx_tui.config.model import TrainingConfig

    data: dict[str, Any] = {
        "model": {"family": "flux", "pretrained": str(model)},
        "dataset": {"resolution": args.resolution, "subsets": [{"image_dir": str(dataset)}]},
        "network": {"kind": "lora", "dim": RANK, "alpha": ALPHA},
        "optimizer": {"type": "adamw", "learning_rate": LR, "max_grad_norm": 1.0},
        "scheduler": {"type": "constant", "warmup_steps": 0},
        "training": {"max_steps": args.steps, "batch_size": args.batch, "mixed_precision": "no"},
        "flow": dict(FLOW),
        "saving": {"every_n_steps": 0, "save_state": False},
    }
    for key, value in changes.items():
        section, field = key.split(".")
        data[section][field] = value
    return TrainingConfig.model_validate(data)


# --------------------------------------------------------------------------------------- the bare loop


def bare_run(model: Path, dataset: Path, args: argparse.Namespace) -> Result:
    """The smallest Flux flow-matching loop doing the engine's work, on pixels already in memory, fp32, CPU
    or whatever device torch has."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from peft import LoraConfig
    from PIL import Image
    from transformers import AutoTokenizer, CLIPTextModel, CLIPTokenizer, T5EncoderModel

    from nyx_tui.trainers.native import flow_names
    from nyx_tui.trainers.native.flow_models import image_ids, pack_latents, unpack_latents

    device = "cuda" if torch.cuda.is_available() else "cpu"

    def frozen(m: Any) -> Any:
        return m.to(device, torch.float32).eval().requires_grad_(False)

    tok = CLIPTokenizer.from_pretrained(model, subfolder="tokenizer")
    tok2 = AutoTokenizer.from_pretrained(model, subfolder="tokenizer_2")
    clip = frozen(CLIPTextModel.from_pretrained(model, subfolder="text_encoder"))
    t5 = frozen(T5EncoderModel.from_pretrained(model, subfolder="text_encoder_2"))
    vae = frozen(AutoencoderKL.from_pretrained(model, subfolder="vae"))
    tr = frozen(FluxTransformer2DModel.from_pretrained(model, subfolder="transformer"))
    targets = [p for fm in flow_names.flow_modules("flux", tr) for p in fm.paths]
    tr.add_adapter(LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=targets, init_lora_weights="gaussian"))
    params = [p for p in tr.parameters() if p.requires_grad]
    tr.train()
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.01)
    shift, scale = vae.config.shift_factor, vae.config.scaling_factor

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

    def ids(t: Any, texts: list[str], n: int) -> Any:
        return t(texts, padding="max_length", max_length=n, truncation=True, return_tensors="pt").input_ids

    times = []
    for step in range(args.steps):
        t0 = time.perf_counter()
        idx = torch.randint(0, len(images), (args.batch,))
        texts = [captions[i] for i in idx]
        with torch.no_grad():
            lat = (vae.encode(pixels[idx].to(device)).latent_dist.sample() - shift) * scale
            pooled = clip(ids(tok, texts, 77).to(device)).pooler_output
            hidden = t5(ids(tok2, texts, T5_TOKENS).to(device))[0]
        sigma = torch.sigmoid(torch.randn(args.batch, device=device))
        noise = torch.randn_like(lat)
        s = sigma.view(-1, 1, 1, 1)
        noisy = (1 - s) * lat + s * noise
        h, w = lat.shape[-2:]
        out = tr(
            hidden_states=pack_latents(noisy),
            timestep=sigma,
            guidance=torch.full((args.batch,), 1.0, device=device),
            pooled_projections=pooled,
            encoder_hidden_states=hidden,
            txt_ids=torch.zeros(hidden.shape[1], 3, device=device),
            img_ids=image_ids(h, w, lat.device, lat.dtype),
            return_dict=False,
        )[0]
        loss = F.mse_loss(unpack_latents(out, h, w).float(), (noise - lat).float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()  # the engine reads the loss every step
        if step >= WARMUP:
            times.append(time.perf_counter() - t0)
    del tr, vae, clip, t5, opt, params
    return Result("bare diffusers+peft", statistics.median(times) * 1000)


def tiny(ws: Path, args: argparse.Namespace) -> int:
    from nyx_tui.demo_assets import build_tiny_flux, make_shapes_dataset

    args.steps, args.batch, args.resolution = args.steps or 60, args.batch or 2, args.resolution or 64
    if args.steps <= WARMUP + 2:
        print(f"--steps must be above {WARMUP + 2} (the first {WARMUP} are warm-up)", file=sys.stderr)
        return 2
    model, dataset = ws / "model-flux", ws / "dataset"
    if not (model / "model_index.json").exists():
        build_tiny_flux(model)
    if not any(dataset.glob("*.png")):
        make_shapes_dataset(dataset)
    modes: list[tuple[str, dict[str, Any]]] = [("nyx engine", {})]
    if not args.no_modes:
        modes += [
            ("engine, fp8 base", {"training.base_quantization": "fp8"}),
            ("engine, blocks_to_swap 2", {"flow.blocks_to_swap": 2}),
            ("engine, checkpointing", {"training.gradient_checkpointing": True}),
            (
                "engine, checkpointing + offload",
                {"training.gradient_checkpointing": True, "training.cpu_offload_checkpointing": True},
            ),
        ]
    best: dict[str, Result] = {}
    for round_ in range(args.repeat):  # the rows alternate; each keeps its fastest median (a busy machine)
        say(f"round {round_ + 1}/{args.repeat}: bare loop")
        got = [bare_run(model, dataset, args)]
        for name, changes in modes:
            say(f"round {round_ + 1}/{args.repeat}: {name}")
            got.append(engine_job(ws, tiny_config(model, dataset, args, **changes), name, WARMUP).result)
        for r in got:
            old = best.get(r.name)
            if old is None or old.ms is None or (r.ms is not None and r.ms < old.ms):
                best[r.name] = r
    rows = list(best.values())

    bare, engine = rows[0].ms, rows[1].ms
    print(
        f"\ntiny Flux dev, batch {args.batch}, {args.resolution} px, fp32, {args.steps} steps "
        f"(median after {WARMUP}, best of {args.repeat})"
    )
    print(f"{'':34}{'ms/step':>10}{'it/s':>9}{'/ bare':>9}{'/ engine':>10}")
    for r in rows:
        if r.ms is None:
            print(f"{r.name:34}failed: {r.error}")
            continue
        vs_bare = f"{r.ms / bare:9.3f}" if bare else f"{'-':>9}"
        vs_engine = f"{r.ms / engine:10.3f}" if engine else f"{'-':>10}"
        print(f"{r.name:34}{r.ms:10.1f}{1000 / r.ms:9.2f}{vs_bare}{vs_engine}")
    print(json.dumps({r.name: r.ms for r in rows}))
    return 0 if all(r.ms is not None for r in rows) else 1


# ------------------------------------------------------------------------------ full-size Flux (--real)


def _real_parts(small: bool) -> dict[str, Any]:
    """Flux.1 dev's architecture (black-forest-labs/FLUX.1-dev's configs) with random weights; `small`: the
    same layout shrunk (hidden 256, narrow encoders and AE; the real block counts) for the CPU check."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from nyx_tui.demo_assets import _t5_tokenizer, _tokenizer

    tokenizer, tokenizer_2 = _tokenizer(), _t5_tokenizer()
    t5_width, clip_width = (64, 64) if small else (4096, 768)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,
        num_layers=19,  # the real block counts even shrunken: the presets' blocks_to_swap must fit
        num_single_layers=38,
        attention_head_dim=128,
        num_attention_heads=2 if small else 24,
        joint_attention_dim=t5_width,
        pooled_projection_dim=clip_width,
        guidance_embeds=True,
        axes_dims_rope=(16, 56, 56),
    )
    clip = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=max(49408, len(tokenizer)),
            hidden_size=clip_width,
            intermediate_size=clip_width * 4,
            num_hidden_layers=2 if small else 12,
            num_attention_heads=2 if small else 12,
            max_position_embeddings=77,
            hidden_act="quick_gelu",
            projection_dim=clip_width,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    t5 = T5EncoderModel(
        T5Config(
            vocab_size=max(32128, len(tokenizer_2)),
            d_model=t5_width,
            d_kv=8 if small else 64,
            d_ff=128 if small else 10240,
            num_layers=2 if small else 24,
            num_heads=4 if small else 64,
            feed_forward_proj="gated-gelu",
            pad_token_id=0,
            eos_token_id=1,
            decoder_start_token_id=0,  # type: ignore[call-arg]  # a T5Config kwarg passed through
        )
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16) if small else (128, 256, 512, 512),
        latent_channels=16,
        layers_per_block=1 if small else 2,
        norm_num_groups=8 if small else 32,
        sample_size=1024,
        scaling_factor=0.3611,
        shift_factor=0.1159,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    return {
        "transformer": transformer,
        "text_encoder": clip,
        "text_encoder_2": t5,
        "vae": vae,
        "tokenizer": tokenizer,
        "tokenizer_2": tokenizer_2,
        "scheduler": scheduler,
    }


def build_real_flux(folder: Path, device: str, small: bool) -> Path:
    """A diffusers FluxPipeline folder of Flux.1 dev's architecture with random bf16 weights (written once):
    built straight on `device` in bf16 (seconds on a GPU), moved to the CPU part by part and saved."""
    if (folder / "model_index.json").is_file():
        say(f"model already built: {folder}")
        return folder
    import torch
    import transformers
    from diffusers import FluxPipeline

    transformers.utils.logging.disable_progress_bar()
    say(f"building Flux.1 dev {'(shrunken) ' if small else ''}on {device} in bf16")
    torch.manual_seed(0)
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            parts = _real_parts(small)
    finally:
        torch.set_default_dtype(before)
    n = 0
    for key, part in parts.items():
        if isinstance(part, torch.nn.Module):
            parts[key] = part.to("cpu", torch.bfloat16).eval()
            n += sum(p.numel() for p in part.parameters())
    if device == "cuda":
        torch.cuda.empty_cache()
    say(f"built {n / 1e9:.2f} B parameters; saving (safetensors)")
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    FluxPipeline(**parts).save_pretrained(tmp, safe_serialization=True)
    tmp.rename(folder)
    del parts
    say(f"saved {folder}")
    return folder


def preset_config(preset: str, model: Path, dataset: Path, steps: int, small: bool) -> Any:
    """The preset as shipped, pointed at `model` and `dataset`, `steps` long, no warm-up of the learning rate,
    nothing saved but the final LoRA; `small` (the CPU check): 64 px and the CPU's optimizer."""
    from nyx_tui.config.model import TrainingConfig
    from nyx_tui.config.presets import preset_data

    data = preset_data(preset)
    data["model"]["pretrained"] = str(model)
    data["dataset"]["subsets"] = [{"image_dir": str(dataset)}]
    data.setdefault("training", {})["max_steps"] = steps
    data.setdefault("scheduler", {})["warmup_steps"] = 0
    data["saving"] = {**data.get("saving", {}), "every_n_steps": 0, "save_state": False}
    if small:
        data["dataset"]["resolution"] = 64
        data["training"]["mixed_precision"] = "no"  # bf16 autocast on the CPU is slow and beside the point
        if data["optimizer"].get("type") == "adamw8bit":
            data["optimizer"]["type"] = "adamw"  # bitsandbytes' 8-bit AdamW wants a GPU
    return TrainingConfig.model_validate(data)


def real(ws: Path, args: argparse.Namespace, cuda: bool) -> int:
    from nyx_tui import vram
    from nyx_tui.demo_assets import make_shapes_dataset

    small = not cuda
    names = list(PRESETS) if args.preset == "all" else [args.preset]
    steps = args.steps or (4 if small else 12)
    warmup = 1 if small else min(4, steps // 3)
    model = build_real_flux(ws / ("flux-dev-shrunken" if small else "flux-dev-full"), "cuda" if cuda else "cpu", small)
    rows: list[tuple[str, Any, Any, Run]] = []
    for short in names:
        preset = PRESETS[short]
        probe = preset_config(preset, model, ws, steps, small)
        res = probe.dataset.resolution
        dataset = ws / f"dataset-{res}"
        if not any(dataset.glob("*.png")):
            say(f"generating 8 images at {res} px")
            make_shapes_dataset(dataset, n=8, size=res)
        cfg = preset_config(preset, model, dataset, steps, small)
        est = vram.estimate(preset_config(preset, model, dataset, steps, small=False))  # the preset's own figure
        tr = cfg.training
        say(
            f"{preset}: {res} px, batch {tr.batch_size}, {tr.base_quantization}, blocks_to_swap "
            f"{cfg.flow.blocks_to_swap}, {cfg.optimizer.type}, {steps} steps; estimate {est.total_gib:.2f} GiB "
            f"({est.peak_phase})"
        )
        run = engine_job(ws, cfg, preset, warmup, watch=cuda)
        if run.result.ms is None:
            say(f"{preset} failed: {run.result.error}")
        else:
            peak = f"{run.result.peak_gib:.2f} GiB" if run.result.peak_gib is not None else "none (no CUDA)"
            say(f"{preset}: {run.it_s:.3f} it/s, peak {peak}")
        rows.append((short, cfg, est, run))

    what = "shrunken Flux (CPU check of the code path)" if small else "Flux.1 dev, full size, random weights"
    print(f"\n{what}, {steps} steps per preset (it/s: median step after {warmup})")
    print(
        f"{'preset':8}{'px':>6}{'batch':>6}{'estimate':>10}{'est-ctx':>9}{'peak alloc':>12}{'alloc/est':>10}"
        f"{'card':>9}{'card/est':>10}{'it/s':>8}"
    )

    def num(v: float | None, fmt: str, width: int) -> str:
        return f"{v:{width}{fmt}}" if v is not None else f"{'-':>{width}}"

    out = []
    for short, cfg, est, run in rows:
        r = run.result
        total = est.total_gib
        res, batch = cfg.dataset.resolution, cfg.training.batch_size
        if r.ms is None:
            print(f"{short:8}{res:>6}{batch:>6}{total:10.2f}  failed: {r.error}")
        else:
            alloc_ratio = r.peak_gib / total if r.peak_gib is not None else None
            card_ratio = run.card_gib / total if run.card_gib is not None else None
            print(
                f"{short:8}{res:>6}{batch:>6}{total:10.2f}{total - vram.CUDA_CONTEXT_GIB:9.2f}"
                f"{num(r.peak_gib, '.2f', 12)}{num(alloc_ratio, '.3f', 10)}{num(run.card_gib, '.2f', 9)}"
                f"{num(card_ratio, '.3f', 10)}{num(run.it_s, '.3f', 8)}"
            )
        out.append(
            {
                "preset": PRESETS[short],
                "estimate_gib": round(total, 3),
                "estimate_phases": {k: round(v, 3) for k, v in est.phases.items()},
                "peak_alloc_gib": r.peak_gib,
                "card_gib": None if run.card_gib is None else round(run.card_gib, 3),
                "it_s": None if run.it_s is None else round(run.it_s, 4),
                "error": r.error or None,
            }
        )
    print(
        "estimate: nyx_tui.vram.estimate (CUDA context included); est-ctx: less its "
        f"{vram.CUDA_CONTEXT_GIB} GiB context; peak alloc: the engine's peak_vram_gib (max_memory_allocated); "
        "card: nvidia-smi's most in use during the run above before it"
    )
    print(json.dumps(out))
    return 0 if all(run.result.ms is not None for *_, run in rows) else 1


# ----------------------------------------------------------------------------------------------- main


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--steps", type=int, default=None, help="steps per run (default 60; 12 with --real)")
    ap.add_argument("--batch", type=int, default=None, help="tiny runs: batch size (default 2)")
    ap.add_argument("--resolution", type=int, default=None, help="tiny runs: px (default 64)")
    ap.add_argument("--workspace", help="keep/reuse models, data and jobs here (default: a temp folder)")
    ap.add_argument("--no-modes", action="store_true", help="tiny runs: skip the memory-mode rows")
    ap.add_argument("--repeat", type=int, default=1, help="tiny runs: alternate the rows N times, keep each best")
    ap.add_argument("--real", action="store_true", help="full-size Flux.1 dev at the presets on a CUDA GPU")
    ap.add_argument("--preset", default="all", choices=[*PRESETS, "all"], help="with --real: which preset(s)")
    ap.add_argument("--allow-cpu", action="store_true", help=argparse.SUPPRESS)  # --real's code path, shrunken
    args = ap.parse_args()

    import torch

    cuda = torch.cuda.is_available()
    if args.real and not cuda and not args.allow_cpu:
        print(
            "bench/flux_step.py --real needs a CUDA GPU: torch.cuda.is_available() is False here "
            f"(torch {torch.__version__}). Run it on a GPU machine, or leave out --real for the tiny CPU benchmark.",
            file=sys.stderr,
        )
        return 2
    ws = Path(args.workspace) if args.workspace else Path(tempfile.mkdtemp(prefix="nyx-flux-bench-"))
    ws.mkdir(parents=True, exist_ok=True)
    gpu = torch.cuda.get_device_name() if cuda else "none"
    say(f"GPU {gpu}, torch {torch.__version__}, {torch.get_num_threads()} CPU threads, workspace {ws}")
    return real(ws, args, cuda) if args.real else tiny(ws, args)


if __name__ == "__main__":
    raise SystemExit(main())
