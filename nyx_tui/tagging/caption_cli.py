"""`nyx caption DIR`: BLIP-family captioning as a job. Keep module-level imports light (no torch, no Textual).

Everything that can be checked without loading the model is checked here, before a job exists: the folder
and its images, the options' ranges, the model (a folder with a config.json, or a repo id in the local
Hugging Face cache), its kind and whether the prompt suits it. Bad input exits 2 with the problem and the
fix; then the job is started and followed like `nyx train` (Ctrl+C detaches; the job goes on).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def register(sub: Any) -> None:
    """Add `caption` to the `nyx` subparsers."""
    from nyx_tui.tagging.captioners import KINDS, MODES, GenerationSettings

    g = GenerationSettings()
    p = sub.add_parser(
        "caption",
        help="write a caption file for every image of a folder with BLIP, BLIP-2 or Florence-2 (a job)",
        description="Caption every image of DIR with a transformers captioner, as a detached job. "
        "The model is a local folder or a Hugging Face repo id already in the local cache "
        "(`hf download REPO`). See docs/captioning.md.",
    )
    p.add_argument("folder", metavar="DIR", help="folder of images (sub-folders too, unless --no-recursive)")
    p.add_argument(
        "--model", required=True, help="repo id (e.g. Salesforce/blip-image-captioning-large) or a local folder"
    )
    p.add_argument("--kind", choices=KINDS, help="model kind (default: read from the model's config.json)")
    how = p.add_mutually_exclusive_group()
    how.add_argument("--beams", type=int, default=g.num_beams, help=f"beam search width (default {g.num_beams})")
    how.add_argument("--sample", action="store_true", help="sample with --top-p/--temperature instead of beams")
    p.add_argument("--top-p", type=float, default=g.top_p, help=f"nucleus sampling mass (default {g.top_p})")
    p.add_argument("--temperature", type=float, default=g.temperature, help="sampling temperature (default 1.0)")
    p.add_argument("--max-tokens", type=int, default=g.max_new_tokens, help="most new tokens (default 40)")
    p.add_argument("--min-tokens", type=int, default=g.min_new_tokens, help="fewest new tokens (default 5)")
    p.add_argument("--repetition-penalty", type=float, default=g.repetition_penalty, help="1.0 = none (default)")
    p.add_argument(
        "--prompt",
        help="BLIP: the caption's start ('a photo of'); BLIP-2: a question ('Question: … Answer:'); "
        "Florence-2: a task token (<CAPTION>, <DETAILED_CAPTION> (default), <MORE_DETAILED_CAPTION>)",
    )
    p.add_argument("--prefix", default="", help="text put before every caption, verbatim (e.g. 'mychar, ')")
    p.add_argument("--suffix", default="", help="text put after every caption, verbatim")
    p.add_argument(
        "--mode",
        choices=MODES,
        default="overwrite",
        help="existing captions: overwrite (default), append (joined with ', '), skip (leave those images alone)",
    )
    p.add_argument("--batch-size", type=int, default=8, help="images per forward pass (default 8)")
    p.add_argument("--caption-ext", default=".txt", help="caption file extension (default .txt)")
    p.add_argument("--no-recursive", action="store_true", help="only DIR itself, not its sub-folders")
    p.add_argument("--device", help="cuda, cuda:1, cpu (default: cuda when available, else cpu)")
    p.add_argument("--seed", type=int, default=0, help="random seed for --sample (default 0)")
    p.add_argument("--download", action="store_true", help="let the job download a repo id that is not cached")
    p.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="allow repos that run their own Python code (microsoft/Florence-2-*); read that code first",
    )
    p.add_argument("--detach", action="store_true", help="print the job id and return; follow with nyx attach")
    p.set_defaults(func=cmd_caption)


def settings_from_args(args: argparse.Namespace) -> Any:
    """The CaptionSettings the command line asks for (not yet validated)."""
    from nyx_tui.tagging.captioners import CaptionSettings, GenerationSettings

    gen = GenerationSettings(
        num_beams=args.beams,
        sample=args.sample,
        top_p=args.top_p,
        temperature=args.temperature,
        max_new_tokens=args.max_tokens,
        min_new_tokens=args.min_tokens,
        repetition_penalty=args.repetition_penalty,
    )
    folder = Path(args.folder).expanduser()
    model = args.model
    if Path(model).expanduser().is_dir():  # the job runs in its own folder: a relative path must not move
        model = str(Path(model).expanduser().resolve())
    return CaptionSettings(
        folder=str(folder.resolve()),
        model=model,
        kind=args.kind,
        generation=gen,
        prompt=args.prompt if args.prompt else None,
        prefix=args.prefix,
        suffix=args.suffix,
        mode=args.mode,
        batch_size=args.batch_size,
        caption_ext=args.caption_ext,
        recursive=not args.no_recursive,
        device=args.device,
        seed=args.seed,
        download=args.download,
        trust_remote_code=args.trust_remote_code,
    )


def problems(settings: Any) -> list[str]:
    """Everything wrong with `settings` that can be known without loading the model, each with its fix."""
    from nyx_tui.datasets.images import IMAGE_EXTS, iter_images
    from nyx_tui.tagging import captioners as c

    out: list[str] = []
    folder = Path(settings.folder)
    if not folder.is_dir():
        out.append(f"{folder} is not a folder; give the folder that holds the images")
    elif next(iter_images(folder, recursive=settings.recursive), None) is None:
        where = "" if settings.recursive else " (sub-folders were not searched: drop --no-recursive)"
        out.append(f"{folder} has no images ({', '.join(sorted(IMAGE_EXTS))}){where}")
    ext = settings.caption_ext
    if not ext.startswith(".") or len(ext) < 2 or "/" in ext or ext.lower() in IMAGE_EXTS:
        out.append(f"--caption-ext {ext!r} must be a file extension such as .txt or .caption (not an image's)")
    if settings.batch_size < 1:
        out.append(f"--batch-size must be at least 1 (got {settings.batch_size})")
    out.extend(settings.generation.problems())
    if settings.device is not None and not (
        settings.device in ("auto", "cpu", "mps") or settings.device.split(":")[0] == "cuda"
    ):
        out.append(f"--device {settings.device!r} is not cpu, cuda or cuda:N")
    try:
        model_dir = _cached_model(settings)
    except c.CaptionModelError as e:
        out.append(str(e))
        return out
    if model_dir is None:  # --download and not cached: the job resolves it, and checks the rest then
        return out
    try:
        kind = c.detect_kind(model_dir, settings.kind)
    except c.CaptionModelError as e:
        out.append(str(e))
        return out
    problem = c.check_prompt(kind, settings.prompt)
    if problem:
        out.append(problem)
    if kind == "florence2" and c.needs_remote_code(c.read_config(model_dir)) and not settings.trust_remote_code:
        out.append(
            f"{settings.model} is Microsoft's original Florence-2 checkpoint, which needs its own Python code: use "
            f"--model {c.SUGGESTED['florence2']} (loaded natively by transformers), or pass --trust-remote-code"
        )
    return out


def _cached_model(settings: Any) -> Path | None:
    """The model's local folder; None for a repo id that is not cached when --download lets the job fetch it."""
    from nyx_tui.tagging import captioners as c

    try:
        return c.resolve_model(settings.model, download=False)
    except c.CaptionModelError:
        if settings.download and c.looks_like_repo_id(settings.model) and not Path(settings.model).exists():
            return None
        raise


def start_caption_job(settings: Any) -> Any:
    """Create the job (kind `caption`, settings in spec.json) and spawn its supervisor. Returns the JobDir."""
    from nyx_tui.jobs.jobdir import create_job
    from nyx_tui.jobs.launch import spawn_supervisor

    name = f"caption-{Path(settings.folder).name}"
    argv = [sys.executable, "-m", "nyx_tui.tagging.caption_job", "."]
    job = create_job("caption", name, argv, extra={"caption": settings.to_dict()})
    spawn_supervisor(job)
    return job


def cmd_caption(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.markup import escape

    err = Console(stderr=True, highlight=False)
    settings = settings_from_args(args)
    found = problems(settings)
    if found:
        for problem in found:
            err.print(f"[bold red]error[/]: {escape(problem)}", highlight=False)
        err.print("nothing was started.")
        return EXIT_USAGE
    from nyx_tui.cli import run_job

    return run_job(start_caption_job(settings), detach=args.detach, spawned=True)


__all__ = ["cmd_caption", "problems", "register", "settings_from_args", "start_caption_job"]
