"""Image captioners of the BLIP family (BLIP, BLIP-2, Florence-2) through transformers.

Two halves, on purpose:

- torch-free (the CLI imports these to validate input before a job exists): `CaptionSettings` (every option a
  caption job runs with, stored in spec.json), `resolve_model` (a folder, or a repo id found in the local
  Hugging Face cache), `detect_kind` (from the model's `config.json`), `check_prompt`, `finish_caption`.
- heavy (only the job process calls it): `load_captioner`, which imports torch and transformers and returns a
  `Captioner` for the detected kind.

Models are never downloaded behind the user's back: a repo id must be in the local cache (`hf download REPO`)
unless the settings allow a download (`nyx caption --download`). The error says which and how.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

if TYPE_CHECKING:  # the CLI imports this module: PIL, torch and transformers load only in the job
    from PIL.Image import Image

Kind = Literal["blip", "blip2", "florence2"]
KINDS: tuple[str, ...] = ("blip", "blip2", "florence2")
Mode = Literal["overwrite", "append", "skip"]
MODES: tuple[str, ...] = ("overwrite", "append", "skip")

# config.json `model_type` → our kind (BLIP-2 writes "blip-2"; the native and the remote-code Florence-2 both
# write "florence2")
MODEL_TYPES: dict[str, str] = {"blip": "blip", "blip-2": "blip2", "blip_2": "blip2", "florence2": "florence2"}

# Florence-2 is steered by a task token alone; these are the ones that answer with plain text
FLORENCE_TASKS: tuple[str, ...] = ("<CAPTION>", "<DETAILED_CAPTION>", "<MORE_DETAILED_CAPTION>")
FLORENCE_DEFAULT_TASK = "<DETAILED_CAPTION>"

REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")

SUGGESTED = {
    "blip": "Salesforce/blip-image-captioning-large",
    "blip2": "Salesforce/blip2-opt-2.7b",
    "florence2": "florence-community/Florence-2-large",
}


class CaptionModelError(RuntimeError):
    """The model cannot be used as asked (missing, not a captioner, needs remote code). The message names the
    model and the fix; the CLI prints it and exits 2, the job logs it and fails."""


# ------------------------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class GenerationSettings:
    """How text is generated. Beam search (the default) is deterministic: the same images give the same
    captions, which makes a re-run reproducible; sampling gives more varied wording."""

    num_beams: int = 3
    sample: bool = False
    top_p: float = 0.9
    temperature: float = 1.0
    max_new_tokens: int = 40
    min_new_tokens: int = 5
    repetition_penalty: float = 1.0

    def generate_kwargs(self) -> dict[str, Any]:
        """The keyword arguments for `model.generate` (only the ones that apply: transformers warns about
        sampling options given to beam search)."""
        kw: dict[str, Any] = {
            "max_new_tokens": self.max_new_tokens,
            "min_new_tokens": min(self.min_new_tokens, self.max_new_tokens),
            "repetition_penalty": self.repetition_penalty,
        }
        if self.sample:
            kw.update(do_sample=True, top_p=self.top_p, temperature=self.temperature, num_beams=1)
        else:
            kw.update(do_sample=False, num_beams=self.num_beams)
        return kw

    def problems(self) -> list[str]:
        """What is out of range, each with its fix (empty when fine)."""
        out: list[str] = []
        if self.num_beams < 1:
            out.append(f"--beams must be at least 1 (got {self.num_beams})")
        if not 0 < self.top_p <= 1:
            out.append(f"--top-p must be in (0, 1] (got {self.top_p}); 0.9 is usual")
        if self.temperature <= 0:
            out.append(f"--temperature must be above 0 (got {self.temperature}); 1.0 is neutral")
        if self.max_new_tokens < 1:
            out.append(f"--max-tokens must be at least 1 (got {self.max_new_tokens})")
        if self.min_new_tokens < 0 or self.min_new_tokens > self.max_new_tokens:
            out.append(
                f"--min-tokens must be between 0 and --max-tokens ({self.max_new_tokens}); got {self.min_new_tokens}"
            )
        if self.repetition_penalty <= 0:
            out.append(f"--repetition-penalty must be above 0 (got {self.repetition_penalty}); 1.0 means none")
        return out


@dataclass(frozen=True)
class CaptionSettings:
    """Everything a caption job runs with. Stored in spec.json under `caption` (`to_dict`/`from_dict`), so a
    job can be re-read, shown and re-run exactly."""

    folder: str
    model: str
    kind: str | None = None  # None: detect from config.json
    generation: GenerationSettings = field(default_factory=GenerationSettings)
    prompt: str | None = None  # BLIP: the caption's start; BLIP-2: a question/instruction; Florence-2: a task token
    prefix: str = ""
    suffix: str = ""
    mode: str = "overwrite"
    batch_size: int = 8
    caption_ext: str = ".txt"
    recursive: bool = True
    device: str | None = None  # None: cuda when available, else cpu
    seed: int = 0
    download: bool = False  # fetch a repo id that is not in the local cache
    trust_remote_code: bool = False  # only for repos that ship their own model code (microsoft/Florence-2-*)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CaptionSettings:
        """Unknown keys are ignored so that a spec written by a newer Nyx still reads."""
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        gen = values.get("generation") or {}
        gen_known = {f.name for f in fields(GenerationSettings)}
        values["generation"] = GenerationSettings(**{k: v for k, v in gen.items() if k in gen_known})
        return cls(**values)


def finish_caption(text: str, prefix: str = "", suffix: str = "") -> str:
    """The caption as written: prefix + generated text + suffix. The prefix and suffix are taken verbatim
    (`"mychar, "` keeps its space); only the generated text is stripped."""
    return f"{prefix}{text.strip()}{suffix}"


def merge_caption(existing: str, new: str, mode: str, prefix: str = "") -> str | None:
    """The text to write for an image whose caption file holds `existing`; None means leave it alone.

    `append` joins with ", " and does not repeat a prefix (a trigger word) the existing caption already
    starts with; `skip` leaves any non-empty caption alone; `overwrite` replaces it."""
    existing = existing.strip()
    if mode == "skip":
        return None if existing else new
    if mode == "append" and existing:
        if prefix.strip() and existing.startswith(prefix.strip()) and new.startswith(prefix):
            new = new[len(prefix) :]
        return f"{existing.rstrip(', ')}, {new.strip()}"
    return new


# ------------------------------------------------------------------------------------------- the model


def looks_like_repo_id(model: str) -> bool:
    return bool(REPO_ID.match(model)) and ".." not in model


def _download_hint(repo: str) -> str:
    return (
        f"download it first with `hf download {repo}` (huggingface_hub's CLI; set HF_TOKEN for gated repos), "
        f"or pass --download to let the job fetch it, or give a local folder with --model"
    )


def resolve_model(model: str, download: bool = False) -> Path:
    """The local folder of `model`: a folder as given, or a repo id's snapshot in the Hugging Face cache
    (`HF_HOME`/`HF_HUB_CACHE`). Raises CaptionModelError naming the model and the fix."""
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise CaptionModelError(
                f"{path} has no config.json: it is not a transformers model folder "
                "(save one with save_pretrained, or give a Hugging Face repo id such as "
                f"{SUGGESTED['blip']})"
            )
        return path.resolve()
    if not looks_like_repo_id(model):
        raise CaptionModelError(
            f"--model {model!r} is neither an existing folder nor a Hugging Face repo id (owner/name); "
            f"for example --model {SUGGESTED['blip']}"
        )
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        folder = Path(snapshot_download(model, local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError, OSError, ValueError):
        if not download:
            from huggingface_hub.constants import HF_HUB_CACHE

            raise CaptionModelError(
                f"model {model} is not in the local Hugging Face cache ({HF_HUB_CACHE}); " + _download_hint(model)
            ) from None
        try:
            folder = Path(snapshot_download(model))
        except Exception as e:  # offline, gated, no such repo: say which, with the hub's words
            raise CaptionModelError(f"could not download {model}: {e}. " + _download_hint(model)) from e
    if not (folder / "config.json").is_file():
        raise CaptionModelError(
            f"the cached snapshot of {model} ({folder}) has no config.json (an incomplete download?); "
            f"run `hf download {model}` again"
        )
    return folder


def read_config(folder: Path) -> dict[str, Any]:
    try:
        data = json.loads((Path(folder) / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise CaptionModelError(f"cannot read {Path(folder) / 'config.json'}: {e}") from e
    if not isinstance(data, dict):
        raise CaptionModelError(f"{Path(folder) / 'config.json'} is not a JSON object")
    return data


def needs_remote_code(config: dict[str, Any]) -> bool:
    """True for checkpoints in their authors' own format (microsoft/Florence-2-*: an `auto_map` to the repo's
    Python files, a `davit` vision tower) that the transformers classes cannot load."""
    vision = config.get("vision_config") or {}
    return bool(config.get("auto_map")) and vision.get("model_type") != "florence_vision"


def detect_kind(folder: Path, given: str | None = None) -> str:
    """The captioner kind for a model folder, from config.json's `model_type`; `given` must agree with it
    (a BLIP-2 loaded as BLIP fails deep inside transformers with an unhelpful message)."""
    config = read_config(folder)
    model_type = str(config.get("model_type", ""))
    detected = MODEL_TYPES.get(model_type)
    if detected is None:
        if given is not None:
            return given  # a fine-tune with a renamed model_type: the user knows what it is
        raise CaptionModelError(
            f"{folder} holds a {model_type or 'model without model_type'!s} model, not a captioner Nyx knows "
            f"(model_type blip, blip-2 or florence2); pass --kind {'|'.join(KINDS)} if it is one of them"
        )
    if given is not None and given != detected:
        raise CaptionModelError(
            f"--kind {given} does not match the model: its config.json says model_type {model_type!r} "
            f"({detected}); drop --kind or pass --kind {detected}"
        )
    return detected


def check_prompt(kind: str, prompt: str | None) -> str | None:
    """A problem with `prompt` for `kind` (with the fix), or None. Florence-2 reads a task token and nothing
    else; its processor raises otherwise, after the model has loaded."""
    if kind == "florence2" and prompt is not None and prompt not in FLORENCE_TASKS:
        return (
            f"Florence-2 takes a task token as its prompt, not free text: --prompt one of "
            f"{', '.join(FLORENCE_TASKS)} (default {FLORENCE_DEFAULT_TASK})"
        )
    return None


# ------------------------------------------------------------------------------------------- captioners


class Captioner(Protocol):
    """Turns a batch of RGB images into one caption each (without prefix or suffix: see `finish_caption`)."""

    @property
    def kind(self) -> str: ...

    def caption(self, images: Sequence[Image]) -> list[str]: ...


def pick_device(device: str | None) -> str:
    """`device` as given, else cuda when torch sees a GPU, else cpu."""
    import torch

    if device and device != "auto":
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


class TransformersCaptioner:
    """One implementation for all three kinds: they differ only in their classes, the default prompt and
    whether the generated ids repeat the prompt (decoder-only language models such as BLIP-2's OPT do)."""

    def __init__(
        self,
        kind: str,
        model: Any,
        processor: Any,
        generation: GenerationSettings,
        prompt: str | None,
        device: str,
        dtype: Any,
        seed: int = 0,
    ) -> None:
        self._kind = kind
        self.model = model
        self.processor = processor
        self.generation = generation
        self.prompt = prompt
        self.device = device
        self.dtype = dtype
        self.seed = seed

    @property
    def kind(self) -> str:
        return self._kind

    def _inputs(self, images: Sequence[Image]) -> dict[str, Any]:
        n = len(images)
        if self.prompt is None:
            inputs = self.processor(images=list(images), return_tensors="pt")
        else:
            # one prompt for the whole batch: every row has the same length, so no padding side matters
            inputs = self.processor(images=list(images), text=[self.prompt] * n, return_tensors="pt")
        out: dict[str, Any] = {}
        for key, value in inputs.items():
            value = value.to(self.device)
            if key == "pixel_values":
                value = value.to(self.dtype)
            out[key] = value
        return out

    def caption(self, images: Sequence[Image]) -> list[str]:
        import torch

        if not images:
            return []
        inputs = self._inputs(images)
        if self.generation.sample:
            torch.manual_seed(self.seed)  # sampling is reproducible for a given seed and batch
        with torch.inference_mode():
            ids = self.model.generate(**inputs, **self.generation.generate_kwargs())
        prompt_ids = inputs.get("input_ids")
        if (
            self._kind == "blip2"
            and prompt_ids is not None
            and ids.shape[1] >= prompt_ids.shape[1]
            and torch.equal(ids[:, : prompt_ids.shape[1]], prompt_ids)
        ):
            ids = ids[:, prompt_ids.shape[1] :]  # BLIP-2's answer alone, not the question
        texts = self.processor.batch_decode(ids, skip_special_tokens=True)
        return [" ".join(str(t).split()) for t in texts]


def load_captioner(settings: CaptionSettings, folder: Path | None = None) -> TransformersCaptioner:
    """Load the model named by `settings` (or the already resolved `folder`) on its device: fp16 on CUDA,
    fp32 on the CPU (fp16 matmuls there are slow or missing). Imports torch and transformers."""
    import torch
    import transformers

    folder = folder or resolve_model(settings.model, settings.download)
    kind = detect_kind(folder, settings.kind)
    problem = check_prompt(kind, settings.prompt)
    if problem:
        raise CaptionModelError(problem)
    device = pick_device(settings.device)
    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    prompt = settings.prompt or None
    config = read_config(folder)
    remote = kind == "florence2" and needs_remote_code(config)
    if remote and not settings.trust_remote_code:
        raise CaptionModelError(
            f"{settings.model} is Microsoft's original Florence-2 checkpoint, which runs its own Python code from "
            f"the repo; transformers {transformers.__version__} loads the converted checkpoints natively: use "
            f"--model {SUGGESTED['florence2']} (or -base, -large-ft), or pass --trust-remote-code to run the "
            "repo's code (read it first)"
        )
    model_cls: Any
    proc_cls: Any
    extra: dict[str, Any] = {}
    if kind == "blip":
        model_cls, proc_cls = transformers.BlipForConditionalGeneration, transformers.BlipProcessor
    elif kind == "blip2":
        model_cls, proc_cls = transformers.Blip2ForConditionalGeneration, transformers.Blip2Processor
    elif remote:
        model_cls, proc_cls = transformers.AutoModelForCausalLM, transformers.AutoProcessor
        extra = {"trust_remote_code": True}
    else:
        native = getattr(transformers, "Florence2ForConditionalGeneration", None)
        if native is None:
            raise CaptionModelError(
                f"transformers {transformers.__version__} has no Florence2ForConditionalGeneration (added in "
                "4.56): upgrade transformers, or use a BLIP model"
            )
        model_cls, proc_cls = native, transformers.AutoProcessor
    if kind == "florence2":
        prompt = prompt or FLORENCE_DEFAULT_TASK
    try:
        processor = proc_cls.from_pretrained(str(folder), **extra)
        model = model_cls.from_pretrained(str(folder), dtype=dtype, **extra)
    except (OSError, ValueError, KeyError) as e:
        raise CaptionModelError(f"cannot load {settings.model} as a {kind} captioner: {e}") from e
    model.to(device)
    model.eval()
    return TransformersCaptioner(kind, model, processor, settings.generation, prompt, device, dtype, settings.seed)


__all__ = [
    "KINDS",
    "MODES",
    "CaptionModelError",
    "CaptionSettings",
    "Captioner",
    "GenerationSettings",
    "TransformersCaptioner",
    "check_prompt",
    "detect_kind",
    "finish_caption",
    "load_captioner",
    "looks_like_repo_id",
    "merge_caption",
    "resolve_model",
]
