from __future__ import annotations

import pytest

from ondeck.durations import format_duration, parse_duration, parse_size


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


@pytest.mark.parametrize(
    ("text", "size"), [("512MiB", 512 * 1024**2), ("2GB", 2 * 1000**3), ("10k", 10_000), (7, 7)]
)
def test_parse_size(text: str | int, size: int) -> None:
    assert parse_size(text) == size


def test_format_duration_round_trips() -> None:
    for seconds in (0.25, 5, 90, 3600, 5400):
        assert parse_duration(format_duration(seconds)) == pytest.approx(seconds)
