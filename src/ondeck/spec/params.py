"""Parameter validation against an automation's JSON Schema (2020-12)."""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import operator
import re
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError
from referencing import Registry
from referencing.exceptions import Unresolvable
from referencing.jsonschema import DRAFT202012

from ondeck.errors import InvalidParams
from ondeck.masking import MASK, Masker
from ondeck.storable import finite_float, nesting, strict_json, value_problems

# Checking a schema against the metaschema takes a dozen frames per level: one nested far
# less deep than a JSON body may be (200 levels) ran out of Python's recursion limit.
SCHEMA_DEPTH_MAX = 64


def param_env_name(name: str) -> str:
    """The environment variable a top-level param reaches a script as."""
    return "ONDECK_PARAM_" + re.sub(r"[^A-Za-z0-9]", "_", name).upper()


def check_schema(schema: dict[str, Any]) -> None:
    """Raise ``ValueError`` unless ``schema`` is a valid JSON Schema for an object."""
    if nesting(schema) > SCHEMA_DEPTH_MAX:
        raise ValueError(f"params nests more than {SCHEMA_DEPTH_MAX} levels of objects and arrays")
    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError as exc:
        raise ValueError(f"params is not a valid JSON Schema: {exc.message}") from exc
    if schema.get("type") != "object":
        raise ValueError("params must be a JSON Schema with type: object")
    unresolved = _unresolved_refs(schema)
    if unresolved:
        refs = ", ".join(map(repr, unresolved))
        raise ValueError(
            f"$ref {refs} does not resolve: a $ref must point within the schema, like #/$defs/name"
        )


def _unresolved_refs(schema: dict[str, Any]) -> list[str]:
    """The ``$ref``s the validator would meet and fail to resolve, at every trigger (or,
    for one to a URL, fetch from the network): every subschema, and every one a ``$ref``
    leads to, is looked at once, with no resolution beyond the schema itself."""
    root = DRAFT202012.create_resource(schema)
    pending = [(root, Registry().resolver_with_root(root))]
    seen: set[int] = set()
    unresolved: list[str] = []
    while pending:
        resource, resolver = pending.pop()
        if id(resource.contents) in seen:  # a $ref cycle, or one reached twice
            continue
        seen.add(id(resource.contents))
        resolver = resolver.in_subresource(resource)
        ref = resource.contents.get("$ref") if isinstance(resource.contents, Mapping) else None
        if isinstance(ref, str):
            try:
                resolved = resolver.lookup(ref)
            except Unresolvable:
                unresolved.append(ref)
            else:
                pending.append((DRAFT202012.create_resource(resolved.contents), resolved.resolver))
        pending.extend((sub, resolver) for sub in resource.subresources())
    return unresolved


def _apply_defaults(schema: dict[str, Any], value: Any) -> None:
    if not isinstance(value, dict):
        return
    for name, prop in (schema.get("properties") or {}).items():
        if not isinstance(prop, dict):
            continue
        if name not in value and "default" in prop:
            value[name] = copy.deepcopy(prop["default"])
        if name in value:
            _apply_defaults(prop, value[name])


@functools.lru_cache(maxsize=512)
def _validator(schema: str) -> Draft202012Validator:
    """One validator per schema text: building one (its reference registry) costs more
    than validating a typical run's params with it, and a built one is immutable.

    Its registry is empty: without one, jsonschema fetches a ``$ref`` to a URL from the
    network, from the server, at every trigger. ``check_schema`` refuses such a schema
    already; this keeps one stored or built some other way from reaching out."""
    return Draft202012Validator(json.loads(schema), registry=Registry())


def json_pointer(parts: Iterable[str | int]) -> str:
    """The RFC 6901 pointer to ``parts`` (keys and indexes): ``""`` is the whole document,
    and ``~`` and ``/`` in keys are written ``~0`` and ``~1``."""
    return "".join("/" + str(part).replace("~", "~0").replace("/", "~1") for part in parts)


def _is_sensitive(schema: Mapping[str, Any]) -> bool:
    return bool(schema.get("writeOnly")) or schema.get("format") == "password"


def _subschemas(schema: Any, root: Mapping[str, Any], depth: int = 0) -> Iterator[Mapping[str, Any]]:
    """``schema`` and those it brings in: a local ``$ref``, ``allOf``, ``anyOf``, ``oneOf``."""
    if not isinstance(schema, Mapping) or depth > 32:  # a $ref cycle
        return
    yield schema
    ref = schema.get("$ref")
    if isinstance(ref, str) and ref.startswith("#/"):
        target: Any = root
        for part in ref[2:].split("/"):
            key = part.replace("~1", "/").replace("~0", "~")
            target = target.get(key) if isinstance(target, Mapping) else None
        yield from _subschemas(target, root, depth + 1)
    for keyword in ("allOf", "anyOf", "oneOf"):
        for sub in schema.get(keyword) or ():
            yield from _subschemas(sub, root, depth + 1)


def sensitive_paths(
    schema: Mapping[str, Any],
    value: Any,
    path: tuple[str | int, ...] = (),
    root: Mapping[str, Any] | None = None,
) -> Iterator[tuple[str | int, ...]]:
    """The paths of the values in ``value`` that ``schema`` marks ``writeOnly`` or
    ``format: password``, at any depth (through properties, patternProperties,
    additionalProperties, items, prefixItems, local ``$ref`` and the ``*Of``
    combinators): values the audit log, errors and logs must not show."""
    root = schema if root is None else root
    schemas = list(_subschemas(schema, root))
    if any(_is_sensitive(sub) for sub in schemas):
        yield path
        return
    for sub in schemas:  # a path reached through several subschemas comes more than once
        if isinstance(value, dict):
            for key, item in value.items():
                for applied in _member_schemas(sub, str(key)):
                    yield from sensitive_paths(applied, item, (*path, key), root)
        elif isinstance(value, list):
            for index, item in enumerate(value):
                for applied in _item_schemas(sub, index):
                    yield from sensitive_paths(applied, item, (*path, index), root)


