"""A database outage, for real: PostgreSQL refuses the server's connections for a while."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import psycopg
import pytest
from sqlalchemy import make_url

from tests.support import (
    ADMIN_TOKEN,
    PG_ADMIN,
    Server,
    base_env,
    put_automation,
    trigger,
    wait_for_run,
    wait_until,
)


@pytest.fixture
def role(pg_url: str) -> Iterator[str]:
    """A role of the test's own, which the test can stop from logging in, with the rights
    the server needs in the test's schema."""
    name = f"ondeck_outage_{uuid.uuid4().hex[:8]}"
    schema = make_url(pg_url).query["options"].removeprefix("-csearch_path=")
    with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
        admin.execute(f"CREATE ROLE {name} LOGIN")
        admin.execute(f"GRANT ALL ON SCHEMA {schema} TO {name}")
    try:
        yield name
    finally:
        with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s", [name])
            admin.execute(f"REASSIGN OWNED BY {name} TO CURRENT_USER")  # the schema it migrated
            admin.execute(f"DROP OWNED BY {name}")  # its rights
            admin.execute(f"DROP ROLE {name}")


def _refuse(role: str, refused: bool) -> None:
    """Let ``role`` log in again, or not, and end the connections it has."""
    with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
        admin.execute(f"ALTER ROLE {role} {'NOLOGIN' if refused else 'LOGIN'}")
        if refused:
            admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s", [role])


def _server(tmp_path: Path, pg_url: str, role: str) -> Server:
    url = make_url(pg_url).set(username=role).render_as_string(hide_password=False)
    (tmp_path / "automations").mkdir()
    return Server(base_env(tmp_path, url), tmp_path / "server.log").start()


def test_while_the_database_is_away_requests_get_503s_with_retry_after_and_nothing_is_lost(
    tmp_path: Path, pg_url: str, role: str
) -> None:
    """Never a 500 and never a half-written run: the API answers what it cannot do now with
    a problem document clients can retry after, and work resumes once the database is back."""
    server = _server(tmp_path, pg_url, role)
    try:
        with server.client() as client:
            put_automation(client, {"name": "echo", "run": {"runtime": "bash", "script": "echo hi"}})
            _refuse(role, True)
            for _ in range(3):  # the pooled connections ended; new ones are refused
                refused = client.post("/automations/echo/runs", json={})
                assert refused.status_code == 503, refused.text
                assert refused.headers["content-type"] == "application/problem+json"
                assert refused.headers["retry-after"] == "1" and refused.json()["retry_after"] == 1
                assert "database unavailable" in refused.json()["detail"]
                assert client.get("/runs").status_code == 503
            _refuse(role, False)
            run = trigger(client, "echo")
            assert wait_for_run(client, run["id"])["status"] == "succeeded"
            listed = client.get("/runs", params={"automation": "echo"}).json()["items"]
            assert [item["id"] for item in listed] == [run["id"]]  # the refused ones left nothing
    finally:
        server.stop()


def test_a_live_log_stream_outlives_an_outage_and_delivers_every_line(
    tmp_path: Path, pg_url: str, role: str
) -> None:
    """A stream already open cannot answer with a problem: it waits for the database and
    goes on where it was, rather than break off mid-response."""
    server = _server(tmp_path, pg_url, role)
    try:
        with server.client() as client:
            script = "for i in $(seq 1 12); do echo line $i; sleep 0.4; done"
            put_automation(client, {"name": "slow", "run": {"runtime": "bash", "script": script}})
            run = trigger(client, "slow")
            events: list[str] = []

            def follow() -> None:
                with client.stream("GET", f"/runs/{run['id']}/logs/stream", timeout=60) as stream:
                    events.extend(
                        line for line in stream.iter_lines() if line.startswith(("data:", "event:"))
                    )

            follower = threading.Thread(target=follow)
            follower.start()
            wait_until(lambda: len(events) >= 2, timeout=30, message="the first line streamed")
            _refuse(role, True)
            time.sleep(2)  # the outage: what the stream does meanwhile is the point
            _refuse(role, False)
            follower.join(60)
            assert not follower.is_alive()
            assert wait_for_run(client, run["id"])["status"] == "succeeded"
        lines = [event for event in events if event.startswith("data:") and '"seq"' in event]
        assert [f"line {i}" in line for i, line in enumerate(lines, 1)] == [True] * 12
        assert events[-2] == "event: end"
    finally:
        server.stop()
    assert "Exception in ASGI application" not in server.log()


