"""Values every store can keep.

Python's JSON and YAML parsers accept what no store can hold, and then a write fails
(PostgreSQL) or every later answer that holds it does (SQLite keeps it):

- ``NaN`` and ``Infinity``, which JSON has no form for;
- text holding ``\\u0000``, NUL (PostgreSQL's text and jsonb refuse it);
- text holding an unpaired surrogate such as ``\\ud800``: not a Unicode character,
  so not encodable as UTF-8.

Input is checked for them, and refused naming where it holds one.

JSON input is also parsed with one parser (``parse_json``), whose limits every route shares.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Iterable, Iterator
from typing import Any

import pydantic_core

NOT_A_JSON_NUMBER = "NaN and Infinity are not JSON numbers"
_SURROGATE = re.compile("[\ud800-\udfff]")

# A backslash run ending in "u" and four hex digits: an escape when the run is odd.
_ESCAPE = re.compile(rb"(\\+)u([0-9a-fA-F]{4})")


def json_problem(raw: bytes) -> str | None:
    """Why the JSON text ``raw`` cannot be stored (a NUL or an unpaired surrogate), with
    the byte where it is; None if it can (or holds no escape of either)."""
    if b"\\u" not in raw:  # the common case, at the cost of one scan
        return None
    paired_until = -1  # the end of the last high surrogate's escape, when a low one must follow
    for match in _ESCAPE.finditer(raw):
        if len(match.group(1)) % 2 == 0:
            continue  # an escaped backslash, then a plain "u"
        code, at = int(match.group(2), 16), match.end(1) - 1
        if paired_until >= 0:
            if at != paired_until or not 0xDC00 <= code <= 0xDFFF:
                return f"an unpaired surrogate escape at byte {paired_until - 6}"
            paired_until = -1
            continue
        if code == 0:
            return f"a NUL character (\\u0000) at byte {at}"
        if 0xD800 <= code <= 0xDBFF:
            paired_until = match.end()
        elif 0xDC00 <= code <= 0xDFFF:
            return f"an unpaired surrogate escape at byte {at}"
    if paired_until >= 0:
        return f"an unpaired surrogate escape at byte {paired_until - 6}"
    return None


# How deep ``parse_json`` takes JSON (its parser's limit). Answers are written by pydantic,
# whose serializer stops not far beyond (at 254 levels): a value stored deeper, such as a
# run's outputs, made every answer that held it a 500.
DEPTH_MAX = 200


def nesting(value: Any) -> int:
    """How many levels of objects and arrays ``value`` nests (0 for a scalar), counted
    level by level, without recursion."""
    depth, level = 0, [value]
    while containers := [item for item in level if isinstance(item, dict | list)]:
        depth += 1
        level = [child for item in containers for child in _members(item)]
    return depth


def _members(container: dict[str, Any] | list[Any]) -> Iterable[Any]:
    return container.values() if isinstance(container, dict) else container


def parse_json(text: str | bytes) -> Any:
    """``text`` parsed as the trigger route parses its body (pydantic's parser): JSON nested
    more than ``DEPTH_MAX`` levels deep, or holding a number of more than 4300 digits, is refused
    with a ``ValueError`` that says where. Python's parser took nesting up to its recursion
    limit, and the code that walks a value (validation, rendering, masking) then ran out of
    it: a 500."""
    return pydantic_core.from_json(text)


def finite_float(text: str) -> float:
    """``text`` as a float JSON can hold: for ``json.loads``, a number too large for a
    float (``1e400``) would be infinite."""
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is too large a number")
    return value


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def strict_json(text: str) -> Any:
    """``json.loads``, refusing what Python's parser takes beyond JSON: ``NaN`` and
    ``Infinity``, which JSON has no form for and no store keeps, and numbers too large
    for a float."""
    return json.loads(text, parse_constant=_no_constant, parse_float=finite_float)


def load_json(raw: bytes) -> Any:
    """``raw`` parsed by ``parse_json`` once ``json_problem`` finds nothing in it; a
    ``ValueError`` says why not."""
    problem = json_problem(raw)
    if problem is not None:
        raise ValueError(f"strings cannot hold {problem}")
    return parse_json(raw)


def bounded(text: str, limit: int) -> str:
    """``text`` in at most ``limit`` characters (a column's width), as it is if it fits.

    Text a sender chose (an event's id, a Slack user id) may be longer: it keeps its start,
    to be recognised, and ends in the SHA-256 of the whole, so that two texts alike in
    their first characters still differ.
    """
    if len(text) <= limit:
        return text
    digest = hashlib.sha256(text.encode()).hexdigest()
    return f"{text[: limit - len(digest) - 1]}~{digest}"


def url_problem(path: str, query: bytes) -> str | None:
    """Why a request's path or query string cannot be stored or looked up (a NUL), or None."""
    if "\x00" in path:
        return "the path holds a NUL character (%00)"
    if b"%00" in query or b"\x00" in query:
        return "the query string holds a NUL character (%00)"
    return None


def _text_problem(text: str) -> str | None:
    if "\x00" in text:
        return "a NUL character (\\u0000)"
    if _SURROGATE.search(text):  # a parser joins each pair: any left is unpaired
        return "an unpaired surrogate"
    return None


def value_problems(
    value: Any, path: tuple[str | int, ...] = ()
) -> Iterator[tuple[tuple[str | int, ...], str]]:
    """Where the parsed ``value`` holds what no store can keep, and what: (path, message).
    A key that cannot be kept is reported at its object (the path cannot name it)."""
    if isinstance(value, float) and not math.isfinite(value):
        yield path, NOT_A_JSON_NUMBER
    elif isinstance(value, str):
        if problem := _text_problem(value):
            yield path, f"text cannot hold {problem}"
    elif isinstance(value, dict):
        for key, item in value.items():
            if problem := _text_problem(str(key)):
                yield path, f"a key cannot hold {problem}"
            else:
                yield from value_problems(item, (*path, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from value_problems(item, (*path, index))
