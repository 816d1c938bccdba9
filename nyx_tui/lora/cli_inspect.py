"""`nyx lora inspect | meta | convert`: what a LoRA file holds, its metadata (shown or edited), its layout.

Imported at parser build time: module-level imports stay light (no torch, no numpy, no rich); the handlers
import what they use. Exit codes: 0 done, 1 bad input or a refused conversion (the message names the problem
and the fix; nothing was written).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.console import Console

    from nyx_tui.lora.inspect import LoraInfo

EXIT_OK, EXIT_FAILED = 0, 1
_BAR = 30
_SHOWN_TAGS = 25
_LONG = 160  # metadata values longer than this are cut in the table (all of them: --json)


def _console(stderr: bool = False) -> Console:
    from rich.console import Console

    return Console(stderr=stderr, highlight=False)


def _error(problem: str, fix: str | None = None) -> int:
    from rich.markup import escape

    err = _console(stderr=True)
    err.print(f"[red]error[/]: {escape(problem)}", soft_wrap=True)
    if fix:
        err.print(f"  [green]fix[/]: {escape(fix)}", soft_wrap=True)
    return EXIT_FAILED


def _file_error(e: Exception) -> int:
    from nyx_tui.lora.header import LoraFileError

    if isinstance(e, LoraFileError):
        return _error(e.problem, e.fix)
    return _error(str(e))


def _short(key: str, value: str) -> str:
    """A metadata value for a table: data: URIs summarised, long values cut."""
    if value.startswith("data:"):
        mime = value[5:].split(";", 1)[0]
        return f"<{mime}, {len(value) * 3 // 4 // 1000} KB>"
    value = value.replace("\n", " ⏎ ")
    return value if len(value) <= _LONG else value[: _LONG - 1] + "…"


# ---------------------------------------------------------------------------------------------- inspect


def _print_info(out: Console, info: LoraInfo, modules: bool) -> None:
    from rich.markup import escape
    from rich.table import Table

    from nyx_tui.lora.inspect import format_size

    family = info.family or "unknown"
    if info.family_source == "keys":
        family += " (from module names)"
    out.print(f"[bold]{escape(Path(info.path).name)}[/]  {format_size(info.file_size)}")
    summary = Table(box=None, pad_edge=False, show_header=False)
    summary.add_column(style="cyan")
    summary.add_column()
    rank, alpha = info.rank, info.alpha

    def span(s: Any) -> str:
        if s.min is None:
            return "-"
        if s.min == s.max:
            return f"{s.min:g}"
        return f"{s.min:g}–{s.max:g} (most {s.most_common:g})"

    rows = [
        ("title", info.title),
        ("family", family),
        ("network", info.network),
        ("key format", info.key_format),
        ("modules", ", ".join(f"{n} {part}" for part, n in info.components.items())),
        ("rank", span(rank)),
        ("alpha", span(alpha)),
        ("parameters", f"{info.parameters:,}"),
        ("dtypes", ", ".join(f"{d} ×{n}" for d, n in info.dtypes.items())),
    ]
    for k, v in rows:
        summary.add_row(k, escape(str(v)))
    out.print(summary)
    if info.training:
        out.print("\n[bold]training[/]")
        t = Table(box=None, pad_edge=False, show_header=False)
        t.add_column(style="cyan")
        t.add_column()
        for k, v in info.training.items():
            text = json.dumps(v) if isinstance(v, (dict, list)) else str(v)
            t.add_row(k, escape(text if len(text) <= _LONG else text[: _LONG - 1] + "…"))
        out.print(t)
    if info.tag_frequency:
        out.print(f"\n[bold]tags[/] ({len(info.tag_frequency)} distinct, {len(info.datasets)} folders)")
        shown = info.tag_frequency[:_SHOWN_TAGS]
        most = shown[0][1] or 1
        width = max(len(t) for t, _ in shown)
        for tag, n in shown:
            out.print(f"  {escape(tag):<{width}} {n:>6} {'█' * max(1, round(_BAR * n / most))}")
        if len(info.tag_frequency) > _SHOWN_TAGS:
            out.print(f"  … and {len(info.tag_frequency) - _SHOWN_TAGS} more (all of them: --json)")
    spec = {k: v for k, v in info.metadata.items() if k.startswith("modelspec.")}
    if spec:
        out.print("\n[bold]modelspec[/]")
        _meta_table(out, spec)
    other = [k for k in info.metadata if not k.startswith(("ss_", "modelspec."))]
    if other:
        out.print(f"other metadata: {escape(', '.join(other))}")
    if modules:
        out.print("\n[bold]modules[/]")
        t = Table(box=None, pad_edge=False)
        for col in ("module", "kind", "rank", "alpha", "out", "in", "kernel", "params"):
            t.add_column(col, justify="left" if col in ("module", "kind") else "right")
        for m in info.modules:
            t.add_row(
                escape(m.name),
                m.kind,
                str(m.rank) if m.rank is not None else "-",
                f"{m.alpha:g}" if m.alpha is not None else "-",
                str(m.out_features or "-"),
                str(m.in_features or "-"),
                "×".join(map(str, m.kernel)) if m.kernel else "-",
                f"{m.params:,}",
            )
        out.print(t)
    for p in info.problems:
        out.print(f"[yellow]warning[/] {escape(p)}")


def cmd_inspect(args: argparse.Namespace) -> int:
    from nyx_tui.lora.header import LoraFileError
    from nyx_tui.lora.inspect import inspect_lora

    try:
        info = inspect_lora(Path(args.file))
    except LoraFileError as e:
        return _file_error(e)
    if args.json:
        data = info.to_json()
        if not args.modules:
            data["modules"] = len(info.modules)
        sys.stdout.write(json.dumps(data, ensure_ascii=False, indent=1) + "\n")
    else:
        _print_info(_console(), info, args.modules)
    return EXIT_OK


# ---------------------------------------------------------------------------------------------- meta


def _meta_table(out: Console, meta: dict[str, str]) -> None:
    from rich.markup import escape
    from rich.table import Table

    t = Table(box=None, pad_edge=False, show_header=False)
    t.add_column(style="cyan", no_wrap=True)
    t.add_column(overflow="fold")
    for k in sorted(meta):
        t.add_row(escape(k), escape(_short(k, meta[k])))
    out.print(t)


_SHORTCUTS = (
    ("title", "modelspec.title"),
    ("author", "modelspec.author"),
    ("description", "modelspec.description"),
    ("trigger", "modelspec.trigger_phrase"),
    ("license", "modelspec.license"),
    ("thumbnail", "modelspec.thumbnail"),
)


def _updates(args: argparse.Namespace) -> dict[str, str | None] | str:
    """The edits asked for, or an error message."""
    updates: dict[str, str | None] = {}
    for item in args.set or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            return f"--set {item!r}: expected KEY=VALUE (e.g. --set modelspec.title='My LoRA')"
        updates[key.strip()] = value
    for attr, key in _SHORTCUTS:
        value = getattr(args, attr)
        if value is not None:
            updates[key] = value
    for key in args.unset or []:
        updates[key] = None
    return updates


def cmd_meta(args: argparse.Namespace) -> int:
    from rich.markup import escape

    from nyx_tui.lora.header import LoraFileError
    from nyx_tui.lora.metadata import read_metadata, write_metadata

    updates = _updates(args)
    if isinstance(updates, str):
        return _error(updates)
    try:
        before = read_metadata(Path(args.file))
        if not updates:
            if args.json:
                sys.stdout.write(json.dumps(before, ensure_ascii=False, indent=1) + "\n")
            elif before:
                _meta_table(_console(), before)
            else:
                _console().print("no metadata (add some: nyx lora meta FILE --title T --author A …)")
            return EXIT_OK
        if args.output and Path(args.output).exists() and Path(args.output).is_dir():
            return _error(f"-o {args.output} is a folder", "name the output file (-o folder/name.safetensors)")
        written = write_metadata(Path(args.file), updates, Path(args.output) if args.output else None)
        after = read_metadata(written)
    except LoraFileError as e:
        return _file_error(e)
    out = _console()
    for key, value in updates.items():
        if value is None:
            out.print(f"[red]-[/] {escape(key)}" + ("" if key in before else " (was not set)"))
        else:
            out.print(f"[green]+[/] {escape(key)} = {escape(_short(key, after.get(key, '')))}")
    out.print(f"wrote {escape(str(written))} (tensors unchanged)")
    return EXIT_OK


# ---------------------------------------------------------------------------------------------- convert


def cmd_convert(args: argparse.Namespace) -> int:
    from rich.markup import escape

    from nyx_tui.lora.convert import convert_file
    from nyx_tui.lora.header import LoraFileError
    from nyx_tui.lora.inspect import inspect_lora

    out_path = Path(args.output)
    if out_path.is_dir():
        return _error(f"-o {out_path} is a folder", "name the output file (-o folder/name.safetensors)")
    try:
        written = convert_file(Path(args.input), out_path, args.to, args.family, fix_prefix=args.fix_prefix)
        info = inspect_lora(written)
    except LoraFileError as e:
        return _file_error(e)
    _console().print(
        f"wrote {escape(str(written))}: {args.to} layout, {len(info.modules)} modules, "
        f"family {info.family or args.family or 'unknown'}"
    )
    return EXIT_OK


# ---------------------------------------------------------------------------------------------- parsers


def add_parsers(lsub: Any) -> None:
    """`inspect`, `meta` and `convert` under `nyx lora`."""
    insp = lsub.add_parser("inspect", help="what a LoRA file holds: family, kind, ranks, training, tags")
    insp.add_argument("file", help="the .safetensors LoRA")
    insp.add_argument("--json", action="store_true", help="print everything as JSON")
    insp.add_argument("--modules", action="store_true", help="list every module (name, kind, rank, alpha, shape)")
    insp.set_defaults(func=cmd_inspect)

    meta = lsub.add_parser(
        "meta", help="show or edit a LoRA's metadata (title, author, trigger words…); tensors stay byte-identical"
    )
    meta.add_argument("file", help="the .safetensors LoRA")
    meta.add_argument("--set", action="append", metavar="KEY=VALUE", help="set a metadata key (repeatable)")
    meta.add_argument("--unset", action="append", metavar="KEY", help="delete a metadata key (repeatable)")
    meta.add_argument("--title", help="modelspec.title")
    meta.add_argument("--author", help="modelspec.author")
    meta.add_argument("--description", help="modelspec.description")
    meta.add_argument("--trigger", metavar="WORDS", help="modelspec.trigger_phrase: the words that call the LoRA")
    meta.add_argument("--license", help="modelspec.license")
    meta.add_argument("--thumbnail", metavar="IMG", help="an image: stored as modelspec.thumbnail (≤ 256 px)")
    meta.add_argument("-o", "--output", metavar="OUT", help="write a new file (default: edit FILE in place)")
    meta.add_argument("--json", action="store_true", help="with no edits: print the metadata as JSON")
    meta.set_defaults(func=cmd_meta)

    conv = lsub.add_parser("convert", help="convert between kohya and diffusers layouts; repair LyCORIS prefixes")
    conv.add_argument("input", help="the .safetensors LoRA")
    conv.add_argument("-o", "--output", required=True, metavar="OUT", help="the file to write")
    conv.add_argument("--to", required=True, choices=("kohya", "diffusers"), help="the layout to write")
    conv.add_argument(
        "--family", choices=("sd15", "sd2", "sdxl", "flux", "sd3"), help="when the file does not say (inspect tells)"
    )
    conv.add_argument(
        "--fix-prefix", action="store_true", help="rename LyCORIS' lycoris_ (or missing) prefixes to kohya's"
    )
    conv.set_defaults(func=cmd_convert)
