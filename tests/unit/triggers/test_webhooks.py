"""Webhook verification against each scheme's published test vector, and every way to get it wrong."""

from __future__ import annotations

import base64
import hashlib
import hmac as hmac_lib
from typing import Any, get_args

import pytest

from ondeck.spec.triggers import WebhookSpec
from ondeck.triggers import standard_webhooks, webhooks
from ondeck.triggers.webhooks import UnusableSecret, WebhookRefused


def flip(text: str, index: int = -2) -> str:
    """``text`` with one character changed (still in the same alphabet)."""
    char = text[index]
    replacement = "0" if char != "0" else "1"
    return text[:index] + replacement + text[index + 1 :] if index != -1 else text[:-1] + replacement


def flip_byte(body: bytes, index: int = 0) -> bytes:
    return body[:index] + bytes([body[index] ^ 0x01]) + body[index + 1 :]


def refused(scheme: str, secret: str, headers: dict[str, str], body: bytes, now: float | None = None) -> str:
    with pytest.raises(WebhookRefused) as caught:
        webhooks.verify(scheme, secret, headers, body, now)
    detail = caught.value.detail
    assert secret not in detail  # messages say what was wrong, never what the secret is
    assert caught.value.status == 401
    return detail


def test_every_scheme_a_trigger_may_name_has_a_verifier() -> None:
    scheme_type: Any = WebhookSpec.model_fields["scheme"].annotation
    assert set(webhooks.SCHEMES) == set(get_args(scheme_type))


# --- GitHub: the example in "Validating webhook deliveries" -----------------------------

GITHUB_SECRET = "It's a Secret to Everybody"
GITHUB_BODY = b"Hello, World!"
GITHUB_SIGNATURE = "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17"


def test_github_published_example_verifies() -> None:
    webhooks.github(GITHUB_SECRET, {"x-hub-signature-256": GITHUB_SIGNATURE}, GITHUB_BODY)


def test_github_rejects_a_one_byte_change_in_body_or_signature() -> None:
    headers = {"x-hub-signature-256": GITHUB_SIGNATURE}
    assert "does not match" in refused("github", GITHUB_SECRET, headers, flip_byte(GITHUB_BODY))
    assert "does not match" in refused("github", GITHUB_SECRET, headers, GITHUB_BODY + b" ")
    for index in (7, 30, -1):  # first, middle and last hex digit
        tampered = {"x-hub-signature-256": flip(GITHUB_SIGNATURE, index)}
        assert "does not match" in refused("github", GITHUB_SECRET, tampered, GITHUB_BODY)


def test_github_rejects_missing_header_other_secret_and_sha1() -> None:
    assert "missing X-Hub-Signature-256" in refused("github", GITHUB_SECRET, {}, GITHUB_BODY)
    refused("github", GITHUB_SECRET + "!", {"x-hub-signature-256": GITHUB_SIGNATURE}, GITHUB_BODY)
    sha1 = "sha1=" + hmac_lib.new(GITHUB_SECRET.encode(), GITHUB_BODY, hashlib.sha1).hexdigest()
    refused("github", GITHUB_SECRET, {"x-hub-signature-256": sha1}, GITHUB_BODY)
    refused(
        "github",
        GITHUB_SECRET,
        {"x-hub-signature-256": GITHUB_SIGNATURE.removeprefix("sha256=")},
        GITHUB_BODY,
    )


# --- Standard Webhooks: the vector of the specification's reference libraries ----------

SW_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
SW_ID = "msg_p5jXN8AQM9LWM0D4loKWxJek"
SW_TIMESTAMP = 1614265330
SW_BODY = b'{"test": 2432232314}'
SW_SIGNATURE = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


def sw_headers(**changes: str) -> dict[str, str]:
    headers = {"webhook-id": SW_ID, "webhook-timestamp": str(SW_TIMESTAMP), "webhook-signature": SW_SIGNATURE}
    headers.update({k.replace("_", "-"): v for k, v in changes.items()})
    return headers


def test_standard_published_vector_signs_and_verifies() -> None:
    assert standard_webhooks.sign(SW_SECRET, SW_ID, SW_TIMESTAMP, SW_BODY) == SW_SIGNATURE
    webhooks.standard(SW_SECRET, sw_headers(), SW_BODY, now=SW_TIMESTAMP)
    # A sender may list several signatures (key rotation); one valid one is enough.
    webhooks.standard(
        SW_SECRET, sw_headers(webhook_signature=f"v1,bm9wZQ== {SW_SIGNATURE}"), SW_BODY, SW_TIMESTAMP
    )


