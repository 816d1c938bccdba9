"""`nyx lora upload` (to the Hugging Face Hub) and `nyx lora compare` (a grid of quick renders, as a job).

Light at import: huggingface_hub, torch and Pillow load inside the handlers. The token for `upload` comes
from HF_TOKEN or the 0600 secrets file (nyx_tui.settings), never from the command line.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def add_parsers(lsub: Any) -> None:
    up = lsub.add_parser(
        "upload",
        help="upload a LoRA, sample images and a model card to the Hugging Face Hub",
        description="Create (or reuse) a model repo on the Hugging Face Hub and commit the LoRA, sample images and "
        "a README model card (base model, tags, trigger words, the training settings from the file's metadata) in "
        "one commit. The token comes from HF_TOKEN or from secrets.toml (mode 600) in Nyx's config folder; "
        "HF_ENDPOINT points it at a mirror.",
    )
    up.add_argument("lora", type=Path, help="the LoRA .safetensors file")
    up.add_argument("--repo", required=True, help="OWNER/NAME of the model repo (NAME alone: under your user)")
    up.add_argument("--private", action="store_true", help="make the repo private (when it is created here)")
    up.add_argument("--samples", nargs="+", type=Path, default=[], metavar="DIR_OR_FILE", help="sample images")
    up.add_argument("--run", metavar="JOB", help="a training job: its latest samples go up with their prompts")
    up.add_argument("--base-model", metavar="ID", help="the base model's Hub id for the card (default: from the file)")
    up.add_argument("--trigger", metavar="WORDS", help="trigger words for the card (instance_prompt)")
    up.add_argument("--message", "-m", metavar="M", help="the commit message")
    up.add_argument("--no-card", action="store_true", help="do not write README.md (keep the repo's card)")
    up.set_defaults(func=cmd_upload)

    cmp_ = lsub.add_parser(
        "compare",
        help="render the same prompts and seed with and without LoRAs into one labelled grid (a job)",
        description="Render prompts with the base model and with each LoRA at each strength, same seed, and write a "
        "side-by-side grid PNG (columns: base, then each LoRA × strength; rows: prompts). With --run, the columns "
        "are the run's saved checkpoints (epoch against epoch). Runs as a job: Ctrl+C detaches.",
    )
    cmp_.add_argument("loras", nargs="*", metavar="LORA", help="LoRA files (A vs B: give several)")
    cmp_.add_argument("--model", metavar="BASE", help="base model: diffusers folder, checkpoint or cached repo id")
    cmp_.add_argument("--family", choices=["sd15", "sd2", "sdxl", "flux", "sd3"], help="when it cannot be detected")
    cmp_.add_argument("--run", metavar="JOB", help="compare every LoRA this training job saved (its model by default)")
    cmp_.add_argument("--prompt", "-p", action="append", default=[], metavar="P", help="a prompt (repeat for rows)")
    cmp_.add_argument("--negative", default="", metavar="N", help="negative prompt (SD families, SD3)")
    cmp_.add_argument("--strength", metavar="S,S,…", help="strengths, e.g. 0,0.5,1 (default 0.5,1; several LoRAs: 1)")
    cmp_.add_argument("--no-base", action="store_true", help="leave out the base-model column")
    cmp_.add_argument("--seed", type=int, default=42, help="the seed of every tile (default 42)")
    cmp_.add_argument("--steps", type=int, help="sampling steps (default: the family's sample default)")
    cmp_.add_argument("--scale", type=float, help="guidance / CFG scale (default: the family's sample default)")
    cmp_.add_argument("--size", metavar="WxH", help="image size (default: the family's resolution)")
    cmp_.add_argument("-o", "--output", metavar="GRID.png", help="where to write the grid (also in the job folder)")
    cmp_.add_argument("--detach", action="store_true", help="return at once; follow later with nyx attach")
    cmp_.set_defaults(func=cmd_compare)


def _err() -> Any:
    from rich.console import Console

    return Console(stderr=True, highlight=False)


def cmd_upload(args: argparse.Namespace) -> int:
    from rich.markup import escape

    from nyx_tui.lora.upload import UploadError, UploadOptions, get_token, redact, upload

    err = _err()
    options = UploadOptions(
        lora=args.lora,
        repo=args.repo,
        private=args.private,
        samples=list(args.samples),
        run=args.run,
        base_model=args.base_model,
        trigger=args.trigger,
        message=args.message,
        card=not args.no_card,
    )
    if not sys.stderr.isatty():  # a log file gets the messages, not a hundred progress-bar frames
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    token: str | None = None
    try:
        token = get_token()
        result = upload(options, token=token, say=lambda m: err.print(escape(redact(m, token))))
    except UploadError as e:
        err.print(f"[bold red]error[/]: {escape(redact(str(e), token))}")
        return EXIT_FAILED
    print(result.url)
    err.print(f"committed {len(result.files)} files to {result.repo_id} ({result.commit[:10]})")
    return EXIT_OK


def cmd_compare(args: argparse.Namespace) -> int:
    from rich.markup import escape

    from nyx_tui.lora.compare import CompareError, CompareOptions, parse_size, parse_strengths, start_compare_job

    err = _err()
    try:
        width = height = None
        if args.size:
            width, height = parse_size(args.size)
        options = CompareOptions(
            loras=list(args.loras),
            model=args.model,
            family=args.family,
            run=args.run,
            prompts=list(args.prompt),
            negative=args.negative,
            strengths=parse_strengths(args.strength) if args.strength else None,
            seed=args.seed,
            steps=args.steps,
            width=width,
            height=height,
            scale=args.scale,
            output=args.output,
            no_base=args.no_base,
        )
        job = start_compare_job(options)
    except CompareError as e:
        err.print(f"[bold red]error[/]: {escape(str(e))}")
        err.print("nothing was started.")
        return EXIT_USAGE
    from nyx_tui.cli import run_job

    code: int = run_job(job, detach=args.detach, spawned=True)
    if args.detach or code != EXIT_OK:
        return code
    grid = _grid_path(job)
    if grid is None:
        return code
    print(grid)
    _show(grid)
    return code


def _grid_path(job: Any) -> Path | None:
    for a in reversed(job.artifacts()):
        if a.get("what") == "image":
            path = Path(str(a["path"]))
            return path if path.is_absolute() else job.path / path
    return None


def _show(path: Path) -> None:
    """The grid in the terminal when stdout is one (textual-image picks the terminal's graphics protocol)."""
    if not sys.stdout.isatty() or os.environ.get("TERM") == "dumb":
        return
    try:
        from rich.console import Console
        from textual_image.renderable import Image as TerminalImage

        Console().print(TerminalImage(str(path), width="auto"))
    except Exception:  # an image is a bonus; the path is already printed
        return
