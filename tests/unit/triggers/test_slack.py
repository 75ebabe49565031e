"""Slack v0 request signing, the slash command form, and reading the command text."""

from __future__ import annotations

from typing import Any

import pytest

from ondeck.spec.params import coerce_text
from ondeck.triggers import slack

# Slack's worked example in "Verifying requests from Slack"
# (https://api.slack.com/authentication/verifying-requests-from-slack).
DOC_SECRET = "8f742231b10e8888abcd99yyyzzz85a5"
DOC_TIMESTAMP = "1531420618"
DOC_BODY = (
    b"token=xyzz0WbapA4vBCDEFasx0q6G&team_id=T1DC2JH3J&team_domain=testteamnow&channel_id=G8PSS9T3V"
    b"&channel_name=foobar&user_id=U2CERLKJA&user_name=roadrunner&command=%2Fwebhook-collect&text="
    b"&response_url=https%3A%2F%2Fhooks.slack.com%2Fcommands%2FT1DC2JH3J%2F397700885554%2F96rGlfmibIGlgcZRskXaIFfN"
    b"&trigger_id=398738663015.47445629121.803a0bc887a14d10d2c447fce8b6703c"
)
DOC_SIGNATURE = "v0=a2114d57b48eac39b9ad189dd8316235a7b4a8d21a10bd27519666489c69b503"
DOC_NOW = float(DOC_TIMESTAMP)


def test_slacks_documented_example_verifies() -> None:
    assert slack.sign(DOC_SECRET, DOC_TIMESTAMP, DOC_BODY) == DOC_SIGNATURE
    slack.verify(DOC_SECRET, DOC_TIMESTAMP, DOC_SIGNATURE, DOC_BODY, now=DOC_NOW)


