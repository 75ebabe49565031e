"""The HTTP API against a real server, on SQLite and PostgreSQL."""

from __future__ import annotations

import fcntl
import json
import os
import re
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest

from ondeck.domain import Run, RunStatus, utcnow
from ondeck.engine import runs
from ondeck.ids import new_id
from ondeck.store.store import Store
from tests.support import ADMIN_TOKEN, Server, base_env, put_automation, unique, wait_for_run, wait_until

PROBLEM = "application/problem+json"


@pytest.fixture
def client(server: Server) -> httpx.Client:
    with server.client() as client:
        yield client


def define(client: httpx.Client, script: str = "echo hi", **fields: Any) -> str:
    name = unique("api")
    put_automation(client, {"name": name, "run": {"runtime": "bash", "script": script}, **fields})
    return name


def assert_problem(response: httpx.Response, status: int, *words: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith(PROBLEM)
    body: dict[str, Any] = response.json()
    assert body["status"] == status and body["detail"]
    for word in words:
        assert word in body["detail"]
    return body


def test_trigger_returns_202_and_the_run_finishes_with_outputs(client: httpx.Client) -> None:
    name = define(
        client,
        'echo "hi $ONDECK_PARAM_WHO"; cp "$ONDECK_PARAMS" "$ONDECK_OUTPUTS"',
        params={"type": "object", "properties": {"who": {"type": "string", "default": "you"}}},
    )
    response = client.post(f"/automations/{name}/runs", json={"params": {}})
    assert response.status_code == 202
    assert response.headers["location"] == f"/api/v1/runs/{response.json()['id']}"
    run = wait_for_run(client, response.json()["id"])
    assert run["status"] == "succeeded" and run["outputs"] == {"who": "you"} and run["exit_code"] == 0
    for field in ("version", "attempt", "created_at", "started_at", "finished_at", "error", "params"):
        assert field in run
    assert [t["to_status"] for t in run["transitions"]] == ["pending", "queued", "running", "succeeded"]
    logs = client.get(f"/runs/{run['id']}/logs").json()
    assert "".join(e["text"] for e in logs["entries"]) == "hi you\n"
    assert set(logs["entries"][0]) == {"seq", "attempt", "stream", "text", "time"}


def test_wait_answers_with_the_finished_run(client: httpx.Client) -> None:
    name = define(client, "exit 4")
    response = client.post(f"/automations/{name}/runs", params={"wait": 30})
    assert response.status_code == 200
    assert response.json()["status"] == "failed" and response.json()["exit_code"] == 4


def test_a_run_stored_with_outputs_too_deep_to_answer_is_shown_without_them(
    client: httpx.Client, module_database: tuple[Path, str]
) -> None:
    """A release before the check on outputs' depth stored them as they came; no answer
    can hold more than about 250 levels, and every answer with such a run was a 500."""
    name = define(client)
    outputs: dict[str, Any] = {}
    for _ in range(300):
        outputs = {"a": outputs}
    now = utcnow()
    run = Run(new_id(), name, 1, RunStatus.SUCCEEDED, {}, 1, "default", "api", now, now, outputs=outputs)
    store = Store(module_database[1])
    try:
        with store.transaction() as tx:
            tx.insert_run(run, [(None, RunStatus.SUCCEEDED, "stored by an earlier release")])
    finally:
        store.dispose()
    one, page = client.get(f"/runs/{run.id}"), client.get("/runs", params={"automation": name})
    assert one.status_code == page.status_code == 200, (one.text, page.text)
    for shown in (one.json(), page.json()["items"][0]):
        assert shown["status"] == "succeeded" and shown["outputs"] is None
        assert shown["error"] == "its outputs nest more than 200 levels of objects and arrays: not shown"


def test_invalid_params_are_422_with_paths_and_no_run_is_written(client: httpx.Client) -> None:
    name = define(
        client, params={"type": "object", "required": ["n"], "properties": {"n": {"type": "integer"}}}
    )
    body = assert_problem(client.post(f"/automations/{name}/runs", json={"params": {"n": "x"}}), 422, "/n")
    assert body["errors"][0]["path"] == "/n"
    assert client.get("/runs", params={"automation": name}).json()["items"] == []


def test_nan_and_infinity_are_refused_in_params_and_fail_a_run_that_outputs_them(
    client: httpx.Client,
) -> None:
    """Python's JSON parsers take them; JSON has no form for them and PostgreSQL refuses
    them: params with them were a 500, and such outputs left the run running until reaped."""
    name = define(client, params={"type": "object", "properties": {"x": {}, "y": {}}})
    body = b'{"params": {"x": NaN, "y": [1, -Infinity]}}'
    response = client.post(
        f"/automations/{name}/runs", content=body, headers={"content-type": "application/json"}
    )
    problem = assert_problem(response, 422, "/x", "/y/1", "NaN")
    assert [error["path"] for error in problem["errors"]] == ["/x", "/y/1"]
    assert client.get("/runs", params={"automation": name}).json()["items"] == []
    outputs = define(client, 'echo \'{"ratio": NaN}\' > "$ONDECK_OUTPUTS"')
    run = client.post(f"/automations/{outputs}/runs", params={"wait": 30}).json()
    assert (run["status"], run["outputs"]) == ("failed", None), run
    assert "NaN is not a JSON number" in run["error"]


@pytest.mark.parametrize(
    ("text", "why"), [("\\u0000", "NUL"), ("\\ud800", "unpaired surrogate"), ("\\udc00\\ud800", "unpaired")]
)
def test_text_no_store_can_keep_is_refused_by_every_route_and_breaks_nothing(
    client: httpx.Client, text: str, why: str
) -> None:
    """Python's parser takes NUL and unpaired surrogates; PostgreSQL refused them (a 500)
    and SQLite kept them, after which every list that held one answered 500 for good."""
    name = define(client, params={"type": "object", "properties": {"x": {}}})
    definition = {"name": name, "description": "aTEXTb", "run": {"runtime": "bash", "script": "true"}}
    bodies = {  # TEXT stands for the escape
        ("POST", f"/automations/{name}/runs"): '{"params": {"x": "aTEXTb"}}',
        ("PUT", f"/environments/{unique('env')}"): '{"description": "aTEXTb"}',
        ("PUT", f"/automations/{name}"): json.dumps(definition),
        ("POST", "/events"): '{"source": "s", "type": "t", "data": {"x": "aTEXTb"}}',
        ("POST", "/tokens"): '{"name": "aTEXTb", "role": "viewer"}',
        ("PUT", "/secrets/s"): '{"value": "aTEXTb"}',
        ("POST", "/runs/nope/reject"): '{"reason": "aTEXTb"}',
    }
    headers = {"content-type": "application/json"}
    for (method, path), body in bodies.items():
        response = client.request(method, path, content=body.replace("TEXT", text).encode(), headers=headers)
        assert_problem(response, 400, why)
        # Nor as UTF-16 (which Python's parser takes), nor as bytes UTF-8 has no such form for.
        decoded = json.loads(body.replace("TEXT", text))
        utf16 = json.dumps(decoded, ensure_ascii=False).encode("utf-16", "surrogatepass")
        assert_problem(client.request(method, path, content=utf16, headers=headers), 400, "not UTF-8")
        raw = json.dumps(decoded, ensure_ascii=False).encode("utf-8", "surrogatepass")
        assert_problem(client.request(method, path, content=raw, headers=headers), 400)
    for path in ("/environments", "/automations", "/runs", "/audit", "/tokens", "/secrets"):
        assert client.get(path).status_code == 200, path
    assert client.get("/runs", params={"automation": name}).json()["items"] == []


def test_paired_surrogate_escapes_are_text_like_any_other(client: httpx.Client) -> None:
    name = define(client, 'printf %s "$ONDECK_PARAM_X"', params={"type": "object", "properties": {"x": {}}})
    body = b'{"params": {"x": "\\ud83d\\ude00 \\\\u0000"}}'  # an emoji, and a backslash then "u0000"
    response = client.post(f"/automations/{name}/runs", content=body, params={"wait": 30})
    assert response.json()["params"] == {"x": "\U0001f600 \\u0000"}
    logs = client.get(f"/runs/{response.json()['id']}/logs").json()["entries"]
    assert "".join(e["text"] for e in logs) == "\U0001f600 \\u0000"


def test_a_run_whose_output_holds_nul_keeps_its_log_and_refuses_such_outputs(client: httpx.Client) -> None:
    """A NUL in the output reads as U+FFFD, as bytes that are not UTF-8 do; outputs that
    hold one cannot be stored, so the run fails saying so (it was left running on PostgreSQL)."""
    name = define(client, 'printf \'a\\0b\'; printf \'{"x": "\\\\u0000"}\' > "$ONDECK_OUTPUTS"')
    run = client.post(f"/automations/{name}/runs", params={"wait": 30}).json()
    assert (run["status"], run["outputs"]) == ("failed", None), run
    assert "cannot be stored: a NUL character" in run["error"]
    logs = client.get(f"/runs/{run['id']}/logs").json()["entries"]
    assert "".join(e["text"] for e in logs) == "a\ufffdb"


def test_urls_and_numbers_past_what_the_store_holds_are_refused(client: httpx.Client) -> None:
    """Each was a 500: NUL in a path or query, integers past the store's columns, and a
    callback URL urllib cannot parse (or whose host no resolver takes)."""
    name = define(client)
    run_id = client.post(f"/automations/{name}/runs", params={"wait": 30}).json()["id"]
    for path, params in [
        ("/runs/a%00b", {}),
        (f"/automations/{name}%00", {}),
        ("/runs", {"automation": "a\0b"}),
        ("/audit", {"target": "\0"}),
    ]:
        assert_problem(client.get(path, params=params), 400, "NUL")
    assert_problem(client.post(f"/automations/{name}%00/runs"), 400, "NUL")
    for path, params in [
        ("/audit", {"cursor": 2**63}),
        (f"/automations/{name}", {"version": 2**31}),
        (f"/runs/{run_id}/logs", {"after": 2**31}),
        (f"/runs/{run_id}/logs", {"attempt": 2**31}),
        (f"/runs/{run_id}/logs/stream", {"after": 2**31}),
    ]:
        assert_problem(client.get(path, params=params), 422, "less than or equal")
    stream = client.get(f"/runs/{run_id}/logs/stream", headers={"Last-Event-ID": str(2**31)})
    assert_problem(stream, 422, "Last-Event-ID")
    for url in ("http://[::1", "http://host:99999/", "http://host:x/", f"http://{'a' * 64}.example.com/"):
        body = {"callback_url": url}
        assert_problem(client.post(f"/automations/{name}/runs", json=body), 400, "callback URL")


def test_json_nested_too_deep_or_with_too_long_a_number_is_a_400_on_every_route(
    client: httpx.Client,
) -> None:
    """Every route parses JSON as the trigger route does: Python's parser took 900 levels,
    which validating, rendering or auditing the value then met as a RecursionError (a
    500), and a number of 5000 digits was a 400 that did not say why."""
    name = define(client)
    deep = "[" * 500 + "]" * 500
    bodies = {
        ("POST", "/events"): f'{{"source": "deep", "data": {deep}}}',
        ("PUT", f"/automations/{name}"): f'{{"run": {{"runtime": "bash"}}, "tags": {deep}}}',
        ("PUT", "/environments/deep"): f'{{"allowed_roles": {deep}}}',
        ("POST", f"/automations/{name}/runs"): f'{{"params": {{"x": {deep}}}}}',
    }
    headers = {"Content-Type": "application/json"}
    for (method, path), body in bodies.items():
        response = client.request(method, path, content=body, headers=headers)
        assert_problem(response, 400, "not valid JSON", "recursion limit exceeded")
    huge = '{"name": "n", "roles": [], "expires_in": ' + "9" * 5000 + "}"
    response = client.post("/tokens", content=huge, headers=headers)
    assert_problem(response, 400, "not valid JSON", "number out of range")
    assert client.get("/audit").status_code == 200


def test_triggering_a_name_no_automation_can_have_is_a_404_and_breaks_no_listing(
    client: httpx.Client,
) -> None:
    """The refusal's audit entry named the automation: past 189 characters it did not fit
    (a 500 on PostgreSQL)."""
    for name in ("a" * 300, "é" * 300, "Upper", "x" * 64):
        response = client.post(f"/automations/{quote(name)}/runs", json={})
        assert_problem(response, 404, "does not exist")
    assert client.get("/audit", params={"action": "run.refused"}).status_code == 200


def test_a_secret_name_or_scope_ending_in_a_newline_is_refused(client: httpx.Client) -> None:
    """A pattern's $ also matched before a final newline: such a name was stored (a 500 on
    PostgreSQL at 129 characters), and so was such a scope."""
    for name in ("A" * 128 + "\n", "NEWLINE\n"):
        response = client.put(f"/secrets/{quote(name)}", json={"value": "value"})
        assert_problem(response, 400, "a secret name is")
    response = client.put("/secrets/NEWLINE", json={"value": "value", "scope": "environment:dev\n"})
    assert_problem(response, 400, "scope is")
    assert_problem(client.delete("/secrets/NEWLINE", params={"scope": "automation:x\n"}), 400, "scope is")
    assert not [s for s in client.get("/secrets").json() if "\n" in s["name"] + s["scope"]]


def test_idempotency_key_over_http(client: httpx.Client) -> None:
    name = define(client, params={"type": "object", "properties": {"n": {"type": "integer"}}})
    headers = {"Idempotency-Key": '"order-17"'}
    first = client.post(f"/automations/{name}/runs", json={"params": {"n": 1}}, headers=headers)
    again = client.post(
        f"/automations/{name}/runs", json={"params": {"n": 1}}, headers={"Idempotency-Key": "order-17"}
    )
    assert again.json()["id"] == first.json()["id"]
    assert again.headers.get("idempotent-replayed") == "true"
    assert_problem(
        client.post(f"/automations/{name}/runs", json={"params": {"n": 2}}, headers=headers),
        422,
        "Idempotency-Key",
    )
    assert_problem(client.post(f"/automations/{name}/runs", headers={"Idempotency-Key": '""'}), 400)


@pytest.mark.parametrize(
    ("method", "path", "kwargs", "status"),
    [
        ("GET", "/automations/does-not-exist", {}, 404),
        ("POST", "/automations/does-not-exist/runs", {}, 404),
        ("GET", "/runs/nope", {}, 404),
        ("GET", "/runs/nope/logs", {}, 404),
        ("GET", "/runs/nope/logs/stream", {}, 404),
        ("POST", "/runs/nope/cancel", {}, 404),
        ("POST", "/runs/nope/rerun", {}, 404),
        ("GET", "/no/such/route", {}, 404),
        ("GET", "/runs", {"params": {"status": "bogus"}}, 400),
        ("GET", "/runs", {"params": {"limit": 0}}, 422),
        (
            "PUT",
            "/automations/x",
            {"content": b"{not json", "headers": {"content-type": "application/json"}},
            400,
        ),
        ("PUT", "/automations/x", {"json": {"run": {"runtime": "cobol"}}}, 422),
        ("PUT", "/automations/x", {"json": {"name": "y", "run": {"runtime": "bash", "script": "true"}}}, 422),
        ("POST", "/automations/does-not-exist/runs", {"json": {"params": [1]}}, 422),
    ],
)
def test_errors_are_problem_json(
    client: httpx.Client, method: str, path: str, kwargs: dict[str, Any], status: int
) -> None:
    assert_problem(client.request(method, path, **kwargs), status)


def test_trigger_input_errors_name_the_field(client: httpx.Client) -> None:
    """The trigger route parses its own input: bad input is refused as on every other route."""
    name = define(client)
    url = f"/automations/{name}/runs"
    assert_problem(client.post(url, content=b"{not json"), 400, "not valid JSON")
    assert_problem(client.post(url, json={"params": [1]}), 422, "/body/params")
    assert_problem(client.post(url, json={"parms": {}}), 422, "/body/parms")
    assert_problem(client.post(url, json={"callback_url": 5}), 422, "/body/callback_url")
    assert_problem(client.post(url, params={"wait": -1}), 422, "/query/wait")
    assert_problem(client.post(url, params={"wait": "soon"}), 422, "/query/wait")
    assert_problem(httpx.post(f"{client.base_url}{url.lstrip('/')}"), 401)
    assert client.get("/runs", params={"automation": name}).json()["items"] == []
    assert client.post(url, content=b"null").status_code == 202
    assert client.post(url, params={"wait": 30}).json()["status"] == "succeeded"
    assert client.get(url).status_code == 405


def test_trigger_refuses_non_json_bodies_and_survives_a_client_going_away(
    server: Server, client: httpx.Client
) -> None:
    """As when FastAPI parsed the body: a form or text body is refused, not parsed as JSON;
    a UTF-8 BOM is ignored; a client that hangs up mid-body is no server error."""
    name = define(client)
    url = f"/automations/{name}/runs"
    assert_problem(client.post(url, data={"params": "x"}), 415, "Content-Type")
    text = {"Content-Type": "text/plain"}
    assert_problem(client.post(url, content=b'{"params": {}}', headers=text), 415, "Content-Type")
    assert client.get("/runs", params={"automation": name}).json()["items"] == []
    json_ = {"Content-Type": "application/json"}
    huge = b'{"params": {"name": "' + b"x" * (1 << 21) + b'"}}'  # over ONDECK_MAX_BODY_BYTES
    body = assert_problem(client.post(url, content=huge, headers=json_), 413, "limit")
    assert len(json.dumps(body)) < 1000  # refused, not echoed
    chunked = client.post(url, content=iter([huge[:1000], huge[1000:]]), headers=json_)  # no length given
    assert_problem(chunked, 413, "limit")
    assert client.get("/runs", params={"automation": name}).json()["items"] == []
    assert client.post(url, content=b"\xef\xbb\xbf{}", headers=json_).status_code == 202
    vendor = {"Content-Type": "application/vnd.ondeck+json; charset=utf-8"}
    assert client.post(url, content=b"{}", headers=vendor).status_code == 202
    before = server.log()
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(
            f"POST /api/v1{url} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ADMIN_TOKEN}\r\n"
            "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{".encode()
        )
    wait_until(lambda: "closed the connection before its body" in server.log()[len(before) :], timeout=30)
    assert "unhandled error" not in server.log()[len(before) :]


def test_definition_errors_name_the_field(client: httpx.Client) -> None:
    body = assert_problem(
        client.put("/automations/x", json={"run": {"runtime": "cobol"}}), 422, "run.runtime"
    )
    assert any(e["field"] == "run.runtime" for e in body["errors"])


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"rate_limit": {"limit": 5, "per": 1e-305}}, "rate_limit.per"),
        ({"retries": {"attempts": 2, "backoff": "99999999999d"}}, "retries.backoff"),
        (
            {"circuit_breaker": {"failures": 1, "within": "99999999999d", "cooldown": "1m"}},
            "circuit_breaker.within",
        ),
        ({"timeout": "9" * 400}, "timeout"),
        ({"triggers": [{"schedule": {"cron": "0 0 30 2 *"}}]}, "triggers.0.schedule"),
        ({"params": {"type": "object", "properties": {"x": {"$ref": "#/$defs/nope"}}}}, "params"),
        ({"concurrency": {"key": "${{ " + "!" * 600 + "params.x }}"}}, "concurrency.key"),
        (
            {"triggers": [{"webhook": {"id": "h" * 128, "scheme": "token", "secret": "S"}}]},
            "triggers.0.webhook.id",
        ),
    ],
)
def test_definitions_that_would_break_the_server_later_are_refused_naming_the_field(
    client: httpx.Client, fields: dict[str, Any], field: str
) -> None:
    """Each was accepted once, then made its triggers, schedules or the reaper fail with 500s."""
    name = unique("bad")
    definition = {"name": name, "run": {"runtime": "bash", "script": "true"}, **fields}
    body = assert_problem(client.put(f"/automations/{name}", json=definition), 422, f"{field}: ")
    assert field in [e["field"] for e in body["errors"]]
    assert client.get(f"/automations/{name}").status_code == 404


