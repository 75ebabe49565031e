"""The clock leases and due times are reckoned in: on PostgreSQL, the database's.

A lease is written by the worker that holds it and judged by a reaper, often on
other hosts. Were each to read its own host's clock, a skew or a step between two
of them larger than the margin a lease leaves (a third of it) would let a reaper
end a healthy attempt and another worker start the run again. So both reckon in
the database's time, which every host shares.

Asking the database for the time at each claim or renewal would cost a round trip
each. Instead the clock is read now and then (``measure``): the database's time,
taken at the midpoint of the query's round trip, is pinned to this host's
monotonic clock, and ``now`` adds the time since. The wall clock of this host plays
no part, so a step of it (NTP, an operator) between two readings moves nothing; only
the monotonic clock's rate, off by parts per million, adds up between readings. On
Linux that clock is ``CLOCK_BOOTTIME``, which, unlike ``time.monotonic``, keeps
counting while the host is suspended (a laptop's lid, a paused virtual machine):
otherwise ``now`` would lag the database by the pause until the next reading.
The difference from this host's wall clock is kept to be shown, and a large one
is logged so that operators learn of it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from sqlalchemy import Connection, text

log = logging.getLogger(__name__)
# A host whose clock is off by more than this is worth an operator's look: leases do
# not depend on it, but logs, run times and other hosts' judgement of time may.
WARN_OFFSET = timedelta(seconds=1)
_READ = text("SELECT clock_timestamp()")
_SAMPLES = 3  # the reading of the fastest round trip is kept: its midpoint is surest


_CLOCK = getattr(time, "CLOCK_BOOTTIME", time.CLOCK_MONOTONIC)  # BOOTTIME: Linux


def elapsed() -> float:
    """Seconds on this host's monotonic clock, suspensions included where it can tell."""
    return time.clock_gettime(_CLOCK)


class DatabaseClock:
    """The database's time, read without a round trip once ``measure`` has pinned it."""

    def __init__(self, local: Callable[[], datetime]) -> None:
        self._local = local
        self._lock = threading.Lock()
        # (database time, elapsed() when it was that time); None until measured.
        self._pin: tuple[datetime, float] | None = None
        self.offset: timedelta | None = None
        """The database's clock minus this host's, at the last reading."""
        self._warned: timedelta | None = None

    @property
    def measured(self) -> bool:
        return self._pin is not None

    def now(self) -> datetime:
        pin = self._pin
        assert pin is not None, "the database's clock is read before it was measured"
        at, since = pin
        return at + timedelta(seconds=elapsed() - since)

    def measure(self, connection: Connection) -> timedelta:
        """Read the database's clock over ``connection``; returns the offset from this host's."""
        with self._lock:
            # The round trip, the database's time, and the elapsed and local times at its midpoint.
            best: tuple[float, datetime, float, datetime] | None = None
            for _ in range(_SAMPLES):
                local, sent = self._local(), elapsed()
                # In UTC: a session time zone with summer time would make now() add wall-clock time.
                database: datetime = connection.execute(_READ).scalar_one().astimezone(UTC)
                returned = elapsed()
                trip = returned - sent
                if best is None or trip < best[0]:
                    best = (trip, database, (sent + returned) / 2, local + timedelta(seconds=trip / 2))
            assert best is not None
            trip, database, midpoint, local = best
            self._pin = (database, midpoint)
            self.offset = database - local
            self._tell(self.offset)
            return self.offset

    def _tell(self, offset: timedelta) -> None:
        """Log a large offset once, and again when it has moved by as much since."""
        if abs(offset) <= WARN_OFFSET:
            if self._warned is not None:
                log.info("this host's clock is within %s of the database's again", WARN_OFFSET)
            self._warned = None
            return
        if self._warned is None or abs(offset - self._warned) > WARN_OFFSET:
            log.warning(
                "this host's clock is %.1f s %s the database's: leases use the database's clock, "
                "but keep the hosts' clocks in sync (NTP) for logs and schedules",
                abs(offset.total_seconds()),
                "behind" if offset > timedelta(0) else "ahead of",
            )
            self._warned = offset
