"""Standard Webhooks v1 (https://www.standardwebhooks.com): signing and verifying.

Used both ways: to verify incoming ``standard`` webhooks, and to sign the
callbacks and notifications ondeck sends.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
import time

TOLERANCE_SECONDS = 5 * 60
PREFIX = "whsec_"
_UNIX_TIME = re.compile(r"[0-9]{1,12}")


class SignatureError(ValueError):
    pass


def unix_time(text: str) -> int | None:
    """``text`` as a sender's Unix time in whole seconds, if it is 1 to 12 ASCII digits (no
    sign, space, ``_`` or other digits, which ``int`` accepts); None if not. Past 4300
    digits ``int`` raised, and past 308 comparing it with the clock did: a 500."""
    return int(text) if _UNIX_TIME.fullmatch(text) else None


def new_secret() -> str:
    return PREFIX + base64.b64encode(secrets.token_bytes(24)).decode()


def _key(secret: str) -> bytes:
    try:
        return base64.b64decode(secret.removeprefix(PREFIX), validate=True)
    except ValueError as exc:
        raise SignatureError("the signing secret is not whsec_<base64>") from exc


def sign(secret: str, message_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` header value: ``v1,<base64 HMAC-SHA256>``."""
    content = f"{message_id}.{timestamp}.".encode() + body
    digest = hmac.new(_key(secret), content, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def headers(secret: str, message_id: str, body: bytes, timestamp: int | None = None) -> dict[str, str]:
    stamp = int(time.time()) if timestamp is None else timestamp
    return {
        "webhook-id": message_id,
        "webhook-timestamp": str(stamp),
        "webhook-signature": sign(secret, message_id, stamp, body),
    }


def verify(
    secret: str,
    message_id: str | None,
    timestamp: str | None,
    signature: str | None,
    body: bytes,
    now: float | None = None,
) -> None:
    """Raise ``SignatureError`` unless one of the v1 signatures matches, within the tolerance."""
    if not (message_id and timestamp and signature):
        raise SignatureError("missing webhook-id, webhook-timestamp or webhook-signature header")
    stamp = unix_time(timestamp)
    if stamp is None:
        raise SignatureError("webhook-timestamp is not a Unix time in seconds")
    current = time.time() if now is None else now
    if abs(current - stamp) > TOLERANCE_SECONDS:
        raise SignatureError("webhook-timestamp is outside the 5-minute tolerance (replay?)")
    expected = sign(secret, message_id, stamp, body).encode()
    for candidate in signature.split():
        if hmac.compare_digest(expected, candidate.encode()):
            return
    raise SignatureError("no webhook-signature matches")
