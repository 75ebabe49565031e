"""Infer a params schema from a Python script's ``main(...)`` signature.

The script is parsed, never imported: loading a definition must not run its code.
"""

from __future__ import annotations

import ast
import json
from typing import Any

from ondeck.storable import value_problems

_TYPES = {
    "str": {"type": "string"},
    "int": {"type": "integer"},
    "float": {"type": "number"},
    "bool": {"type": "boolean"},
    "list": {"type": "array"},
    "dict": {"type": "object"},
}


def find_main(source: str) -> ast.FunctionDef | None:
    try:
        tree = ast.parse(source)
    except SyntaxError as exc:
        raise ValueError(f"python script has a syntax error at line {exc.lineno}: {exc.msg}") from exc
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name == "main":
            return node
    return None


def _annotation_schema(node: ast.expr | None) -> dict[str, Any]:
    if node is None:
        return {}
    if isinstance(node, ast.Name) and node.id in _TYPES:
        return dict(_TYPES[node.id])
    if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name):
        outer = node.value.id
        if outer == "list":
            return {"type": "array", "items": _annotation_schema(node.slice)}
        if outer == "dict":
            return {"type": "object"}
        if outer == "Literal":
            elements = node.slice.elts if isinstance(node.slice, ast.Tuple) else [node.slice]
            return {"enum": [ast.literal_eval(e) for e in elements]}
        if outer == "Optional":
            inner = _annotation_schema(node.slice)
            return {"anyOf": [inner, {"type": "null"}]} if inner else {}
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
        left, right = _annotation_schema(node.left), _annotation_schema(node.right)
        if isinstance(node.right, ast.Constant) and node.right.value is None:
            return {"anyOf": [left, {"type": "null"}]} if left else {}
        return {"anyOf": [left, right]} if left and right else {}
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return _annotation_schema(ast.parse(node.value, mode="eval").body)
    return {}


def infer_schema(main: ast.FunctionDef) -> dict[str, Any]:
    """JSON Schema for ``main``'s keyword-callable arguments."""
    args = main.args
    positional = args.posonlyargs + args.args
    defaults: list[ast.expr | None] = [None] * (len(positional) - len(args.defaults)) + list(args.defaults)
    pairs = list(zip(positional, defaults, strict=True)) + list(
        zip(args.kwonlyargs, args.kw_defaults, strict=True)
    )
    properties: dict[str, Any] = {}
    required: list[str] = []
    for arg, default in pairs:
        prop = _annotation_schema(arg.annotation)
        if default is None:
            required.append(arg.arg)
        else:
            try:
                value = ast.literal_eval(default)
            except ValueError as exc:
                raise ValueError(f"default of main() argument {arg.arg!r} must be a literal") from exc
            prop["default"] = _json_default(arg.arg, value)
        properties[arg.arg] = prop
    schema: dict[str, Any] = {"type": "object", "properties": properties}
    if required:
        schema["required"] = required
    if args.kwarg is None:
        schema["additionalProperties"] = False
    return schema


def _json_default(name: str, value: Any) -> Any:
    """``value`` if JSON can hold it and a store can keep it: a literal may also be
    bytes, a set or a complex number, or a float too large to be finite (``1e400``)."""
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError):
        raise ValueError(f"default of main() argument {name!r} is not a JSON value") from None
    for _, problem in value_problems(value):
        raise ValueError(f"default of main() argument {name!r}: {problem}")
    return value
