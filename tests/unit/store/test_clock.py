"""The store's clock, which leases are reckoned in: the database's on PostgreSQL, whatever
this host's says. A skewed host is played by a store given a shifted local clock."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

import psycopg
import pytest

from ondeck.domain import utcnow
from ondeck.store import clock
from ondeck.store.store import Store
from tests.support import PG_ADMIN

MINUTE = timedelta(seconds=60)
# Loopback round trips and the test's own reads: far below the skews played here.
CLOSE = timedelta(seconds=1)


class SkewedClock:
    """This host's clock, ``by`` off the true time (which a test may change, as a step)."""

    def __init__(self, by: timedelta) -> None:
        self.by = by

    def __call__(self) -> datetime:
        return utcnow() + self.by


def database_now() -> datetime:
    """The database's own clock, read apart from the store under test."""
    with psycopg.connect(PG_ADMIN) as connection:
        row = connection.execute("SELECT clock_timestamp()").fetchone()
    assert row is not None
    return row[0]  # type: ignore[no-any-return]


@pytest.fixture
def skewed() -> SkewedClock:
    return SkewedClock(-MINUTE)  # a host a minute behind


@pytest.fixture
def skewed_store(pg_url: str, skewed: SkewedClock) -> Iterator[Store]:
    store = Store(pg_url, clock=skewed)
    yield store
    store.dispose()


def test_a_host_behind_reckons_in_the_databases_time_and_measures_how_far_behind_it_is(
    skewed_store: Store,
) -> None:
    assert skewed_store.clock_offset is None  # not read yet
    now = skewed_store.now()  # reads it first
    assert abs(now - database_now()) < CLOSE
    offset = skewed_store.clock_offset
    assert offset is not None and abs(offset - MINUTE) < CLOSE


def test_a_new_reading_measures_the_offset_again(skewed_store: Store, skewed: SkewedClock) -> None:
    assert abs(skewed_store.sync_clock() - MINUTE) < CLOSE
    skewed.by = 2 * MINUTE  # the host is now two minutes ahead
    assert abs(skewed_store.sync_clock() + 2 * MINUTE) < CLOSE
    offset = skewed_store.clock_offset
    assert offset is not None and abs(offset + 2 * MINUTE) < CLOSE
    assert abs(skewed_store.now() - database_now()) < CLOSE


def test_a_step_of_the_hosts_clock_between_readings_does_not_move_the_stores_time(
    skewed_store: Store, skewed: SkewedClock
) -> None:
    """An NTP or manual step can come at any moment; a claim soon after still writes a
    lease in the database's time."""
    skewed_store.sync_clock()
    skewed.by = 3 * MINUTE  # stepped forward four minutes, not read since
    assert abs(skewed_store.now() - database_now()) < CLOSE


def test_a_large_offset_is_logged_once_and_again_when_it_moves(
    skewed_store: Store, skewed: SkewedClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="ondeck.store.clock")

    def warnings() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]

    skewed_store.sync_clock()
    skewed_store.sync_clock()
    (first,) = warnings()
    assert "60.0 s behind the database's" in first
    skewed.by = MINUTE
    skewed_store.sync_clock()
    assert len(warnings()) == 2 and "60.0 s ahead of the database's" in warnings()[1]
    skewed.by = timedelta(0)
    skewed_store.sync_clock()
    assert len(warnings()) == 2


def test_a_host_in_step_with_the_database_is_not_warned_about(
    pg_store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="ondeck.store.clock")
    offset = pg_store.sync_clock()
    assert abs(offset) < CLOSE and caplog.records == []


def test_on_sqlite_the_stores_time_is_this_hosts(tmp_path: Path) -> None:
    """One host holds and judges every lease: there is no other clock to agree with."""
    store = Store(f"sqlite:///{tmp_path / 'ondeck.db'}", clock=SkewedClock(-MINUTE))
    try:
        assert store.sync_clock() == timedelta(0) and store.clock_offset is None
        assert abs(store.now() - (utcnow() - MINUTE)) < CLOSE
    finally:
        store.dispose()


@pytest.mark.skipif(sys.platform != "linux", reason="CLOCK_BOOTTIME is Linux's")
def test_the_time_since_a_reading_counts_while_the_host_is_suspended() -> None:
    """A suspension cannot be played here; what can be checked is that the clock the
    reading is pinned to is the one that counts it (time.monotonic stops meanwhile, so
    after a laptop's lid or a paused VM, leases were written in a time lagging the
    database's by the pause until the next reading)."""
    assert clock._CLOCK == time.CLOCK_BOOTTIME
    before = time.clock_gettime(time.CLOCK_BOOTTIME)
    assert before <= clock.elapsed() <= time.clock_gettime(time.CLOCK_BOOTTIME)
