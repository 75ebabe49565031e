"""Webhooks (``POST /hooks/{id}``) and the events API against a real server, on SQLite and PostgreSQL."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from ondeck.settings import Settings
from ondeck.triggers import standard_webhooks
from tests.support import Server, put_automation, unique, wait_for_run, wait_until

PROBLEM = "application/problem+json"


@pytest.fixture
def admin(server: Server) -> Iterator[httpx.Client]:
    with server.client() as client:
        yield client


@pytest.fixture
def outside(server: Server) -> Iterator[httpx.Client]:
    """A sender with no ondeck token: what GitHub or Alertmanager would be."""
    with httpx.Client(base_url=server.url, timeout=60) as client:
        yield client


def set_secret(admin: httpx.Client, value: str) -> str:
    name = f"HOOK_{uuid.uuid4().hex[:10].upper()}"
    response = admin.put(f"/secrets/{name}", json={"value": value, "scope": "global"})
    assert response.status_code == 200, response.text
    return name


def hook_automation(
    admin: httpx.Client,
    scheme: str,
    secret_name: str,
    *,
    when: str | None = None,
    params: dict[str, str] | None = None,
    access: dict[str, Any] | None = None,
    script: str = "echo hooked",
    hook_id: str | None = None,
) -> tuple[str, str]:
    """A new automation with one webhook trigger; returns (automation name, hook id)."""
    name, hook_id = unique("hooked"), hook_id or unique("hook")
    trigger: dict[str, Any] = {"webhook": {"id": hook_id, "scheme": scheme, "secret": secret_name}}
    if when is not None:
        trigger["when"] = when
    if params:
        trigger["params"] = params
    definition: dict[str, Any] = {
        "name": name,
        "params": {"type": "object", "properties": {p: {"type": "string"} for p in params or {}}},
        "run": {"runtime": "bash", "script": script},
        "triggers": [trigger],
    }
    if access is not None:
        definition["access"] = access
    put_automation(admin, definition)
    return name, hook_id


def runs_of(admin: httpx.Client, name: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = admin.get("/runs", params={"automation": name, "limit": 500}).json()[
        "items"
    ]
    return items


def assert_problem(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith(PROBLEM)
    body: dict[str, Any] = response.json()
    assert body["status"] == status
    return body


# --- GitHub ----------------------------------------------------------------------------


def github_headers(secret: str, body: bytes, event: str, delivery: str) -> dict[str, str]:
    digest = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    return {
        "X-Hub-Signature-256": f"sha256={digest}",
        "X-GitHub-Event": event,
        "X-GitHub-Delivery": delivery,
        "Content-Type": "application/json",
    }


def test_same_github_delivery_posted_five_times_starts_one_run(
    admin: httpx.Client, outside: httpx.Client
) -> None:
    secret = uuid.uuid4().hex
    name, hook_id = hook_automation(
        admin,
        "github",
        set_secret(admin, secret),
        when="${{ event.type == 'push' }}",
        params={"ref": "${{ event.data.ref }}", "repo": "${{ event.data.repository.full_name }}"},
    )
    body = json.dumps({"ref": "refs/heads/main", "repository": {"full_name": "acme/api"}}).encode()
    delivery = str(uuid.uuid4())
    answers = [
        outside.post(
            f"/hooks/{hook_id}", content=body, headers=github_headers(secret, body, "push", delivery)
        )
        for _ in range(5)
    ]
    assert [a.status_code for a in answers] == [202] * 5, answers[-1].text
    run_ids = {tuple(a.json()["runs"]) for a in answers}
    assert len(run_ids) == 1 and len(next(iter(run_ids))) == 1
    [run] = runs_of(admin, name)
    assert run["id"] == answers[0].json()["runs"][0]
    assert run["params"] == {"ref": "refs/heads/main", "repo": "acme/api"}
    assert run["trigger"] == "webhook"
    assert run["principal"] == f"webhook:{hook_id}"
    assert run["idempotency_key"] == f"github:{delivery}"
    assert wait_for_run(admin, run["id"])["status"] == "succeeded"

    # Another delivery is another run; an event the rule does not want starts none.
    other = outside.post(
        f"/hooks/{hook_id}", content=body, headers=github_headers(secret, body, "push", str(uuid.uuid4()))
    )
    assert other.status_code == 202 and other.json()["runs"][0] != run["id"]
    ping = outside.post(
        f"/hooks/{hook_id}", content=b"{}", headers=github_headers(secret, b"{}", "ping", str(uuid.uuid4()))
    )
    assert ping.status_code == 202 and ping.json() == {"runs": [], "skipped": 1, "results": None}
    assert len(runs_of(admin, name)) == 2


def test_bad_signature_is_401_audited_and_starts_nothing(admin: httpx.Client, outside: httpx.Client) -> None:
    secret = uuid.uuid4().hex
    name, hook_id = hook_automation(admin, "github", set_secret(admin, secret))
    body = b'{"ref": "refs/heads/main"}'
    headers = github_headers(secret, body, "push", str(uuid.uuid4()))
    tampered = outside.post(f"/hooks/{hook_id}", content=body + b" ", headers=headers)
    problem = assert_problem(tampered, 401)
    assert "does not match" in problem["detail"]
    assert secret not in tampered.text
    wrong_key = github_headers("not-the-secret", body, "push", str(uuid.uuid4()))
    assert_problem(outside.post(f"/hooks/{hook_id}", content=body, headers=wrong_key), 401)
    unsigned = {k: v for k, v in headers.items() if k != "X-Hub-Signature-256"}
    assert (
        "missing"
        in assert_problem(outside.post(f"/hooks/{hook_id}", content=body, headers=unsigned), 401)["detail"]
    )
    assert runs_of(admin, name) == []
    audit = admin.get("/audit", params={"action": "webhook.refused", "actor": f"webhook:{hook_id}"}).json()
    assert len(audit["items"]) == 3
    assert {e["detail"]["hook"] for e in audit["items"]} == {hook_id}
    assert all(secret not in json.dumps(e) for e in audit["items"])
    # The same request, correctly signed, is accepted: the refusals were about the signature.
    assert outside.post(f"/hooks/{hook_id}", content=body, headers=headers).status_code == 202


def test_unknown_hook_is_404_and_body_over_the_limit_is_413(
    admin: httpx.Client, outside: httpx.Client
) -> None:
    assert_problem(outside.post(f"/hooks/{unique('nohook')}", content=b"{}"), 404)
    secret = uuid.uuid4().hex
    name, hook_id = hook_automation(admin, "token", set_secret(admin, secret))
    limit = Settings.model_fields["max_body_bytes"].default
    auth = {"Authorization": f"Bearer {secret}"}
    assert_problem(outside.post(f"/hooks/{hook_id}", content=b"x" * (limit + 1), headers=auth), 413)

    # Without a Content-Length (chunked), the bytes actually read are counted.
    def chunks() -> Iterator[bytes]:
        for _ in range(limit // 65536 + 2):
            yield b"y" * 65536

    streamed = outside.post(f"/hooks/{hook_id}", content=chunks(), headers=auth)
    assert "content-length" not in streamed.request.headers
    assert_problem(streamed, 413)
    assert runs_of(admin, name) == []
    assert outside.post(f"/hooks/{hook_id}", content=b"x" * limit, headers=auth).status_code == 202


# --- Alertmanager ----------------------------------------------------------------------

STARTS_AT = "2024-05-02T10:15:30.123456789Z"


def am_alert(
    alertname: str, instance: str, status: str = "firing", fingerprint: str | None = None
) -> dict[str, Any]:
    return {
        "status": status,
        "labels": {"alertname": alertname, "instance": instance, "job": "node", "severity": "page"},
        "annotations": {"summary": f"{alertname} on {instance}"},
        "startsAt": STARTS_AT,
        "endsAt": "2024-05-02T10:45:00Z" if status == "resolved" else "0001-01-01T00:00:00Z",
        "generatorURL": "http://prometheus.example:9090/graph?g0.expr=node_cpu",
        "fingerprint": fingerprint or hashlib.sha256(f"{alertname}{instance}".encode()).hexdigest()[:16],
    }


def am_notification(*alerts: dict[str, Any], status: str = "firing") -> bytes:
    """A notification as Alertmanager's webhook receiver sends it (payload version 4)."""
    return json.dumps(
        {
            "receiver": "ondeck",
            "status": status,
            "alerts": list(alerts),
            "groupLabels": {"job": "node"},
            "commonLabels": {"job": "node", "severity": "page"},
            "commonAnnotations": None,
            "externalURL": "http://alertmanager.example:9093",
            "version": "4",
            "groupKey": '{}:{job="node"}',
            "truncatedAlerts": 0,
        }
    ).encode()


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