def test_put_creates_versions_only_on_change(client: httpx.Client) -> None:
    name = unique("ver")
    definition = {"name": name, "run": {"runtime": "bash", "script": "true"}}
    assert put_automation(client, definition)["version"] == 1
    assert put_automation(client, definition) | {"created_at": None} == put_automation(client, definition) | {
        "created_at": None
    }
    changed = put_automation(client, {**definition, "description": "new"})
    assert changed["version"] == 2 and changed["changed"] is True
    assert client.get(f"/automations/{name}", params={"version": 1}).json()["definition"]["description"] == ""
    names = [a["name"] for a in client.get("/automations").json()["items"]]
    assert name in names


def test_runs_list_filters_and_paginates_with_link(client: httpx.Client) -> None:
    other = client.post(f"/automations/{define(client)}/runs").json()["id"]  # filtered out below
    wait_for_run(client, other)
    name = define(client)
    ids = [client.post(f"/automations/{name}/runs").json()["id"] for _ in range(5)]
    for run_id in ids:
        wait_for_run(client, run_id)
    seen, cursor = [], None
    while True:
        response = client.get(
            "/runs", params={"automation": name, "limit": 2, **({"cursor": cursor} if cursor else {})}
        )
        page = response.json()
        seen += [r["id"] for r in page["items"]]
        cursor = page["next_cursor"]
        if not cursor:
            break
        assert 'rel="next"' in response.headers["link"]
    assert seen == sorted(ids, reverse=True)
    # The Link header's next page keeps the filters: following it alone walks the same pages.
    followed: list[str] = []
    response = client.get("/runs", params={"automation": name, "status": "succeeded", "limit": 2})
    while True:
        followed += [r["id"] for r in response.json()["items"]]
        link = response.headers.get("link")
        if link is None:
            break
        target = re.fullmatch(r'<(/api/v1/runs\?[^>]+)>; rel="next"', link)
        assert target is not None, link
        response = client.get(client.base_url.join(target.group(1)))
    assert followed == seen
    succeeded = client.get("/runs", params={"automation": name, "status": "succeeded,failed"}).json()["items"]
    assert len(succeeded) == 5
    assert client.get("/runs", params={"automation": name, "status": "queued"}).json()["items"] == []
    for cursor in ("garbage", seen[0].upper(), seen[0] + "0"):  # once a 200 listing runs "before" it
        assert_problem(client.get("/runs", params={"cursor": cursor}), 400, "cursor is not one a page gave")


