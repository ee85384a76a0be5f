"""Sizes for people to read, in one spelling everywhere (messages, tables, pages)."""

from __future__ import annotations


def human_size(n: float) -> str:
    """A byte count for people to read: ``512 B``, ``1.5 KiB``, ``870.2 MiB``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"