FIRING_RULE = "${{ event.labels.alertname == 'HighCPU' && event.status == 'firing' }}"
RESOLVED_RULE = "${{ event.labels.alertname == 'HighCPU' && event.status == 'resolved' }}"
ALERT_PARAMS = {"instance": "${{ event.labels.instance }}", "summary": "${{ event.annotations.summary }}"}


def test_alertmanager_notification_starts_a_run_per_matching_alert_and_repeats_start_none(
    admin: httpx.Client, outside: httpx.Client
) -> None:
    secret = uuid.uuid4().hex
    name, hook_id = hook_automation(
        admin, "alertmanager", set_secret(admin, secret), when=FIRING_RULE, params=ALERT_PARAMS
    )
    cpu = am_alert("HighCPU", "web-1:9100")
    body = am_notification(cpu, am_alert("DiskFull", "db-2:9100"))
    first = outside.post(f"/hooks/{hook_id}", content=body, headers=basic("alertmanager", secret))
    assert first.status_code == 202, first.text
    assert len(first.json()["runs"]) == 1 and first.json()["skipped"] == 1
    [run] = runs_of(admin, name)
    assert run["params"] == {"instance": "web-1:9100", "summary": "HighCPU on web-1:9100"}
    assert run["idempotency_key"] == f"alertmanager:{cpu['fingerprint']}:{STARTS_AT}:firing"

    # repeat_interval: the same notification again, then with a changed annotation, with a bearer token.
    again = outside.post(f"/hooks/{hook_id}", content=body, headers=basic("alertmanager", secret))
    assert again.status_code == 202 and again.json()["runs"] == [run["id"]]
    cpu_now = {**cpu, "annotations": {"summary": "HighCPU on web-1:9100 (97%)"}}
    moved = am_notification(cpu_now, am_alert("DiskFull", "db-2:9100"))
    repeat = outside.post(f"/hooks/{hook_id}", content=moved, headers={"Authorization": f"Bearer {secret}"})
    assert repeat.status_code == 202 and repeat.json()["runs"] == [run["id"]]
    assert [r["id"] for r in runs_of(admin, name)] == [run["id"]]
    assert_problem(
        outside.post(f"/hooks/{hook_id}", content=body, headers=basic("alertmanager", "nope")), 401
    )
    # A header's bytes are read as Latin-1: base64 refused the é with a ValueError, a 500.
    not_ascii = {"Authorization": "Basic \u00e9".encode("latin-1")}
    refusal = assert_problem(outside.post(f"/hooks/{hook_id}", content=body, headers=not_ascii), 401)
    assert refusal["detail"] == "the Basic credentials are not base64 of user:password"
    assert [r["id"] for r in runs_of(admin, name)] == [run["id"]]