def test_a_trigger_whose_wait_ends_during_an_outage_is_answered_with_its_run_not_a_503(
    tmp_path: Path, pg_url: str, role: str
) -> None:
    """Its run was admitted before the database went away: a 503 would tell the client to
    send the trigger again, and so to start a second run. The first trigger of a version,
    too, whose answer needs the params' schema, which this process had not read yet."""
    server = _server(tmp_path, pg_url, role)
    schema = make_url(pg_url).query["options"]
    try:
        with server.client() as client, psycopg.connect(PG_ADMIN, options=schema, autocommit=True) as admin:
            put_automation(client, {"name": "slow", "run": {"runtime": "bash", "script": "sleep 5"}})
            answers: list[httpx.Response] = []
            waiting = threading.Thread(
                target=lambda: answers.append(
                    client.post("/automations/slow/runs?wait=2", json={}, timeout=30)
                )
            )
            waiting.start()
            admitted = lambda: admin.execute("SELECT 1 FROM runs").fetchone() is not None  # noqa: E731
            wait_until(admitted, timeout=30, message="the run admitted")
            _refuse(role, True)
            waiting.join(30)  # answered while the database is still away
            _refuse(role, False)
            (answer,) = answers
            assert answer.status_code == 202, answer.text
            assert wait_for_run(client, answer.json()["id"])["status"] == "succeeded"
    finally:
        server.stop()


def test_a_read_waiting_on_a_run_is_told_of_an_outage_at_once_not_at_the_end_of_its_wait(
    tmp_path: Path, pg_url: str, role: str
) -> None:
    """A read sent nothing to start again: a 503 it can retry after tells it more, and
    sooner, than holding it for the rest of its wait."""
    server = _server(tmp_path, pg_url, role)
    schema = make_url(pg_url).query["options"]
    try:
        with server.client() as client, psycopg.connect(PG_ADMIN, options=schema, autocommit=True) as admin:
            put_automation(client, {"name": "slow", "run": {"runtime": "bash", "script": "sleep 60"}})
            run = trigger(client, "slow")
            answers: list[httpx.Response] = []
            waiting = threading.Thread(
                target=lambda: answers.append(client.get(f"/runs/{run['id']}?wait=60", timeout=90))
            )
            waiting.start()
            # The wait's first read marks the run watched: it is waiting.
            watched = lambda: admin.execute("SELECT watched FROM runs").fetchone() == (True,)  # noqa: E731
            wait_until(watched, timeout=30, message="the read waiting")
            _refuse(role, True)
            waiting.join(30)  # its next read, a poll period on, meets the outage
            _refuse(role, False)
            (answer,) = answers
            assert answer.status_code == 503, answer.text
            assert answer.headers["retry-after"] == "1" and "database unavailable" in answer.json()["detail"]
            client.post(f"/runs/{run['id']}/cancel")
    finally:
        server.stop()


def test_the_cli_waits_out_an_outage_on_a_read_as_the_server_asks(
    tmp_path: Path, pg_url: str, role: str
) -> None:
    """A read sent while the database is away gets a 503 with Retry-After: the command
    says it waits, sends it again, and succeeds once the database is back."""
    server = _server(tmp_path, pg_url, role)
    try:
        with server.client() as client:
            put_automation(client, {"name": "echo", "run": {"runtime": "bash", "script": "echo hi"}})
            run = trigger(client, "echo")
            wait_for_run(client, run["id"])
        _refuse(role, True)
        env = {
            "PATH": "/usr/bin:/bin",
            "HOME": str(tmp_path),
            "ONDECK_URL": server.url,
            "ONDECK_TOKEN": ADMIN_TOKEN,
        }
        errors = tmp_path / "cli.err"
        with errors.open("w") as stderr:
            show = subprocess.Popen(
                [sys.executable, "-m", "ondeck", "runs", "show", run["id"], "--json"],
                env=env,
                stdout=subprocess.PIPE,
                stderr=stderr,
                text=True,
            )
            wait_until(
                lambda: "waiting for it" in errors.read_text(), timeout=60, message="the CLI met the outage"
            )
            _refuse(role, False)
            out, _ = show.communicate(timeout=60)
        assert show.returncode == 0, errors.read_text()
        assert (
            json.loads(out)["status"] == "succeeded" and "cannot answer for now (503)" in errors.read_text()
        )
    finally:
        server.stop()
