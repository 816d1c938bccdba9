"""The VRAM estimator: torch-free, monotonic in the ways memory is, and the Flux presets fit their cards."""

from __future__ import annotations

import subprocess
import sys
from importlib import resources
from pathlib import Path
from typing import Any

import pytest

from nyx_tui import vram
from nyx_tui.config.io import load_config
from nyx_tui.config.model import TrainingConfig
from nyx_tui.config.presets import load_preset, preset_data

PRESET_TIERS = {"flux-lora-24gb": 24, "flux-lora-16gb": 16, "flux-lora-12gb": 12}
MARGIN = 0.08  # each preset leaves at least this share of its card free


def flux(**changes: Any) -> TrainingConfig:
    """Flux.1 dev at 1024 px, batch 1, rank 16, AdamW 8-bit, checkpointing, everything cached; `changes` as
    "section.field" = value."""
    data: dict[str, Any] = {
        "model": {"family": "flux", "pretrained": "black-forest-labs/FLUX.1-dev"},
        "dataset": {"resolution": 1024, "subsets": [{"image_dir": "./images"}]},
        "network": {"kind": "lora", "dim": 16},
        "optimizer": {"type": "adamw8bit"},
        "training": {
            "max_steps": 100,
            "batch_size": 1,
            "mixed_precision": "bf16",
            "gradient_checkpointing": True,
            "cache_latents_to_disk": True,
            "cache_text_encoder_outputs_to_disk": True,
        },
        "flow": {},
    }
    for key, value in changes.items():
        section, name = key.split(".")
        data[section][name] = value
    return TrainingConfig.model_validate(data)


def gib(**changes: Any) -> float:
    return vram.estimate(flux(**changes)).total_gib


def training(**changes: Any) -> float:
    return vram.estimate(flux(**changes)).phases["training"]


def test_the_estimator_imports_no_torch() -> None:
    code = "import nyx_tui.vram, sys; assert 'torch' not in sys.modules, sorted(m for m in sys.modules if 'torch' in m)"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_storage_precision_orders_the_base() -> None:
    bf16, fp8, int8, nf4 = (training(**{"training.base_quantization": q}) for q in ("none", "fp8", "int8", "nf4"))
    assert nf4 < fp8 <= int8 < bf16
    base = {
        q: vram.estimate(flux(**{"training.base_quantization": q})).parts["base_weights"]
        for q in ("none", "fp8", "nf4")
    }
    assert base["none"] == pytest.approx(11.9e9 * 2 / 2**30, rel=0.01)  # 11.9 B weights, 2 bytes each
    assert base["fp8"] == pytest.approx(base["none"] / 2, rel=0.01)  # the blocks (99.4%) in one byte
    assert base["nf4"] == pytest.approx(base["none"] / 4 * 1.03, rel=0.02)  # half a byte + block statistics
    assert training(**{"training.mixed_precision": "no"}) > bf16  # fp32 weights and activations


def test_each_memory_mode_lowers_the_estimate() -> None:
    base = training(**{"training.base_quantization": "fp8"})
    swap = [training(**{"training.base_quantization": "fp8", "flow.blocks_to_swap": n}) for n in (4, 8, 16)]
    assert base > swap[0] > swap[1] > swap[2]
    offload = training(**{"training.base_quantization": "fp8", "training.cpu_offload_checkpointing": True})
    assert offload < base
    no_ckpt = training(**{"training.base_quantization": "fp8", "training.gradient_checkpointing": False})
    assert no_ckpt > base + 20  # every block's activations wait for the backward pass: tens of GiB at 1024 px


def test_cached_text_encoders_and_t5_on_the_cpu() -> None:
    uncached = flux(
        **{"training.cache_text_encoder_outputs_to_disk": False, "training.cache_text_encoder_outputs": False}
    )
    cached = vram.estimate(flux())
    assert vram.estimate(uncached).parts["text_encoders"] == pytest.approx((4.76e9 + 0.123e9) * 2 / 2**30, rel=0.01)
    assert cached.parts["text_encoders"] == 0 and cached.phases["training"] < vram.estimate(uncached).total_gib
    # caching still loads T5 once, before training; on the CPU it never reaches the card
    assert cached.phases["text-encoder caching"] > 9
    t5_cpu = vram.estimate(flux(**{"flow.t5_on_cpu": True}))
    assert t5_cpu.phases["text-encoder caching"] < 2
    uncached_t5_cpu = uncached.model_copy(update={"flow": t5_cpu_flow()})
    assert vram.estimate(uncached_t5_cpu).total_gib < vram.estimate(uncached).total_gib - 8


def t5_cpu_flow() -> Any:
    return flux(**{"flow.t5_on_cpu": True}).flow


def test_bigger_batches_resolutions_ranks_and_optimizers_cost_more() -> None:
    assert gib(**{"training.batch_size": 2}) > gib()
    assert gib(**{"dataset.resolution": 512}) < gib(**{"dataset.resolution": 768}) < gib()
    assert gib(**{"network.dim": 64}) > gib(**{"network.dim": 16}) > gib(**{"network.dim": 4})
    adamw8, adamw, prodigy = (gib(**{"optimizer.type": o}) for o in ("adamw8bit", "adamw", "prodigy"))
    assert adamw8 < adamw < prodigy
    assert gib(**{"optimizer.type": "adafactor"}) < adamw8
    assert gib(**{"flow.t5_max_token_length": 256}) < gib()  # fewer text tokens in every block
    assert gib(**{"flow.train_blocks": "single"}) < gib()  # fewer adapters


