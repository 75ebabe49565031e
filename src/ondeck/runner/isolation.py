"""A PID namespace per attempt, so no process of a run can outlive it.

The attempt runs as ``setpriv --pdeathsig KILL -- unshare --pid --fork
--kill-child -- PROGRAM``: the script is PID 1 of its own namespace, and when
it exits, or when ``unshare`` dies, the kernel kills every process left in
that namespace — including ones that called ``setsid``, and including when the
worker itself is killed with ``kill -9`` (``--pdeathsig``). Without those
tools (or the rights to make a namespace), attempts fall back to a process
group, which covers everything but ``setsid`` escapes and worker death.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import subprocess

log = logging.getLogger(__name__)


@functools.cache
def prefix() -> tuple[str, ...]:
    """The command prefix that isolates an attempt, or () if this host cannot."""
    setpriv, unshare = shutil.which("setpriv"), shutil.which("unshare")
    if not (setpriv and unshare):
        log.warning("setpriv/unshare not found: attempts run in a process group only")
        return ()
    candidate = [setpriv, "--pdeathsig", "KILL", "--", unshare, "--pid", "--fork", "--kill-child"]
    if os.geteuid() != 0:
        candidate += ["--user", "--map-current-user"]
    candidate.append("--")
    try:
        probe = subprocess.run([*candidate, "true"], capture_output=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError) as exc:
        log.warning("cannot create PID namespaces (%s): attempts run in a process group only", exc)
        return ()
    if probe.returncode != 0:
        log.warning(
            "cannot create PID namespaces (%s): attempts run in a process group only",
            probe.stderr.decode(errors="replace").strip(),
        )
        return ()
    return tuple(candidate)
