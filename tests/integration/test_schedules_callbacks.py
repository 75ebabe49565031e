"""Schedules across processes, and signed callbacks through the outbox, against real servers."""

from __future__ import annotations

import itertools
import json
import threading
from collections.abc import Iterator
from datetime import datetime
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from ondeck.triggers import standard_webhooks
from tests.support import Server, base_env, put_automation, unique, wait_for_run, wait_until

CALLBACK_SECRET = standard_webhooks.new_secret()


class Receiver:
    """An HTTP endpoint on 127.0.0.1 that fails the first ``failures`` requests."""

    def __init__(self, failures: int = 0) -> None:
        self.failures = failures
        self.requests: list[tuple[dict[str, str], bytes, int]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                status = 500 if len(receiver.requests) < receiver.failures else 200
                receiver.requests.append(({k.lower(): v for k, v in self.headers.items()}, body, status))
                self.send_response(status)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                return

        self.server = HTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    made = Receiver(failures=2)
    yield made
    made.close()


def start(tmp_path: Path, database_url: str, name: str, **env: str) -> Server:
    data = tmp_path / name
    data.mkdir()
    return Server(base_env(data, database_url, **env), data / "server.log").start()


def test_each_tick_fires_exactly_once_across_two_servers(tmp_path: Path, pg_url: str) -> None:
    first = start(tmp_path, pg_url, "a")
    second = start(tmp_path, pg_url, "b")
    name = unique("ticker")
    try:
        with first.client() as client:
            put_automation(
                client,
                {
                    "name": name,
                    "params": {"type": "object", "properties": {"tick": {"type": "string"}}},
                    "run": {"runtime": "bash", "script": "true"},
                    "triggers": [
                        {
                            "schedule": {"cron": "*/2 * * * * *"},
                            "params": {"tick": "${{ event.data.fire_at }}"},
                        }
                    ],
                },
            )
            schedule = client.get(f"/automations/{name}").json()["triggers"][0]
            assert schedule["paused"] is False and schedule["next_fire_at"]

            def runs() -> list[dict[str, Any]]:
                items: list[dict[str, Any]] = client.get(
                    "/runs", params={"automation": name, "limit": 100}
                ).json()["items"]
                return items

            wait_until(lambda: len(runs()) >= 10, timeout=60, interval=0.5, message="ten ticks")
            paused = client.post(f"/automations/{name}/schedules/0/pause").json()
            assert paused["paused"] is True and paused["next_fire_at"] is None
            seen = runs()
            ticks = sorted(datetime.fromisoformat(r["params"]["tick"]) for r in seen)
            assert len(ticks) == len(set(ticks)) == len(seen)  # no tick twice
            gaps = {(b - a).total_seconds() for a, b in itertools.pairwise(ticks)}
            assert gaps == {2.0}  # and none skipped
            assert {r["trigger"] for r in seen} == {"schedule"}
            assert len({r["principal"] for r in seen}) == 1
    finally:
        first.stop()
        second.stop()


def test_callback_is_retried_then_delivered_once_signed(tmp_path: Path, receiver: Receiver) -> None:
    server = start(
        tmp_path,
        f"sqlite:///{tmp_path / 'cb.db'}",
        "cb",
        ONDECK_CALLBACK_ALLOW="127.0.0.1/32",
        ONDECK_CALLBACK_SECRET=CALLBACK_SECRET,
        ONDECK_CALLBACK_RETRY_SECONDS="0.3",
    )
    try:
        with server.client() as client:
            name = unique("cb")
            put_automation(
                client,
                {"name": name, "run": {"runtime": "bash", "script": "echo '{\"n\": 1}' > $ONDECK_OUTPUTS"}},
            )
            run = client.post(f"/automations/{name}/runs", json={"callback_url": receiver.url}).json()
            wait_for_run(client, run["id"])

            def delivered() -> list[dict[str, Any]] | None:
                found: list[dict[str, Any]] = client.get(f"/runs/{run['id']}/deliveries").json()
                return found if found and found[0]["status"] == "delivered" else None

            (delivery,) = wait_until(delivered, timeout=30, message="the callback to be delivered")
            assert [a["status_code"] for a in delivery["attempt_log"]] == [500, 500, 200]
            assert [status for _, _, status in receiver.requests] == [500, 500, 200]
            headers, body, _ = receiver.requests[-1]
            standard_webhooks.verify(
                CALLBACK_SECRET,
                headers["webhook-id"],
                headers["webhook-timestamp"],
                headers["webhook-signature"],
                body,
            )
            assert len({h["webhook-id"] for h, _, _ in receiver.requests}) == 1  # one delivery, retried
            payload = json.loads(body)
            assert payload["type"] == "run.succeeded" and payload["data"]["id"] == run["id"]
            assert payload["data"]["outputs"] == {"n": 1}
            with pytest.raises(standard_webhooks.SignatureError):
                standard_webhooks.verify(
                    CALLBACK_SECRET,
                    headers["webhook-id"],
                    headers["webhook-timestamp"],
                    headers["webhook-signature"],
                    body + b" ",
                )
    finally:
        server.stop()


def test_notify_rules_and_ssrf_refusal(tmp_path: Path) -> None:
    receiver = Receiver()
    server = start(tmp_path, f"sqlite:///{tmp_path / 'n.db'}", "n", ONDECK_CALLBACK_RETRY_SECONDS="0.3")
    try:
        with server.client() as client:
            name = unique("notify")
            put_automation(
                client,
                {
                    "name": name,
                    "params": {
                        "type": "object",
                        "properties": {"fail": {"type": "boolean", "default": False}},
                    },
                    "run": {"runtime": "bash", "script": '[ "$ONDECK_PARAM_FAIL" = false ]'},
                    "notify": [{"on": ["failed"], "url": receiver.url}],
                },
            )
            ok = wait_for_run(client, client.post(f"/automations/{name}/runs").json()["id"])
            bad = wait_for_run(
                client, client.post(f"/automations/{name}/runs", json={"params": {"fail": True}}).json()["id"]
            )
            assert ok["status"] == "succeeded" and bad["status"] == "failed"
            assert client.get(f"/runs/{ok['id']}/deliveries").json() == []

            def settled() -> list[dict[str, Any]] | None:
                found: list[dict[str, Any]] = client.get(f"/runs/{bad['id']}/deliveries").json()
                return found if found and found[0]["status"] == "failed" else None

            (refused,) = wait_until(settled, timeout=30, message="the refused notification")
            assert "ONDECK_CALLBACK_ALLOW" in refused["last_error"] and len(refused["attempt_log"]) == 1
            assert receiver.requests == []  # loopback is not allow-listed on this server
            wrong = client.post(f"/automations/{name}/runs", json={"callback_url": "file:///etc/passwd"})
            assert wrong.status_code == 400 and "http(s)" in wrong.json()["detail"]
    finally:
        server.stop()
        receiver.close()


def test_schedules_listed_with_next_fire(tmp_path: Path) -> None:
    server = start(tmp_path, f"sqlite:///{tmp_path / 's.db'}", "s")
    try:
        with server.client() as client:
            name = unique("nightly")
            put_automation(
                client,
                {
                    "name": name,
                    "run": {"runtime": "bash", "script": "true"},
                    "triggers": [{"schedule": {"cron": "0 2 * * *", "timezone": "UTC", "catch_up": "none"}}],
                },
            )
            listed = [s for s in client.get("/schedules").json() if s["automation"] == name]
            assert len(listed) == 1 and listed[0]["next_fire_at"].endswith("02:00:00Z")
            assert client.post(f"/automations/{name}/schedules/0/pause").json()["paused"] is True
            assert client.post(f"/automations/{name}/schedules/0/resume").json()["paused"] is False
            actions = [
                e["action"]
                for e in client.get("/audit", params={"target": f"schedule:{name}#0"}).json()["items"]
            ]
            assert actions == ["schedule.resumed", "schedule.paused"]
        assert httpx.get(server.url + "/healthz").status_code == 200
    finally:
        server.stop()
