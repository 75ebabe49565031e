"""Slack slash commands against real servers (SQLite and PostgreSQL), and the engine behind them.

A local HTTP receiver stands in for Slack's ``response_url``; the outbox may
reach it because ``ONDECK_CALLBACK_ALLOW`` lists loopback.
"""

from __future__ import annotations

import json
import re
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import httpx
import pytest

from ondeck import storable
from ondeck.auth import tokens
from ondeck.auth.principals import SYSTEM
from ondeck.engine import catalog, chatops
from ondeck.engine.admission import AdmissionPolicy
from ondeck.spec.loader import parse_definition
from ondeck.store.store import Store
from ondeck.triggers import slack
from ondeck.triggers.slack import SlashCommand
from tests.support import Server, base_env, put_automation, wait_for_run, wait_until

SECRET = "8f742231b10e8888abcd99yyyzzz85a5"
OPS, APPROVER, REVOKED, GHOST, STRANGER = "UOPS0001", "UAPPR0001", "UREVOKED1", "UGHOST001", "USTRANGER"
GREET_SCRIPT = """\
while [ -n "$ONDECK_PARAM_GATE" ] && [ ! -e "$ONDECK_PARAM_GATE" ]; do sleep 0.05; done
printf '{"said": "%s", "n": %s}' "$ONDECK_PARAM_MSG" "$ONDECK_PARAM_N" > "$ONDECK_OUTPUTS"
"""
BIG_OUTPUTS_SCRIPT = """printf '{"text": "%s"}' "$(printf 'ab%.0s' $(seq 1500))" > "$ONDECK_OUTPUTS"\n"""
RUN_ID = re.compile(r"run `([0-9A-Za-z]+)`")


