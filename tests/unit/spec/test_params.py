from __future__ import annotations

import pytest

from ondeck.errors import InvalidParams
from ondeck.spec.params import check_schema, validate_params

SCHEMA = {
    "type": "object",
    "required": ["service"],
    "additionalProperties": False,
    "properties": {
        "service": {"type": "string", "pattern": "^[a-z0-9-]+$"},
        "env": {"type": "string", "enum": ["dev", "prod"], "default": "dev"},
        "options": {"type": "object", "properties": {"force": {"type": "boolean", "default": False}}},
    },
}


def test_defaults_are_applied_including_nested() -> None:
    assert validate_params(SCHEMA, {"service": "api", "options": {}}) == {
        "service": "api",
        "env": "dev",
        "options": {"force": False},
    }


def test_every_failing_path_is_listed() -> None:
    with pytest.raises(InvalidParams) as caught:
        validate_params(SCHEMA, {"service": "Bad Name", "env": "qa", "extra": 1})
    paths = sorted(e["path"] for e in caught.value.extensions["errors"])
    assert paths == ["", "/env", "/service"]  # "": the params object itself (RFC 6901)
    assert "/service" in caught.value.detail
    assert "params: Additional properties are not allowed" in caught.value.detail


def test_paths_are_json_pointers_with_keys_escaped() -> None:
    schema = {"type": "object", "properties": {"a/b": {"type": "integer"}, "c~d": {"type": "integer"}}}
    with pytest.raises(InvalidParams) as caught:
        validate_params(schema, {"a/b": "x", "c~d": "y", "e/f": float("nan")})
    assert caught.value.extensions["errors"] == [
        {"path": "/e~1f", "message": "NaN and Infinity are not JSON numbers"}
    ]
    with pytest.raises(InvalidParams) as caught:
        validate_params(schema, {"a/b": "x", "c~d": "y"})
    assert [e["path"] for e in caught.value.extensions["errors"]] == ["/a~1b", "/c~0d"]


def test_missing_required_is_an_error() -> None:
    with pytest.raises(InvalidParams, match="service"):
        validate_params(SCHEMA, {})


def test_validation_does_not_mutate_the_input() -> None:
    given = {"service": "api"}
    validate_params(SCHEMA, given)
    assert given == {"service": "api"}


def test_schema_must_describe_an_object() -> None:
    with pytest.raises(ValueError, match="type: object"):
        check_schema({"type": "string"})
    with pytest.raises(ValueError, match="not a valid JSON Schema"):
        check_schema({"type": "object", "properties": {"x": {"type": 5}}})


def test_nan_and_infinity_anywhere_are_refused_with_their_paths() -> None:
    params = {"service": "api", "options": {"ratio": float("nan"), "range": [0, float("-inf")]}}
    with pytest.raises(InvalidParams, match="not JSON numbers") as caught:
        validate_params({"type": "object"}, params)
    paths = [e["path"] for e in caught.value.extensions["errors"]]
    assert paths == ["/options/ratio", "/options/range/1"]