def test_resolved_alert_triggers_its_own_rule(admin: httpx.Client, outside: httpx.Client) -> None:
    secret = uuid.uuid4().hex
    secret_name = set_secret(admin, secret)
    remediate, firing_hook = hook_automation(
        admin, "alertmanager", secret_name, when=FIRING_RULE, params=ALERT_PARAMS
    )
    close, resolved_hook = hook_automation(
        admin, "alertmanager", secret_name, when=RESOLVED_RULE, params=ALERT_PARAMS
    )
    auth = {"Authorization": f"Bearer {secret}"}
    fingerprint = uuid.uuid4().hex[:16]
    firing = am_notification(am_alert("HighCPU", "web-3:9100", fingerprint=fingerprint))
    resolved = am_notification(am_alert("HighCPU", "web-3:9100", "resolved", fingerprint), status="resolved")
    # Alertmanager sends every notification of the receiver to both hooks.
    for body in (firing, resolved, firing, resolved):
        for hook_id in (firing_hook, resolved_hook):
            assert outside.post(f"/hooks/{hook_id}", content=body, headers=auth).status_code == 202
    [started] = runs_of(admin, remediate)
    [closed] = runs_of(admin, close)
    assert started["idempotency_key"].endswith(":firing")
    assert closed["idempotency_key"].endswith(":resolved")
    assert closed["params"]["instance"] == "web-3:9100"


def test_one_rule_for_both_statuses_runs_once_firing_and_once_resolved(
    admin: httpx.Client, outside: httpx.Client
) -> None:
    secret = uuid.uuid4().hex
    name, hook_id = hook_automation(
        admin,
        "alertmanager",
        set_secret(admin, secret),
        when="${{ event.labels.alertname == 'HighCPU' }}",
        params={"status": "${{ event.status }}"},
    )
    auth = {"Authorization": f"Bearer {secret}"}
    fingerprint = uuid.uuid4().hex[:16]
    for status in ("firing", "firing", "resolved", "resolved"):
        body = am_notification(am_alert("HighCPU", "web-4:9100", status, fingerprint), status=status)
        assert outside.post(f"/hooks/{hook_id}", content=body, headers=auth).status_code == 202
    assert sorted(r["params"]["status"] for r in runs_of(admin, name)) == ["firing", "resolved"]


