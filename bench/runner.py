"""The runner alone: trivial attempts through ``run_attempt``, with no database and no HTTP.

    .venv/bin/python bench/runner.py [--attempts N] [--rounds R] [--src DIR ...]

Runs N attempts of a bash ``true`` script, 16 at a time, the way a worker starts them
on this host (``isolation.best()``, workspaces in a hidden data directory on the disk of
the current directory), and prints the whole machine's CPU per attempt and attempts/s.
A fraction of an end-to-end run, but a steadier one: a change to the runner (how a
workspace is made, say) that is lost in the noise of ``throughput.py`` shows here.

With ``--src`` trees (e.g. ``git archive`` of two commits), the rounds alternate them,
each measured in a child process with that tree first on ``PYTHONPATH``; compare within
one invocation. Prints figures and never asserts.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from pathlib import Path

from throughput import LIMITS, alternate, machine_cpu_seconds, ms  # bench/ is on the path: run as a script

from ondeck.domain import RunStatus
from ondeck.runner import isolation
from ondeck.runner.attempt import Attempt, Finished
from ondeck.runner.process import run_attempt

CONCURRENCY = 16


async def _attempts(count: int, data: Path) -> None:
    mode = isolation.best()
    slots = asyncio.Semaphore(CONCURRENCY)

    async def one(number: int) -> None:
        attempt = Attempt(
            run_id=f"bench{number}",
            number=1,
            runtime="bash",
            script="true",
            args=[],
            entrypoint="script",
            params={"number": number},
            timeout=60.0,
            limits=LIMITS,
            log_budget=1 << 20,
            workspace_root=data / "workspaces",
            kill_grace=1.0,
            isolation=mode,
            hidden=(data,),
        )
        async with slots:
            async for event in run_attempt(attempt, asyncio.Event()):
                if isinstance(event, Finished) and event.outcome.status != RunStatus.SUCCEEDED:
                    raise SystemExit(f"attempt {number} ended {event.outcome}")

    await asyncio.gather(*(one(number) for number in range(count)))


def measure(count: int) -> None:
    """Run ``count`` attempts here and print the machine's CPU per attempt and attempts/s."""
    with tempfile.TemporaryDirectory(prefix="ondeck-bench-runner-", dir=Path.cwd()) as data:
        cpu, start = machine_cpu_seconds(), time.perf_counter()
        asyncio.run(_attempts(count, Path(data)))
        cpu, elapsed = machine_cpu_seconds() - cpu, time.perf_counter() - start
    print(f"{ms(cpu / count)} of the machine's CPU per attempt, {count / elapsed:.0f} attempts/s", flush=True)


if __name__ == "__main__":
    alternate(__file__, __doc__ or "", measure, "attempts", 3000)
