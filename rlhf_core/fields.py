"""Documented dataclass fields: each training and model setting carries its one-line help."""

from __future__ import annotations

from dataclasses import field
from typing import Any


def documented(default: Any, help: str) -> Any:
    """A dataclass field with ``help`` in its metadata (where settings tables read it from)."""
    return field(default=default, metadata={"help": help})