def test_standard_rejects_a_one_byte_change_in_body_signature_timestamp_or_id() -> None:
    now = SW_TIMESTAMP
    refused("standard", SW_SECRET, sw_headers(), flip_byte(SW_BODY, 3), now)
    refused("standard", SW_SECRET, sw_headers(webhook_signature=flip(SW_SIGNATURE, 5)), SW_BODY, now)
    refused("standard", SW_SECRET, sw_headers(webhook_timestamp=str(SW_TIMESTAMP + 1)), SW_BODY, now)
    refused("standard", SW_SECRET, sw_headers(webhook_id=flip(SW_ID)), SW_BODY, now)


def test_standard_rejects_stale_and_future_timestamps_and_missing_headers() -> None:
    assert "tolerance" in refused("standard", SW_SECRET, sw_headers(), SW_BODY, SW_TIMESTAMP + 301)
    assert "tolerance" in refused("standard", SW_SECRET, sw_headers(), SW_BODY, SW_TIMESTAMP - 301)
    webhooks.standard(SW_SECRET, sw_headers(), SW_BODY, SW_TIMESTAMP + 299)
    for header in ("webhook-id", "webhook-timestamp", "webhook-signature"):
        headers = sw_headers()
        del headers[header]
        assert "missing" in refused("standard", SW_SECRET, headers, SW_BODY, SW_TIMESTAMP)


@pytest.mark.parametrize("stamp", ["9" * 400, "9" * 5000, "+1700000000", " 1700000000", "1_700_000_000"])
def test_standard_takes_only_plain_digits_as_its_timestamp(stamp: str) -> None:
    """Past 4300 digits ``int`` raised, and past 308 comparing it with the clock did (a 500)."""
    headers = sw_headers(webhook_timestamp=stamp)
    assert refused("standard", SW_SECRET, headers, SW_BODY, SW_TIMESTAMP) == (
        "webhook-timestamp is not a Unix time in seconds"
    )


