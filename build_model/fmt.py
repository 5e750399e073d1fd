"""Formatting for progress lines."""

from __future__ import annotations


def human_size(nbytes: float) -> str:
    """`3.1 MB`-style sizes (powers of 1024), for 'wrote X (size)' lines."""
    for unit in ("B", "KB", "MB"):
        if nbytes < 1024:
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    return f"{nbytes:.1f} GB"
