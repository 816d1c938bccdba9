"""`nyx lora …`: one parser, whose actions each tool module adds (each module owns its parsers and handlers)."""

from __future__ import annotations

from typing import Any


def register(sub: Any) -> None:
    from nyx_tui.lora import cli_inspect, cli_resize, cli_share

    lora = sub.add_parser("lora", help="inspect, resize, merge, edit, convert, upload and compare LoRA files")
    lsub = lora.add_subparsers(dest="lora_command", metavar="ACTION", required=True)
    cli_inspect.add_parsers(lsub)
    cli_resize.add_parsers(lsub)
    cli_share.add_parsers(lsub)
