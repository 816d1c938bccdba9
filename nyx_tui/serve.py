"""Placeholder: its helper fills in the command."""

from __future__ import annotations

from typing import Any


def register(sub: Any) -> None:
    return None
