"""Human durations (``90s``, ``10m``, ``1h30m``) and sizes (``512MiB``)."""

from __future__ import annotations

import math
import re
from collections.abc import Callable

DAY = 86400.0
YEAR = 365 * DAY
# Sizes become resource limits and file offsets: 64-bit, and signed in places.
MAX_SIZE = 2**63 - 1
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": DAY}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B?|B)?\s*$", re.IGNORECASE)
_SIZE_FACTORS = {"": 1, "b": 1, "k": 1000, "m": 1000**2, "g": 1000**3, "t": 1000**4}


def parse_duration(value: str | int | float) -> float:
    """Seconds in ``value``: a number of seconds or a string such as ``1h30m``."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        if value < 0:
            raise ValueError("a duration cannot be negative")
        return _finite(value)
    if not isinstance(value, str):  # a bool, or a list or an object from JSON or YAML
        raise ValueError("a duration is a number of seconds or a string like 90s, 10m, 1h")
    text = value.strip().lower().replace(" ", "")
    if re.fullmatch(r"\d+(\.\d+)?", text):
        return _finite(float(text))
    pos, total = 0, 0.0
    for match in _DURATION.finditer(text):
        if match.start() != pos:
            break
        total += float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
        pos = match.end()
    if pos != len(text) or not text:
        raise ValueError(f"invalid duration {value!r}: use forms like 90s, 10m, 1h30m")
    return _finite(total)


def _finite(seconds: int | float) -> float:
    """``seconds`` as a float; too many digits would make it infinite (or, for an int, not
    convert at all), which no clock or date can add."""
    try:
        result = float(seconds)
    except OverflowError:
        result = math.inf
    if not math.isfinite(result):
        raise ValueError("a duration must be a finite number of seconds")
    return result


def within(low: float, high: float) -> Callable[[float], float]:
    """A check that a duration is from ``low`` to ``high`` seconds, for a field's validator;
    its error says both in the form a user writes them."""

    def check(seconds: float) -> float:
        if not low <= seconds <= high:
            if low:
                raise ValueError(f"must be from {format_duration(low)} to {format_duration(high)}")
            raise ValueError(f"must be at most {format_duration(high)}")
        return seconds

    return check


def parse_size(value: str | int) -> int:
    """Bytes in ``value``: a number of bytes or ``512MiB``, ``2GB``, ``10M``."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise ValueError("a size cannot be negative")
        return _at_most_max_size(value)
    if not isinstance(value, str):  # a bool, or a float from JSON or YAML
        raise ValueError("a size is a whole number of bytes or a string like 512MiB")
    match = _SIZE.match(value)
    if not match:
        raise ValueError(f"invalid size {value!r}: use forms like 512MiB, 2GiB, 1000000")
    number, unit = float(match.group(1)), (match.group(2) or "").lower()
    prefix = unit[:1] if unit not in ("b", "") else ""
    factor = 1024 ** ("kmgt".index(prefix) + 1) if "i" in unit else _SIZE_FACTORS[prefix]
    return _at_most_max_size(number * factor)


def _at_most_max_size(size: float) -> int:
    if not size <= MAX_SIZE:  # also refuses an infinite one (too many digits)
        raise ValueError(f"a size is at most {MAX_SIZE} bytes")
    return int(size)


def format_duration(seconds: float) -> str:
    """``seconds`` as a short human string, the inverse of ``parse_duration``."""
    if seconds < 1:
        return f"{seconds * 1000:.0f}ms"
    if seconds < 60:
        return f"{seconds:g}s"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    parts = [(days, "d"), (hours, "h"), (minutes, "m"), (secs, "s")]
    return "".join(f"{count}{unit}" for count, unit in parts if count)
