"""Slack slash commands: v0 request signing, the form Slack posts, and the command text.

Slack signs ``v0:{timestamp}:{raw body}`` with the app's signing secret
(HMAC-SHA256, hex, header ``X-Slack-Signature: v0=…``). The signature covers
the bytes exactly as sent, so it is checked before the form is parsed; the
timestamp is signed too, and one older than five minutes is a replay.

The command text is split the way a shell would split it (quotes group
words), and that is all: nothing here executes anything.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import shlex
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl

from ondeck.spec.params import coerce_text
from ondeck.storable import value_problems
from ondeck.triggers.standard_webhooks import unix_time

TOLERANCE_SECONDS = 5 * 60
VERSION = "v0"
SIGNATURE_HEADER = "X-Slack-Signature"
TIMESTAMP_HEADER = "X-Slack-Request-Timestamp"
PARAM_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]{0,63}$")
VERBS = ("run", "status", "list", "approve", "help")

# Slack escapes these three in the text it sends; clients may "smarten" quotes.
_ENTITIES = (("&lt;", "<"), ("&gt;", ">"), ("&amp;", "&"))
_SMART_QUOTES = str.maketrans({"\u201c": '"', "\u201d": '"', "\u2018": "'", "\u2019": "'"})


class SignatureError(ValueError):
    """The request does not prove it came from Slack."""


class CommandError(ValueError):
    """The command text cannot be understood; the message says how to fix it."""


def sign(secret: str, timestamp: str, body: bytes) -> str:
    """The ``X-Slack-Signature`` value Slack would send for ``body`` at ``timestamp``."""
    base = f"{VERSION}:{timestamp}:".encode() + body
    return f"{VERSION}=" + hmac.new(secret.encode(), base, hashlib.sha256).hexdigest()


def verify(
    secret: str, timestamp: str | None, signature: str | None, body: bytes, now: float | None = None
) -> None:
    """Raise ``SignatureError`` unless ``signature`` signs ``body`` at a timestamp within tolerance.

    The timestamp is signed as the header's exact text, and only plain digits
    are accepted, so no other spelling of the same number can pass.
    """
    if not timestamp or not signature:
        raise SignatureError(f"missing {SIGNATURE_HEADER} or {TIMESTAMP_HEADER} header")
    stamp = unix_time(timestamp)
    if stamp is None:
        raise SignatureError(f"{TIMESTAMP_HEADER} is not a Unix time")
    current = time.time() if now is None else now
    if abs(current - stamp) > TOLERANCE_SECONDS:
        raise SignatureError(f"{TIMESTAMP_HEADER} is outside the 5-minute tolerance (replay?)")
    expected = sign(secret, timestamp, body).encode()
    if not hmac.compare_digest(expected, signature.encode("utf-8", "replace")):
        raise SignatureError(f"{SIGNATURE_HEADER} does not match the body")


@dataclass(frozen=True)
class SlashCommand:
    """The fields of a slash command request that ondeck uses."""

    user_id: str
    text: str = ""
    command: str = "/ondeck"
    user_name: str = ""
    response_url: str | None = None
    channel_id: str = ""
    channel_name: str = ""
    team_id: str = ""
    trigger_id: str = ""


def read_form(body: bytes) -> SlashCommand:
    """The slash command in an ``application/x-www-form-urlencoded`` body (already verified)."""
    try:
        pairs = parse_qsl(body.decode("utf-8"), keep_blank_values=True, strict_parsing=bool(body))
    except (UnicodeDecodeError, ValueError) as exc:
        raise CommandError(f"the body is not a URL-encoded form: {exc}") from exc
    form: dict[str, str] = {}
    for key, value in pairs:
        form.setdefault(key, value)
    # Slack never sends a NUL; no store can keep one (the audit log refused it as an actor).
    for path, problem in value_problems(form):
        field = f"field {path[0]!r}" if path else "field names"
        raise CommandError(f"the form's {field}: {problem}")
    if not form.get("user_id"):
        raise CommandError("the form has no user_id")
    return SlashCommand(
        user_id=form["user_id"],
        text=form.get("text", ""),
        command=form.get("command") or "/ondeck",
        user_name=form.get("user_name", ""),
        response_url=form.get("response_url") or None,
        channel_id=form.get("channel_id", ""),
        channel_name=form.get("channel_name", ""),
        team_id=form.get("team_id", ""),
        trigger_id=form.get("trigger_id", ""),
    )


def read_users(setting: str | None) -> dict[str, str]:
    """``ONDECK_SLACK_USERS`` (``U123=alice,U456=bob``) as Slack user id → token name."""
    users: dict[str, str] = {}
    for entry in (setting or "").split(","):
        entry = entry.strip()
        if not entry:
            continue
        user_id, equals, name = (part.strip() for part in entry.partition("="))
        if not equals or not user_id or not name:
            raise ValueError(f"ONDECK_SLACK_USERS entry {entry!r} is not SLACK_USER_ID=token-name")
        users[user_id] = name
    return users


@dataclass(frozen=True)
class Command:
    """One parsed command: ``verb`` and its operands, e.g. ``run deploy env=prod``."""

    verb: str
    target: str | None = None  # automation's Slack name for run, run id for status/approve
    pairs: tuple[tuple[str, str], ...] = ()  # run's key=value operands, as typed
    comment: str = ""  # approve's optional words after the run id


def parse(text: str) -> Command:
    """Split ``text`` like a shell would and read it as one of the commands; nothing is executed."""
    cleaned = text.translate(_SMART_QUOTES)
    for entity, char in _ENTITIES:
        cleaned = cleaned.replace(entity, char)
    try:
        words = tuple(shlex.split(cleaned, comments=False, posix=True))
    except ValueError as exc:
        raise CommandError(f"cannot split the command: {exc} (a quote is not closed?)") from exc
    if not words:
        return Command("help")
    verb, operands = words[0].lower(), words[1:]
    if verb not in VERBS:
        raise CommandError(f"unknown command {words[0]!r}; try one of {', '.join(VERBS)}")
    if verb in ("list", "help"):
        if operands:
            raise CommandError(f"`{verb}` takes no arguments")
        return Command(verb)
    if not operands:
        what = "NAME [key=value …]" if verb == "run" else "RUN_ID"
        raise CommandError(f"usage: {verb} {what}")
    if verb == "status":
        if len(operands) > 1:
            raise CommandError("usage: status RUN_ID")
        return Command(verb, operands[0])
    if verb == "approve":
        return Command(verb, operands[0], comment=" ".join(operands[1:]))
    return Command(verb, operands[0], tuple(_pair(word) for word in operands[1:]))


def _pair(word: str) -> tuple[str, str]:
    key, equals, value = word.partition("=")
    if not equals:
        raise CommandError(f'{word!r} is not key=value (quote values with spaces: msg="hello world")')
    if not PARAM_NAME.match(key):
        raise CommandError(f"{key!r} is not a parameter name (letters, digits, _ and -)")
    return key, value


def typed_params(pairs: tuple[tuple[str, str], ...], schema: Mapping[str, Any]) -> dict[str, Any]:
    """``run``'s ``key=value`` operands typed by the automation's params schema."""
    properties = schema.get("properties") or {}
    typed: dict[str, Any] = {}
    for key, value in pairs:
        prop = properties.get(key)
        typed[key] = coerce_text(value, prop if isinstance(prop, dict) else {})
    return typed


def escape(text: str) -> str:
    """``text`` safe to show inside a Slack message (Slack's three control characters)."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
