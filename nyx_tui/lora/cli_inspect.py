"""Placeholder: its helper fills in the parsers."""

from __future__ import annotations

from typing import Any


def add_parsers(lsub: Any) -> None:
    return None