def test_malformed_alertmanager_notification_is_400_after_verification(
    admin: httpx.Client, outside: httpx.Client
) -> None:
    secret = uuid.uuid4().hex
    name, hook_id = hook_automation(admin, "alertmanager", set_secret(admin, secret))
    auth = {"Authorization": f"Bearer {secret}"}
    old = json.dumps({"version": "3", "alerts": []}).encode()
    assert (
        "version"
        in assert_problem(outside.post(f"/hooks/{hook_id}", content=old, headers=auth), 400)["detail"]
    )
    assert runs_of(admin, name) == []


# --- token, hmac and standard ----------------------------------------------------------


def test_token_scheme_starts_runs_and_honours_idempotency_key(
    admin: httpx.Client, outside: httpx.Client
) -> None:
    secret = uuid.uuid4().hex
    name, hook_id = hook_automation(
        admin, "token", set_secret(admin, secret), params={"text": "${{ event.data.raw }}"}
    )
    auth = {"Authorization": f"Bearer {secret}"}
    plain = outside.post(f"/hooks/{hook_id}", content=b"deploy please", headers=auth)
    assert plain.status_code == 202, plain.text
    [run] = runs_of(admin, name)
    assert run["params"] == {"text": "deploy please"}
    assert run["idempotency_key"] is None
    keyed = {**auth, "Idempotency-Key": unique("key")}
    first = outside.post(f"/hooks/{hook_id}", content=b"again", headers=keyed).json()["runs"]
    assert outside.post(f"/hooks/{hook_id}", content=b"again", headers=keyed).json()["runs"] == first
    assert len(runs_of(admin, name)) == 2
    assert_problem(
        outside.post(f"/hooks/{hook_id}", content=b"x", headers={"Authorization": "Bearer no"}), 401
    )
    assert_problem(outside.post(f"/hooks/{hook_id}", content=b"x"), 401)
    assert len(runs_of(admin, name)) == 2


def test_a_delivery_holding_text_no_store_can_keep_is_taken_as_raw_text(
    admin: httpx.Client, outside: httpx.Client
) -> None:
    """JSON holding NUL or an unpaired surrogate is passed on as its text, and a NUL
    byte becomes U+FFFD: before, the run's params could not be stored. So is JSON nested
    too deep for the API's parser (before, a RecursionError: a 500)."""
    secret = uuid.uuid4().hex
    name, hook_id = hook_automation(
        admin, "token", set_secret(admin, secret), params={"text": "${{ event.data.raw }}"}
    )
    auth = {"Authorization": f"Bearer {secret}"}
    for body, text in [
        (b'{"x": "a\\u0000b"}', '{"x": "a\\u0000b"}'),
        (b'{"x": "\\ud800"}', '{"x": "\\ud800"}'),
        (b"a\x00b", "a\ufffdb"),
        (b"[" * 5000 + b"]" * 5000, "[" * 5000 + "]" * 5000),
    ]:
        answer = outside.post(f"/hooks/{hook_id}", content=body, headers=auth)
        assert answer.status_code == 202, answer.text
        run = wait_for_run(admin, answer.json()["runs"][0])
        assert (run["status"], run["params"]) == ("succeeded", {"text": text})
    assert admin.get("/runs", params={"automation": name}).status_code == 200