class Receiver:
    """An HTTP endpoint on 127.0.0.1 standing in for Slack's response_url."""

    def __init__(self) -> None:
        self.posts: list[tuple[str, dict[str, Any]]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                receiver.posts.append((self.path, json.loads(body)))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                return

        self.server = HTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def url(self) -> str:
        """A fresh response_url, so each test finds only its own messages."""
        return f"{self.base}/commands/{uuid.uuid4().hex}"

    def messages(self, url: str) -> list[dict[str, Any]]:
        path = url.removeprefix(self.base)
        return [payload for posted, payload in list(self.posts) if posted == path]

    def close(self) -> None:
        self.server.shutdown()


@dataclass
class Slack:
    """A real server with Slack configured, its admin client, and the fake response_url host."""

    server: Server
    admin: httpx.Client
    receiver: Receiver

    def post(
        self,
        text: str,
        user_id: str = OPS,
        response_url: str | None = None,
        secret: str = SECRET,
        timestamp: str | None = None,
        tamper: bool = False,
    ) -> httpx.Response:
        form = {
            "token": "ignored",
            "team_id": "T0001",
            "channel_id": "C0001",
            "channel_name": "ops",
            "user_id": user_id,
            "user_name": user_id.lower(),
            "command": "/ondeck",
            "text": text,
            "response_url": response_url or "",
            "trigger_id": "1.2.3",
        }
        body = urlencode(form).encode()
        stamp = timestamp or str(int(time.time()))
        headers = {
            "content-type": "application/x-www-form-urlencoded",
            slack.TIMESTAMP_HEADER: stamp,
            slack.SIGNATURE_HEADER: slack.sign(secret, stamp, body),
        }
        sent = body + b"&x=1" if tamper else body
        return httpx.post(f"{self.server.url}/chatops/slack", content=sent, headers=headers, timeout=30)

    def runs_of(self, automation: str) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = self.admin.get(
            "/runs", params={"automation": automation, "limit": 100}
        ).json()["items"]
        return items


def _definitions() -> list[dict[str, Any]]:
    return [
        {
            "name": "greet",
            "description": "Say hello.\nA second line that list does not show.",
            "params": {
                "type": "object",
                "required": ["msg"],
                "properties": {
                    "msg": {"type": "string"},
                    "n": {"type": "integer", "default": 1},
                    "gate": {"type": "string", "default": ""},
                },
            },
            # Waits for the test to open the gate, so the reply provably came before the run ended.
            "run": {"runtime": "bash", "script": GREET_SCRIPT},
            "timeout": "60s",
            "triggers": [{"slack": {"command": "greet"}}],
        },
        {
            "name": "gated-deploy",
            "run": {"runtime": "bash", "script": "true"},
            "approval": {"approvers": ["approver"], "required": 1},
            "triggers": [{"slack": {"command": "deploy"}}],
        },
        {
            "name": "secret-job",
            "access": {"view": ["admin"]},
            "run": {"runtime": "bash", "script": "true"},
            "triggers": [{"slack": {"command": "secret-job"}}],
        },
        {"name": "not-in-slack", "run": {"runtime": "bash", "script": "true"}},
        {
            "name": "broken",
            "run": {"runtime": "bash", "script": "echo oops >&2; exit 3"},
            "triggers": [{"slack": {"command": "broken"}}],
        },
        {
            "name": "chatty",
            "run": {"runtime": "bash", "script": BIG_OUTPUTS_SCRIPT},
            "triggers": [{"slack": {"command": "chatty"}}],
        },
    ]


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    made = Receiver()
    yield made
    made.close()


@pytest.fixture(scope="module")
def chat(module_database: tuple[Path, str], receiver: Receiver) -> Iterator[Slack]:
    data, url = module_database
    users = f"{OPS}=slack-ops,{APPROVER}=slack-approver,{REVOKED}=slack-revoked,{GHOST}=no-such-token"
    env = base_env(
        data,
        url,
        ONDECK_SLACK_SIGNING_SECRET=SECRET,
        ONDECK_SLACK_USERS=users,
        ONDECK_CALLBACK_ALLOW="127.0.0.0/8",
        ONDECK_CALLBACK_RETRY_SECONDS="0.3",
        ONDECK_MAX_BODY_BYTES="4096",
    )
    server = Server(env, data / "server.log").start()
    try:
        with server.client() as admin:
            for name, roles in (
                ("slack-ops", ["operator"]),
                ("slack-approver", ["approver"]),
                ("slack-revoked", ["operator"]),
            ):
                assert admin.post("/tokens", json={"name": name, "roles": roles}).status_code == 201
            assert admin.delete("/tokens/slack-revoked").status_code == 204
            for definition in _definitions():
                put_automation(admin, definition)
            yield Slack(server, admin, receiver)
    finally:
        server.stop()


def _run_id(text: str) -> str:
    found = RUN_ID.search(text)
    assert found, text
    return found.group(1)


def test_run_answers_at_once_and_posts_the_result_to_response_url(chat: Slack, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    url = chat.receiver.url()
    started = time.monotonic()
    response = chat.post(f'run greet msg="hello world" n=2 gate={gate}', response_url=url)
    elapsed = time.monotonic() - started
    assert response.status_code == 200, response.text
    assert elapsed < 3.0, f"Slack wants an answer within 3 s; took {elapsed:.2f}s"
    reply = response.json()
    assert reply["response_type"] == "in_channel"
    run_id = _run_id(reply["text"])
    assert f"<@{OPS}>" in reply["text"] and "greet" in reply["text"]

    run = chat.admin.get(f"/runs/{run_id}").json()
    assert run["params"] == {"msg": "hello world", "n": 2, "gate": str(gate)}
    assert run["trigger"] == "slack" and run["principal"] == "slack-ops"
    assert run["status"] not in ("succeeded", "failed")  # the gate is shut: it cannot have ended
    assert chat.receiver.messages(url) == []

    gate.touch()
    finished = wait_for_run(chat.admin, run_id)
    assert finished["status"] == "succeeded"
    assert finished["outputs"] == {"said": "hello world", "n": 2}
    (message,) = wait_until(lambda: chat.receiver.messages(url), message="the result at response_url")
    assert run_id in message["text"] and "succeeded" in message["text"]
    assert message["response_type"] == "in_channel"


def test_unmapped_or_inactive_users_are_refused_politely_and_start_nothing(chat: Slack) -> None:
    before = len(chat.runs_of("greet"))
    for user, phrase in (
        (STRANGER, "is not linked"),
        (REVOKED, "missing, revoked or expired"),
        (GHOST, "missing, revoked or expired"),
    ):
        url = chat.receiver.url()
        response = chat.post("run greet msg=hi", user_id=user, response_url=url)
        assert response.status_code == 200, response.text
        reply = response.json()
        assert reply["response_type"] == "ephemeral"
        assert reply["text"].startswith("Sorry") and phrase in reply["text"]
        assert chat.receiver.messages(url) == []
    assert len(chat.runs_of("greet")) == before
    refused = chat.admin.get("/audit", params={"action": "slack.refused", "actor": f"slack:{STRANGER}"})
    assert refused.json()["items"], "a refused Slack user is audited"


def test_an_unlinked_user_with_an_over_long_id_is_refused_and_audited_under_a_shortened_id(
    chat: Slack,
) -> None:
    """The audit log keeps 100 characters of an actor: PostgreSQL refused a longer
    ``slack:<user id>``, and the user was told something went wrong inside ondeck."""
    ids = ["U" + "X" * 299, "U" + "X" * 298 + "Y"]  # alike in their first 299 characters
    for user in ids:
        reply = chat.post("run greet msg=hi", user_id=user).json()
        assert reply["response_type"] == "ephemeral" and "is not linked" in reply["text"], reply
    actors = [storable.bounded(f"slack:{user}", 100) for user in ids]
    assert len(set(actors)) == 2 and all(len(actor) == 100 for actor in actors)
    for user, actor in zip(ids, actors, strict=True):
        found = chat.admin.get("/audit", params={"action": "slack.refused", "actor": actor}).json()
        assert [entry["detail"]["user_id"] for entry in found["items"]] == [user]


def test_a_bad_missing_or_stale_signature_is_401_and_starts_nothing(chat: Slack) -> None:
    before = len(chat.runs_of("greet"))
    stale = str(int(time.time()) - 600)
    for response in (
        chat.post("run greet msg=x", secret=SECRET[::-1]),
        chat.post("run greet msg=x", tamper=True),
        chat.post("run greet msg=x", timestamp=stale),
        chat.post("run greet msg=x", timestamp="9" * 400),  # past 308 digits: a 500, and past 4300
        chat.post("run greet msg=x", timestamp="9" * 5000),
        httpx.post(f"{chat.server.url}/chatops/slack", content=b"user_id=UOPS0001&text=run+greet+msg%3Dx"),
    ):
        assert response.status_code == 401, response.text
        assert response.headers["content-type"] == "application/problem+json"
        assert response.json()["type"] == "/problems/invalid-signature"
    too_big = chat.post("run greet msg=" + "x" * 5000)
    assert too_big.status_code == 413 and too_big.json()["status"] == 413
    assert len(chat.runs_of("greet")) == before


def test_a_form_holding_a_nul_is_a_400_naming_the_field_and_starts_nothing(chat: Slack) -> None:
    """No store keeps a NUL: as an unlinked user's id, PostgreSQL refused the audit entry
    (and SQLite kept it)."""
    before = len(chat.runs_of("greet"))
    for text, user, field in (
        ("run greet msg=hi", "UNUL\x00", "user_id"),
        ("run greet msg=a\x00b", OPS, "text"),
    ):
        response = chat.post(text, user_id=user)
        assert response.status_code == 400, response.text
        assert response.headers["content-type"] == "application/problem+json"
        assert (
            response.json()["detail"]
            == f"the form's field {field!r}: text cannot hold a NUL character (\\u0000)"
        )
    assert len(chat.runs_of("greet")) == before


def test_status_list_and_help(chat: Slack) -> None:
    run_id = _run_id(chat.post("run greet msg=status-check").json()["text"])
    wait_for_run(chat.admin, run_id)
    status = chat.post(f"status {run_id}").json()
    assert status["response_type"] == "ephemeral"
    assert run_id in status["text"] and "*succeeded*" in status["text"] and "status-check" in status["text"]
    missing = chat.post("status 01NOSUCHRUN").json()
    assert missing["response_type"] == "ephemeral" and "Not found" in missing["text"]
    hidden_run = chat.admin.post("/automations/secret-job/runs").json()["id"]
    hidden = chat.post(f"status {hidden_run}").json()["text"]
    assert "Forbidden" in hidden and "secret-job" in hidden

    listing = chat.post("list").json()["text"]
    assert "`/ondeck run greet` → *greet*: Say hello. (params: msg*, gate, n)" in listing
    assert "`/ondeck run deploy` → *gated-deploy*" in listing
    assert "secret-job" not in listing and "not-in-slack" not in listing

    for text in ("help", ""):
        helped = chat.post(text).json()
        assert helped["response_type"] == "ephemeral"
        for verb in ("run NAME", "status RUN_ID", "list", "approve RUN_ID", "help"):
            assert f"/ondeck {verb}" in helped["text"]
    confused = chat.post('run greet msg="unclosed').json()["text"]
    assert confused.startswith("Sorry, I did not understand") and "/ondeck help" in confused


def test_status_shows_failures_and_shortens_long_outputs(chat: Slack) -> None:
    broken = _run_id(chat.post("run broken").json()["text"])
    chatty = _run_id(chat.post("run chatty").json()["text"])
    assert wait_for_run(chat.admin, broken)["status"] == "failed"
    assert len(wait_for_run(chat.admin, chatty)["outputs"]["text"]) == 3000
    failed = chat.post(f"status {broken}").json()["text"]
    assert (
        "*failed*" in failed and "Exit code 3" in failed and "Error: " in failed and "Finished at" in failed
    )
    long = chat.post(f"status {chatty}").json()["text"]
    assert "*succeeded*" in long and "abab" in long and " …```" in long
    assert len(long) < 2000  # the 3000-character output was cut, not pasted whole


def test_a_body_streamed_past_the_limit_is_413_and_a_form_without_user_is_400(chat: Slack) -> None:
    def chunks() -> Iterator[bytes]:
        for _ in range(5):
            yield b"x" * 1000  # no Content-Length: the limit is enforced while reading

    streamed = httpx.post(f"{chat.server.url}/chatops/slack", content=chunks())
    assert streamed.status_code == 413
    body, stamp = b"text=list&command=%2Fondeck", str(int(time.time()))
    headers = {slack.TIMESTAMP_HEADER: stamp, slack.SIGNATURE_HEADER: slack.sign(SECRET, stamp, body)}
    anonymous = httpx.post(f"{chat.server.url}/chatops/slack", content=body, headers=headers)
    assert anonymous.status_code == 400 and "user_id" in anonymous.json()["detail"]


def test_engine_refusals_become_replies_not_errors(chat: Slack) -> None:
    before = len(chat.runs_of("greet"))
    for text, phrase in (
        ("run greet n=three msg=x", "`/n`"),
        ("run greet", "'msg' is a required property"),
        ("run nothing-here", "no automation answers to 'nothing-here'"),
        ("run secret-job", "may not see automation 'secret-job'"),
        ("approve 01NOSUCHRUN", "may not decide approvals"),
    ):
        response = chat.post(text)
        assert response.status_code == 200, response.text
        reply = response.json()
        assert reply["response_type"] == "ephemeral" and phrase in reply["text"], (text, reply)
    missing = chat.post("approve 01NOSUCHRUN", user_id=APPROVER).json()
    assert missing["response_type"] == "ephemeral" and "run 01NOSUCHRUN does not exist" in missing["text"]
    assert len(chat.runs_of("greet")) == before


def test_an_approver_in_slack_approves_a_run_someone_else_requested(chat: Slack) -> None:
    url = chat.receiver.url()
    requested = chat.post("run deploy", response_url=url).json()
    run_id = _run_id(requested["text"])
    assert "waiting for approval" in requested["text"] and f"/ondeck approve {run_id}" in requested["text"]
    assert chat.admin.get(f"/runs/{run_id}").json()["status"] == "waiting_approval"

    operator = chat.post(f"approve {run_id}").json()
    assert operator["response_type"] == "ephemeral" and "may not decide approvals" in operator["text"]
    waiting = chat.post(f"status {run_id}").json()["text"]
    assert "*waiting_approval*" in waiting and "approver" in waiting

    approved = chat.post(f'approve {run_id} "ship it"', user_id=APPROVER).json()
    assert approved["response_type"] == "in_channel"
    assert f"<@{APPROVER}> approved run `{run_id}`" in approved["text"] and "queued" in approved["text"]
    run = wait_for_run(chat.admin, run_id)
    assert run["status"] == "succeeded"
    assert run["approval"]["policies"][0]["approved_by"] == ["slack-approver"]
    decision = chat.admin.get("/audit", params={"action": "approval.approve", "target": f"run:{run_id}"})
    assert [(e["actor"], e["detail"]["comment"]) for e in decision.json()["items"]] == [
        ("slack-approver", "ship it")
    ]
    (message,) = wait_until(lambda: chat.receiver.messages(url), message="the approved run's result")
    assert run_id in message["text"] and "succeeded" in message["text"]
    again = chat.post(f"approve {run_id}", user_id=APPROVER).json()
    assert again["response_type"] == "ephemeral" and "not waiting for approval" in again["text"]

    own_id = _run_id(chat.post("run deploy", user_id=APPROVER).json()["text"])
    own = chat.post(f"approve {own_id}", user_id=APPROVER).json()
    assert own["response_type"] == "ephemeral" and "someone else must approve" in own["text"]
    assert chat.admin.get(f"/runs/{own_id}").json()["status"] == "waiting_approval"


def test_without_a_signing_secret_or_with_a_bad_user_map_slack_is_503(tmp_path: Path) -> None:
    for name, extra, named in (
        ("unset", {}, "ONDECK_SLACK_SIGNING_SECRET"),
        (
            "bad-users",
            {"ONDECK_SLACK_SIGNING_SECRET": SECRET, "ONDECK_SLACK_USERS": "U1"},
            "ONDECK_SLACK_USERS",
        ),
    ):
        data = tmp_path / name
        data.mkdir()
        env = {**base_env(data, f"sqlite:///{data / 'ondeck.db'}"), **extra}
        server = Server(env, data / "server.log").start()
        try:
            response = httpx.post(f"{server.url}/chatops/slack", content=b"user_id=U1&text=help")
            assert response.status_code == 503
            problem = response.json()
            assert problem["title"] == "Slack is not configured"
            assert named in problem["detail"]
        finally:
            server.stop()


# --- the engine function, in process, against a real store ------------------


POLICY = AdmissionPolicy()


def _command(text: str, user_id: str = OPS, response_url: str | None = None) -> SlashCommand:
    return SlashCommand(user_id=user_id, text=text, user_name="ops", response_url=response_url)


def _define(store: Store, definition: dict[str, Any]) -> None:
    catalog.apply(store, parse_definition(definition))


@pytest.fixture
def ops(store: Store) -> dict[str, str]:
    tokens.create(store, SYSTEM, "ops", ["operator"])
    return {OPS: "ops"}


def test_values_typed_in_slack_are_data_never_expressions(store: Store, ops: dict[str, str]) -> None:
    _define(
        store,
        {
            "name": "echo",
            "params": {
                "type": "object",
                "properties": {"msg": {"type": "string"}, "env": {"type": "string"}},
            },
            "run": {"runtime": "bash", "script": "true"},
            "triggers": [{"slack": {"command": "echo"}, "params": {"env": "staging"}}],
        },
    )
    reply = chatops.answer(store, POLICY, ops, _command("run echo msg='${{ event.data.user_id }}' env=prod"))
    run_id = _run_id(reply.text)
    with store.read() as tx:
        run = tx.get_run(run_id)
    assert run is not None
    # The value stays literal text, and the author's pinned env wins over the one typed in Slack.
    assert run.params == {"msg": "${{ event.data.user_id }}", "env": "staging"}


def test_a_false_when_starts_nothing_and_says_so(store: Store, ops: dict[str, str]) -> None:
    _define(
        store,
        {
            "name": "picky",
            "run": {"runtime": "bash", "script": "true"},
            "triggers": [{"slack": {"command": "picky"}, "when": "${{ event.data.channel_name == 'ops' }}"}],
        },
    )
    reply = chatops.answer(store, POLICY, ops, _command("run picky"))
    assert "did not start" in reply.text and not reply.in_channel
    with store.read() as tx:
        assert tx.list_runs(automation="picky", statuses=[], before=None, limit=10, among=None) == []


def test_rate_limits_and_expired_tokens_are_explained(store: Store) -> None:
    _define(
        store,
        {
            "name": "once",
            "run": {"runtime": "bash", "script": "true"},
            "rate_limit": {"limit": 1, "per": "1h"},
            "triggers": [{"slack": {"command": "once"}}],
        },
    )
    tokens.create(store, SYSTEM, "ops", ["operator"])
    tokens.create(store, SYSTEM, "brief", ["operator"], expires_in=0.001)
    users = {OPS: "ops", "UBRIEF": "brief"}
    assert chatops.answer(store, POLICY, users, _command("run once")).in_channel
    limited = chatops.answer(store, POLICY, users, _command("run once"))
    assert "Too many requests" in limited.text and "Try again in" in limited.text
    wait_until(lambda: tokens.principal_named(store, "brief") is None, message="the token to expire")
    expired = chatops.answer(store, POLICY, users, _command("list", user_id="UBRIEF"))
    assert "revoked or expired" in expired.text


def test_sensitive_params_are_masked_in_the_reply(store: Store, ops: dict[str, str]) -> None:
    _define(
        store,
        {
            "name": "login",
            "params": {
                "type": "object",
                "properties": {"user": {"type": "string"}, "password": {"type": "string", "writeOnly": True}},
            },
            "run": {"runtime": "bash", "script": "true"},
            "triggers": [{"slack": {"command": "login"}}],
        },
    )
    reply = chatops.answer(store, POLICY, ops, _command("run login user=me password=hunter2"))
    assert "hunter2" not in reply.text and '"user": "me"' in reply.text


def test_an_approval_short_of_the_required_count_says_what_is_missing(store: Store) -> None:
    _define(
        store,
        {
            "name": "two-keys",
            "run": {"runtime": "bash", "script": "true"},
            "approval": {"approvers": ["approver"], "required": 2},
            "triggers": [{"slack": {"command": "two-keys"}}],
        },
    )
    for name, roles in (("ops", ["operator"]), ("ann", ["approver"]), ("bo", ["approver"])):
        tokens.create(store, SYSTEM, name, roles)
    users = {OPS: "ops", "UANN": "ann", "UBO": "bo"}
    run_id = _run_id(chatops.answer(store, POLICY, users, _command("run two-keys")).text)
    first = chatops.answer(store, POLICY, users, _command(f"approve {run_id}", user_id="UANN"))
    assert first.in_channel and "still needs approval (automation two-keys: 2 of approver)" in first.text
    status = chatops.answer(store, POLICY, users, _command(f"status {run_id}")).text
    assert "*waiting_approval*" in status and "Approved so far by ann" in status
    second = chatops.answer(store, POLICY, users, _command(f"approve {run_id}", user_id="UBO"))
    assert "queued now" in second.text


def test_list_says_so_when_nothing_can_be_started_from_slack(store: Store, ops: dict[str, str]) -> None:
    _define(store, {"name": "plain", "run": {"runtime": "bash", "script": "true"}})
    reply = chatops.answer(store, POLICY, ops, _command("list"))
    assert reply.text == "There are no automations you can start from Slack." and not reply.in_channel
