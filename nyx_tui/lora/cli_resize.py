"""`nyx lora resize` and `nyx lora merge`: the parsers and their handlers (the work is in `resize`/`merge`).

Imported at `nyx` start-up: nothing heavy at module level (torch comes with the handlers). Exit codes as the
rest of the CLI: 0 done, 2 bad input (a clear message, nothing written).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

EXIT_OK, EXIT_USAGE = 0, 2


def add_parsers(lsub: Any) -> None:
    resize = lsub.add_parser(
        "resize",
        help="bring a LoRA/LoCon to a lower rank (fixed, or per module by its singular values, as sd-scripts)",
        description="Resize a kohya-format LoRA/LoCon: per module, the SVD of up·down cut to the new rank, alpha "
        "scaled so the strength stays (new alpha = alpha/rank × new rank). Dynamic methods pick the rank per "
        "module exactly as sd-scripts' resize_lora.py (docs/lora-resize-merge.md has the rule).",
    )
    resize.add_argument("input", metavar="IN", help="the LoRA file (.safetensors)")
    resize.add_argument("-o", "--output", required=True, metavar="OUT", help="the resized file to write")
    how = resize.add_mutually_exclusive_group(required=True)
    how.add_argument("--rank", type=int, metavar="R", help="fixed new rank (never above a module's own rank)")
    how.add_argument(
        "--dynamic",
        choices=("sv_ratio", "sv_fro", "sv_cumulative"),
        help="pick each module's rank from its singular values (needs --param)",
    )
    resize.add_argument(
        "--param",
        type=float,
        metavar="X",
        help="the dynamic method's parameter: sv_ratio keeps S > S[0]/X (e.g. 20); sv_fro and sv_cumulative keep "
        "that fraction of the Frobenius norm / of the sum of singular values (0 < X ≤ 1, e.g. 0.9)",
    )
    resize.add_argument(
        "--max-rank", type=int, metavar="R", help="cap for a dynamic rank (sd-scripts' --new_rank; default: own rank)"
    )
    resize.add_argument(
        "--conv-rank", type=int, metavar="R", help="rank (or cap) for convolution modules (default: as the others)"
    )
    resize.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where the SVDs run (default cpu)")
    resize.add_argument(
        "--precision", choices=("fp16", "bf16", "fp32"), help="dtype of the saved file (default: the input's)"
    )
    resize.add_argument("--json", action="store_true", help="print the report as JSON (for scripts)")
    resize.set_defaults(func=cmd_resize)

    merge = lsub.add_parser(
        "merge",
        help="merge LoRAs into one (concat or svd), or bake them into a base model (--base)",
        description="Merge LoRAs, each with an optional weight (IN:WEIGHT, default 1). Without --base: one LoRA "
        "file, concat (exact: ranks add up, ΔW = Σ w·ΔW) or svd (the summed ΔW cut to --rank). With --base: the "
        "LoRAs baked into the model's weights (a diffusers folder → a diffusers folder; a .safetensors "
        "checkpoint in original key names → one file).",
    )
    merge.add_argument("inputs", nargs="+", metavar="IN[:WEIGHT]", help="LoRA files, each with an optional weight")
    merge.add_argument("-o", "--output", required=True, metavar="OUT", help="the merged LoRA / model to write")
    merge.add_argument("--mode", choices=("concat", "svd"), default="concat", help="LoRA + LoRA: how (default concat)")
    merge.add_argument("--rank", type=int, metavar="R", help="--mode svd: the merged rank")
    merge.add_argument("--conv-rank", type=int, metavar="R", help="--mode svd: rank of 3x3 convolutions")
    merge.add_argument(
        "--clamp-quantile",
        type=float,
        metavar="Q",
        help="--mode svd: clamp up/down to this quantile of their values, as sd-scripts does (0.99); default none",
    )
    merge.add_argument("--base", metavar="MODEL", help="bake into this base model (diffusers folder or checkpoint)")
    merge.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where the math runs (default cpu)")
    merge.add_argument(
        "--precision",
        choices=("fp16", "bf16", "fp32"),
        help="dtype of the output (default: the first LoRA's; with --base, each weight keeps its own)",
    )
    merge.add_argument("--json", action="store_true", help="print the report as JSON (for scripts)")
    merge.set_defaults(func=cmd_merge)


def _quiet() -> None:
    """lora_io (the hashes) imports peft, which imports bitsandbytes, whose CPU backend warns about an optional
    kernel package on import: noise for a resize or merge."""
    import logging

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


def _error(message: str) -> int:
    from rich.console import Console

    Console(stderr=True, highlight=False).print(f"[bold red]error[/]: {message}", highlight=False, soft_wrap=True)
    return EXIT_USAGE


def cmd_resize(args: argparse.Namespace) -> int:
    from nyx_tui.lora.resize import LoraFileError, resize_lora

    _quiet()
    if args.dynamic is None and args.param is not None:
        return _error("--param goes with --dynamic METHOD; a fixed --rank takes none")
    if args.dynamic is None and args.max_rank is not None:
        return _error("--max-rank caps a --dynamic rank; with a fixed --rank give the rank itself")
    try:
        report = resize_lora(
            args.input,
            args.output,
            rank=args.rank,
            dynamic=args.dynamic,
            param=args.param,
            max_rank=args.max_rank,
            conv_rank=args.conv_rank,
            device=args.device,
            precision=args.precision,
        )
    except LoraFileError as e:
        return _error(str(e))
    if args.json:
        sys.stdout.write(report.to_json() + "\n")
        return EXIT_OK
    from rich.console import Console
    from rich.table import Table

    how = "fixed rank" if report.method == "fixed" else f"{report.method} {report.param:g}"
    table = Table(title=f"resize ({how}) → {report.output}", title_justify="left")
    for column, justify in (("module", "left"), ("kind", "left"), ("rank", "right"), ("alpha", "right"),
                            ("fro kept", "right"), ("sum(S) kept", "right")):  # fmt: skip
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    for m in report.modules:
        table.add_row(
            m.name,
            m.kind,
            f"{m.old_rank} → {m.new_rank}",
            f"{m.old_alpha:g} → {m.new_alpha:g}",
            f"{m.fro_retained:.1%}",
            f"{m.sum_retained:.1%}",
        )
    console = Console(highlight=False)
    console.print(table)
    old = sum(m.old_rank for m in report.modules)
    new = sum(m.new_rank for m in report.modules)
    console.print(
        f"{len(report.modules)} modules, ranks {old} → {new} in all; mean Frobenius norm kept {report.mean_fro:.2%}; "
        f"saved {report.precision}" + (f"; {len(report.kept)} other tensors copied unchanged" if report.kept else "")
    )
    return EXIT_OK


def cmd_merge(args: argparse.Namespace) -> int:
    from nyx_tui.lora.merge import bake, merge_loras, parse_source
    from nyx_tui.lora.resize import LoraFileError

    _quiet()
    sources = [parse_source(text) for text in args.inputs]
    try:
        if args.base:
            if args.rank is not None or args.conv_rank is not None or args.mode != "concat":
                return _error("--mode/--rank make a merged LoRA; with --base the LoRAs are baked in at full rank")
            report = bake(sources, args.base, args.output, precision=args.precision, device=args.device)
        else:
            report = merge_loras(
                sources,
                args.output,
                mode=args.mode,
                rank=args.rank,
                conv_rank=args.conv_rank,
                precision=args.precision,
                device=args.device,
                clamp_quantile=args.clamp_quantile,
            )
    except LoraFileError as e:
        return _error(str(e))
    if args.json:
        sys.stdout.write(report.to_json() + "\n")
        return EXIT_OK
    from rich.console import Console
    from rich.table import Table

    console = Console(highlight=False)
    names = ", ".join(f"{path}×{weight:g}" for path, weight in report.sources)
    if report.mode == "bake":
        table = Table(title=f"baked {names} → {report.output}", title_justify="left")
        table.add_column("weight file")
        table.add_column("LoRA modules baked", justify="right")
        for fid, count in report.baked.items():
            table.add_row(fid, str(count))
        console.print(table)
        return EXIT_OK
    table = Table(title=f"merged ({report.mode}) {names} → {report.output}", title_justify="left")
    table.add_column("module")
    table.add_column("files", justify="right")
    table.add_column("rank", justify="right")
    table.add_column("alpha", justify="right")
    if report.mode == "svd":
        table.add_column("fro kept", justify="right")
    for m in report.modules:
        row = [m.name, str(m.files), str(m.rank), f"{m.alpha:g}"]
        if report.mode == "svd":
            row.append(f"{report.fro_retained.get(m.name, float('nan')):.1%}")
        table.add_row(*row)
    console.print(table)
    console.print(f"{len(report.modules)} modules written to {report.output}")
    return EXIT_OK