def test_cancel_and_rerun(client: httpx.Client) -> None:
    name = define(client, "sleep 600", params={"type": "object", "properties": {"x": {"type": "integer"}}})
    run = client.post(f"/automations/{name}/runs", json={"params": {"x": 5}}).json()
    cancelled = client.post(f"/runs/{run['id']}/cancel")
    assert cancelled.status_code == 202
    final = wait_for_run(client, run["id"], timeout=30)
    assert final["status"] == "cancelled"
    assert_problem(client.post(f"/runs/{run['id']}/cancel"), 409, "already finished")
    again = client.post(f"/runs/{run['id']}/rerun")
    assert again.status_code == 202
    rerun = again.json()
    assert rerun["rerun_of"] == run["id"] and rerun["params"] == {"x": 5} and rerun["trigger"] == "rerun"
    client.post(f"/runs/{rerun['id']}/cancel")


def test_retries_keep_each_attempts_logs_apart(client: httpx.Client) -> None:
    name = define(client, 'echo "attempt $ONDECK_ATTEMPT"; exit 1', retries={"attempts": 2, "backoff": "0s"})
    run = wait_for_run(client, client.post(f"/automations/{name}/runs").json()["id"])
    assert run["status"] == "failed" and run["attempt"] == 2
    assert [a["status"] for a in run["attempts"]] == ["failed", "failed"]
    for number in (1, 2):
        entries = client.get(f"/runs/{run['id']}/logs", params={"attempt": number}).json()["entries"]
        assert "".join(e["text"] for e in entries) == f"attempt {number}\n"


