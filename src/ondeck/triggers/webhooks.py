"""Verifying incoming webhooks: one pure function per scheme a trigger may name.

Each takes the hook's secret, the request headers (names in lower case), the
raw body and the current time, and returns only if the request proves it knows
the secret; otherwise it raises ``WebhookRefused`` saying what was wrong, never
echoing the secret or the expected signature. Every comparison of secret
material is constant-time (``hmac.compare_digest``) so response timing does not
reveal how much of a guess was right.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import time
from collections.abc import Callable, Mapping
from hmac import compare_digest
from hmac import new as new_mac

from ondeck.errors import OndeckError, Unauthenticated
from ondeck.triggers import standard_webhooks

TOLERANCE_SECONDS = 5 * 60
SIGNATURE_HEADER = "X-Ondeck-Signature"

Headers = Mapping[str, str]
Verifier = Callable[[str, Headers, bytes, float | None], None]


class WebhookRefused(Unauthenticated):
    """The request does not prove it comes from the holder of the hook's secret."""

    code = "webhook-refused"
    title = "Webhook signature or credentials not accepted"


class UnusableSecret(OndeckError):
    """The stored secret cannot serve this scheme: a configuration error, not the sender's."""

    code = "webhook-secret-unusable"
    status = 503
    title = "Webhook secret unusable"


def _same(given: str, expected: str) -> bool:
    return compare_digest(given.encode(), expected.encode())


def _hex_mac(secret: str, content: bytes) -> str:
    return new_mac(secret.encode(), content, hashlib.sha256).hexdigest()


def _check_fresh(stamp: int, now: float | None, header: str) -> None:
    current = time.time() if now is None else now
    if abs(current - stamp) > TOLERANCE_SECONDS:
        raise WebhookRefused(
            f"{header} timestamp is outside the 5-minute tolerance (replayed or clock skew?)"
        )


def github(secret: str, headers: Headers, body: bytes, now: float | None = None) -> None:
    """``X-Hub-Signature-256: sha256=<hex HMAC-SHA256(secret, body)>``, as GitHub signs deliveries."""
    given = headers.get("x-hub-signature-256")
    if not given:
        raise WebhookRefused("missing X-Hub-Signature-256 header")
    if not _same(given.strip().lower(), "sha256=" + _hex_mac(secret, body)):
        raise WebhookRefused("X-Hub-Signature-256 does not match the body")


def standard(secret: str, headers: Headers, body: bytes, now: float | None = None) -> None:
    """Standard Webhooks v1: ``webhook-id``, ``webhook-timestamp``, ``webhook-signature``."""
    if not secret.startswith(standard_webhooks.PREFIX):
        raise UnusableSecret("a standard webhook secret is whsec_<base64>")
    try:
        if not base64.b64decode(secret.removeprefix(standard_webhooks.PREFIX), validate=True):
            raise UnusableSecret("a standard webhook secret is whsec_<base64> with a non-empty key")
    except binascii.Error as exc:
        raise UnusableSecret("a standard webhook secret is whsec_<base64>") from exc
    try:
        standard_webhooks.verify(
            secret,
            headers.get("webhook-id"),
            headers.get("webhook-timestamp"),
            headers.get("webhook-signature"),
            body,
            now,
        )
    except standard_webhooks.SignatureError as exc:
        raise WebhookRefused(str(exc)) from exc


def sign_hmac(secret: str, body: bytes, timestamp: int | None = None) -> str:
    """The ``X-Ondeck-Signature`` value a sender of an ``hmac`` webhook puts on ``body``."""
    stamp = int(time.time()) if timestamp is None else timestamp
    return f"t={stamp},v1={_hex_mac(secret, f'{stamp}.'.encode() + body)}"


def hmac(secret: str, headers: Headers, body: bytes, now: float | None = None) -> None:
    """``X-Ondeck-Signature: t=<unix ts>,v1=<hex HMAC-SHA256(secret, "<t>." + body)>``.

    The timestamp is signed with the body, so an old request cannot be replayed
    with a fresh one; several ``v1=`` entries are accepted (key rotation).
    """
    header = headers.get(SIGNATURE_HEADER.lower())
    if not header:
        raise WebhookRefused(f"missing {SIGNATURE_HEADER} header")
    stamps, candidates = [], []
    for part in header.split(","):
        name, _, value = part.strip().partition("=")
        if name == "t":
            stamps.append(value)
        elif name == "v1":
            candidates.append(value.strip().lower())
    stamp = standard_webhooks.unix_time(stamps[0]) if len(stamps) == 1 else None
    if stamp is None:
        raise WebhookRefused(f"{SIGNATURE_HEADER} needs exactly one t=<unix seconds>")
    if not candidates:
        raise WebhookRefused(f"{SIGNATURE_HEADER} has no v1= signature")
    _check_fresh(stamp, now, SIGNATURE_HEADER)
    expected = _hex_mac(secret, f"{stamps[0]}.".encode() + body)
    if not any(_same(candidate, expected) for candidate in candidates):
        raise WebhookRefused(f"{SIGNATURE_HEADER} does not match the body and timestamp")


def _credentials(headers: Headers) -> tuple[str, str]:
    """(scheme in lower case, credentials) from the Authorization header."""
    scheme, _, credentials = headers.get("authorization", "").strip().partition(" ")
    return scheme.lower(), credentials.strip()


def token(secret: str, headers: Headers, body: bytes, now: float | None = None) -> None:
    """``Authorization: Bearer <secret>``: no signature, so only ever over HTTPS."""
    scheme, credentials = _credentials(headers)
    if scheme != "bearer" or not credentials:
        raise WebhookRefused("missing Authorization: Bearer header")
    if not _same(credentials, secret):
        raise WebhookRefused("the bearer token is not this hook's secret")


def alertmanager(secret: str, headers: Headers, body: bytes, now: float | None = None) -> None:
    """What Alertmanager's ``http_config`` sends: a bearer token, or Basic auth.

    With Basic auth either the password or the whole ``user:password`` may be
    the secret, so a receiver can be configured with a password alone or with
    a user name folded into the secret.
    """
    scheme, credentials = _credentials(headers)
    if scheme == "bearer" and credentials:
        if not _same(credentials, secret):
            raise WebhookRefused("the bearer token is not this hook's secret")
        return
    if scheme == "basic" and credentials:
        try:
            pair = base64.b64decode(credentials, validate=True).decode()
        except ValueError as exc:  # not base64 (or not ASCII at all, as a header may be), or not UTF-8
            raise WebhookRefused("the Basic credentials are not base64 of user:password") from exc
        _, _, password = pair.partition(":")
        # Both comparisons always run: no short-circuit to time.
        if not (_same(password, secret) | _same(pair, secret)):
            raise WebhookRefused("the Basic credentials do not match this hook's secret")
        return
    raise WebhookRefused("missing Authorization header (Bearer or Basic)")


SCHEMES: dict[str, Verifier] = {
    "github": github,
    "standard": standard,
    "hmac": hmac,
    "token": token,
    "alertmanager": alertmanager,
}


def verify(scheme: str, secret: str, headers: Headers, body: bytes, now: float | None = None) -> None:
    """Verify with the named scheme; raise ``WebhookRefused`` unless the request proves the secret."""
    SCHEMES[scheme](secret, headers, body, now)
