"""`nyx dataset dedupe|filter|prep|captions-quality|quarantine`: registered into the `dataset` group by
`datasets.cli`. The work is in `dedupe`, `quality`, `preprocess` and `caption_quality`; this module parses,
asks, shows progress and prints.

Exit codes as everywhere in `nyx`: 0 done, 1 some images failed, 2 bad input (nothing was changed).
Moves into the quarantine happen only with `--yes` or a `y` typed at the prompt; a script without `--yes`
gets exit 2 and the command to run, never a silent move. Keep module-level imports light (no torch, no
Textual, no PIL): `nyx --help` builds every parser.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2

ProgressFn = Callable[[int, int], None]


def _console(stderr: bool = False) -> Console:
    return Console(stderr=stderr, highlight=False)


@contextmanager
def _progress(label: str, enabled: bool = True) -> Iterator[ProgressFn | None]:
    """A Rich progress bar on stderr when it is a terminal (and output is not --json); else nothing."""
    err = _console(stderr=True)
    if not enabled or not err.is_terminal:
        yield None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=err,
        transient=True,
    ) as bar:
        task = bar.add_task(label, total=None)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield update


def _bad_folder(err: Console, e: Exception) -> int:
    err.print(f"[red]error[/]: {escape(str(e))}; pass the dataset folder (the one holding the images)")
    return EXIT_USAGE


def _confirm(args: argparse.Namespace, err: Console, question: str, command: str) -> bool | None:
    """True to go ahead; False when the user said no; None when nobody can be asked (not a terminal, no --yes)."""
    if args.yes:
        return True
    if not sys.stdin.isatty():
        err.print(f"[red]error[/]: {escape(question)} needs confirmation; nothing was moved. Run: {escape(command)}")
        return None
    from rich.prompt import Confirm

    return Confirm.ask(question, default=False, console=err)


def _quarantine(
    args: argparse.Namespace, root: Path, reasons: dict[Path, str], label: str, err: Console
) -> tuple[int, dict[str, Any] | None]:
    """Ask, then move `reasons`' images into the quarantine. (exit code, the report as JSON or None)."""
    from nyx_tui.datasets.dedupe import quarantine, quarantine_root

    if not reasons:
        return EXIT_OK, None
    where = quarantine_root(root)
    question = f"Move {len(reasons)} image(s) and their captions to {where}?"
    ok = _confirm(args, err, question, f"nyx dataset {args.dataset_command} {root} --quarantine --yes")
    if ok is None:
        return EXIT_USAGE, None
    if not ok:
        err.print("nothing was moved")
        return EXIT_OK, None
    report = quarantine(root, reasons, label=label)
    if not args.json:
        moved = sum(1 for m in report.moved if m.sidecar_of is None)
        sidecars = len(report.moved) - moved
        err.print(
            f"moved {moved} image(s) and {sidecars} sidecar file(s) to {escape(str(report.batch))}; "
            f"undo with: nyx dataset quarantine {escape(str(root))} --restore --yes"
        )
        for path, why in report.skipped:
            err.print(f"[yellow]skipped[/] {escape(path)}: {escape(why)}")
    return EXIT_OK, report.to_json()


def _size(w: int | None, h: int | None) -> str:
    return f"{w}x{h}" if w and h else "?"


def _kb(n: int) -> str:
    return f"{n / 1024:.0f} KB" if n < 1 << 20 else f"{n / (1 << 20):.1f} MB"


# ------------------------------------------------------------------------------------------------ dedupe


def cmd_dedupe(args: argparse.Namespace) -> int:
    from nyx_tui.datasets.dedupe import find_duplicates

    err, out = _console(stderr=True), _console()
    try:
        with _progress("hashing", not args.json) as progress:
            result = find_duplicates(
                Path(args.folder),
                threshold=args.threshold,
                exact_only=args.exact_only,
                cache_path=Path(args.cache) if args.cache else None,
                progress=progress,
            )
    except ValueError as e:
        err.print(f"[red]error[/]: {escape(str(e))}")
        return EXIT_USAGE
    except (FileNotFoundError, NotADirectoryError) as e:
        return _bad_folder(err, e)
    code, moved = EXIT_OK, None
    if not args.json:
        _print_groups(out, result, hint=not args.quarantine)
    if args.quarantine:
        reasons = {}
        for g in result.groups:
            for m in g.members:
                how = "exact copy" if m.exact else f"distance {m.distance}" + (", mirrored" if m.flipped else "")
                reasons[m.image.path] = f"duplicate of {g.keeper.rel} ({how})"
        code, moved = _quarantine(args, result.root, reasons, "dedupe", err)
    if args.json and code != EXIT_USAGE:
        answer = result.to_json()
        answer["quarantine"] = moved
        print(json.dumps(answer, indent=1))
    return code


