"""Finding and killing every process that belongs to one attempt.

The attempt's process leads its own session and process group, so ``killpg``
reaches its children and grandchildren. A process that started a session of
its own (``setsid``) leaves the group; it is still found by the
``ONDECK_RUN_ID``/``ONDECK_ATTEMPT`` pair in its environment.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from pathlib import Path

from ondeck import blocking

_PROC = Path("/proc")


def _pids() -> list[int]:
    return [int(entry.name) for entry in _PROC.iterdir() if entry.name.isdigit()]


def _stat_fields(pid: int) -> list[str] | None:
    try:
        text = (_PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    # The command name is in parentheses and may contain spaces: split after it.
    return text[text.rfind(")") + 2 :].split()


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes in process group ``pgid``."""
    members = []
    for pid in _pids():
        fields = _stat_fields(pid)
        if fields and fields[0] != "Z" and int(fields[2]) == pgid:
            members.append(pid)
    return members


def tagged_processes(run_id: str, attempt: int) -> list[int]:
    """Live processes whose environment marks them as part of this attempt."""
    markers = (f"ONDECK_RUN_ID={run_id}".encode(), f"ONDECK_ATTEMPT={attempt}".encode())
    found = []
    for pid in _pids():
        try:
            environ = (_PROC / str(pid) / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if all(marker in environ for marker in markers):
            fields = _stat_fields(pid)
            if fields and fields[0] != "Z":
                found.append(pid)
    return found


def _signal_group(pgid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signum)


def group_alive(pgid: int) -> bool:
    """Cheap first check: does anything (zombies included) remain in the group?"""
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


async def terminate(pgid: int, run_id: str, attempt: int, grace: float, *, spare_leader: bool) -> None:
    """SIGTERM the group, SIGKILL whatever is left after ``grace`` seconds.

    With ``spare_leader`` the leader (``unshare``, holding the attempt's PID
    namespace) is not sent SIGTERM: its death would SIGKILL the namespace at
    once and leave the script no grace period. Also kills processes of this
    attempt that left the group via ``setsid``.
    """
    if spare_leader:
        for pid in group_members(pgid):
            if pid != pgid:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGTERM)
    else:
        _signal_group(pgid, signal.SIGTERM)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + grace
    while group_members(pgid) and loop.time() < deadline:
        await asyncio.sleep(0.05)
    _signal_group(pgid, signal.SIGKILL)
    # On a thread: reading every process's environment can wait on one stuck in the kernel.
    await blocking.run(kill_tagged, run_id, attempt)  # waited for even if this is cancelled


def kill_tagged(run_id: str, attempt: int, passes: int = 5) -> None:
    """SIGKILL the processes of this attempt that left its group (``tagged_processes``),
    again while a pass finds some: one may have forked after the scan read its list."""
    for _ in range(passes):
        found = tagged_processes(run_id, attempt)
        for pid in found:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        if not found:
            return
