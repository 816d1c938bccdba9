"""Image–caption agreement: the CLIP cosine similarity of each image with its caption.

`clip_similarities(images, captions, model)` loads a transformers CLIP model (`CLIPModel` and its processor,
through `AutoModel`/`AutoProcessor`) from a local folder or from a Hugging Face repo id already in the local
cache (never downloads; a missing repo raises `ClipModelError` naming it and `hf download REPO`), and gives
one similarity in [-1, 1] per (image, caption) pair: the cosine of the L2-normalised projected image and text
embeddings. Captions are truncated to the model's text length (77 tokens for OpenAI's CLIPs); images are
turned upright by their EXIF orientation and transparency is laid on white (`caption_job.load_image`).

`nyx dataset captions-quality --clip MODEL` feeds these into `datasets.caption_quality` (which stays
torch-free: the TUI imports it). torch and transformers are imported inside the functions.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

DEFAULT_BATCH_SIZE = 16


class ClipModelError(RuntimeError):
    """The CLIP model could not be found or loaded; the message names it and the fix."""


def resolve_clip_model(model: str) -> Path:
    """The local folder of `model`: a folder as given, or a repo id's snapshot in the local Hugging Face cache."""
    from nyx_tui.tagging.captioners import looks_like_repo_id

    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ClipModelError(f"{path} has no config.json: it is not a transformers CLIP model folder")
        return path.resolve()
    if not looks_like_repo_id(model):
        raise ClipModelError(
            f"CLIP model {model!r} is neither an existing folder nor a Hugging Face repo id (owner/name); "
            "for example openai/clip-vit-base-patch32"
        )
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        folder = Path(snapshot_download(model, local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError, OSError, ValueError):
        raise ClipModelError(
            f"CLIP model {model} is not in the local Hugging Face cache ({constants.HF_HUB_CACHE}) and nothing "
            f"is downloaded here: fetch it first with `hf download {model}` (set HF_TOKEN for gated repos), "
            "or give a local folder"
        ) from None
    if not (folder / "config.json").is_file():
        raise ClipModelError(
            f"the cached snapshot of {model} ({folder}) has no config.json (an incomplete download?); "
            f"run `hf download {model}` again"
        )
    return folder


def _features(out: Any) -> Any:
    """transformers 4 returns the projected features as a tensor, 5 as an output with `pooler_output`."""
    return out if hasattr(out, "norm") else out.pooler_output


def _max_text_length(model: Any, tokenizer: Any) -> int:
    n = getattr(getattr(model.config, "text_config", None), "max_position_embeddings", None)
    limit = getattr(tokenizer, "model_max_length", None)
    candidates = [int(v) for v in (n, limit) if isinstance(v, int) and 0 < v < 100_000]
    return min(candidates) if candidates else 77


def clip_similarities(
    images: Sequence[Path],
    captions: Sequence[str],
    model: str,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    device: str | None = None,
) -> list[float]:
    """The CLIP cosine similarity of `images[i]` with `captions[i]`, for every i (same order).
    Raises ValueError when the lengths differ, ClipModelError when the model cannot be found or loaded,
    OSError for an unreadable image."""
    if len(images) != len(captions):
        raise ValueError(f"{len(images)} images but {len(captions)} captions")
    folder = resolve_clip_model(model)  # also for no images: a wrong --clip is said at once
    if not images:
        return []

    import torch
    from transformers import AutoModel, AutoProcessor

    from nyx_tui.tagging.caption_job import load_image
    from nyx_tui.tagging.captioners import pick_device

    try:
        processor = AutoProcessor.from_pretrained(str(folder), local_files_only=True)
        net = AutoModel.from_pretrained(str(folder), local_files_only=True)
    except Exception as e:  # a wrong kind of model, missing tokenizer files, ...
        raise ClipModelError(f"could not load a CLIP model from {folder}: {e}") from e
    if not (hasattr(net, "get_image_features") and hasattr(net, "get_text_features")):
        raise ClipModelError(f"{folder} is a {type(net).__name__}, not a CLIP-style image–text model")
    dev = pick_device(device)
    net = net.to(dev).eval()
    tokenizer = getattr(processor, "tokenizer", processor)
    image_processor = getattr(processor, "image_processor", processor)
    max_len = _max_text_length(net, tokenizer)
    out: list[float] = []
    size = max(1, batch_size)
    with torch.inference_mode():
        for start in range(0, len(images), size):
            paths = images[start : start + size]
            texts = [c or "" for c in captions[start : start + size]]
            pixels = image_processor(images=[load_image(Path(p)) for p in paths], return_tensors="pt")
            tokens = tokenizer(texts, padding=True, truncation=True, max_length=max_len, return_tensors="pt")
            img = _features(net.get_image_features(pixel_values=pixels["pixel_values"].to(dev)))
            txt = _features(
                net.get_text_features(
                    input_ids=tokens["input_ids"].to(dev), attention_mask=tokens["attention_mask"].to(dev)
                )
            )
            img = img / img.norm(dim=-1, keepdim=True)
            txt = txt / txt.norm(dim=-1, keepdim=True)
            sims = (img * txt).sum(dim=-1).clamp(-1.0, 1.0)
            out.extend(float(s) for s in sims.float().cpu())
    return out


__all__ = ["DEFAULT_BATCH_SIZE", "ClipModelError", "clip_similarities", "resolve_clip_model"]