def _print_groups(out: Console, result: Any, hint: bool) -> None:
    for n, g in enumerate(result.groups, 1):
        k = g.keeper
        out.print(f"[bold]group {n}[/]  keep [green]{escape(k.rel)}[/] ({_size(k.width, k.height)}, {_kb(k.bytes)})")
        for m in g.members:
            i = m.image
            how = "exact copy" if m.exact else f"distance {m.distance}" + (" (mirrored)" if m.flipped else "")
            out.print(f"    [yellow]{escape(i.rel)}[/]  {how}  ({_size(i.width, i.height)}, {_kb(i.bytes)})")
    for i in result.unreadable:
        out.print(f"[red]unreadable[/] {escape(i.rel)}: {escape(i.error or '')}")
    dupes = sum(len(g.members) for g in result.groups)
    kind = "exact" if result.exact_only else f"within {result.threshold} bits"
    out.print(
        f"{len(result.images)} images ({result.hashed} hashed, {result.cached} from cache) · "
        f"{len(result.groups)} group(s), {dupes} duplicate(s) {kind} · {result.seconds:.1f} s"
    )
    if dupes and hint:
        out.print(f"move the duplicates aside: nyx dataset dedupe {escape(str(result.root))} --quarantine --yes")


# ------------------------------------------------------------------------------------------------ filter


def cmd_filter(args: argparse.Namespace) -> int:
    from nyx_tui.datasets.quality import check_quality

    err, out = _console(stderr=True), _console()
    try:
        with _progress("scoring", not args.json) as progress:
            result = check_quality(
                Path(args.folder),
                min_side=args.min_side or None,
                max_aspect=args.max_aspect or None,
                min_blur=None if args.min_blur is not None and args.min_blur <= 0 else args.min_blur,
                cache_path=Path(args.cache) if args.cache else None,
                progress=progress,
            )
    except ValueError as e:
        err.print(f"[red]error[/]: {escape(str(e))}")
        return EXIT_USAGE
    except (FileNotFoundError, NotADirectoryError) as e:
        return _bad_folder(err, e)
    fails = result.failures
    if not args.json:
        for item in fails:
            blur = "" if item.blur is None else f", sharpness {item.blur:.0f}"
            out.print(f"[yellow]{escape(item.rel)}[/] ({_size(item.width, item.height)}{blur})")
            for r in item.reasons:
                out.print(f"    {escape(r)}")
        out.print(
            f"{len(result.items)} images, {len(fails)} fail · {result.decoded} decoded, {result.cached} from cache · "
            f"{result.seconds:.1f} s"
        )
    code, moved = EXIT_OK, None
    if args.quarantine:
        reasons = {i.path: "; ".join(i.reasons) for i in fails if not i.error}
        code, moved = _quarantine(args, result.root, reasons, "filter", err)
    if args.json and code != EXIT_USAGE:
        answer = result.to_json()
        answer["quarantine"] = moved
        print(json.dumps(answer, indent=1))
    return code


# -------------------------------------------------------------------------------------------------- prep


