"""The command line's own start-up."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from types import SimpleNamespace

import httpx
import pytest
import typer

from ondeck import cli
from ondeck.cli import Api
from ondeck.settings import Settings

SERVER_SIDE = ("sqlalchemy", "psycopg", "alembic", "fastapi", "jsonschema", "ondeck.store.store")


def test_the_client_commands_start_without_the_server_side() -> None:
    """``ondeck run`` and the other commands that talk HTTP are what people type most: the
    store, the API and the schemas are imported only by the commands that use them, which
    halves the start-up (about 0.7 s instead of 1.5 s here)."""
    probe = (
        "import sys, ondeck.cli, ondeck.settings; ondeck.settings.Settings(); "
        f"print(sorted(set({SERVER_SIDE!r}) & set(sys.modules)))"
    )
    defaults = {key: value for key, value in os.environ.items() if not key.startswith("ONDECK_")}
    command = [sys.executable, "-c", probe]
    result = subprocess.run(command, capture_output=True, text=True, env=defaults, check=True)
    assert result.stdout.strip() == "[]"


def _api(answers: list[httpx.Response], sent: list[str]) -> Api:
    """The CLI's client, talking to a server that gives ``answers`` in turn: the edge cases
    of ``Retry-After`` that ondeck's own server never sends."""

    def answer(request: httpx.Request) -> httpx.Response:
        sent.append(request.method)
        return answers.pop(0)

    api = Api(Settings(url="http://ondeck.test"))
    api.client = httpx.Client(base_url=api.base, transport=httpx.MockTransport(answer))
    return api


def _unavailable(retry_after: bytes, kind: str = "/problems/store-unavailable") -> httpx.Response:
    problem = {"type": kind, "title": "Unavailable", "detail": "for now"}
    return httpx.Response(503, headers=[(b"retry-after", retry_after)], json=problem)


@pytest.fixture
def slept(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The CLI's waits, recorded instead of slept."""
    waits: list[float] = []
    monkeypatch.setattr(cli, "time", SimpleNamespace(monotonic=time.monotonic, sleep=waits.append))
    return waits


def test_a_read_the_server_cannot_serve_for_now_is_sent_again_a_second_later_at_least(
    slept: list[float],
) -> None:
    sent: list[str] = []
    api = _api([_unavailable(b"0"), _unavailable(b"2"), httpx.Response(200, json={"id": "r1"})], sent)
    assert api.request("GET", "/runs/r1") == {"id": "r1"}
    assert sent == ["GET"] * 3 and slept == [1, 2]  # never at once, however soon the server asks


@pytest.mark.parametrize(
    ("method", "key", "answer"),
    [
        ("POST", None, _unavailable(b"1")),  # its outcome may be unknown: a second run
        ("POST", "k1", _unavailable(b"1", "/problems/circuit-open")),  # not an outage
        ("GET", None, _unavailable(b"\xb2")),  # not a number of seconds: not guessed at
        ("GET", None, _unavailable(b"Fri, 04 Dec 2026 22:00:00 GMT")),
    ],
)
def test_what_is_not_sent_again(
    slept: list[float], method: str, key: str | None, answer: httpx.Response
) -> None:
    sent: list[str] = []
    api = _api([answer], sent)
    headers = {"Idempotency-Key": key} if key else {}
    with pytest.raises(typer.Exit) as exited:
        api.request(method, "/automations/a/runs", json={}, headers=headers)
    assert exited.value.exit_code == cli.EXIT_API and sent == [method] and slept == []


def test_a_trigger_with_an_idempotency_key_is_sent_again_through_an_outage(slept: list[float]) -> None:
    """The key makes the second send answer with the first's run, if that was admitted."""
    sent: list[str] = []
    api = _api([_unavailable(b"1"), httpx.Response(202, json={"id": "r1"})], sent)
    answer = api.request("POST", "/automations/a/runs", json={}, headers={"Idempotency-Key": "k1"})
    assert answer == {"id": "r1"} and sent == ["POST", "POST"] and slept == [1]