def test_an_estimate_describes_itself() -> None:
    estimate = vram.estimate(flux(**{"training.base_quantization": "fp8", "flow.blocks_to_swap": 8}))
    text = estimate.describe()
    first = text.splitlines()[0]
    assert first.startswith("≈ ") and "GiB peak" in first and "Flux.1 dev" in first and "1024 px" in first
    for part in ("base weights (fp8)", "swapped block on the card", "activations", "optimizer state (adamw8bit)"):
        assert part in text
    assert "text-encoder caching" in text
    assert estimate.total_gib == pytest.approx(sum(estimate.parts.values()))
    assert any("CPU memory" in n for n in estimate.notes)
    assert vram.smallest_tier(estimate.total_gib) == 16


@pytest.mark.parametrize(("preset", "tier"), sorted(PRESET_TIERS.items()))
def test_each_flux_preset_fits_its_card(preset: str, tier: int) -> None:
    estimate = vram.estimate(load_preset(preset))
    assert estimate.model == "Flux.1 dev"
    assert estimate.fits(tier, margin=MARGIN), estimate.describe()
    smaller = max((t for t in PRESET_TIERS.values() if t < tier), default=0)
    if smaller:  # and uses its card: a 24 GB preset that fit 16 GB would leave quality on the table
        assert not estimate.fits(smaller), estimate.describe()


def test_presets_load_from_a_saved_file(tmp_path: Path) -> None:
    for preset in PRESET_TIERS:
        cfg = load_preset(preset)
        path = tmp_path / f"{preset}.toml"
        path.write_text(resources.files("nyx_tui.config").joinpath("presets", f"{preset}.toml").read_text())
        loaded = load_config(path)
        assert loaded.training.base_quantization == cfg.training.base_quantization
        assert loaded.flow.blocks_to_swap == cfg.flow.blocks_to_swap


def test_presets_follow_the_published_recipes() -> None:
    """sd-scripts' tiers: fp8 base everywhere, swap on the small cards, caching always, AdamW 8-bit."""
    for preset in PRESET_TIERS:
        data = preset_data(preset)
        assert data["training"]["base_quantization"] == "fp8"
        assert data["training"]["gradient_checkpointing"] is True
        assert data["training"]["cache_text_encoder_outputs_to_disk"] is True
        assert data["optimizer"]["type"] == "adamw8bit"
    assert preset_data("flux-lora-12gb")["flow"]["blocks_to_swap"] == 16  # sd-scripts' 12 GB setting


def test_model_sizes_follow_the_config() -> None:
    assert vram.model_size_for(flux()) is vram.FLUX_DEV
    schnell = flux(**{"model.pretrained": "black-forest-labs/FLUX.1-schnell"})
    assert vram.model_size_for(schnell) is vram.FLUX_SCHNELL
    assert vram.estimate(schnell).total_gib < vram.estimate(flux()).total_gib  # 256 T5 tokens, not 512
    sd3 = {"model.family": "sd3", "dataset.resolution": 1024}
    assert vram.model_size_for(flux(**sd3, **{"model.pretrained": "stabilityai/stable-diffusion-3.5-large"})) is (
        vram.SD35_LARGE
    )
    medium = flux(**sd3, **{"model.pretrained": "stabilityai/stable-diffusion-3.5-medium"})
    assert vram.model_size_for(medium) is vram.SD35_MEDIUM
    assert vram.model_size_for(flux(**sd3, **{"model.pretrained": "sd3_medium_incl_clips.safetensors"})) is (
        vram.SD3_MEDIUM
    )
    assert vram.estimate(medium).total_gib < vram.estimate(flux(**sd3)).total_gib
    large = flux(**sd3, **{"flow.blocks_to_swap": 10})
    assert vram.estimate(large).phases["training"] < vram.estimate(flux(**sd3)).phases["training"] - 3
    for size in vram.MODEL_SIZES.values():  # every block kind adds up below its model
        assert size.block_params < size.denoiser_params


def test_unet_families_are_estimated_too() -> None:
    sdxl = load_preset("sdxl-lora")
    estimate = vram.estimate(sdxl)
    assert estimate.model == "SDXL 1.0"
    assert 8 < estimate.total_gib < 24  # the preset is for 24 GB cards
    sd15 = vram.estimate(load_preset("sd15-lora"))
    assert sd15.total_gib < estimate.total_gib
    assert vram.estimate(sdxl, params=vram.FLUX_DEV).model == "Flux.1 dev"  # an explicit size wins


def test_config_check_shows_the_estimate_before_anything_loads(capsys: pytest.CaptureFixture[str]) -> None:
    """`nyx config check` prints the estimate (even for a config whose files are missing), `--vram` the parts."""
    from nyx_tui.cli import main

    preset = str(Path(vram.__file__).parent / "config" / "presets" / "flux-lora-12gb.toml")
    main(["config", "check", preset])
    out = capsys.readouterr().out
    assert "VRAM estimate" in out and "Flux.1 dev" in out and "12 GB" in out
    assert "base weights" not in out
    main(["config", "check", "--vram", preset])
    assert "base weights (fp8)" in capsys.readouterr().out
