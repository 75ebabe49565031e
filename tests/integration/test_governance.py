"""Authentication, RBAC, approvals, secrets, rate limits, breakers and audit, against a real server."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from tests.support import Server, put_automation, unique, wait_for_run, wait_until

ROLES = ("viewer", "operator", "approver", "admin")


@pytest.fixture
def admin(server: Server) -> Iterator[httpx.Client]:
    with server.client() as client:
        yield client


def make_token(admin: httpx.Client, *roles: str) -> str:
    response = admin.post("/tokens", json={"name": unique("t"), "roles": list(roles)})
    assert response.status_code == 201, response.text
    token: str = response.json()["token"]
    assert token.startswith("odk_")
    return token


@pytest.fixture
def clients(server: Server, admin: httpx.Client) -> Iterator[dict[str, httpx.Client]]:
    """One client per built-in role, plus an anonymous one."""
    made = {"anonymous": server.client(token=None)}
    for role in ROLES:
        made[role] = server.client(
            token=admin.headers["authorization"].split()[1] if role == "admin" else make_token(admin, role)
        )
    yield made
    for client in made.values():
        client.close()


# --- every route x every role ------------------------------------------------------

ANON, VIEWER, OPERATOR, APPROVER, ADMIN = "anonymous", "viewer", "operator", "approver", "admin"


def expect(anonymous: int, viewer: int, operator: int, approver: int, admin: int) -> dict[str, int]:
    return {ANON: anonymous, VIEWER: viewer, OPERATOR: operator, APPROVER: approver, ADMIN: admin}


# (method, route template, request builder, expected status per role)
ROUTE_TABLE: list[tuple[str, str, Any, dict[str, int]]] = [
    ("GET", "/automations", lambda f: ("/automations", {}), expect(401, 200, 200, 200, 200)),
    (
        "GET",
        "/automations/{name}",
        lambda f: (f"/automations/{f['name']}", {}),
        expect(401, 200, 200, 200, 200),
    ),
    (
        "PUT",
        "/automations/{name}",
        lambda f: (f"/automations/{f['name']}", {"json": f["definition"]}),
        expect(401, 403, 403, 403, 200),
    ),
    (
        "POST",
        "/automations/{name}/runs",
        lambda f: (f"/automations/{f['name']}/runs", {}),
        expect(401, 403, 202, 202, 202),
    ),
    ("GET", "/runs", lambda f: ("/runs", {}), expect(401, 200, 200, 200, 200)),
    ("GET", "/runs/{run_id}", lambda f: (f"/runs/{f['run']}", {}), expect(401, 200, 200, 200, 200)),
    ("GET", "/runs/{run_id}/logs", lambda f: (f"/runs/{f['run']}/logs", {}), expect(401, 200, 200, 200, 200)),
    (
        "GET",
        "/runs/{run_id}/logs/stream",
        lambda f: (f"/runs/{f['run']}/logs/stream", {}),
        expect(401, 200, 200, 200, 200),
    ),
    # The run belongs to the admin and has finished: only the admin may try, and it is too late.
    (
        "POST",
        "/runs/{run_id}/cancel",
        lambda f: (f"/runs/{f['run']}/cancel", {}),
        expect(401, 403, 403, 403, 409),
    ),
    (
        "POST",
        "/runs/{run_id}/rerun",
        lambda f: (f"/runs/{f['run']}/rerun", {}),
        expect(401, 403, 202, 202, 202),
    ),
    # The run is not waiting for approval: approvers and admins get past the role check to a 409.
    (
        "POST",
        "/runs/{run_id}/approve",
        lambda f: (f"/runs/{f['run']}/approve", {}),
        expect(401, 403, 403, 409, 409),
    ),
    (
        "POST",
        "/runs/{run_id}/reject",
        lambda f: (f"/runs/{f['run']}/reject", {}),
        expect(401, 403, 403, 409, 409),
    ),
    (
        "POST",
        "/tokens",
        lambda f: ("/tokens", {"json": {"name": unique("x"), "roles": ["viewer"]}}),
        expect(401, 403, 403, 403, 201),
    ),
    ("GET", "/tokens", lambda f: ("/tokens", {}), expect(401, 403, 403, 403, 200)),
    ("DELETE", "/tokens/{name}", lambda f: ("/tokens/no-such-token", {}), expect(401, 403, 403, 403, 404)),
    (
        "PUT",
        "/secrets/{name}",
        lambda f: ("/secrets/TABLE_SECRET", {"json": {"value": "value"}}),
        expect(401, 403, 403, 403, 200),
    ),
    ("GET", "/secrets", lambda f: ("/secrets", {}), expect(401, 403, 403, 403, 200)),
    ("DELETE", "/secrets/{name}", lambda f: ("/secrets/NO_SUCH_SECRET", {}), expect(401, 403, 403, 403, 404)),
    ("GET", "/environments", lambda f: ("/environments", {}), expect(401, 200, 200, 200, 200)),
    (
        "GET",
        "/environments/{name}",
        lambda f: (f"/environments/{f['env']}", {}),
        expect(401, 200, 200, 200, 200),
    ),
    (
        "PUT",
        "/environments/{name}",
        lambda f: (f"/environments/{f['env']}", {"json": {}}),
        expect(401, 403, 403, 403, 200),
    ),
    ("GET", "/audit", lambda f: ("/audit", {}), expect(401, 403, 403, 403, 200)),
    ("GET", "/schedules", lambda f: ("/schedules", {}), expect(401, 200, 200, 200, 200)),
    # The automation has no schedule: admins get past the role check to a 404.
    (
        "POST",
        "/automations/{name}/schedules/{index}/pause",
        lambda f: (f"/automations/{f['name']}/schedules/0/pause", {}),
        expect(401, 403, 403, 403, 404),
    ),
    (
        "POST",
        "/automations/{name}/schedules/{index}/resume",
        lambda f: (f"/automations/{f['name']}/schedules/0/resume", {}),
        expect(401, 403, 403, 403, 404),
    ),
    (
        "GET",
        "/runs/{run_id}/deliveries",
        lambda f: (f"/runs/{f['run']}/deliveries", {}),
        expect(401, 200, 200, 200, 200),
    ),
    # No trigger listens to this source: callers with `trigger` get past the role check to 202, no runs.
    (
        "POST",
        "/events",
        lambda f: ("/events", {"json": {"source": unique("table-src"), "type": "t", "id": unique("e")}}),
        expect(401, 403, 202, 202, 202),
    ),
]


def test_route_table_covers_every_api_route(server: Server) -> None:
    spec = httpx.get(server.url + "/openapi.json").json()
    routes = {
        (method.upper(), path.removeprefix("/api/v1"))
        for path, methods in spec["paths"].items()
        if path.startswith("/api/v1")
        for method in methods
    }
    assert routes == {(method, path) for method, path, _, _ in ROUTE_TABLE}


def test_every_route_for_every_role(admin: httpx.Client, clients: dict[str, httpx.Client]) -> None:
    name, env = unique("table"), unique("env")
    definition = {"name": name, "run": {"runtime": "bash", "script": "echo table"}}
    put_automation(admin, definition)
    assert admin.put(f"/environments/{env}", json={}).status_code == 200
    run = wait_for_run(admin, admin.post(f"/automations/{name}/runs").json()["id"])
    fixtures = {"name": name, "definition": definition, "run": run["id"], "env": env}
    failures = []
    for method, route, build, expected in ROUTE_TABLE:
        path, kwargs = build(fixtures)
        for role, status in expected.items():
            response = clients[role].request(method, path, **kwargs)
            if response.status_code != status:
                failures.append(f"{role:>9} {method} {route}: {response.status_code} (expected {status})")
            elif status >= 400:
                assert response.headers["content-type"].startswith("application/problem+json")
    assert not failures, "\n".join(failures)


def test_health_endpoints_need_no_token(server: Server) -> None:
    assert httpx.get(server.url + "/healthz").status_code == 200
    assert httpx.get(server.url + "/readyz").status_code == 200


def test_bad_revoked_and_expired_tokens_are_401(server: Server, admin: httpx.Client) -> None:
    with server.client(token="odk_not-a-real-token") as bad:
        response = bad.get("/runs")
        assert response.status_code == 401 and "unknown token" in response.json()["detail"]
        assert response.headers["www-authenticate"].startswith("Bearer")
    name = unique("rev")
    token = admin.post("/tokens", json={"name": name, "roles": ["viewer"]}).json()["token"]
    with server.client(token=token) as client:
        assert client.get("/runs").status_code == 200
        assert admin.delete(f"/tokens/{name}").status_code == 204
        assert "revoked" in client.get("/runs").json()["detail"]
    short = admin.post("/tokens", json={"name": unique("exp"), "roles": ["viewer"], "expires_in": "1s"})
    with server.client(token=short.json()["token"]) as client:
        wait_until(lambda: client.get("/runs").status_code == 401, timeout=10, message="token expiry")
        assert "expired" in client.get("/runs").json()["detail"]
    listed = admin.get("/tokens").json()
    assert all("token" not in t and "token_hash" not in t for t in listed)


@pytest.mark.parametrize(
    ("expires_in", "problem"),
    [
        ("99999999999d", "from 1s to 365d"),
        ("9" * 400, "finite"),
        ("0s", "from 1s to 365d"),
        ("soon", "invalid"),
        ([], "a number of seconds or a string"),
        ({"days": 1}, "a number of seconds or a string"),
    ],
)
def test_a_token_lifetime_out_of_bounds_is_a_422_naming_it(
    admin: httpx.Client, expires_in: object, problem: str
) -> None:
    """A huge one overflowed the expiry date (a 500); 0s made a token that never expires;
    a list or an object was a 500."""
    response = admin.post(
        "/tokens", json={"name": unique("life"), "roles": ["viewer"], "expires_in": expires_in}
    )
    assert response.status_code == 422, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    assert "/body/expires_in" in response.json()["detail"] and problem in response.json()["detail"]


def test_a_token_may_live_a_year(admin: httpx.Client) -> None:
    response = admin.post("/tokens", json={"name": unique("year"), "roles": ["viewer"], "expires_in": "365d"})
    assert response.status_code == 201, response.text
    created = datetime.fromisoformat(response.json()["created_at"])
    assert datetime.fromisoformat(response.json()["expires_at"]) - created == pytest.approx(
        timedelta(days=365), abs=timedelta(seconds=5)
    )


# --- rules on parameter values ------------------------------------------------------


def test_operator_may_restart_in_dev_but_not_prod(
    admin: httpx.Client, clients: dict[str, httpx.Client]
) -> None:
    name = unique("restart")
    put_automation(
        admin,
        {
            "name": name,
            "params": {"type": "object", "properties": {"env": {"type": "string", "enum": ["dev", "prod"]}}},
            "run": {"runtime": "bash", "script": "echo restart"},
            "access": {"run": [{"role": "operator", "when": "${{ params.env != 'prod' }}"}, "admin"]},
        },
    )
    operator = clients[OPERATOR]
    assert operator.post(f"/automations/{name}/runs", json={"params": {"env": "dev"}}).status_code == 202
    denied = operator.post(f"/automations/{name}/runs", json={"params": {"env": "prod"}})
    assert denied.status_code == 403
    assert "params.env != 'prod'" in denied.json()["detail"]
    assert admin.post(f"/automations/{name}/runs", json={"params": {"env": "prod"}}).status_code == 202
    refused = admin.get("/audit", params={"action": "run.refused", "target": f"automation:{name}"}).json()[
        "items"
    ]
    assert refused and refused[0]["detail"]["status"] == 403


def test_view_access_hides_automations_and_their_runs(
    admin: httpx.Client, clients: dict[str, httpx.Client]
) -> None:
    name = unique("hidden")
    put_automation(
        admin, {"name": name, "run": {"runtime": "bash", "script": "true"}, "access": {"view": ["approver"]}}
    )
    run = admin.post(f"/automations/{name}/runs").json()
    viewer = clients[VIEWER]
    assert name not in [a["name"] for a in viewer.get("/automations").json()["items"]]
    assert viewer.get(f"/automations/{name}").status_code == 403
    assert viewer.get(f"/runs/{run['id']}").status_code == 403
    assert run["id"] not in [r["id"] for r in viewer.get("/runs", params={"limit": 500}).json()["items"]]
    assert name in [a["name"] for a in clients[APPROVER].get("/automations").json()["items"]]


def test_operator_cancels_only_its_own_runs(admin: httpx.Client, clients: dict[str, httpx.Client]) -> None:
    name = unique("slow")
    put_automation(admin, {"name": name, "run": {"runtime": "bash", "script": "sleep 600"}})
    mine = clients[OPERATOR].post(f"/automations/{name}/runs").json()
    theirs = admin.post(f"/automations/{name}/runs").json()
    assert clients[OPERATOR].post(f"/runs/{theirs['id']}/cancel").status_code == 403
    assert clients[OPERATOR].post(f"/runs/{mine['id']}/cancel").status_code == 202
    assert admin.post(f"/runs/{theirs['id']}/cancel").status_code == 202
    for run in (mine, theirs):
        assert wait_for_run(admin, run["id"])["status"] == "cancelled"


# --- approvals -------------------------------------------------------------------------


def test_two_approvers_needed_and_no_self_approval(server: Server, admin: httpx.Client) -> None:
    name = unique("gated")
    put_automation(
        admin,
        {
            "name": name,
            "run": {"runtime": "bash", "script": "echo approved work"},
            "approval": {"approvers": ["approver"], "required": 2},
        },
    )
    tokens = [make_token(admin, "approver") for _ in range(3)]
    requester, first, second = (server.client(token=t) for t in tokens)
    with requester, first, second:
        run = requester.post(f"/automations/{name}/runs").json()
        assert run["status"] == "waiting_approval"
        self_approval = requester.post(f"/runs/{run['id']}/approve", json={"comment": "me"})
        assert self_approval.status_code == 403 and "someone else" in self_approval.json()["detail"]
        after_first = first.post(f"/runs/{run['id']}/approve", json={"comment": "lgtm"}).json()
        assert after_first["status"] == "waiting_approval"
        assert first.post(f"/runs/{run['id']}/approve").status_code == 409  # one decision each
        assert admin.get(f"/runs/{run['id']}").json()["started_at"] is None
        after_second = second.post(f"/runs/{run['id']}/approve", json={"comment": "ok"}).json()
        assert after_second["status"] in ("queued", "running", "succeeded")
        final = wait_for_run(admin, run["id"])
    assert final["status"] == "succeeded"
    assert [t["to_status"] for t in final["transitions"]][:3] == ["pending", "waiting_approval", "queued"]
    decisions = admin.get(
        "/audit", params={"target": f"run:{run['id']}", "action": "approval.approve"}
    ).json()
    assert len(decisions["items"]) == 2


def test_environment_protection_and_rejection(admin: httpx.Client, clients: dict[str, httpx.Client]) -> None:
    env, name = unique("prod"), unique("deploy")
    admin.put(f"/environments/{env}", json={"protection": {"approvers": ["approver"], "required": 1}})
    put_automation(
        admin,
        {
            "name": name,
            "environment": env,
            "run": {"runtime": "bash", "script": "echo deploy"},
        },
    )
    run = clients[OPERATOR].post(f"/automations/{name}/runs").json()
    assert run["status"] == "waiting_approval" and run["environment"] == env
    rejected = clients[APPROVER].post(f"/runs/{run['id']}/reject", json={"comment": "not today"}).json()
    assert rejected["status"] == "rejected" and "not today" in rejected["error"]


def test_expired_approval_ends_rejected(admin: httpx.Client) -> None:
    name = unique("expiring")
    put_automation(
        admin,
        {
            "name": name,
            "run": {"runtime": "bash", "script": "true"},
            "approval": {"approvers": ["approver"], "timeout": "1s"},
        },
    )
    run = admin.post(f"/automations/{name}/runs").json()
    final = wait_for_run(admin, run["id"], timeout=30)
    assert final["status"] == "rejected" and "expired" in final["error"]


# --- secrets -------------------------------------------------------------------------

SECRET = "s3cr3t-VALUE-42xyz-do-not-leak"


def test_secret_never_leaks(server: Server, admin: httpx.Client) -> None:
    name = unique("leaky")
    assert (
        admin.put("/secrets/LEAK_TOKEN", json={"value": SECRET, "scope": f"automation:{name}"}).status_code
        == 200
    )
    script = "\n".join(
        [
            'echo "plain: $LEAK_TOKEN"',
            'printf "%s" "split: ${LEAK_TOKEN:0:9}"; sleep 0.3; printf "%s\\n" "${LEAK_TOKEN:9}"',
            'printf \'{"leak": "%s", "nested": ["%s"]}\' "$LEAK_TOKEN" "$LEAK_TOKEN" > "$ONDECK_OUTPUTS"',
            'echo "error: could not log in with $LEAK_TOKEN" >&2',
            "exit 1",
        ]
    )
    put_automation(
        admin, {"name": name, "secrets": ["LEAK_TOKEN"], "run": {"runtime": "bash", "script": script}}
    )
    run = wait_for_run(admin, admin.post(f"/automations/{name}/runs").json()["id"])
    assert run["status"] == "failed"
    logs = admin.get(f"/runs/{run['id']}/logs").json()
    text = "".join(e["text"] for e in logs["entries"])
    assert "plain: ***" in text and "split: ***" in text and "error: could not log in with ***" in text
    assert run["outputs"] == {"leak": "***", "nested": ["***"]}
    with admin.stream("GET", f"/runs/{run['id']}/logs/stream") as stream:
        streamed = stream.read().decode()
    responses = [
        streamed,
        text,
        admin.get(f"/runs/{run['id']}").text,
        admin.get("/secrets").text,
        admin.get("/audit", params={"limit": 1000}).text,
        httpx.get(server.url + "/openapi.json").text,
    ]
    for body in responses:
        assert SECRET not in body
    assert "LEAK_TOKEN" in admin.get("/secrets").text
    database_url = server.env["ONDECK_DATABASE_URL"]
    if database_url.startswith("sqlite"):
        db = Path(database_url.removeprefix("sqlite:///"))
        for path in (db, db.with_name(db.name + "-wal")):
            if path.exists():
                assert SECRET.encode() not in path.read_bytes()
    else:
        engine = sa.create_engine(database_url)
        with engine.connect() as conn:
            tables = [
                r[0]
                for r in conn.execute(
                    sa.text("SELECT tablename FROM pg_tables WHERE schemaname = current_schema()")
                )
            ]
            for table in tables:
                dumped = (
                    conn.execute(sa.text(f"SELECT string_agg(t::text, '|') FROM {table} t")).scalar() or ""
                )
                assert SECRET not in dumped, table
        engine.dispose()


def test_write_only_params_stay_out_of_answers_audit_errors_and_logs(admin: httpx.Client) -> None:
    name = unique("write-only")
    schema = {
        "type": "object",
        "properties": {
            "password": {"type": "string", "writeOnly": True, "pattern": "^[a-z]+$"},
            "creds": {"type": "object", "properties": {"pw": {"type": "string", "format": "password"}}},
        },
    }
    script = (
        'echo "pw=$ONDECK_PARAM_PASSWORD"\n'
        'printf \'{"echo": "%s"}\' "$ONDECK_PARAM_PASSWORD" > "$ONDECK_OUTPUTS"'
    )
    put_automation(admin, {"name": name, "params": schema, "run": {"runtime": "bash", "script": script}})
    given = {"password": "hunterpw", "creds": {"pw": "nestedpw"}}
    shown = {"password": "***", "creds": {"pw": "***"}}
    triggered = admin.post(f"/automations/{name}/runs", json={"params": given}).json()
    run = wait_for_run(admin, triggered["id"])
    assert run["status"] == "succeeded" and run["outputs"] == {"echo": "***"}
    listed = admin.get("/runs", params={"automation": name}).json()["items"]
    assert triggered["params"] == run["params"] == listed[0]["params"] == shown
    rerun = admin.post(f"/runs/{run['id']}/rerun", params={"wait": 30}).json()
    assert (rerun["status"], rerun["params"]) == ("succeeded", shown)  # "***" fails the pattern
    logs = admin.get(f"/runs/{run['id']}/logs").json()
    assert "pw=***" in "".join(e["text"] for e in logs["entries"])
    bad = admin.post(f"/automations/{name}/runs", json={"params": {"password": "Hunter2Secret"}})
    assert bad.status_code == 422 and "Hunter2Secret" not in bad.text
    assert bad.json()["errors"] == [{"path": "/password", "message": "not valid (pattern)"}]
    refused = admin.post(
        f"/automations/{name}/runs", json={"params": {"password": "cbleak"}, "callback_url": "ftp://x"}
    )
    assert refused.status_code == 400
    audit = admin.get("/audit", params={"limit": 1000}).text
    for value in ("hunterpw", "nestedpw", "Hunter2Secret", "cbleak"):
        assert value not in audit
    assert '"creds": {"pw": "***"}' in audit or '"creds":{"pw":"***"}' in audit


def test_a_write_only_params_object_is_shown_with_every_value_masked(admin: httpx.Client) -> None:
    name = unique("all-write-only")
    schema = {"type": "object", "writeOnly": True, "properties": {"a": {}, "b": {}}}
    put_automation(admin, {"name": name, "params": schema, "run": {"runtime": "bash", "script": "true"}})
    triggered = admin.post(
        f"/automations/{name}/runs", json={"params": {"a": "x1", "b": 2}}, params={"wait": 30}
    )
    assert triggered.status_code == 200, triggered.text
    assert triggered.json()["params"] == {"a": "***", "b": "***"}
    assert admin.get("/runs", params={"automation": name}).json()["items"][0]["params"] == {
        "a": "***",
        "b": "***",
    }


def test_values_rendered_from_write_only_params_are_not_quoted_back(admin: httpx.Client) -> None:
    """A concurrency key or an environment may be rendered from any param."""
    name = unique("rendered")
    schema = {"type": "object", "properties": {"token": {"type": "string", "writeOnly": True}}}
    put_automation(
        admin,
        {
            "name": name,
            "params": schema,
            "environment": "${{ params.token }}",
            "run": {"runtime": "bash", "script": "true"},
        },
    )
    refused = admin.post(f"/automations/{name}/runs", json={"params": {"token": "tok-s3cret"}})
    assert refused.status_code == 400 and "tok-s3cret" not in refused.text, refused.text
    assert "selects environment '***'" in refused.json()["detail"]
    keyed = unique("keyed")
    put_automation(
        admin,
        {
            "name": keyed,
            "params": schema,
            "concurrency": {"key": "${{ params.token }}", "limit": 1, "policy": "reject"},
            "run": {"runtime": "bash", "script": "sleep 30"},
        },
    )
    first = admin.post(f"/automations/{keyed}/runs", json={"params": {"token": "tok-s3cret"}})
    second = admin.post(f"/automations/{keyed}/runs", json={"params": {"token": "tok-s3cret"}})
    other = admin.post(f"/automations/{keyed}/runs", json={"params": {"token": "another"}})
    assert (first.status_code, second.status_code, other.status_code) == (202, 409, 202), second.text
    # Kept as digests: the same for the same value (so the second is refused), not for another.
    assert first.json()["concurrency_key"].startswith(f"{keyed}:sha256:")
    assert other.json()["concurrency_key"].startswith(f"{keyed}:sha256:")
    assert other.json()["concurrency_key"] != first.json()["concurrency_key"]
    for response in (refused, first, second):
        assert "tok-s3cret" not in response.text
    assert "tok-s3cret" not in admin.get("/audit", params={"limit": 1000}).text
    for run in (first.json(), other.json()):
        admin.post(f"/runs/{run['id']}/cancel")


def test_missing_secret_fails_the_run_clearly(admin: httpx.Client) -> None:
    name = unique("nosecret")
    put_automation(
        admin, {"name": name, "secrets": ["NOT_SET_ANYWHERE"], "run": {"runtime": "bash", "script": "true"}}
    )
    run = wait_for_run(admin, admin.post(f"/automations/{name}/runs").json()["id"])
    assert run["status"] == "failed" and "NOT_SET_ANYWHERE is not set" in run["error"]


def test_secret_scopes_pick_the_most_specific(admin: httpx.Client) -> None:
    env, name = unique("stage"), unique("scoped")
    admin.put(f"/environments/{env}", json={})
    admin.put("/secrets/SCOPED_VALUE", json={"value": "from-global"})
    admin.put("/secrets/SCOPED_VALUE", json={"value": "from-env", "scope": f"environment:{env}"})
    put_automation(
        admin,
        {
            "name": name,
            "environment": env,
            "secrets": ["SCOPED_VALUE"],
            "run": {"runtime": "bash", "script": 'test "$SCOPED_VALUE" = from-env'},
        },
    )
    assert wait_for_run(admin, admin.post(f"/automations/{name}/runs").json()["id"])["status"] == "succeeded"


# --- rate limits and circuit breakers --------------------------------------------------


def test_rate_limit_answers_429_then_recovers(admin: httpx.Client) -> None:
    name = unique("limited")
    put_automation(
        admin,
        {
            "name": name,
            "run": {"runtime": "bash", "script": "true"},
            "rate_limit": {"limit": 3, "per": "3s", "scope": "automation"},
        },
    )

    def burst() -> list[httpx.Response]:
        return [admin.post(f"/automations/{name}/runs") for _ in range(4)]

    # Align with a fresh window so all four land in it.
    # A burst may straddle two windows; one that lands in a single window shows the limit.
    responses = wait_until(
        lambda: (r := burst()) and [x.status_code for x in r] == [202, 202, 202, 429] and r,
        timeout=30,
        interval=0.5,
        message="three accepted and the fourth refused within one window",
    )
    limited = responses[3]
    assert 1 <= int(limited.headers["retry-after"]) <= 3
    assert limited.headers["content-type"].startswith("application/problem+json")
    wait_until(
        lambda: admin.post(f"/automations/{name}/runs").status_code == 202,
        timeout=10,
        interval=0.5,
        message="the next window",
    )


def test_circuit_breaker_opens_refuses_and_closes_after_a_good_trial(admin: httpx.Client) -> None:
    name = unique("flaky")
    put_automation(
        admin,
        {
            "name": name,
            "params": {"type": "object", "properties": {"ok": {"type": "boolean", "default": False}}},
            "run": {"runtime": "bash", "script": '[ "$ONDECK_PARAM_OK" = true ]'},
            "circuit_breaker": {"failures": 2, "within": "1m", "cooldown": "2s"},
        },
    )
    for _ in range(2):
        assert wait_for_run(admin, admin.post(f"/automations/{name}/runs").json()["id"])["status"] == "failed"
    before = len(admin.get("/runs", params={"automation": name}).json()["items"])
    refused = admin.post(f"/automations/{name}/runs", json={"params": {"ok": True}})
    assert refused.status_code == 503 and int(refused.headers["retry-after"]) >= 1
    assert len(admin.get("/runs", params={"automation": name}).json()["items"]) == before
    trial = wait_until(
        lambda: (
            (r := admin.post(f"/automations/{name}/runs", json={"params": {"ok": True}})).status_code == 202
            and r
        ),
        timeout=15,
        interval=0.5,
        message="the cooldown to end",
    )
    assert wait_for_run(admin, trial.json()["id"])["status"] == "succeeded"
    assert admin.post(f"/automations/{name}/runs", json={"params": {"ok": True}}).status_code == 202


# --- audit ----------------------------------------------------------------------------


def _verify(server: Server) -> subprocess.CompletedProcess[str]:
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": server.env["HOME"],
        "ONDECK_DATABASE_URL": server.env["ONDECK_DATABASE_URL"],
    }
    return subprocess.run(
        [sys.executable, "-m", "ondeck", "audit", "verify"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_audit_records_and_detects_tampering(server: Server, admin: httpx.Client) -> None:
    name = unique("audited")
    put_automation(
        admin,
        {
            "name": name,
            "run": {"runtime": "bash", "script": "true"},
            "params": {"type": "object", "properties": {"password": {"type": "string", "writeOnly": True}}},
        },
    )
    run = admin.post(f"/automations/{name}/runs", json={"params": {"password": "hunter2"}}).json()
    entries = admin.get("/audit", params={"target": f"run:{run['id']}"}).json()["items"]
    assert entries[0]["action"] == "run.triggered" and entries[0]["actor"] == "admin"
    assert entries[0]["detail"]["params"] == {"password": "***"}
    assert admin.get("/audit", params={"action": "automation.put", "target": f"automation:{name}"}).json()[
        "items"
    ]
    intact = _verify(server)
    assert intact.returncode == 0, intact.stderr
    engine = sa.create_engine(server.env["ONDECK_DATABASE_URL"])
    with engine.begin() as conn:
        conn.execute(
            sa.text("UPDATE audit_entries SET actor = 'mallory' WHERE id = :id"), {"id": entries[0]["id"]}
        )
    engine.dispose()
    broken = _verify(server)
    assert broken.returncode == 1
    assert f"broken at entry {entries[0]['id']}" in broken.stderr
