from __future__ import annotations

import pytest

from ondeck.durations import DAY, YEAR, format_duration, parse_duration, parse_size, within


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("90s", 90),
        ("10m", 600),
        ("1h", 3600),
        ("1h30m", 5400),
        ("250ms", 0.25),
        (45, 45),
        ("2", 2),
        ("1d", 86400),
    ],
)
def test_parse_duration_accepts_human_forms(text: str | int, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "10x", "m10", "1h 2", "-5", "ten minutes"])
def test_parse_duration_rejects_garbage_with_a_hint(text: str) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(text)


@pytest.mark.parametrize("value", [True, [], ["1h"], {}, None])
def test_a_duration_of_another_type_is_refused_as_a_value_error(value: object) -> None:
    """A validator's ValueError names the field; any other error was a 500."""
    with pytest.raises(ValueError, match="a duration is a number of seconds or a string"):
        parse_duration(value)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("text", "size"), [("512MiB", 512 * 1024**2), ("2GB", 2 * 1000**3), ("10k", 10_000), (7, 7)]
)
def test_parse_size(text: str | int, size: int) -> None:
    assert parse_size(text) == size


def test_format_duration_round_trips() -> None:
    for seconds in (0.25, 5, 90, 3600, 5400):
        assert parse_duration(format_duration(seconds)) == pytest.approx(seconds)


@pytest.mark.parametrize("value", ["9" * 400, "9" * 400 + "d", 10**400, float("inf"), float("nan")])
def test_a_duration_too_large_for_a_number_is_refused_not_an_overflow(value: str | float) -> None:
    with pytest.raises(ValueError, match="finite"):
        parse_duration(value)


@pytest.mark.parametrize("value", ["9" * 400 + "TiB", "9" * 400, 10**400, 2**63])
def test_a_size_beyond_any_limit_is_refused_not_an_overflow(value: str | int) -> None:
    with pytest.raises(ValueError, match="at most"):
        parse_size(value)
    assert parse_size(2**63 - 1) == 2**63 - 1


def test_format_duration_counts_days() -> None:
    assert format_duration(YEAR) == "365d"
    assert format_duration(DAY + 90) == "1d1m30s"


@pytest.mark.parametrize(
    ("low", "seconds", "message"),
    [(1.0, 0.5, "must be from 1s to 365d"), (0.0, YEAR + 1, "must be at most 365d")],
)
def test_within_names_the_bounds_as_a_user_writes_them(low: float, seconds: float, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        within(low, YEAR)(seconds)
    assert within(low, YEAR)(YEAR) == YEAR