def cmd_prep(args: argparse.Namespace) -> int:
    from nyx_tui.datasets.preprocess import PrepOptions, prepare

    err, out = _console(stderr=True), _console()
    opts = PrepOptions(
        max_side=args.max_side,
        bucket_resolution=args.bucket_resolution,
        bucket_step=args.bucket_step,
        bucket_min=args.bucket_min,
        bucket_max=args.bucket_max,
        flatten=args.flatten_alpha,
        fmt=args.format,
        quality=args.quality,
        autocontrast=args.autocontrast,
        white_balance=args.white_balance,
    )
    try:
        with _progress("processing", not args.json) as progress:
            result = prepare(Path(args.folder), Path(args.out), opts, progress=progress)
    except ValueError as e:
        err.print(f"[red]error[/]: {escape(str(e))}")
        return EXIT_USAGE
    except (FileNotFoundError, NotADirectoryError) as e:
        return _bad_folder(err, e)
    if args.json:
        print(json.dumps(result.to_json(), indent=1))
    else:
        for item in result.failed:
            out.print(f"[red]failed[/] {escape(item.source)}: {escape(item.error or '')}")
        written = len(result.items) - len(result.failed)
        captions = sum(len(i.captions) for i in result.items)
        out.print(
            f"wrote {written} image(s) and {captions} caption file(s) to {escape(str(result.out))} · "
            f"{len(result.failed)} failed · {result.seconds:.1f} s"
        )
    return EXIT_FAILED if result.failed else EXIT_OK


# -------------------------------------------------------------------------------------------- captions


def cmd_captions_quality(args: argparse.Namespace) -> int:
    from nyx_tui.datasets.caption_quality import check_captions, load_vocabulary

    err, out = _console(stderr=True), _console()
    vocab = None
    if args.vocab:
        try:
            vocab = load_vocabulary(Path(args.vocab))
        except (OSError, ValueError, UnicodeDecodeError) as e:
            err.print(f"[red]error[/]: --vocab: {escape(str(e))}; pass a WD14 selected_tags.csv")
            return EXIT_USAGE
    try:
        reports = check_captions(
            Path(args.folder),
            caption_ext=args.caption_ext,
            vocab=vocab,
            min_tags=args.min_tags,
            keep_tokens=args.keep_tokens,
        )
    except (FileNotFoundError, NotADirectoryError) as e:
        return _bad_folder(err, e)
    clip_summary: dict[str, Any] | None = None
    if getattr(args, "clip", None):
        clip_summary = _caption_clip(args, reports, err)
        if clip_summary is None:
            return EXIT_USAGE
    flagged = [r for r in reports if r.codes]
    shown = flagged[: args.top] if args.top > 0 else flagged
    if args.json:
        answer = {
            "folder": str(Path(args.folder).absolute()),
            "images": len(reports),
            "flagged": len(flagged),
            "items": [r.to_json() for r in shown],
        }
        if clip_summary is not None:
            answer["clip"] = clip_summary
        print(json.dumps(answer, indent=1))
        return EXIT_OK
    for r in shown:
        out.print(f"[bold]{r.score:3d}[/] [yellow]{escape(r.rel)}[/]")
        for reason in r.reasons:
            out.print(f"      {escape(reason)}")
    more = f" (showing the worst {len(shown)}; --top 0 shows all)" if len(shown) < len(flagged) else ""
    out.print(f"{len(reports)} images, {len(flagged)} caption(s) with something to fix{more}")
    if clip_summary is not None and clip_summary["median"] is not None:
        median, threshold = clip_summary["median"], clip_summary["threshold"]
        out.print(f"CLIP similarity: dataset median {median:.3f}, flagged below {threshold:.3f}")
    return EXIT_OK


def _caption_clip(args: argparse.Namespace, reports: list[Any], err: Console) -> dict[str, Any] | None:
    """Add CLIP similarities (images with a caption) to `reports` (`caption_quality.apply_clip`); the `clip`
    part of --json, or None after printing why it failed."""
    from nyx_tui.datasets.caption_quality import apply_clip, clip_threshold

    captioned = [r for r in reports if r.caption and r.caption.strip()]
    try:
        from nyx_tui.tagging import clip_score

        with _progress("CLIP", enabled=not args.json):
            sims = clip_score.clip_similarities(
                [r.path for r in captioned], [r.caption for r in captioned], args.clip, device=args.device
            )
    except ImportError as e:
        err.print(f"[red]error[/]: --clip needs torch and transformers ({escape(str(e))}); install them")
        return None
    except Exception as e:  # ClipModelError (not found, not a CLIP model), an unreadable image, ...
        err.print(f"[red]error[/]: --clip {escape(args.clip)}: {escape(str(e))}")
        return None
    by_path = {r.path: s for r, s in zip(captioned, sims, strict=True)}
    apply_clip(reports, by_path)
    cut = clip_threshold(by_path.values())
    return {
        "model": args.clip,
        "median": None if cut is None else round(cut[0], 4),
        "threshold": None if cut is None else round(cut[1], 4),
        "similarities": {r.rel: round(s, 4) for r, s in zip(captioned, sims, strict=True)},
    }