@pytest.mark.parametrize("position", [0, 5, len(DOC_BODY) // 2, len(DOC_BODY) - 1])
def test_a_one_byte_change_in_the_body_is_rejected(position: int) -> None:
    changed = bytearray(DOC_BODY)
    changed[position] ^= 0x01
    with pytest.raises(slack.SignatureError, match="does not match"):
        slack.verify(DOC_SECRET, DOC_TIMESTAMP, DOC_SIGNATURE, bytes(changed), now=DOC_NOW)


def test_one_byte_more_or_less_in_the_body_is_rejected() -> None:
    for body in (DOC_BODY + b"&", DOC_BODY[:-1], b" " + DOC_BODY):
        with pytest.raises(slack.SignatureError):
            slack.verify(DOC_SECRET, DOC_TIMESTAMP, DOC_SIGNATURE, body, now=DOC_NOW)


@pytest.mark.parametrize("position", [0, 3, 10, len(DOC_SIGNATURE) - 1])
def test_a_one_byte_change_in_the_signature_is_rejected(position: int) -> None:
    changed = bytearray(DOC_SIGNATURE.encode())
    changed[position] = ord("1") if changed[position] != ord("1") else ord("2")
    with pytest.raises(slack.SignatureError):
        slack.verify(DOC_SECRET, DOC_TIMESTAMP, changed.decode(), DOC_BODY, now=DOC_NOW)


@pytest.mark.parametrize("timestamp", ["1531420619", "1531420617", "1531420608", "01531420618"])
def test_a_changed_timestamp_is_rejected(timestamp: str) -> None:
    with pytest.raises(slack.SignatureError, match="does not match"):
        slack.verify(DOC_SECRET, timestamp, DOC_SIGNATURE, DOC_BODY, now=DOC_NOW)


def test_another_secret_does_not_verify() -> None:
    with pytest.raises(slack.SignatureError):
        slack.verify(DOC_SECRET[:-1] + "6", DOC_TIMESTAMP, DOC_SIGNATURE, DOC_BODY, now=DOC_NOW)


@pytest.mark.parametrize("skew", [-301, 301, 3600, -86400])
def test_a_timestamp_outside_five_minutes_is_rejected_even_when_signed(skew: int) -> None:
    # Correctly signed, so only the age can be the reason: a replayed request.
    with pytest.raises(slack.SignatureError, match="tolerance"):
        slack.verify(DOC_SECRET, DOC_TIMESTAMP, DOC_SIGNATURE, DOC_BODY, now=DOC_NOW + skew)


@pytest.mark.parametrize("skew", [-299, 0, 299])
def test_a_timestamp_within_five_minutes_is_accepted(skew: int) -> None:
    slack.verify(DOC_SECRET, DOC_TIMESTAMP, DOC_SIGNATURE, DOC_BODY, now=DOC_NOW + skew)


@pytest.mark.parametrize(
    ("timestamp", "signature"),
    [(None, DOC_SIGNATURE), (DOC_TIMESTAMP, None), ("", DOC_SIGNATURE), (DOC_TIMESTAMP, "")],
)
def test_missing_headers_are_rejected(timestamp: str | None, signature: str | None) -> None:
    with pytest.raises(slack.SignatureError, match="missing"):
        slack.verify(DOC_SECRET, timestamp, signature, DOC_BODY, now=DOC_NOW)


@pytest.mark.parametrize(
    "timestamp",
    [" 1531420618", "+1531420618", "1531420618.0", "1_531_420_618", "\u0661\u0665", "9" * 400, "9" * 5000],
)
def test_only_a_plain_digit_timestamp_is_accepted(timestamp: str) -> None:
    """Past 4300 digits ``int`` raised, and past 308 comparing it with the clock did (a 500)."""
    # Each would be signed correctly, so the format check is the one that refuses.
    signature = slack.sign(DOC_SECRET, timestamp, DOC_BODY)
    with pytest.raises(slack.SignatureError, match="not a Unix time"):
        slack.verify(DOC_SECRET, timestamp, signature, DOC_BODY, now=DOC_NOW)


def test_a_non_ascii_signature_is_rejected_not_crashed() -> None:
    with pytest.raises(slack.SignatureError):
        slack.verify(DOC_SECRET, DOC_TIMESTAMP, "v0=é" + DOC_SIGNATURE[4:], DOC_BODY, now=DOC_NOW)


def test_the_documented_form_is_read() -> None:
    command = slack.read_form(DOC_BODY)
    assert command.user_id == "U2CERLKJA" and command.user_name == "roadrunner"
    assert command.command == "/webhook-collect" and command.text == ""
    assert (
        command.response_url
        == "https://hooks.slack.com/commands/T1DC2JH3J/397700885554/96rGlfmibIGlgcZRskXaIFfN"
    )
    assert (command.channel_id, command.team_id) == ("G8PSS9T3V", "T1DC2JH3J")
    assert command.trigger_id.startswith("398738663015.")


def test_a_form_without_user_or_malformed_is_refused() -> None:
    with pytest.raises(slack.CommandError, match="user_id"):
        slack.read_form(b"text=list&command=%2Fondeck")
    with pytest.raises(slack.CommandError):
        slack.read_form(b"\xff\xfe")
    with pytest.raises(slack.CommandError):
        slack.read_form(b"user_id=U1&garbage")


def test_the_form_text_is_decoded_and_a_blank_response_url_is_none() -> None:
    command = slack.read_form(b"user_id=U1&text=run+greet+msg%3D%22hello+world%22&response_url=")
    assert command.text == 'run greet msg="hello world"'
    assert command.response_url is None and command.command == "/ondeck"


def test_quoted_values_are_one_value() -> None:
    command = slack.parse("run greet msg=\"hello world\" who='the team' n=3 empty=")
    assert (command.verb, command.target) == ("run", "greet")
    assert command.pairs == (("msg", "hello world"), ("who", "the team"), ("n", "3"), ("empty", ""))


def test_smart_quotes_and_slack_escapes_are_undone() -> None:
    command = slack.parse("run greet msg=\u201chello & <world>\u201d q=\u2018a b\u2019".replace("&", "&amp;"))
    assert command.pairs == (("msg", "hello & <world>"), ("q", "a b"))
    assert slack.parse("run greet x=&lt;b&gt;").pairs == (("x", "<b>"),)


def test_shell_syntax_is_only_text_never_executed() -> None:
    command = slack.parse('run greet msg="$(touch /tmp/pwned); `id`" x=a;b')
    assert command.pairs == (("msg", "$(touch /tmp/pwned); `id`"), ("x", "a;b"))
    with pytest.raises(slack.CommandError, match="not key=value"):
        slack.parse("run greet ; rm -rf /")


def test_an_unclosed_quote_is_explained() -> None:
    with pytest.raises(slack.CommandError, match="quote"):
        slack.parse('run greet msg="hello')


@pytest.mark.parametrize(
    ("text", "verb", "target", "comment"),
    [
        ("", "help", None, ""),
        ("   ", "help", None, ""),
        ("help", "help", None, ""),
        ("HELP", "help", None, ""),
        ("list", "list", None, ""),
        ("status 01HZX", "status", "01HZX", ""),
        ("approve 01HZX", "approve", "01HZX", ""),
        ('approve 01HZX "looks good" to me', "approve", "01HZX", "looks good to me"),
        ("run deploy", "run", "deploy", ""),
    ],
)
def test_each_command_is_recognised(text: str, verb: str, target: str | None, comment: str) -> None:
    command = slack.parse(text)
    assert (command.verb, command.target, command.comment) == (verb, target, comment)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("deploy now", "unknown command"),
        ("run", "usage: run NAME"),
        ("status", "usage: status RUN_ID"),
        ("status a b", "usage: status RUN_ID"),
        ("approve", "usage: approve RUN_ID"),
        ("list all", "takes no arguments"),
        ("help me", "takes no arguments"),
        ("run greet msg", "not key=value"),
        ("run greet 9x=1", "not a parameter name"),
        ('run greet "a b"=1', "not a parameter name"),
        ("run greet =1", "not a parameter name"),
    ],
)
def test_bad_commands_say_what_is_wrong(text: str, message: str) -> None:
    with pytest.raises(slack.CommandError, match=message):
        slack.parse(text)


SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "n": {"type": "integer"},
        "ratio": {"type": "number"},
        "dry": {"type": "boolean"},
        "tags": {"type": "array"},
        "meta": {"type": "object"},
        "msg": {"type": "string"},
        "odd": True,
    },
}


def test_values_are_typed_by_the_schema() -> None:
    pairs = (
        ("n", "3"),
        ("ratio", "0.5"),
        ("dry", "yes"),
        ("tags", '["a","b"]'),
        ("meta", '{"k": 1}'),
        ("msg", "42"),
        ("odd", "7"),
        ("extra", "true"),
    )
    assert slack.typed_params(pairs, SCHEMA) == {
        "n": 3,
        "ratio": 0.5,
        "dry": True,
        "tags": ["a", "b"],
        "meta": {"k": 1},
        "msg": "42",  # a string param stays text even when it looks like a number
        "odd": "7",
        "extra": "true",  # not in the schema: left for admission to judge
    }


@pytest.mark.parametrize(("key", "text"), [("n", "three"), ("ratio", "x"), ("dry", "maybe"), ("tags", "[")])
def test_values_that_do_not_convert_stay_text_for_validation_to_name(key: str, text: str) -> None:
    assert slack.typed_params(((key, text),), SCHEMA) == {key: text}


@pytest.mark.parametrize(
    ("text", "expected"), [("false", False), ("No", False), ("0", False), ("TRUE", True)]
)
def test_booleans_accept_the_usual_spellings(text: str, expected: bool) -> None:
    assert coerce_text(text, {"type": "boolean"}) is expected


def test_the_user_mapping_is_read_and_malformed_entries_are_loud() -> None:
    assert slack.read_users(" U1=alice , U2 = bob,,") == {"U1": "alice", "U2": "bob"}
    assert slack.read_users(None) == {} and slack.read_users("") == {}
    for bad in ("U1", "U1=", "=alice", "U1=alice,U2"):
        with pytest.raises(ValueError, match="ONDECK_SLACK_USERS"):
            slack.read_users(bad)


def test_text_shown_in_slack_is_escaped() -> None:
    assert slack.escape("a & <b> > c") == "a &amp; &lt;b&gt; &gt; c"