def test_sse_stream_of_a_finished_run_replays_everything_then_ends(client: httpx.Client) -> None:
    name = define(client, "echo one; echo two >&2")
    run = wait_for_run(client, client.post(f"/automations/{name}/runs").json()["id"])
    with client.stream("GET", f"/runs/{run['id']}/logs/stream") as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        body = response.read().decode()
    assert "event: log" in body and '"text":"one\\n"' in body and '"stream":"stderr"' in body
    assert body.rstrip().splitlines()[-1] == 'data: {"status": "succeeded", "exit_code": 0}'


def test_a_wait_and_a_log_stream_begun_mid_run_are_told_at_once_not_by_polling(
    database_url: str, tmp_path: Path
) -> None:
    """Only runs someone waits on or follows announce their changes and output (nearly
    every run has no watcher, and each announcement wakes every API process): a wait and
    a log stream that begin while the run is under way, unannounced so far, hear of its
    next line and its end at once, though polling here is every 120 s; so do a trigger
    and a rerun that wait, whose runs are watched from their admission on."""
    data = tmp_path / "data"
    (data / "automations").mkdir(parents=True)
    server = Server(base_env(data, database_url, ONDECK_POLL_SECONDS="120"), tmp_path / "server.log").start()
    store = Store(database_url)
    try:
        with server.client() as client, ThreadPoolExecutor(1) as pool:
            name = define(
                client,
                'echo first; while [ ! -e "$ONDECK_PARAM_GATE" ]; do sleep 0.05; done; echo second',
                params={"type": "object", "properties": {"gate": {"type": "string"}}},
            )

            def first_line(run_id: str) -> None:
                logged = f"/runs/{run_id}/logs"
                wait_until(lambda: client.get(logged).json()["entries"], message="the first line")

            def under_way(gate: Path) -> str:
                body = {"params": {"gate": str(gate)}}
                run_id: str = client.post(f"/automations/{name}/runs", json=body).json()["id"]
                first_line(run_id)
                assert not runs.get(store, run_id).watched
                return run_id

            waited_on = under_way(tmp_path / "gate-1")
            waited = pool.submit(lambda: client.get(f"/runs/{waited_on}", params={"wait": 25}).json())
            wait_until(lambda: runs.get(store, waited_on).watched, message="the wait to begin")
            (tmp_path / "gate-1").touch()
            assert waited.result(timeout=30)["status"] == "succeeded"

            followed = under_way(tmp_path / "gate-2")
            with client.stream("GET", f"/runs/{followed}/logs/stream", timeout=30) as response:
                lines = (json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: "))
                assert next(lines)["text"] == "first\n"
                (tmp_path / "gate-2").touch()
                assert [line.get("text") for line in lines] == ["second\n", None]

            def answered_at_once(path: str, gate: Path, body: Any = None) -> str:
                answer = pool.submit(lambda: client.post(path, params={"wait": 25}, json=body))
                running = {"automation": name, "status": "running"}
                (run,) = wait_until(
                    lambda: client.get("/runs", params=running).json()["items"], message="a start"
                )
                first_line(run["id"])
                gate.touch()
                response = answer.result(timeout=30)
                assert response.status_code == 200, response.text
                assert response.json()["id"] == run["id"] and response.json()["status"] == "succeeded"
                return str(run["id"])

            gate = tmp_path / "gate-3"
            triggered = answered_at_once(f"/automations/{name}/runs", gate, {"params": {"gate": str(gate)}})
            gate.unlink()
            answered_at_once(f"/runs/{triggered}/rerun", gate)
    finally:
        store.dispose()
        server.stop()


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"POST /api/v1/automations/x/runs HTTP/1.1\r\nContent-Length: " + b"9" * 100 + b"\r\n\r\n{}",
        b"NOT HTTP AT ALL\r\n\r\n",
    ],
)
def test_a_request_too_malformed_to_reach_the_api_is_refused_as_a_problem(
    server: Server, request_bytes: bytes
) -> None:
    """The HTTP server refuses it before any route; it answered in plain text."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(request_bytes)
        response = b""
        while chunk := sock.recv(4096):
            response += chunk
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 "), head
    assert b"content-type: application/problem+json" in head.lower()
    problem = json.loads(body)
    assert problem["status"] == 400 and "could not be parsed" in problem["detail"]


def test_health_and_openapi(server: Server) -> None:
    with httpx.Client(base_url=server.url) as client:
        assert client.get("/healthz").json() == {"status": "ok"}
        assert client.get("/readyz").json()["status"] == "ready"
        spec = client.get("/openapi.json").json()
        # The trigger route reads its own input; its documentation is written out, not derived.
        trigger = spec["paths"]["/api/v1/automations/{name}/runs"]["post"]
        assert [p["name"] for p in trigger["parameters"]] == [
            "name",
            "wait",
            "Idempotency-Key",
            "authorization",
        ]
        body = trigger["requestBody"]["content"]["application/json"]["schema"]
        assert set(body["properties"]) == {"params", "callback_url"}
        assert trigger["responses"]["202"]["content"]["application/json"]["schema"]["$ref"].endswith(
            "/RunOut"
        )
        assert client.get("/docs").status_code == 200


def test_a_trigger_while_another_process_writes_to_sqlite_waits_off_the_event_loop(tmp_path: Path) -> None:
    """Triggers are admitted on the event loop when SQLite's write lock is free; when another
    process holds it, the trigger waits for it on a thread, and the API answers meanwhile."""
    (tmp_path / "automations").mkdir()
    database_file = tmp_path / "ondeck.db"
    server = Server(base_env(tmp_path, f"sqlite:///{database_file}"), tmp_path / "server.log").start()
    other = os.open(f"{database_file}-writer.lock", os.O_RDWR | os.O_CREAT)
    try:
        with server.client() as client, ThreadPoolExecutor(1) as pool:
            name = define(client, "true")
            assert client.post(f"/automations/{name}/runs").status_code == 202  # the lock is free
            fcntl.flock(other, fcntl.LOCK_EX)
            trigger = pool.submit(client.post, f"/automations/{name}/runs")
            with httpx.Client(base_url=server.url, timeout=5) as probe:
                for _ in range(5):
                    started = time.monotonic()
                    assert probe.get("/healthz").status_code == 200
                    assert time.monotonic() - started < 1.0, "the API waited for the write lock"
            assert not trigger.done(), "admitted while another process held the write lock"
            fcntl.flock(other, fcntl.LOCK_UN)
            response = trigger.result(timeout=30)
            assert response.status_code == 202, response.text
            assert wait_for_run(client, response.json()["id"])["status"] == "succeeded"
    finally:
        os.close(other)
        server.stop()
