from __future__ import annotations

import http.server
import re
import threading

import pytest
from referencing.exceptions import Unresolvable

from ondeck.errors import InvalidParams
from ondeck.spec.params import (
    SCHEMA_DEPTH_MAX,
    check_schema,
    json_pointer,
    masked,
    sensitive_paths,
    sensitive_values,
    validate_params,
)
from ondeck.storable import nesting

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


def test_values_no_store_can_keep_are_refused_anywhere_with_their_paths() -> None:
    """Params come from schedules, events and ChatOps too, not only from parsed JSON."""
    params = {
        "service": "a\0b",
        "options": {"ratio": float("nan"), "range": [0, float("-inf")], "who": "\ud800"},
    }
    with pytest.raises(InvalidParams, match="not JSON numbers") as caught:
        validate_params({"type": "object"}, params)
    paths = [e["path"] for e in caught.value.extensions["errors"]]
    assert paths == ["/service", "/options/ratio", "/options/range/1", "/options/who"]
    assert "\0" not in caught.value.detail and "\ud800" not in caught.value.detail


SENSITIVE = {
    "type": "object",
    "$defs": {"login": {"type": "object", "properties": {"pw": {"type": "string", "format": "password"}}}},
    "properties": {
        "password": {"type": "string", "writeOnly": True, "pattern": "^[a-z]+$"},
        "creds": {"$ref": "#/$defs/login"},
        "keys": {"type": "array", "items": {"type": "string", "writeOnly": True}},
        "either": {"anyOf": [{"type": "integer", "writeOnly": True}]},
        "name": {"type": "string"},
    },
}


def test_sensitive_values_are_found_at_any_depth_and_masked() -> None:
    params = {
        "password": "pw",
        "creds": {"pw": "x", "user": "u"},
        "keys": ["k1", "k2"],
        "either": 7,
        "name": "n",
    }
    assert sorted(map(json_pointer, sensitive_paths(SENSITIVE, params))) == [
        "/creds/pw",
        "/either",
        "/keys/0",
        "/keys/1",
        "/password",
    ]
    assert masked(SENSITIVE, params) == {
        "password": "***",
        "creds": {"pw": "***", "user": "u"},
        "keys": ["***", "***"],
        "either": "***",
        "name": "n",
    }
    assert params["creds"] == {"pw": "x", "user": "u"}  # the input is left alone
    assert sorted(sensitive_values(SENSITIVE, params)) == ["7", "k1", "k2", "pw", "x"]
    assert masked({"type": "object", "writeOnly": True}, {"a": 1}) == "***"


def test_members_and_items_named_by_pattern_or_position_are_found_too() -> None:
    schema = {
        "type": "object",
        "properties": {
            "tokens": {"type": "object", "additionalProperties": {"type": "string", "writeOnly": True}},
            "env": {
                "type": "object",
                "properties": {"HOME": {"type": "string"}},
                "patternProperties": {"_KEY$": {"writeOnly": True}, "[": {}},  # a bad pattern matches none
            },
            "pair": {"type": "array", "prefixItems": [{"type": "string"}, {"format": "password"}]},
            "rest": {"type": "array", "prefixItems": [{"type": "string"}], "items": {"writeOnly": True}},
        },
    }
    params = {
        "tokens": {"github": "t1", "slack": "t2"},
        "env": {"HOME": "/h", "API_KEY": "k", "OTHER": "o"},
        "pair": ["user", "pw"],
        "rest": ["first", "r1", "r2"],
    }
    assert sorted(map(json_pointer, sensitive_paths(schema, params))) == [
        "/env/API_KEY",
        "/pair/1",
        "/rest/1",
        "/rest/2",
        "/tokens/github",
        "/tokens/slack",
    ]
    assert sorted(sensitive_values(schema, params)) == ["k", "pw", "r1", "r2", "t1", "t2"]