def _mappings(*candidates: Any) -> list[Mapping[str, Any]]:
    return [candidate for candidate in candidates if isinstance(candidate, Mapping)]


def _member_schemas(schema: Mapping[str, Any], key: str) -> list[Mapping[str, Any]]:
    """The subschemas of ``schema`` that apply to its member ``key``, as JSON Schema has it."""
    properties = schema.get("properties")
    named = properties.get(key) if isinstance(properties, Mapping) else None
    patterns = schema.get("patternProperties")
    matched = []
    for pattern, sub in patterns.items() if isinstance(patterns, Mapping) else ():
        with contextlib.suppress(re.error, TypeError):
            if re.search(pattern, key):
                matched.append(sub)
    if named is None and not matched:
        return _mappings(schema.get("additionalProperties"))
    return _mappings(named, *matched)


def _item_schemas(schema: Mapping[str, Any], index: int) -> list[Mapping[str, Any]]:
    """The subschemas of ``schema`` that apply to its item ``index`` (draft 2020-12):
    ``prefixItems`` for the first items, ``items`` for the rest."""
    prefix = schema.get("prefixItems")
    if isinstance(prefix, list) and index < len(prefix):
        return _mappings(prefix[index])
    return _mappings(schema.get("items"))


def _inside(path: tuple[str | int, ...], outers: Iterable[tuple[str | int, ...]]) -> bool:
    """Whether ``path`` is one of ``outers`` or lies within one."""
    return any(path[: len(outer)] == outer for outer in outers)


def _at(value: Any, path: tuple[str | int, ...]) -> Any:
    for part in path:
        value = value[part]
    return value


def masked(schema: Mapping[str, Any] | None, params: Any) -> Any:
    """``params`` with the values ``sensitive_paths`` finds replaced by ``***``; each
    of them (or all, if not an object) when the schema is not known (None)."""
    if schema is None:
        return {key: MASK for key in params} if isinstance(params, dict) else MASK
    paths = sorted(set(sensitive_paths(schema, params)), key=len)
    if not paths:
        return params
    if not paths[0]:
        return MASK
    shown = copy.deepcopy(params)
    done: list[tuple[str | int, ...]] = []
    for path in paths:  # shortest first: one inside a value masked already is skipped
        if not _inside(path, done):
            operator.setitem(_at(shown, path[:-1]), path[-1], MASK)
            done.append(path)
    return shown


def sensitive_values(schema: Mapping[str, Any], params: Any) -> list[str]:
    """The text of each scalar in the sensitive values of ``params``, to mask wherever
    they might be quoted: error messages, a run's output."""
    return _scalar_texts(params, set(sensitive_paths(schema, params)))


def _scalar_texts(params: Any, paths: Iterable[tuple[str | int, ...]]) -> list[str]:
    found: list[str] = []

    def scalars(value: Any) -> None:
        if isinstance(value, dict | list):
            for item in value.values() if isinstance(value, dict) else value:
                scalars(item)
        elif value is not None:
            found.append(value if isinstance(value, str) else json.dumps(value))

    for path in paths:
        scalars(_at(params, path))
    return found


def validate_params(schema: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    """Return ``params`` with schema defaults filled in, or raise ``InvalidParams``.

    The error lists every failing JSON pointer path, so a form or a CLI user can
    fix all fields in one go.
    """
    if not isinstance(params, dict):
        raise InvalidParams("params must be a JSON object", errors=[{"path": "", "message": "not an object"}])
    unstorable = [
        {"path": json_pointer(path), "message": message} for path, message in value_problems(params)
    ]
    if unstorable:
        summary = "; ".join(f"{item['path'] or 'params'}: {item['message']}" for item in unstorable)
        raise InvalidParams(f"params cannot be stored: {summary}", errors=unstorable)
    filled = copy.deepcopy(params)
    _apply_defaults(schema, filled)
    validator = _validator(json.dumps(schema, sort_keys=True))
    errors = sorted(validator.iter_errors(filled), key=lambda e: list(map(str, e.absolute_path)))
    if errors:
        # The validator's messages quote the values: not those the schema marks sensitive.
        hidden = set(sensitive_paths(schema, filled))
        masker = Masker(_scalar_texts(filled, hidden))
        listed = []
        for error in errors:
            path = tuple(error.absolute_path)
            message = (
                f"not valid ({error.validator})" if _inside(path, hidden) else masker.text(error.message)
            )
            listed.append({"path": json_pointer(path), "message": message})
        summary = "; ".join(f"{item['path'] or 'params'}: {item['message']}" for item in listed)
        raise InvalidParams(f"params do not match the schema: {summary}", errors=listed)
    return filled


def coerce_text(text: str, schema: Mapping[str, Any]) -> Any:
    """Text a person typed (``k=v`` in Slack or the CLI) as the type the param's schema wants.

    Text that does not convert is passed on unchanged: the schema validation at
    admission then names the field and the problem.
    """
    kind = schema.get("type")
    try:
        if kind == "integer":
            return int(text)
        if kind == "number":
            return finite_float(text)
        if kind == "boolean" and text.lower() in ("true", "false", "yes", "no", "1", "0"):
            return text.lower() in ("true", "yes", "1")
        if kind in ("array", "object"):
            return strict_json(text)
    except ValueError:
        pass
    return text
