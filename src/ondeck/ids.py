"""Identifiers that sort by creation time, so keyset pagination by id is by age."""

from __future__ import annotations

import os
import threading
import time

_ALPHABET = "0123456789abcdefghjkmnpqrstvwxyz"  # Crockford base32, lower case
ID_PATTERN = f"[{_ALPHABET}]{{26}}"
_lock = threading.Lock()
_last = 0


def new_id() -> str:
    """A 26-character ULID-style id: 48 bits of milliseconds, 80 random bits.

    Monotonic within the process, as ULID's monotonic mode: an id made in the same
    millisecond as the one before it (or after the clock stepped back) is that one plus
    one, so runs admitted in a burst are claimed, and listed, in the order they came.
    """
    global _last
    value = (int(time.time() * 1000) << 80) | int.from_bytes(os.urandom(10), "big")
    with _lock:
        if value >> 80 <= _last >> 80:
            value = _last + 1
        _last = value
    chars = []
    for _ in range(26):
        value, index = divmod(value, 32)
        chars.append(_ALPHABET[index])
    return "".join(reversed(chars))
