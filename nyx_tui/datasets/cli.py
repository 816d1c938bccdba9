"""`nyx dataset …`: the dataset commands. This module owns the `dataset` group and scan/stats/tags; the
tools (dedupe, filter, prep) register theirs from `datasets.cli_tools`.

Imported by `nyx_tui.cli` at parser build time: keep module-level imports light (no torch, no Textual).

Exit codes: 0 ok (`scan` and `stats` print layout problems and still exit 0; `scan --strict` exits 1 on an
error-level problem), 1 the action failed (captions not written because they changed on disk, nothing to
undo), 2 bad input (no such folder, a bad option or rules file; nothing was changed).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.console import Console

    from nyx_tui.datasets.scan import Dataset
    from nyx_tui.datasets.tags import BatchResult
    from nyx_tui.datasets.undo import UndoResult

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
_BAR = 30  # width of a histogram bar


def _console(stderr: bool = False) -> Console:
    from rich.console import Console

    return Console(stderr=stderr, highlight=False)


def _print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, ensure_ascii=False, indent=1) + "\n")


def _scan(args: argparse.Namespace, *, read_sizes: bool = True, caption_ext: str | None = None) -> Dataset | None:
    """Scan DIR, or print why not (None: exit 2)."""
    from rich.markup import escape

    from nyx_tui.datasets.scan import scan

    err = _console(stderr=True)
    try:
        return scan(Path(args.dir), caption_ext or args.caption_ext, read_sizes=read_sizes)
    except FileNotFoundError:
        err.print(
            f"[red]error[/]: {escape(args.dir)} does not exist; check the path (the folder of images, or of "
            "their `N_name` folders)"
        )
    except NotADirectoryError:
        err.print(f"[red]error[/]: {escape(args.dir)} is a file, not a folder; pass the folder that holds it")
    except ValueError as e:
        err.print(f"[red]error[/]: --caption-ext: {escape(str(e))}")
    except PermissionError as e:
        err.print(f"[red]error[/]: cannot read {escape(args.dir)} ({e.strerror}); check its permissions")
    return None


def _print_problems(console: Console, ds: Dataset, limit: int | None = None) -> None:
    from rich.markup import escape

    colours = {"error": "bold red", "warning": "yellow", "info": "cyan"}
    shown = ds.problems if limit is None else ds.problems[:limit]
    for p in shown:
        console.print(f"[{colours.get(p.severity, 'white')}]{p.severity}[/] {escape(p.message)}")
        console.print(f"  [green]fix[/]: {escape(p.fix)}")
    if len(shown) < len(ds.problems):
        console.print(f"… and {len(ds.problems) - len(shown)} more problems (all of them: --json)")


# ---------------------------------------------------------------------------------------------- scan


def cmd_scan(args: argparse.Namespace) -> int:
    from rich.markup import escape
    from rich.table import Table

    ds = _scan(args)
    if ds is None:
        return EXIT_USAGE
    errors = sum(p.severity == "error" for p in ds.problems)
    if args.json:
        _print_json(ds.to_json())
    else:
        out = _console()
        info = ds.to_json()
        folders = [f for f in ds.folders if f.images]
        unreadable = f" ({len(ds.unreadable)} unreadable)" if ds.unreadable else ""
        out.print(
            f"[bold]{escape(str(ds.root))}[/]: {len(ds.images)} images{unreadable} in "
            f"{len(folders)} folder{'s' if len(folders) != 1 else ''}, scanned in {ds.seconds:.2f} s"
        )
        out.print(
            f"captions ({ds.caption_ext}): {info['captioned']} captioned, {info['missing_captions']} missing, "
            f"{info['empty_captions']} empty; {len(ds.orphans)} without an image"
        )
        if folders:
            table = Table(box=None, pad_edge=False)
            for col in ("folder", "repeats", "class token", "images", "captioned"):
                table.add_column(col, justify="right" if col in ("repeats", "images", "captioned") else "left")
            captioned: dict[str, int] = {}
            for e in ds.images:
                captioned[e.folder] = captioned.get(e.folder, 0) + e.has_caption
            for f in folders:
                table.add_row(
                    escape(f.rel or "."),
                    str(f.kohya.repeats) if f.kohya else "-",
                    escape(f.kohya.name) if f.kohya else "-",
                    str(f.images),
                    str(captioned.get(f.rel, 0)),
                )
            out.print(table)
        if ds.problems:
            _print_problems(out, ds, None if args.all else 30)
        else:
            out.print("[green]no layout problems[/]")
    return EXIT_FAILED if args.strict and errors else EXIT_OK


# --------------------------------------------------------------------------------------------- stats


def _bars(console: Console, rows: list[tuple[str, int]], *, skip_zero: bool = True) -> None:
    from rich.markup import escape

    rows = [(k, n) for k, n in rows if n or not skip_zero]
    if not rows:
        console.print("  (none)")
        return
    most = max(n for _, n in rows) or 1
    width = max(len(k) for k, _ in rows)
    for k, n in rows:
        bar = "█" * max(1 if n else 0, round(_BAR * n / most))
        console.print(f"  {escape(k):<{width}} {n:>6} {bar}")


def cmd_stats(args: argparse.Namespace) -> int:
    from rich.markup import escape

    from nyx_tui.datasets.stats import BucketSettings, compute_stats

    err = _console(stderr=True)
    base = BucketSettings()
    caption_ext = args.caption_ext
    if args.config:
        from nyx_tui.config.errors import ConfigError
        from nyx_tui.config.io import load_config

        try:
            cfg = load_config(Path(args.config))
        except ConfigError as e:
            err.print(f"[red]error[/]: --config: {escape(e.format())}")
            return EXIT_USAGE
        base = BucketSettings.from_config(cfg.dataset)
        caption_ext = caption_ext or cfg.dataset.caption_extension

    def given(value: int | None, default: int) -> int:
        return default if value is None else value

    settings = BucketSettings(
        given(args.resolution, base.resolution),
        base.enable_bucket if args.bucket is None else args.bucket,
        given(args.min_bucket_reso, base.min_bucket_reso),
        given(args.max_bucket_reso, base.max_bucket_reso),
        given(args.bucket_steps, base.bucket_reso_steps),
        base.bucket_no_upscale or args.no_upscale,
    )
    bad = _check_settings(settings)
    if bad:
        err.print(f"[red]error[/]: {bad}")
        return EXIT_USAGE
    ds = _scan(args, caption_ext=caption_ext or ".txt")
    if ds is None:
        return EXIT_USAGE
    st = compute_stats(ds, settings)
    if args.json:
        _print_json({"root": str(ds.root), "caption_ext": ds.caption_ext, **st.to_json(args.top)})
        return EXIT_OK
    out = _console()
    out.print(
        f"[bold]{escape(str(ds.root))}[/]: {st.images} images ({st.unreadable} unreadable), "
        f"{st.with_repeats} trained an epoch (repeats applied)"
    )
    out.print(
        f"captions ({ds.caption_ext}): {st.captioned} ({st.missing_captions} missing, {st.empty_captions} empty); "
        f"{st.unique_tags} distinct tags, {st.tags_per_caption:.1f} per caption"
    )
    out.print("\n[bold]shorter side[/] (px)")
    _bars(out, st.short_side)
    out.print("\n[bold]aspect ratio[/] (nearest, width:height)")
    _bars(out, st.aspect)
    if st.sizes:
        out.print("\n[bold]most common sizes[/]")
        _bars(out, [(f"{w}x{h}", n) for (w, h), n in st.sizes[: min(args.top, 10)]])
    s = st.settings
    if not s.enable_bucket:
        how = "no bucketing: every image is cropped to the square"
    elif s.bucket_no_upscale:
        how = f"bucketing, no upscale, steps {s.bucket_reso_steps}"
    else:
        how = f"bucketing {s.min_bucket_reso}-{s.max_bucket_reso} px, steps {s.bucket_reso_steps}"
    out.print(f"\n[bold]buckets at {s.resolution}[/] ({how}): images (with repeats)")
    _bars(out, [(f"{b.size[0]}x{b.size[1]} ({b.with_repeats})", b.images) for b in st.buckets])
    if st.smaller_than_resolution:
        note = "kept at their size" if s.bucket_no_upscale else "enlarged"
        out.print(f"  {st.smaller_than_resolution} images are smaller than {s.resolution}² pixels ({note})")
    out.print(f"\n[bold]top tags[/] (captions holding each; {st.unique_tags} in all)")
    _bars(out, st.tags[: args.top])
    errors = [p for p in ds.problems if p.severity == "error"]
    if ds.problems:
        out.print(
            f"\n{len(ds.problems)} layout problem(s), {len(errors)} error(s): nyx dataset scan "
            f"{escape(args.dir)} lists them with fixes"
        )
    return EXIT_OK


def _check_settings(s: Any) -> str | None:
    if not 64 <= s.resolution <= 8192:
        return f"--resolution {s.resolution}: use 64 to 8192 (e.g. 512 for SD1.5, 1024 for SDXL/Flux)"
    if not 8 <= s.bucket_reso_steps <= 1024:
        return f"--bucket-steps {s.bucket_reso_steps}: use 8 to 1024 (64 is usual)"
    if s.min_bucket_reso < s.bucket_reso_steps:
        return f"--min-bucket-reso {s.min_bucket_reso} is below the bucket steps ({s.bucket_reso_steps}): raise it"
    if s.min_bucket_reso > s.max_bucket_reso:
        return (
            f"--min-bucket-reso {s.min_bucket_reso} is above --max-bucket-reso {s.max_bucket_reso}: swap or change them"
        )
    return None


# ---------------------------------------------------------------------------------------------- tags


def _tags_op(args: argparse.Namespace, ds: Dataset) -> tuple[Any, str, bool]:
    """The operation, its description (for the journal) and whether it may create captions. Raises
    ValueError (a bad argument) or RulesError (a bad rules file)."""
    from nyx_tui.datasets import tags as t

    action = args.tags_action
    freq = t.tag_frequencies(ds.images)
    if action == "add":
        where = " at front" if args.front else ""
        return t.add_tags(args.tags, front=args.front), f"add {_q(args.tags)}{where}", not args.skip_uncaptioned
    if action == "remove":
        return t.remove_tags(args.tags), f"remove {_q(args.tags)}", False
    if action == "replace":
        return t.replace_tag(args.old, args.new), f"replace {_q([args.old])} with {_q([args.new])}", False
    if action == "prune":
        if args.below < 1:
            raise ValueError(f"--below {args.below}: give a count of captions, 2 or more (1 removes nothing)")
        return (
            t.prune_tags(freq, args.below, keep_tokens=args.keep_tokens),
            f"prune tags in fewer than {args.below} captions",
            False,
        )
    if action == "front":
        return t.move_to_front(args.tags), f"move {_q(args.tags)} to front", False
    if action == "dedupe":
        return t.dedupe_tags(), "dedupe tags", False
    if action == "sort":
        keep = f", keeping the first {args.keep_tokens}" if args.keep_tokens else ""
        return (
            t.sort_tags(args.by, keep_tokens=args.keep_tokens, frequencies=freq),
            f"sort tags by {args.by}{keep}",
            False,
        )
    if action in ("alias", "imply"):
        rules = t.load_rules(Path(args.file))
        if action == "alias":
            if not rules.aliases:
                raise t.RulesError(f"{args.file} holds no aliases (lines like `kitty -> cat`)")
            return t.apply_aliases(rules.aliases), f"aliases from {args.file}", False
        if not rules.implications:
            raise t.RulesError(f"{args.file} holds no implications (lines like `cat ears => animal ears`)")
        return t.apply_implications(rules.implications), f"implications from {args.file}", False
    raise ValueError(f"unknown action {action!r}")


def _q(tags: list[str]) -> str:
    return ", ".join(json.dumps(x, ensure_ascii=False) for x in tags)


def _batch_json(ds: Dataset, r: BatchResult) -> dict[str, Any]:
    return {
        "action": r.action,
        "dry_run": r.dry_run,
        "changed": len(r.edits),
        "written": len(r.written),
        "conflicts": [ds.rel(p) for p in r.conflicts],
        "errors": [{"path": ds.rel(p), "error": m} for p, m in r.errors],
        "batch": r.batch_id,
        "journal": str(r.journal) if r.journal else None,
        "changes": [
            {
                "caption": ds.rel(e.caption_path),
                "before": e.before,
                "after": e.after,
                "added": e.added,
                "removed": e.removed,
            }
            for e in r.edits
        ],
    }


def cmd_tags(args: argparse.Namespace) -> int:
    from rich.markup import escape

    from nyx_tui.datasets import tags as t

    if args.tags_action == "undo":
        return _cmd_undo(args)
    err = _console(stderr=True)
    ds = _scan(args, read_sizes=False)
    if ds is None:
        return EXIT_USAGE
    try:
        op, action, create = _tags_op(args, ds)
    except (ValueError, t.RulesError) as e:
        err.print(f"[red]error[/]: {escape(str(e))}")
        return EXIT_USAGE
    selection = t.select(ds.images, args.only or (), args.has or ())
    if (args.only or args.has) and not selection:
        err.print(
            "[yellow]no image matches --only/--has[/]: check the pattern (a path relative to DIR, a "
            "glob like `10_mychar/*` or `*.png`, or a folder)"
        )
        return EXIT_USAGE
    edits = t.plan(selection, op, create_missing=create)
    result = t.apply_edits(ds.root, edits, action, dry_run=args.dry_run)
    if args.json:
        _print_json(_batch_json(ds, result))
        return EXIT_OK if result.ok else EXIT_FAILED
    out = _console()
    scope = f"{len(selection)} of {len(ds.images)} images" if (args.only or args.has) else f"{len(ds.images)} images"
    for edit in result.edits[: args.show]:
        parts = []
        if edit.removed:
            parts.append("[red]-[/] " + escape(", ".join(edit.removed)))
        if edit.added:
            parts.append("[green]+[/] " + escape(", ".join(edit.added)))
        if not parts:
            parts.append("[cyan]reordered[/]: " + escape(edit.after))
        created = " (new)" if edit.before is None else ""
        out.print(f"  {escape(ds.rel(edit.caption_path))}{created}: " + "  ".join(parts))
    if len(result.edits) > args.show:
        out.print(f"  … and {len(result.edits) - args.show} more (--show N lists more, --json lists all)")
    if args.dry_run:
        out.print(f"dry run: {action} would change {len(result.edits)} captions ({scope}); nothing was written")
        return EXIT_OK
    if not result.edits:
        out.print(f"{action}: no caption changes ({scope})")
        return EXIT_OK
    out.print(f"{action}: wrote {len(result.written)} of {len(result.edits)} captions ({scope})")
    if result.written:
        out.print(f"undo with: nyx dataset tags {escape(args.dir)} undo   (batch {result.batch_id})")
    for p in result.conflicts:
        err.print(f"[red]conflict[/]: {escape(ds.rel(p))} changed on disk since it was read; not overwritten")
    for p, m in result.errors:
        err.print(f"[red]error[/]: {escape(ds.rel(p))}: {escape(m)}")
    if result.conflicts:
        err.print("  fix: run the command again: it reads the captions as they are now")
    return EXIT_OK if result.ok else EXIT_FAILED


def _undo_json(root: Path, r: UndoResult) -> dict[str, Any]:
    def rel(p: Path) -> str:
        try:
            return p.relative_to(root).as_posix()
        except ValueError:
            return str(p)

    return {
        "batch": r.batch.id,
        "action": r.batch.action,
        "dry_run": r.dry_run,
        "restored": [rel(p) for p in r.restored],
        "unchanged": [rel(p) for p in r.unchanged],
        "conflicts": [rel(p) for p in r.conflicts],
        "errors": [{"path": rel(p), "error": m} for p, m in r.errors],
    }


def _cmd_undo(args: argparse.Namespace) -> int:
    import time

    from rich.markup import escape

    from nyx_tui.datasets.undo import Journal, NothingToUndo

    err = _console(stderr=True)
    root = Path(args.dir).expanduser().absolute()
    if not root.is_dir():
        err.print(f"[red]error[/]: {escape(args.dir)} is not a folder; pass the dataset folder the edits were made in")
        return EXIT_USAGE
    journal = Journal(root)
    if args.list:
        batches = journal.batches()
        if args.json:
            _print_json(
                [
                    {"batch": b.id, "t": b.t, "action": b.action, "files": len(b.files), "undone": b.undone is not None}
                    for b in batches
                ]
            )
            return EXIT_OK
        out = _console()
        if not batches:
            out.print("no caption edits recorded")
        for b in batches:
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(b.t))
            state = " [dim](undone)[/]" if b.undone is not None else ""
            out.print(f"{b.id:>4}  {when}  {len(b.files):>5} captions  {escape(b.action)}{state}")
        return EXIT_OK
    try:
        result = journal.undo(args.batch, dry_run=args.dry_run)
    except NothingToUndo as e:
        err.print(f"[yellow]{escape(str(e))}[/]")
        return EXIT_FAILED
    if args.json:
        _print_json(_undo_json(root, result))
        return EXIT_OK if result.ok else EXIT_FAILED
    out = _console()
    verb = "would restore" if args.dry_run else "restored"
    out.print(
        f"undo batch {result.batch.id} ({escape(result.batch.action)}): {verb} {len(result.restored)} captions"
        + (f", {len(result.unchanged)} already as before" if result.unchanged else "")
    )
    for p in result.conflicts:
        err.print(
            f"[red]conflict[/]: {escape(str(p.relative_to(root)))} was edited after the batch; left as it is "
            "(edit it by hand if needed)"
        )
    for p, m in result.errors:
        err.print(f"[red]error[/]: {escape(str(p))}: {escape(m)} (fix it, then undo again: the batch stays undoable)")
    return EXIT_OK if result.ok else EXIT_FAILED


# ------------------------------------------------------------------------------------------- parsers


def _add_scan_parsers(dsub: Any) -> None:
    scan = dsub.add_parser(
        "scan",
        help="list a dataset's images, captions and kohya folders, and its layout problems with fixes",
        description="Scan DIR (recursively): images with their sizes, captions, kohya `N_name` folders, unreadable "
        "images, and layout problems, each with its fix. Exits 0 even with problems (--strict: 1 on errors).",
    )
    scan.add_argument("dir", metavar="DIR", help="the dataset folder (images, or `N_name` folders of images)")
    scan.add_argument("--caption-ext", default=".txt", help="caption file extension the trainer reads (default .txt)")
    scan.add_argument("--json", action="store_true", help="print a JSON object (counts, folders, problems)")
    scan.add_argument("--strict", action="store_true", help="exit 1 when a problem is an error")
    scan.add_argument("--all", action="store_true", help="print every problem (default: the first 30)")
    scan.set_defaults(func=cmd_scan)

    stats = dsub.add_parser(
        "stats",
        help="sizes, aspect ratios, buckets and tag frequencies of a dataset",
        description="Histograms of DIR's image sizes and aspect ratios, the buckets a training resolution makes "
        "(sd-scripts' enable_bucket rules) with how many images fall in each, and the most common tags.",
    )
    stats.add_argument("dir", metavar="DIR", help="the dataset folder")
    stats.add_argument("--resolution", type=int, help="training resolution (default 1024, or the config's)")
    stats.add_argument(
        "--config",
        metavar="FILE",
        help="take resolution, bucketing and caption extension from a "
        "training config's [dataset] (options given here still win)",
    )
    stats.add_argument(
        "--bucket",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="aspect-ratio bucketing (enable_bucket); --no-bucket: one square size (default on, or the config's)",
    )
    stats.add_argument("--min-bucket-reso", type=int, help="smallest bucket side (default 256)")
    stats.add_argument("--max-bucket-reso", type=int, help="largest bucket side (default 1024)")
    stats.add_argument("--bucket-steps", type=int, help="bucket sides are multiples of this (default 64)")
    stats.add_argument("--no-upscale", action="store_true", help="bucket_no_upscale: never enlarge an image")
    stats.add_argument("--caption-ext", default=None, help="caption file extension (default .txt)")
    stats.add_argument("--top", type=int, default=30, help="how many tags (and sizes) to list (default 30)")
    stats.add_argument("--json", action="store_true", help="print a JSON object")
    stats.set_defaults(func=cmd_stats)


def _add_tags_parser(dsub: Any) -> None:
    tags = dsub.add_parser(
        "tags",
        help="edit the tags of captions in bulk: add, remove, replace, prune, sort, aliases… (with undo)",
        description="Edit the comma-separated tags of DIR's captions. Every change is written atomically, never "
        "over a caption edited meanwhile (reported as a conflict, exit 1), and recorded so `undo` puts it back. "
        "See docs/datasets.md.",
    )
    tags.add_argument("dir", metavar="DIR", help="the dataset folder")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--caption-ext", default=".txt", help="caption file extension (default .txt)")
    common.add_argument("--dry-run", action="store_true", help="show what would change; write nothing")
    common.add_argument("--json", action="store_true", help="print a JSON object")
    common.add_argument("--show", type=int, default=20, help="list this many changed captions (default 20)")
    sel = argparse.ArgumentParser(add_help=False)
    sel.add_argument(
        "--only",
        action="append",
        metavar="GLOB",
        help="only these images: a path relative to DIR, a glob (`10_mychar/*`, `*.png`) or a folder; repeat for more",
    )
    sel.add_argument("--has", action="append", metavar="TAG", help="only captions holding this tag (repeatable)")
    keep = argparse.ArgumentParser(add_help=False)
    keep.add_argument(
        "--keep-tokens",
        type=int,
        default=0,
        metavar="N",
        help="leave the first N tags of each caption in place (the config's keep_tokens)",
    )
    asub = tags.add_subparsers(dest="tags_action", metavar="ACTION", required=True)
    parents = [common, sel]

    p = asub.add_parser("add", parents=parents, help="add tags (at the end, or --front)")
    p.add_argument("tags", nargs="+", metavar="TAG")
    p.add_argument("--front", action="store_true", help="insert at the start (e.g. a trigger word)")
    p.add_argument(
        "--skip-uncaptioned",
        action="store_true",
        help="leave images without a caption file alone (default: create the caption)",
    )
    p = asub.add_parser("remove", parents=parents, help="remove tags")
    p.add_argument("tags", nargs="+", metavar="TAG")
    p = asub.add_parser("replace", parents=parents, help="rename a tag (an empty NEW removes it)")
    p.add_argument("old", metavar="OLD")
    p.add_argument("new", metavar="NEW")
    p = asub.add_parser(
        "prune", parents=[*parents, keep], help="remove tags held by fewer than N captions of the whole dataset"
    )
    p.add_argument("--below", type=int, required=True, metavar="N", help="remove tags in fewer than N captions")
    p = asub.add_parser("front", parents=parents, help="move tags to the start of the caption")
    p.add_argument("tags", nargs="+", metavar="TAG")
    asub.add_parser("dedupe", parents=parents, help="drop repeated tags within each caption")
    p = asub.add_parser("sort", parents=[*parents, keep], help="sort tags alphabetically or by frequency")
    p.add_argument("--by", choices=("alpha", "frequency"), default="alpha", help="order (default alpha)")
    p = asub.add_parser("alias", parents=parents, help="rewrite tags by the aliases of a rules file (kitty -> cat)")
    p.add_argument("file", metavar="FILE", help="rules file (.txt lines `old -> new`, or .toml [aliases])")
    p = asub.add_parser(
        "imply", parents=parents, help="add implied tags by the implications of a rules file (cat ears => animal ears)"
    )
    p.add_argument("file", metavar="FILE", help="rules file (.txt lines `tag => implied`, or .toml [implications])")
    p = asub.add_parser("undo", parents=[common], help="put back the captions of the last batch (or --batch N)")
    p.add_argument("--batch", type=int, metavar="N", help="undo this batch (see --list) instead of the last one")
    p.add_argument("--list", action="store_true", help="list the recorded batches")
    tags.set_defaults(func=cmd_tags)


def register(sub: Any) -> None:
    """Add `dataset` and its actions to the `nyx` subparsers."""
    dataset = sub.add_parser("dataset", help="scan, inspect and clean a folder of images and captions")
    dsub = dataset.add_subparsers(dest="dataset_command", metavar="ACTION", required=True)
    _add_scan_parsers(dsub)
    _add_tags_parser(dsub)
    from nyx_tui.datasets import cli_tools

    cli_tools.register(dsub)


__all__ = ["register"]