# ------------------------------------------------------------------------------------------- quarantine


def cmd_quarantine(args: argparse.Namespace) -> int:
    from nyx_tui.datasets.dedupe import list_quarantine, restore

    err, out = _console(stderr=True), _console()
    root = Path(args.folder).expanduser().absolute()
    if not root.is_dir():
        return _bad_folder(err, NotADirectoryError(f"{root} is not a folder"))
    batches = list_quarantine(root)
    if args.restore:
        names = args.batch or None
        known = {b.name for b, _ in batches}
        unknown = [n for n in names or [] if n not in known]
        if unknown:
            err.print(
                f"[red]error[/]: no quarantine batch {', '.join(unknown)}; list them: nyx dataset quarantine {root}"
            )
            return EXIT_USAGE
        count = sum(len(m) for b, m in batches if names is None or b.name in names)
        if not count:
            err.print("the quarantine is empty: nothing to restore")
            return EXIT_OK
        ok = _confirm(
            args, err, f"Move {count} file(s) back into {root}?", f"nyx dataset quarantine {root} --restore --yes"
        )
        if ok is None:
            return EXIT_USAGE
        if not ok:
            err.print("nothing was moved")
            return EXIT_OK
        report = restore(root, names)
        if args.json:
            print(json.dumps(report.to_json(), indent=1))
        else:
            out.print(f"restored {len(report.moved)} file(s)")
            for path, why in report.skipped:
                out.print(f"[yellow]kept[/] {escape(path)}: {escape(why)}")
        return EXIT_OK
    if args.json:
        answer = [{"batch": b.name, "files": [m.to_json() for m in moves]} for b, moves in batches]
        print(json.dumps(answer, indent=1))
        return EXIT_OK
    if not batches:
        out.print("the quarantine is empty")
    for b, moves in batches:
        out.print(f"[bold]{escape(b.name)}[/]: {len(moves)} file(s)")
        for m in moves:
            if m.sidecar_of is None:
                out.print(f"    {escape(m.source)}  [dim]{escape(m.reason)}[/]")
    return EXIT_OK


# -------------------------------------------------------------------------------------------- parsers