def test_standard_secret_must_be_whsec_base64() -> None:
    for secret in ("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "whsec_not base64!", "whsec_"):
        with pytest.raises(UnusableSecret) as caught:
            webhooks.standard(secret, sw_headers(), SW_BODY, SW_TIMESTAMP)
        assert caught.value.status == 503


# --- hmac: ondeck's own t=,v1= header --------------------------------------------------

HMAC_SECRET = "hmac-secret-for-tests"
HMAC_TIMESTAMP = 1_700_000_000
HMAC_BODY = b'{"action": "restart", "service": "api"}'


def hmac_header(stamp: int = HMAC_TIMESTAMP, body: bytes = HMAC_BODY, secret: str = HMAC_SECRET) -> str:
    # Computed here from the documented definition, independently of the code under test.
    digest = hmac_lib.new(secret.encode(), f"{stamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={stamp},v1={digest}"


def test_hmac_signature_verifies_and_matches_the_documented_construction() -> None:
    header = hmac_header()
    assert webhooks.sign_hmac(HMAC_SECRET, HMAC_BODY, HMAC_TIMESTAMP) == header
    webhooks.hmac(HMAC_SECRET, {"x-ondeck-signature": header}, HMAC_BODY, now=HMAC_TIMESTAMP + 10)
    rotated = f"t={HMAC_TIMESTAMP},v1={'0' * 64},v1={header.split('v1=')[1]}"
    webhooks.hmac(HMAC_SECRET, {"x-ondeck-signature": rotated}, HMAC_BODY, now=HMAC_TIMESTAMP)


def test_hmac_rejects_a_one_byte_change_in_body_signature_or_timestamp() -> None:
    now = HMAC_TIMESTAMP
    header = hmac_header()
    assert "does not match" in refused(
        "hmac", HMAC_SECRET, {"x-ondeck-signature": header}, flip_byte(HMAC_BODY), now
    )
    assert "does not match" in refused(
        "hmac", HMAC_SECRET, {"x-ondeck-signature": flip(header)}, HMAC_BODY, now
    )
    moved = header.replace(f"t={HMAC_TIMESTAMP}", f"t={HMAC_TIMESTAMP + 1}")
    assert "does not match" in refused("hmac", HMAC_SECRET, {"x-ondeck-signature": moved}, HMAC_BODY, now)


def test_hmac_rejects_stale_timestamps_even_when_correctly_signed() -> None:
    for stamp in (HMAC_TIMESTAMP - 301, HMAC_TIMESTAMP + 301):
        header = {"x-ondeck-signature": hmac_header(stamp)}
        assert "tolerance" in refused("hmac", HMAC_SECRET, header, HMAC_BODY, HMAC_TIMESTAMP)
    webhooks.hmac(
        HMAC_SECRET, {"x-ondeck-signature": hmac_header(HMAC_TIMESTAMP - 299)}, HMAC_BODY, HMAC_TIMESTAMP
    )


@pytest.mark.parametrize(
    "header",
    [
        "",
        "v1=abc",
        "t=1700000000",
        "t=soon,v1=abc",
        "t=-5,v1=abc",
        "t=1700000000,t=1700000000,v1=abc",
        f"t={'9' * 5000},v1=abc",
    ],
)
def test_hmac_rejects_malformed_headers(header: str) -> None:
    headers = {"x-ondeck-signature": header} if header else {}
    refused("hmac", HMAC_SECRET, headers, HMAC_BODY, HMAC_TIMESTAMP)


# --- token and alertmanager: credentials in Authorization ------------------------------

TOKEN = "tok-0123456789abcdef"


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def test_token_accepts_only_the_exact_bearer_secret() -> None:
    webhooks.token(TOKEN, {"authorization": f"Bearer {TOKEN}"}, b"")
    webhooks.token(TOKEN, {"authorization": f"bearer {TOKEN}"}, b"")  # the scheme is case-insensitive
    assert "missing" in refused("token", TOKEN, {}, b"")
    refused("token", TOKEN, {"authorization": f"Bearer {flip(TOKEN)}"}, b"")
    refused("token", TOKEN, {"authorization": f"Bearer {TOKEN}x"}, b"")
    refused("token", TOKEN, {"authorization": f"Bearer {TOKEN[:-1]}"}, b"")
    refused("token", TOKEN, {"authorization": TOKEN}, b"")
    refused("token", TOKEN, {"authorization": basic("x", TOKEN)}, b"")


def test_alertmanager_accepts_bearer_or_basic_auth_as_http_config_sends_them() -> None:
    webhooks.alertmanager(TOKEN, {"authorization": f"Bearer {TOKEN}"}, b"{}")
    webhooks.alertmanager(TOKEN, {"authorization": basic("alertmanager", TOKEN)}, b"{}")
    webhooks.alertmanager("alertmanager:" + TOKEN, {"authorization": basic("alertmanager", TOKEN)}, b"{}")


def test_alertmanager_rejects_wrong_or_malformed_credentials() -> None:
    assert "missing" in refused("alertmanager", TOKEN, {}, b"{}")
    refused("alertmanager", TOKEN, {"authorization": f"Bearer {flip(TOKEN)}"}, b"{}")
    refused("alertmanager", TOKEN, {"authorization": basic("alertmanager", flip(TOKEN))}, b"{}")
    refused("alertmanager", TOKEN, {"authorization": basic(TOKEN, "password")}, b"{}")  # secret as the user
    refused("alertmanager", "other:" + TOKEN, {"authorization": basic("alertmanager", "x")}, b"{}")
    assert "base64" in refused("alertmanager", TOKEN, {"authorization": "Basic ???"}, b"{}")
    assert "base64" in refused("alertmanager", TOKEN, {"authorization": "Basic \u00e9"}, b"{}")
    refused("alertmanager", TOKEN, {"authorization": f"Token {TOKEN}"}, b"{}")


def test_secret_comparisons_are_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[bytes, bytes]] = []
    real = webhooks.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(webhooks, "compare_digest", spy)
    cases: list[tuple[str, str, dict[str, str], bytes, float | None]] = [
        ("github", GITHUB_SECRET, {"x-hub-signature-256": GITHUB_SIGNATURE}, GITHUB_BODY, None),
        ("hmac", HMAC_SECRET, {"x-ondeck-signature": hmac_header()}, HMAC_BODY, HMAC_TIMESTAMP),
        ("token", TOKEN, {"authorization": f"Bearer {TOKEN}"}, b"", None),
        ("alertmanager", TOKEN, {"authorization": basic("am", TOKEN)}, b"", None),
    ]
    for scheme, secret, headers, body, now in cases:
        calls.clear()
        webhooks.verify(scheme, secret, headers, body, now)
        assert calls, f"{scheme} compared without compare_digest"
