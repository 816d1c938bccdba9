"""`nyx tag DIR`: WD14 tagging as a job. Keep module-level imports light (no onnxruntime, no Textual).

Everything that can be checked without loading the model is checked before a job is created (exit 2 with
the problem and the fix, nothing started): the folder and its images, the model folder's two files or the
shape of a repo id, the thresholds. Then the job runs `python -m nyx_tui.tagging.tag_job .` under a
supervisor, and this command follows it like `nyx train` (Ctrl+C detaches; the job goes on).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2

# the defaults live in wd14.py, which imports numpy and Pillow: too heavy for every `nyx` start, so the
# parser leaves them None and `_options` fills them in; the help text names them
_MODES = ("append", "overwrite", "skip")


def register(sub: Any) -> None:
    """Add `tag` to the `nyx` subparsers."""
    tag = sub.add_parser(
        "tag",
        help="tag a folder of images with a WD14 tagger (a job; writes caption files)",
        description="Tag every image under DIR with a WD14 ONNX tagger and write the tags to caption files "
        "beside the images. Runs as a job: Ctrl+C detaches, `nyx attach` follows it again.",
    )
    tag.add_argument("dir", help="folder of images (searched recursively)")
    tag.add_argument(
        "--model",
        default=None,
        help="Hugging Face repo id (default SmilingWolf/wd-vit-tagger-v3) or a folder holding model.onnx and "
        "selected_tags.csv",
    )
    tag.add_argument("--threshold", type=float, help="keep general tags at least this likely (default 0.35)")
    tag.add_argument(
        "--character-threshold", type=float, help="keep character tags at least this likely (default 0.85)"
    )
    tag.add_argument(
        "--mcut",
        action="store_true",
        help="choose the thresholds per image by MCut (the middle of the largest gap between probabilities); "
        "character tags still need 0.15",
    )
    tag.add_argument("--rating", action="store_true", help="put the most likely rating tag first")
    tag.add_argument("--undesired", action="append", help="tags never written (comma-separated; repeatable)")
    tag.add_argument(
        "--mode",
        choices=_MODES,
        default="append",
        help="append new tags to an existing caption (default), overwrite it, or skip captioned images",
    )
    tag.add_argument("--batch-size", type=int, help="images per run when the model allows it (default 8)")
    tag.add_argument("--caption-ext", default=".txt", help="caption file extension (default .txt)")
    tag.add_argument("--keep-underscores", action="store_true", help="write long_hair, not long hair")
    tag.add_argument("--escape-parens", action="store_true", help=r"write \( \) for ( ) (A1111 prompt syntax)")
    tag.add_argument("--no-recursive", action="store_true", help="only the images directly in DIR")
    tag.add_argument("--detach", action="store_true", help="return at once; follow later with nyx attach")
    tag.set_defaults(func=cmd_tag)


def _fail(message: str, fix: str) -> int:
    from rich.console import Console

    err = Console(stderr=True, highlight=False)
    err.print(f"[bold red]error[/]: {message}", markup=True, highlight=False)
    err.print(f"  [green]fix[/]: {fix}", highlight=False)
    err.print("nothing was started.")
    return EXIT_USAGE


def _csv(values: list[str] | None) -> list[str]:
    return [v.strip() for item in values or [] for v in item.split(",") if v.strip()]


def _model_problem(model: str) -> tuple[str, str] | None:
    """(problem, fix) for a model argument that cannot work, or None. A folder must hold both files; any
    other value must look like `owner/name` (whether the Hub has it is the job's to find out)."""
    from nyx_tui.tagging.wd14 import DEFAULT_MODEL, local_model_problem, looks_like_repo_id

    path = Path(model).expanduser()
    if path.is_dir():
        problem = local_model_problem(path)
        if problem:
            return problem, "download both files of the tagger into that folder, or pass a Hugging Face repo id"
        return None
    if path.exists():
        return f"{model} is a file, not a model folder", "pass the folder that holds model.onnx and selected_tags.csv"
    if looks_like_repo_id(model) and not model.startswith((".", "/", "~")):
        return None
    return (
        f"{model!r} is neither an existing folder nor a Hugging Face repo id (owner/name)",
        f"pass --model {DEFAULT_MODEL} (or another SmilingWolf tagger) or a folder with model.onnx and "
        "selected_tags.csv",
    )


def cmd_tag(args: argparse.Namespace) -> int:
    from nyx_tui.datasets.images import iter_images
    from nyx_tui.tagging.wd14 import (
        DEFAULT_BATCH_SIZE,
        DEFAULT_CHARACTER_THRESHOLD,
        DEFAULT_MODEL,
        DEFAULT_THRESHOLD,
        TagOptions,
    )

    folder = Path(args.dir).expanduser()
    if not folder.is_dir():
        what = "is a file, not a folder" if folder.exists() else "does not exist"
        return _fail(f"{args.dir} {what}", "pass the folder that holds the images to tag")
    recursive = not args.no_recursive
    if next(iter_images(folder, recursive=recursive), None) is None:
        return _fail(
            f"{folder} holds no images{'' if recursive else ' directly (try without --no-recursive)'}",
            "point at the folder with the .png/.jpg/.webp files",
        )
    model = args.model or DEFAULT_MODEL
    problem = _model_problem(model)
    if problem:
        return _fail(*problem)
    threshold = DEFAULT_THRESHOLD if args.threshold is None else args.threshold
    character = DEFAULT_CHARACTER_THRESHOLD if args.character_threshold is None else args.character_threshold
    for flag, value in (("--threshold", threshold), ("--character-threshold", character)):
        if not 0.0 <= value <= 1.0:
            return _fail(f"{flag} {value:g} is not a probability", f"give {flag} a value between 0 and 1, e.g. 0.35")
    batch_size = DEFAULT_BATCH_SIZE if args.batch_size is None else args.batch_size
    if batch_size < 1:
        return _fail(f"--batch-size {batch_size} is not a batch size", "give --batch-size 1 or more (default 8)")
    ext = args.caption_ext.strip()
    ext = ext if ext.startswith(".") else f".{ext}"
    if len(ext) < 2 or "/" in ext:
        return _fail(f"--caption-ext {args.caption_ext!r} is not a file extension", "pass e.g. --caption-ext .txt")
    options = TagOptions(
        threshold=threshold,
        character_threshold=character,
        mcut=args.mcut,
        rating=args.rating,
        undesired=tuple(_csv(args.undesired)),
        replace_underscores=not args.keep_underscores,
        escape_parens=args.escape_parens,
        mode=args.mode,
        caption_ext=ext,
        batch_size=batch_size,
    )
    model_path = Path(model).expanduser()
    # the worker runs in the job folder: a relative model folder must be made absolute here
    model_ref = str(model_path.resolve()) if model_path.is_dir() else model
    spec = {"folder": str(folder.resolve()), "model": model_ref, "recursive": recursive, "options": options.to_json()}
    return _start(spec, folder, args.detach)


def _start(spec: dict[str, Any], folder: Path, detach: bool) -> int:
    from nyx_tui.cli import run_job
    from nyx_tui.jobs.jobdir import create_job

    argv = [sys.executable, "-m", "nyx_tui.tagging.tag_job", "."]
    job = create_job("tag", f"tag-{folder.resolve().name}", argv, extra={"tag": spec})
    return run_job(job, detach=detach)


__all__ = ["register"]
