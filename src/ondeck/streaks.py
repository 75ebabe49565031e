"""Logging the failures of something retried without flooding the log while they last."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

REMIND_SECONDS = 60.0


class Failures:
    """The failures of one retried task (a loop's step, a write). The first of a streak is
    logged with its traceback; the rest are counted, with a reminder every minute while
    they go on. The recovery is logged with the count. During a database outage every
    loop of every process fails several times a second, and a traceback each time
    buried what mattered."""

    def __init__(
        self,
        logger: logging.Logger,
        what: str,
        level: int = logging.ERROR,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._log, self._what, self._level, self._clock = logger, what, level, clock
        self._streak = 0
        self._logged = 0.0  # when this streak was last logged, by ``clock``

    def failed(self) -> None:
        """Count a failure; call it from the ``except`` block that caught it."""
        self._streak += 1
        now = self._clock()
        if self._streak == 1:
            self._log.log(self._level, "%s failed; will retry", self._what, exc_info=True)
            self._logged = now
        elif now - self._logged >= REMIND_SECONDS:
            self._log.log(self._level, "%s still fails (%d tries)", self._what, self._streak, exc_info=True)
            self._logged = now

    def succeeded(self) -> None:
        if self._streak:
            self._log.info("%s works again, after %d failed tries", self._what, self._streak)
            self._streak = 0
