"""Parsing and formatting of sizes and durations as the spec defines them; how progress is counted."""

from __future__ import annotations

import re
from typing import Callable

from infercache.errors import BadInputError

#: How a long operation reports progress: (done, total), in items or in bytes, as the operation says
#: (the CLI turns it into a bar: cli.common.progress_bar).
ProgressCallback = Callable[[int, int], None]

_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1 << 10,
    "m": 1 << 20,
    "g": 1 << 30,
    "t": 1 << 40,
    "p": 1 << 50,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgtp]?)(i?b)?\s*$", re.IGNORECASE)

_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$", re.IGNORECASE)


def parse_size(text: str | int) -> int:
    """Bytes from '64M', '1.5G', '4KiB', '512' (binary units, case-insensitive)."""
    if isinstance(text, int):
        if text < 0:
            raise BadInputError(f"size must not be negative: {text}")
        return text
    match = _SIZE_RE.match(str(text))
    if not match:
        raise BadInputError(f"unparsable size {text!r} (expected e.g. 512, 64M, 1.5G, 4KiB)")
    number, unit, _suffix = match.groups()
    return int(float(number) * _SIZE_UNITS[unit.lower()])


def parse_duration(text: str | int | float) -> float:
    """Seconds from '90m', '2h', '7d', '2w', '30s' or a bare number of seconds."""
    if isinstance(text, (int, float)):
        if text < 0:
            raise BadInputError(f"duration must not be negative: {text}")
        return float(text)
    match = _DURATION_RE.match(str(text))
    if not match:
        raise BadInputError(f"unparsable duration {text!r} (expected e.g. 30s, 90m, 2h, 7d, 2w)")
    number, unit = match.groups()
    return float(number) * _DURATION_UNITS[(unit or "s").lower()]


def format_size(num_bytes: int | float) -> str:
    """Human size in binary units: 1536 -> '1.5 KiB'."""
    value = float(num_bytes)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")
