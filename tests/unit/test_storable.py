"""What no store can keep is found before it is stored."""

from __future__ import annotations

import json

import pytest

from ondeck.storable import NOT_A_JSON_NUMBER, json_problem, value_problems


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        (b'{"a": "x"}', None),
        (b'{"a": "\\u00e9 \\u0041"}', None),
        (b'{"a": "\\ud83d\\ude00"}', None),  # a pair: one character
        (b'{"a": "\\\\u0000"}', None),  # a backslash, then "u0000"
        (b'{"a": "\\\\\\u0000"}', "a NUL character (\\u0000) at byte 9"),  # a backslash, then NUL
        (b'{"a": "\\u0000"}', "a NUL character (\\u0000) at byte 7"),
        (b'{"a": "\\ud800"}', "an unpaired surrogate escape at byte 7"),
        (b'{"a": "\\uDC00\\uD800"}', "an unpaired surrogate escape at byte 7"),  # the wrong order
        (b'{"a": "\\ud800x\\udc00"}', "an unpaired surrogate escape at byte 7"),
        (b'{"a": "\\ud800\\\\udc00"}', "an unpaired surrogate escape at byte 7"),
        (b'{"a": "\\ud83d\\ude00\\udc00"}', "an unpaired surrogate escape at byte 19"),
    ],
)
def test_json_text_is_checked_for_nul_and_unpaired_surrogates(raw: bytes, problem: str | None) -> None:
    assert json_problem(raw) == problem
    if problem is None:
        assert not list(value_problems(json.loads(raw)))  # as the parsed value is
    else:
        assert list(value_problems(json.loads(raw)))


def test_parsed_values_are_checked_with_their_paths() -> None:
    value = {
        "ok": ["x", 1, 2.5, None, True, "\U0001f600"],
        "nul": ["fine", "a\0b"],
        "lone": {"deep": "\ud800"},
        "nan": float("nan"),
        "keys": {"a\0": 1, "b": {"\udc00": 2}},
    }
    assert list(value_problems(value)) == [
        (("nul", 1), "text cannot hold a NUL character (\\u0000)"),
        (("lone", "deep"), "text cannot hold an unpaired surrogate"),
        (("nan",), NOT_A_JSON_NUMBER),
        (("keys",), "a key cannot hold a NUL character (\\u0000)"),
        (("keys", "b"), "a key cannot hold an unpaired surrogate"),
    ]
