"""``${{ … }}`` expressions: JMESPath over a context such as ``{"params": …}``.

A string that is exactly one expression evaluates to the expression's value
(keeping its JSON type); an expression embedded in other text is rendered as
text. Expressions only ever *read* data: JMESPath has no side effects, which is
why it was chosen over a general-purpose template language.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Annotated, Any

import jmespath
import jmespath.exceptions
from pydantic import AfterValidator

_EXPRESSION = re.compile(r"\$\{\{\s*(.*?)\s*\}\}", re.DOTALL)
# Compiling and evaluating recurse once per level of nesting: these keep both far from
# Python's recursion limit, well above what a condition or a mapping needs.
MAX_LENGTH = 1000
MAX_DEPTH = 32


class ExpressionError(ValueError):
    pass


def expressions_in(template: str) -> list[str]:
    return [match.group(1) for match in _EXPRESSION.finditer(template)]


def check(template: str) -> None:
    """Raise ``ExpressionError`` if any expression in ``template`` does not compile."""
    for source in expressions_in(template):
        _compile(source)


def _checked(template: str) -> str:
    check(template)
    return template


# A definition field holding ``${{ }}`` expressions, refused at load time if one does not compile.
Expression = Annotated[str, AfterValidator(_checked)]


def _compile(source: str) -> Any:
    if len(source) > MAX_LENGTH:
        raise ExpressionError(f"expression ${{{{ {source[:40]}… }}}} is over {MAX_LENGTH} characters")
    try:
        parsed = jmespath.compile(source)
    except jmespath.exceptions.JMESPathError as exc:
        raise ExpressionError(f"invalid expression ${{{{ {source} }}}}: {exc}") from exc
    except RecursionError as exc:  # nested so deep that even compiling it gave up
        raise ExpressionError(_too_deep(source)) from exc
    if _depth(parsed.parsed) > MAX_DEPTH:
        raise ExpressionError(_too_deep(source))
    return parsed


def _too_deep(source: str) -> str:
    return f"expression ${{{{ {source[:40]}… }}}} nests more than {MAX_DEPTH} levels deep"


def _depth(tree: Mapping[str, Any]) -> int:
    """Levels of the syntax tree, counted without recursing (it may be deep)."""
    deepest, pending = 0, [(tree, 1)]
    while pending:
        node, depth = pending.pop()
        deepest = max(deepest, depth)
        # A slice's children are its numbers, not nodes.
        pending.extend((child, depth + 1) for child in node["children"] if isinstance(child, Mapping))
    return deepest


def _as_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if value is None:
        return ""
    return json.dumps(value, separators=(",", ":"), sort_keys=True)


def evaluate(template: str, context: dict[str, Any]) -> Any:
    """Evaluate ``template`` against ``context``; plain strings come back unchanged."""
    whole = _EXPRESSION.fullmatch(template.strip())
    if whole:
        return _search(whole.group(1), context)
    return _EXPRESSION.sub(lambda m: _as_text(_search(m.group(1), context)), template)


def render(template: str, context: dict[str, Any]) -> str:
    """Like ``evaluate`` but always text (JSON for non-string values)."""
    return _as_text(evaluate(template, context))


def _search(source: str, context: dict[str, Any]) -> Any:
    try:
        return _compile(source).search(context)
    except jmespath.exceptions.JMESPathError as exc:
        raise ExpressionError(f"expression ${{{{ {source} }}}} failed: {exc}") from exc