def test_errors_never_quote_a_sensitive_value() -> None:
    with pytest.raises(InvalidParams) as caught:
        validate_params(SENSITIVE, {"password": "Hunter2Secret", "creds": {"pw": 5}, "name": 3})
    assert "Hunter2Secret" not in str(caught.value.extensions) and "Hunter2Secret" not in caught.value.detail
    assert caught.value.extensions["errors"] == [
        {"path": "/creds/pw", "message": "not valid (type)"},
        {"path": "/name", "message": "3 is not of type 'string'"},
        {"path": "/password", "message": "not valid (pattern)"},
    ]
    # A message about the object around it quotes it too: masked there.
    schema = {**SENSITIVE, "maxProperties": 1}
    with pytest.raises(InvalidParams) as caught:
        validate_params(schema, {"password": "hunter", "name": "n"})
    assert "hunter" not in caught.value.detail and "***" in caught.value.detail


def _with(x: object, **more: object) -> dict[str, object]:
    return {"type": "object", "properties": {"x": x}, **more}


@pytest.mark.parametrize(
    ("schema", "ref"),
    [
        (_with({"$ref": "#/$defs/nope"}), "#/$defs/nope"),
        (_with({"$ref": "other.json"}), "other.json"),
        (_with({"$ref": "https://schemas.example/x.json"}), "https://schemas.example/x.json"),
        (_with({"items": {"$ref": "#/$defs/gone"}}), "#/$defs/gone"),
        # Reached only through another $ref (definitions is not a 2020-12 keyword).
        (
            _with({"$ref": "#/definitions/a"}, definitions={"a": {"$ref": "#/definitions/b"}}),
            "#/definitions/b",
        ),
    ],
)
def test_a_ref_that_does_not_resolve_within_the_schema_is_refused(
    schema: dict[str, object], ref: str
) -> None:
    """Else every trigger failed with a 500 (or the validator fetched a URL's schema)."""
    with pytest.raises(ValueError, match=f"\\$ref '{re.escape(ref)}' does not resolve"):
        check_schema(schema)


@pytest.mark.parametrize(
    "schema",
    [
        _with({"$ref": "#/$defs/a"}, **{"$defs": {"a": {"type": "string"}}}),
        _with({"$ref": "#/$defs/tree"}, **{"$defs": {"tree": {"items": {"$ref": "#/$defs/tree"}}}}),
        _with({"$ref": "#name"}, **{"$defs": {"a": {"$anchor": "name"}}}),
        _with({"$id": "https://schemas.example/x", "$defs": {"b": {}}, "$ref": "#/$defs/b"}),
        _with({"$ref": "#"}),
    ],
    ids=["defs", "cycle", "anchor", "nested-id", "root"],
)
def test_refs_within_the_schema_are_accepted(schema: dict[str, object]) -> None:
    check_schema(schema)
    validate_params(schema, {})


def _nested(levels: int) -> dict[str, object]:
    schema: dict[str, object] = {}
    for _ in range(levels - 3):  # the object, its properties, then each schema a level
        schema = {"items": schema}
    return {"type": "object", "properties": {"x": schema}}


def test_a_schema_nested_too_deep_is_refused_before_the_metaschema_recurses_through_it() -> None:
    """Checking one 200 levels deep ran out of Python's recursion limit: a 500 at its PUT."""
    assert nesting(_nested(SCHEMA_DEPTH_MAX)) == SCHEMA_DEPTH_MAX
    check_schema(_nested(SCHEMA_DEPTH_MAX))
    for levels in (SCHEMA_DEPTH_MAX + 1, 200):
        with pytest.raises(ValueError, match=f"params nests more than {SCHEMA_DEPTH_MAX} levels"):
            check_schema(_nested(levels))


def test_validating_never_fetches_a_ref_from_the_network() -> None:
    """``check_schema`` refuses a ``$ref`` to a URL; were one to reach the validator all
    the same (stored under an older release, say), jsonschema's default would fetch it,
    from the server, at every trigger."""
    fetched: list[str] = []

    class Schemas(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            fetched.append(self.path)
            body = b'{"type": "string"}'
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), Schemas) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        url = f"http://127.0.0.1:{server.server_address[1]}/name.json"
        schema = {"type": "object", "properties": {"name": {"$ref": url}}}
        try:
            with pytest.raises(Unresolvable, match=r"name\.json"):
                validate_params(schema, {"name": "x"})
        finally:
            server.shutdown()
    assert fetched == []