def ondeck_signature(secret: str, body: bytes, stamp: int) -> str:
    digest = hmac.new(secret.encode(), f"{stamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={stamp},v1={digest}"


def test_hmac_scheme_accepts_fresh_signatures_only(admin: httpx.Client, outside: httpx.Client) -> None:
    secret = uuid.uuid4().hex
    name, hook_id = hook_automation(
        admin, "hmac", set_secret(admin, secret), params={"service": "${{ event.data.service }}"}
    )
    body = b'{"service": "api"}'
    now = int(time.time())
    ok = outside.post(
        f"/hooks/{hook_id}", content=body, headers={"X-Ondeck-Signature": ondeck_signature(secret, body, now)}
    )
    assert ok.status_code == 202, ok.text
    [run] = runs_of(admin, name)
    assert run["params"] == {"service": "api"}
    stale = {"X-Ondeck-Signature": ondeck_signature(secret, body, now - 600)}
    assert (
        "tolerance"
        in assert_problem(outside.post(f"/hooks/{hook_id}", content=body, headers=stale), 401)["detail"]
    )
    fresh = {"X-Ondeck-Signature": ondeck_signature(secret, body, now)}
    assert_problem(outside.post(f"/hooks/{hook_id}", content=b'{"service": "db"}', headers=fresh), 401)
    assert len(runs_of(admin, name)) == 1


def test_standard_webhook_is_deduplicated_by_message_id(admin: httpx.Client, outside: httpx.Client) -> None:
    secret = standard_webhooks.new_secret()
    name, hook_id = hook_automation(
        admin, "standard", set_secret(admin, secret), params={"order": "${{ event.data.order }}"}
    )
    body = b'{"order": "A-17"}'
    message_id = unique("msg")
    for _ in range(3):  # a sender's retries: same id, fresh timestamp and signature
        response = outside.post(
            f"/hooks/{hook_id}", content=body, headers=standard_webhooks.headers(secret, message_id, body)
        )
        assert response.status_code == 202, response.text
    [run] = runs_of(admin, name)
    assert run["params"] == {"order": "A-17"} and run["idempotency_key"] == f"standard:{message_id}"
    forged = standard_webhooks.headers(standard_webhooks.new_secret(), unique("msg"), body)
    assert_problem(outside.post(f"/hooks/{hook_id}", content=body, headers=forged), 401)
    for stamp in ("9" * 400, "9" * 5000):  # past 308 digits, comparing it with the clock was a 500
        huge = {**standard_webhooks.headers(secret, unique("msg"), body), "webhook-timestamp": stamp}
        refusal = assert_problem(outside.post(f"/hooks/{hook_id}", content=body, headers=huge), 401)
        assert refusal["detail"] == "webhook-timestamp is not a Unix time in seconds"
    assert len(runs_of(admin, name)) == 1


def test_a_hook_with_the_longest_id_runs_as_its_principal(admin: httpx.Client, outside: httpx.Client) -> None:
    """webhook:<id> fits the store's principal column, on PostgreSQL too."""
    secret = uuid.uuid4().hex
    hook_id = unique("hook").ljust(92, "x")
    name, _ = hook_automation(admin, "token", set_secret(admin, secret), hook_id=hook_id)
    response = outside.post(f"/hooks/{hook_id}", content=b"go", headers={"Authorization": f"Bearer {secret}"})
    assert response.status_code == 202, response.text
    [run] = runs_of(admin, name)
    assert run["principal"] == f"webhook:{hook_id}"


# --- secrets, access rules, waiting ------------------------------------------------------


def test_hook_whose_secret_is_not_set_is_503_saying_so_and_naming_it_only_in_the_log(
    server: Server, admin: httpx.Client, outside: httpx.Client
) -> None:
    """The sender is not known yet: the secret's and the automation's names are for the
    server's log, not for whoever posts to the hook."""
    missing = f"HOOK_{uuid.uuid4().hex[:10].upper()}"
    name, hook_id = hook_automation(admin, "token", missing)
    problem = assert_problem(outside.post(f"/hooks/{hook_id}", headers={"Authorization": "Bearer x"}), 503)
    assert "its secret is not set" in problem["detail"]
    assert missing not in problem["detail"] and name not in problem["detail"]
    assert wait_until(
        lambda: f"webhook secret {missing} is not set (for automation {name!r})" in server.log()
    )
    assert runs_of(admin, name) == []


def test_access_rules_apply_to_the_webhook_principal(admin: httpx.Client, outside: httpx.Client) -> None:
    secret = uuid.uuid4().hex
    secret_name = set_secret(admin, secret)
    auth = {"Authorization": f"Bearer {secret}"}
    locked, locked_hook = hook_automation(admin, "token", secret_name, access={"run": ["admin"]})
    assert "webhook:" in assert_problem(outside.post(f"/hooks/{locked_hook}", headers=auth), 403)["detail"]
    assert runs_of(admin, locked) == []
    # An author may grant the hook by its principal name.
    hook_id = unique("hook")
    name, _ = hook_automation(
        admin, "token", secret_name, access={"run": [f"webhook:{hook_id}"]}, hook_id=hook_id
    )
    assert outside.post(f"/hooks/{hook_id}", headers=auth).status_code == 202
    assert len(runs_of(admin, name)) == 1


def test_wait_answers_200_with_the_finished_runs(admin: httpx.Client, outside: httpx.Client) -> None:
    secret = uuid.uuid4().hex
    name, hook_id = hook_automation(admin, "token", set_secret(admin, secret), script="echo waited")
    response = outside.post(
        f"/hooks/{hook_id}", params={"wait": 30}, content=b"{}", headers={"Authorization": f"Bearer {secret}"}
    )
    assert response.status_code == 200, response.text
    body = response.json()
    [result] = body["results"]
    assert body["runs"] == [result["id"]]
    assert result["status"] == "succeeded" and result["automation"] == name


# --- events API ------------------------------------------------------------------------


def event_automation(
    admin: httpx.Client, source: str, event_type: str | None, when: str | None = None
) -> str:
    name = unique("on-event")
    trigger: dict[str, Any] = {
        "event": {"source": source, **({"type": event_type} if event_type else {})},
        "params": {"version": "${{ event.data.version }}"},
    }
    if when:
        trigger["when"] = when
    put_automation(
        admin,
        {
            "name": name,
            "params": {"type": "object", "properties": {"version": {"type": "string"}}},
            "run": {"runtime": "bash", "script": "true"},
            "triggers": [trigger],
        },
    )
    return name


def test_events_start_matching_triggers_once_per_source_and_id(server: Server, admin: httpx.Client) -> None:
    source = unique("deployer")
    any_type = event_automation(admin, source, None)
    finished = event_automation(admin, source, "deploy.finished")
    prod_only = event_automation(admin, source, "deploy.finished", "${{ event.data.env == 'prod' }}")
    other_source = event_automation(admin, unique("elsewhere"), "deploy.finished")

    event = {
        "source": source,
        "type": "deploy.finished",
        "id": "d-1",
        "data": {"env": "prod", "version": "1.2"},
    }
    first = admin.post("/events", json=event)
    assert first.status_code == 202, first.text
    assert len(first.json()["runs"]) == 3 and first.json()["skipped"] == 0
    # The same (source, id) again starts nothing, even if its data changed in between.
    again = admin.post("/events", json={**event, "data": {"env": "prod", "version": "1.2.1"}})
    assert again.status_code == 202 and sorted(again.json()["runs"]) == sorted(first.json()["runs"])

    staging = admin.post("/events", json={**event, "id": "d-2", "data": {"env": "staging", "version": "1.3"}})
    assert len(staging.json()["runs"]) == 2 and staging.json()["skipped"] == 1
    started = admin.post(
        "/events", json={"source": source, "type": "deploy.started", "id": "d-3", "data": {"version": "2"}}
    )
    assert len(started.json()["runs"]) == 1  # only the trigger that names no type

    counts = {n: len(runs_of(admin, n)) for n in (any_type, finished, prod_only, other_source)}
    assert counts == {any_type: 3, finished: 2, prod_only: 1, other_source: 0}
    [run] = runs_of(admin, prod_only)
    assert run["params"] == {"version": "1.2"} and run["trigger"] == "event"
    assert run["idempotency_key"] == f"event:{source}:d-1"

    viewer_token = admin.post("/tokens", json={"name": unique("viewer"), "roles": ["viewer"]}).json()["token"]
    with server.client(token=viewer_token) as viewer:
        assert_problem(viewer.post("/events", json={**event, "id": "d-4"}), 403)
    operator_name = unique("op")
    operator_token = admin.post("/tokens", json={"name": operator_name, "roles": ["operator"]}).json()[
        "token"
    ]
    with server.client(token=operator_token) as operator:
        posted = operator.post("/events", json={**event, "id": "d-5"})
        assert posted.status_code == 202
        principals = {admin.get(f"/runs/{r}").json()["principal"] for r in posted.json()["runs"]}
    assert principals == {operator_name}
    assert_problem(admin.post("/events", json={"type": "x"}), 422)


def test_an_event_with_the_longest_source_and_id_is_deduplicated(admin: httpx.Client) -> None:
    """Its idempotency key, event:<source>:<id>, is longer than the store keeps: it is
    shortened without losing what tells it apart."""
    source = unique("s").ljust(200, "s")
    name = event_automation(admin, source, None)
    event = {"source": source, "id": "i" * 200, "data": {"version": "1"}}
    first = admin.post("/events", json=event)
    assert first.status_code == 202, first.text
    assert admin.post("/events", json=event).json()["runs"] == first.json()["runs"]
    other = admin.post("/events", json={**event, "id": "i" * 199 + "j"})
    assert other.status_code == 202 and other.json()["runs"] != first.json()["runs"]
    assert len(runs_of(admin, name)) == 2
