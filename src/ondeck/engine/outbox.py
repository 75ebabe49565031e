"""The delivery outbox: callbacks and notifications, durable, signed, retried.

A delivery is written in the same transaction that ends the run, so a crash
cannot lose it; a sender loop in every process takes due deliveries with
``SKIP LOCKED``, signs them with the Standard Webhooks scheme, and retries
with exponential backoff for up to 24 hours. Destinations on loopback,
link-local and private networks are refused unless allow-listed (SSRF).
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import socket
import time
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import httpx
from pydantic import ValidationError

from ondeck import blocking
from ondeck.domain import Run, utcnow
from ondeck.errors import InvalidRequest
from ondeck.ids import new_id
from ondeck.spec.loader import summarize
from ondeck.spec.models import Automation, Notify
from ondeck.store.store import Store, Transaction
from ondeck.streaks import Failures
from ondeck.triggers import standard_webhooks

GIVE_UP_AFTER = timedelta(hours=24)
MAX_RETRY = 3600.0
HOLD = timedelta(seconds=60)  # a claimed delivery is invisible to other senders this long
log = logging.getLogger(__name__)


def check_url(url: str) -> str:
    """``url``, if it can be called: http(s), with a host that is a host name (labels of
    1 to 63 characters, as IDNA encodes them) or an address."""
    try:
        parts = urlsplit(url)
        usable = parts.scheme in ("http", "https") and bool(parts.hostname) and parts.port != 0
        if usable:
            (parts.hostname or "").encode("idna")
    except ValueError:  # an unclosed [IPv6 address], a port that is not a number or past
        usable = False  # 65535, a label too long or empty (UnicodeError)
    if not usable:
        raise InvalidRequest(f"callback URL must be an http(s) URL with a valid host, not {url!r}")
    return url


def run_summary(run: Run) -> dict[str, Any]:
    return {
        "id": run.id,
        "automation": run.automation,
        "version": run.version,
        "status": str(run.status),
        "outputs": run.outputs,
        "exit_code": run.exit_code,
        "error": run.error,
        "attempt": run.attempt,
        "created_at": run.created_at.isoformat(),
        "finished_at": run.finished_at.isoformat() if run.finished_at else None,
    }


def enqueue(tx: Transaction, run: Run, now: datetime, definition: Automation | None = None) -> None:
    """Queue the callback and matching notifications for a run that just ended.

    ``definition`` is the run's automation version when the caller has it parsed
    already; otherwise its notify rules are read from the store.
    """
    targets: list[tuple[str, str]] = []
    if run.callback_url:
        kind = "slack" if run.trigger == "slack" else "callback"
        targets.append((kind, run.callback_url))
    for rule in _stored_notify(tx, run) if definition is None else definition.notify:
        if str(run.status) in rule.on:
            targets.append(("notify", rule.url))
    for kind, url in targets:
        payload = (
            _slack_message(run)
            if kind == "slack"
            else {
                "type": f"run.{run.status}",
                "timestamp": now.isoformat(),
                "data": run_summary(run),
            }
        )
        tx.insert_delivery(new_id(), run.id, url, kind, payload, now)


def _stored_notify(tx: Transaction, run: Run) -> list[Notify]:
    """The run's notify rules as stored, leaving out (and logging) any this release's spec
    refuses: a rule that cannot be read must not stop the run from ending."""
    version = tx.automation_version(run.automation, run.version)
    rules = []
    for number, raw in enumerate(version.definition.get("notify", []) if version else [], 1):
        try:
            rules.append(Notify.model_validate(raw))
        except ValidationError as exc:
            log.warning("run %s: notify rule %d left out: %s", run.id, number, summarize(exc))
    return rules


def _slack_message(run: Run) -> dict[str, Any]:
    text = f"Run `{run.id}` of *{run.automation}* {run.status}"
    if run.error:
        text += f": {run.error}"
    if run.outputs:
        text += f"\n```{json.dumps(run.outputs)[:2500]}```"
    return {"response_type": "in_channel", "text": text}


class Destinations:
    """Which hosts deliveries may go to: public addresses, plus an explicit allow-list."""

    def __init__(self, allow: str | None) -> None:
        self.networks = []
        self.hosts = set()
        for entry in (allow or "").split(","):
            entry = entry.strip()
            if not entry:
                continue
            try:
                self.networks.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                self.hosts.add(entry.lower())

    def refusal(self, url: str) -> str | None:
        """Why ``url`` may not be called, or None if it may. Resolves the host name."""
        host = urlsplit(url).hostname or ""
        if host.lower() in self.hosts:
            return None
        try:
            infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
        except (OSError, UnicodeError) as exc:  # UnicodeError: not a host name IDNA encodes
            return f"cannot resolve {host}: {exc}"
        for info in infos:
            address = ipaddress.ip_address(info[4][0])
            if any(address in network for network in self.networks):
                continue
            if (
                address.is_private
                or address.is_loopback
                or address.is_link_local
                or address.is_multicast
                or address.is_reserved
                or address.is_unspecified
            ):
                return (
                    f"destination {host} ({address}) is a private, loopback or link-local address; "
                    "allow it with ONDECK_CALLBACK_ALLOW"
                )
        return None


def _backoff(first: float, attempt: int) -> float:
    return float(min(MAX_RETRY, first * 2 ** (attempt - 1)))


def _claim(store: Store, limit: int) -> list[dict[str, Any]]:
    """Due deliveries, held from other senders for ``HOLD``: when they are due and until
    when they are held is reckoned in the store's time (``Store.now``), which every host
    shares, so a sender whose clock runs ahead cannot take one another holds."""
    now = store.now()
    with store.transaction() as tx:
        return tx.claim_deliveries(now, now + HOLD, limit)


def _record(
    store: Store,
    delivery: dict[str, Any],
    status_code: int | None,
    error: str | None,
    ms: int,
    first_retry: float,
) -> None:
    now = utcnow()
    number = delivery["attempts"] + 1
    if status_code is not None and 200 <= status_code < 300:
        outcome: dict[str, Any] = {"status": "delivered", "delivered_at": now, "last_error": None}
    elif (error and error.startswith("refused:")) or now - delivery["created_at"] >= GIVE_UP_AFTER:
        outcome = {"status": "failed", "last_error": error or f"HTTP {status_code}"}
    else:
        retry_at = store.now() + timedelta(seconds=_backoff(first_retry, number))
        outcome = {
            "status": "pending",
            "next_attempt_at": retry_at,
            "last_error": error or f"HTTP {status_code}",
        }
    with store.transaction() as tx:
        tx.record_delivery_attempt(delivery["id"], number, now, status_code, error, ms, **outcome)


async def send(
    delivery: dict[str, Any], client: httpx.AsyncClient, secret: str, destinations: Destinations
) -> tuple[int | None, str | None]:
    refusal = await blocking.run(destinations.refusal, delivery["url"])
    if refusal:
        return None, f"refused: {refusal}"
    body = json.dumps(delivery["payload"], separators=(",", ":")).encode()
    headers = {"content-type": "application/json", "user-agent": "ondeck-outbox"}
    headers.update(standard_webhooks.headers(secret, delivery["id"], body))
    try:
        response = await client.post(delivery["url"], content=body, headers=headers)
    except httpx.HTTPError as exc:
        return None, f"{type(exc).__name__}: {exc}"
    return response.status_code, None


async def deliver_forever(
    store: Store,
    secret: str,
    destinations: Destinations,
    first_retry: float,
    wake: asyncio.Event,
    stop: asyncio.Event,
) -> None:
    """Send due deliveries; wakes on new ones, else checks every second for due retries."""
    async with httpx.AsyncClient(timeout=10, follow_redirects=False) as client:
        failures = Failures(log, "claiming deliveries")
        while not stop.is_set():
            try:
                batch = await blocking.run(_claim, store, 20)
            except Exception:
                failures.failed()
                batch = []
            else:
                failures.succeeded()
            for delivery in batch:
                started = time.monotonic()
                try:
                    status_code, error = await send(delivery, client, secret, destinations)
                except Exception as exc:  # a bug: fails this delivery's attempt, not the sender
                    log.exception("sending delivery %s failed", delivery["id"])
                    status_code, error = None, f"{type(exc).__name__} in sending (the server's log has more)"
                elapsed = int((time.monotonic() - started) * 1000)
                try:
                    await blocking.run(_record, store, delivery, status_code, error, elapsed, first_retry)
                except Exception:
                    log.exception("recording delivery %s failed", delivery["id"])
            if batch:
                continue
            wake.clear()
            waiters = {asyncio.ensure_future(wake.wait()), asyncio.ensure_future(stop.wait())}
            await asyncio.wait(waiters, timeout=1.0, return_when=asyncio.FIRST_COMPLETED)
            for waiter in waiters:
                waiter.cancel()
