from __future__ import annotations

import pytest

from ondeck.spec.expressions import ExpressionError, check, evaluate, render

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