def _threshold(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 64:
        raise argparse.ArgumentTypeError(f"{value} is outside 0..64 bits (6 finds resized, recompressed, cropped)")
    return value


def register(dsub: Any) -> None:
    """Add dedupe, filter, prep, captions-quality and quarantine to the `nyx dataset` subparsers."""
    move = argparse.ArgumentParser(add_help=False)
    move.add_argument(
        "--quarantine", action="store_true", help="move the extras and their captions to DIR/.nyx/quarantine/"
    )
    move.add_argument("-y", "--yes", action="store_true", help="do not ask before moving")
    move.add_argument("--json", action="store_true", help="print the result as JSON")
    move.add_argument("--cache", metavar="FILE", help="hash cache (default: the user cache folder)")

    dd = dsub.add_parser(
        "dedupe",
        parents=[move],
        help="find exact and near-duplicate images (resized, recompressed, cropped, mirrored)",
        description="Group duplicate images; the keeper of a group is the largest. Nothing is deleted: "
        "--quarantine moves the extras (with captions) to DIR/.nyx/quarantine/, undone by `nyx dataset "
        "quarantine DIR --restore`. Hashes are cached, so a second run reads only new or changed images.",
    )
    dd.add_argument("folder", metavar="DIR")
    dd.add_argument(
        "--threshold", type=_threshold, default=6, help="max perceptual-hash distance in bits (default 6; 0..64)"
    )
    dd.add_argument("--exact-only", action="store_true", help="only byte-identical copies (no image decoding)")
    dd.set_defaults(func=cmd_dedupe)

    flt = dsub.add_parser(
        "filter",
        parents=[move],
        help="flag images that are too small, too elongated or blurry",
        description="Score every image (shortest side, aspect ratio, sharpness) and list those failing a "
        "limit with the reasons; --quarantine moves them aside. A limit of 0 turns that check off.",
    )
    flt.add_argument("folder", metavar="DIR")
    flt.add_argument("--min-side", type=int, default=512, help="shortest side in px (default 512)")
    flt.add_argument("--max-aspect", type=float, default=3.0, help="longer/shorter side (default 3)")
    flt.add_argument(
        "--min-blur", type=float, default=50.0, help="sharpness: Laplacian variance at 512 px (default 50)"
    )
    flt.set_defaults(func=cmd_filter)

    prep = dsub.add_parser(
        "prep",
        help="write a resized / bucket-cropped / converted copy of a dataset (originals untouched)",
        description="Process every image into OUT (same relative paths; captions copied): EXIF rotation "
        "applied, alpha flattened, then the options below. Existing files in OUT are replaced.",
    )
    prep.add_argument("folder", metavar="DIR")
    prep.add_argument("--out", required=True, help="output folder (outside DIR)")
    prep.add_argument("--max-side", type=int, help="scale down so the longer side is at most this (never up)")
    prep.add_argument("--bucket-resolution", type=int, help="crop each image to its training bucket at this resolution")
    prep.add_argument("--bucket-step", type=int, default=64, help="bucket sides are multiples of this (default 64)")
    prep.add_argument("--bucket-min", type=int, help="smallest bucket side (as in the training config; default 256)")
    prep.add_argument("--bucket-max", type=int, help="largest bucket side (as in the training config; default 1024)")
    prep.add_argument("--flatten-alpha", default="white", metavar="COLOR", help="background for transparency")
    prep.add_argument("--format", choices=["png", "jpg", "webp"], help="output format (default: keep)")
    prep.add_argument("--quality", type=int, default=95, help="JPEG/WebP quality 1..100 (default 95)")
    prep.add_argument("--autocontrast", action="store_true", help="stretch each channel's levels (1%% clipped)")
    prep.add_argument("--white-balance", action="store_true", help="gray-world colour correction")
    prep.add_argument("--json", action="store_true", help="print the result as JSON")
    prep.set_defaults(func=cmd_prep)

    cq = dsub.add_parser(
        "captions-quality",
        help="score captions: empty, short, duplicate, unknown or conflicting tags (worst first)",
    )
    cq.add_argument("folder", metavar="DIR")
    cq.add_argument("--vocab", metavar="CSV", help="WD14 selected_tags.csv: flag tags not in it")
    cq.add_argument("--caption-ext", default=".txt", help="caption extension (default .txt)")
    cq.add_argument("--min-tags", type=int, default=3, help="fewer tags than this is `short` (default 3)")
    cq.add_argument(
        "--keep-tokens", type=int, default=0, help="leading tags (trigger words) not checked against --vocab"
    )
    cq.add_argument("--top", type=int, default=20, help="show the worst N (0: all; default 20)")
    cq.add_argument(
        "--clip",
        metavar="MODEL",
        help="also flag captions far from their image by CLIP similarity (a local CLIP folder or a cached repo id)",
    )
    cq.add_argument("--device", default=None, help="device for --clip (default: cuda if available, else cpu)")
    cq.add_argument("--json", action="store_true", help="print the result as JSON")
    cq.set_defaults(func=cmd_captions_quality)

    qr = dsub.add_parser("quarantine", help="list what dedupe/filter moved aside, or put it back (--restore)")
    qr.add_argument("folder", metavar="DIR")
    qr.add_argument("--restore", action="store_true", help="move the files back where they were")
    qr.add_argument("--batch", action="append", help="only this batch (repeatable; default: all)")
    qr.add_argument("-y", "--yes", action="store_true", help="do not ask before moving")
    qr.add_argument("--json", action="store_true", help="print the result as JSON")
    qr.set_defaults(func=cmd_quarantine)


__all__ = ["register"]
