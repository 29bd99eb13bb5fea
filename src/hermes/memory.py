"""Byte sizes, budget parsing and process memory readings (RSS). A leaf module: imports nothing from hermes
except errors."""
from __future__ import annotations

import math
import re

from hermes.errors import BudgetError

_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3, "t": 1000**4, "tb": 1000**4,
    "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4,
}
_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*$")


def parse_bytes(text: str | float, *, what: str = "budget") -> int:
    """Parse a size such as ``"300MiB"``, ``"1.5GB"``, ``"4096"`` or an int into a positive number of bytes.

    Raises:
        BudgetError: the text does not parse, or is zero or negative.
    """
    if isinstance(text, bool):
        raise BudgetError(f"{what} must be a size such as '300MiB' or '2GB', got {text!r}")
    if isinstance(text, (int, float)):
        value = float(text)
        if not math.isfinite(value) or value <= 0:
            raise BudgetError(f"{what} must be a positive size such as '300MiB' or '2GB', got {text!r}")
        return int(value)
    match = _SIZE_RE.match(str(text))
    if str(text).strip().startswith("-"):
        raise BudgetError(f"{what} must be positive, got {text!r}; use a size such as '300MiB' or '2GB'")
    if not match or match.group(2).lower() not in _UNITS:
        raise BudgetError(
            f"cannot parse {what} {text!r}: use a number with an optional unit "
            "(B, KB, MB, GB, KiB, MiB, GiB), e.g. '300MiB' or '1.5GB'"
        )
    value = float(match.group(1)) * _UNITS[match.group(2).lower()]
    if value < 1:
        raise BudgetError(f"{what} must be positive, got {text!r}; use a size such as '300MiB' or '2GB'")
    return int(value)


def format_bytes(n: float) -> str:
    """Human-readable binary size: ``format_bytes(3 * 2**20) == '3.0 MiB'``."""
    sign = "-" if n < 0 else ""
    n = abs(float(n))
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{sign}{n:.0f} {unit}" if unit == "B" else f"{sign}{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _status_field(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not found in /proc/self/status")


def current_rss() -> int:
    """Resident set size of this process, in bytes."""
    return _status_field("VmRSS")


def peak_rss() -> int:
    """Peak resident set size of this process (VmHWM) since start or since the last :func:`reset_peak_rss`."""
    return _status_field("VmHWM")


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter to the current RSS. Returns False where the kernel refuses."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:
        return False
