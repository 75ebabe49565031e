from __future__ import annotations

import pytest

from ondeck.errors import InvalidDefinition
from ondeck.spec.expressions import ExpressionError, check, evaluate, render
from ondeck.spec.loader import parse_definition

CONTEXT = {"params": {"env": "prod", "count": 3, "tags": ["a", "b"]}}


def test_whole_expression_keeps_the_json_type() -> None:
    assert evaluate("${{ params.count }}", CONTEXT) == 3
    assert evaluate("${{ params.env == 'prod' }}", CONTEXT) is True


def test_embedded_expressions_render_as_text() -> None:
    assert evaluate("deploy-${{ params.env }}-${{ params.count }}", CONTEXT) == "deploy-prod-3"
    assert render("${{ params.tags }}", CONTEXT) == '["a","b"]'


def test_plain_strings_pass_through() -> None:
    assert evaluate("no expressions here", CONTEXT) == "no expressions here"


def test_invalid_expression_is_reported_at_check_time() -> None:
    with pytest.raises(ExpressionError, match="invalid expression"):
        check("${{ params.[ }}")


def test_missing_field_is_null_not_an_error() -> None:
    assert evaluate("${{ params.missing }}", CONTEXT) is None


@pytest.mark.parametrize(
    "source",
    ["!" * 600 + "a", "a" + "[]" * 300, " || ".join(["a"] * 100), "[" * 450 + "a" + "]" * 450],
    ids=["not", "flatten", "or", "lists"],
)
def test_deeply_nested_expressions_are_refused_at_check_time(source: str) -> None:
    """Compiling or evaluating them ran out of Python's recursion limit: a 500 at every trigger."""
    with pytest.raises(ExpressionError, match="nests more than 32 levels deep"):
        check("${{ " + source + " }}")


def test_an_expression_as_deep_as_allowed_evaluates() -> None:
    assert evaluate("${{ " + "!" * 30 + "(params.env) }}", CONTEXT) is True


def test_overlong_expressions_are_refused() -> None:
    with pytest.raises(ExpressionError, match="over 1000 characters"):
        check("${{ " + "params.a || " * 100 + "params.b }}")


def test_a_deep_expression_in_a_definition_is_refused_naming_the_field() -> None:
    with pytest.raises(
        InvalidDefinition, match=r"ops/deep.yaml: concurrency.key: expression .* nests more than"
    ):
        parse_definition(
            {
                "name": "deep",
                "run": {"runtime": "bash", "script": "true"},
                "concurrency": {"key": "${{ " + "!" * 600 + "params.env }}"},
            },
            "ops/deep.yaml",
        )
