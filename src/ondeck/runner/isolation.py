"""How an attempt's process is started: a PID namespace per attempt, so no process of a run can outlive it.

The script runs in a PID namespace of its own: when it exits, or when the process
holding the namespace dies, the kernel kills every process left in there —
including ones that called ``setsid``, and including when the worker itself is
killed with ``kill -9``. Resource limits are set before the script starts, so
everything it starts inherits them. Three ways, best first:

``launcher``
    ``ondeck-launch`` (``launch.c``, built by ``make install``) does all of it with
    one exec; and, in a mount namespace of the script's own, hides ondeck's data
    directory (the database, the master key) and other runs' workspaces from it,
    and gives it a ``/proc`` that shows only its own processes.
``namespace``
    The same from util-linux: ``setpriv --pdeathsig KILL -- unshare --pid --fork
    --kill-child -- prlimit … --``; about 2 ms more CPU per run.
``group``
    Where neither can make a namespace: ``prlimit`` and a process group, which
    covers everything but worker death and ``setsid`` escapes; those are found by their
    environment (see ``processes.tagged_processes``) when the attempt ends, unless they
    cleared it.
"""

from __future__ import annotations

import functools
import logging
import os
import pwd
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from ondeck.runner.attempt import ResourceLimits

log = logging.getLogger(__name__)

LAUNCHER, NAMESPACE, GROUP = "launcher", "namespace", "group"
_PROBE_LIMITS = ResourceLimits(memory_bytes=1 << 30, cpu_seconds=10, processes=4096, file_size_bytes=1 << 20)


def command(
    mode: str,
    limits: ResourceLimits,
    keep: Path,
    hide: Sequence[Path] = (),
    user: tuple[int, int] | None = None,
) -> list[str]:
    """The prefix that starts a program isolated by ``mode`` under ``limits``, as ``user``
    (uid, gid; see ``script_user``) if given; with the launcher, ``hide`` (see ``hidden``)
    is hidden from it, but for ``keep``, its workspace."""
    values = (limits.memory_bytes, limits.cpu_seconds, limits.processes, limits.file_size_bytes)
    if mode == LAUNCHER:  # started by this process, which it must not outlive
        launcher = _launcher_path() or "ondeck-launch"
        ids = f"{user[0]}:{user[1]}" if user else "-"
        return [launcher, str(os.getpid()), *map(str, values), ids, str(keep), *map(str, hide), "--"]
    prefix = list(_namespace_prefix()) if mode == NAMESPACE else []
    prlimit = _prlimit_path()
    if prlimit is not None:
        names = ("as", "cpu", "nproc", "fsize")
        options = (f"--{name}={value}" for name, value in zip(names, values, strict=True))
        prefix += [prlimit, *options, "--core=0", "--"]
    if user is not None:
        setpriv = shutil.which("setpriv") or "setpriv"
        become = [f"--reuid={user[0]}", f"--regid={user[1]}", "--clear-groups", "--no-new-privs"]
        prefix += [setpriv, *become, "--"]
    return prefix


def script_user(name: str) -> tuple[int, int]:
    """The (uid, gid) scripts run as, from ``ONDECK_SCRIPT_USER``: a user name or a uid
    (with that user's group, else the same number). ``ValueError`` if there is no such
    user, or if this process, not root, cannot become it."""
    try:
        entry = pwd.getpwuid(int(name)) if name.isdigit() else pwd.getpwnam(name)
        ids = entry.pw_uid, entry.pw_gid
    except KeyError:
        if not name.isdigit():
            raise ValueError(f"script user {name!r} does not exist") from None
        ids = int(name), int(name)
    if max(ids) >= 2**32 - 1:  # -1 changes no id, and more would wrap around (to root, for one)
        raise ValueError(f"script user {name!r} is not a valid user id")
    if os.geteuid() not in (0, ids[0]):
        raise ValueError(f"running scripts as {name!r} needs ondeck to run as root")
    return ids


def database_directory(database: Path) -> Path | None:
    """The directory of a SQLite ``database`` configured outside the data directory, to
    hide from scripts with it, if it holds nothing but that database's files (hiding a
    directory hides all of it: a home directory, say); None, with a warning, otherwise."""
    directory = database.resolve().parent
    own = {database.name + suffix for suffix in ("", "-wal", "-shm", "-journal", "-writer.lock")}
    others = [entry.name for entry in directory.iterdir() if entry.name not in own]
    if others:
        log.warning(
            "%s is not hidden from scripts: it holds more than the database (%s); "
            "give the database a directory of its own",
            directory,
            ", ".join(sorted(others)[:3]) + (", …" if len(others) > 3 else ""),
        )
        return None
    return directory


def hidden(*directories: Path) -> tuple[Path, ...]:
    """Of ``directories`` (ondeck's data directory, the workspaces' root), those to hide
    from scripts: resolved, less any inside another, and less any that holds what a
    script is started with (Python, this package, the launcher), which it would stop,
    or that everyone may write to (``/tmp``, ``/dev/shm``): other programs use it too."""
    launcher = _launcher_path()
    needed = [Path(sys.prefix), Path(sys.executable), Path(__file__).parents[1]]
    needed += [Path(launcher)] if launcher else []
    resolved = {directory.resolve() for directory in directories}
    chosen: list[Path] = []
    for directory in sorted(resolved):
        if any(directory.is_relative_to(other) for other in chosen):
            continue
        if any(path.resolve().is_relative_to(directory) for path in needed):
            log.warning("%s is not hidden from scripts: it holds what they are started with", directory)
            continue
        if directory.exists() and directory.stat().st_mode & stat.S_IWOTH:
            log.warning("%s is not hidden from scripts: it is shared; give ondeck one of its own", directory)
            continue
        chosen.append(directory)
    return tuple(chosen)


@functools.cache
def best() -> str:
    """The best mode this host supports (probed once per process)."""
    for mode in (LAUNCHER, NAMESPACE):
        if available(mode):
            return mode
        log.info("attempts cannot start through the %s: %s", mode, _probe(mode))
    log.warning("cannot create PID namespaces: attempts run in a process group only")
    return GROUP


def available(mode: str) -> bool:
    """Whether this host can start attempts isolated by ``mode`` (probed once per process)."""
    return mode == GROUP or _probe(mode) is None


@functools.cache
def _probe(mode: str) -> str | None:
    """None when ``mode`` can start a program here, else why not."""
    if mode == LAUNCHER and _launcher_path() is None:
        return "ondeck-launch is not installed (make install builds it)"
    if mode == NAMESPACE and not _namespace_prefix():
        return "setpriv or unshare not found"
    return trial(mode, ["true"])


def trial(mode: str, program: Sequence[str], user: tuple[int, int] | None = None) -> str | None:
    """Start ``program`` isolated by ``mode``, as ``user`` if given, as a run would start
    (in a workspace, with a directory around it hidden); None if it succeeded, else why not."""
    try:
        with tempfile.TemporaryDirectory() as hide:
            keep = Path(hide, "workspace")
            keep.mkdir()
            probe = subprocess.run(
                [*command(mode, _PROBE_LIMITS, keep, [Path(hide)], user), *program],
                capture_output=True,
                timeout=30,
                check=False,
                cwd=keep,
            )
    except (OSError, subprocess.SubprocessError) as exc:
        return str(exc)
    if probe.returncode != 0:
        return probe.stderr.decode(errors="replace").strip() or f"exit code {probe.returncode}"
    return None


@functools.cache
def _launcher_path() -> str | None:
    beside = Path(sys.executable).with_name("ondeck-launch")  # in the virtualenv's bin
    if os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("ondeck-launch")


@functools.cache
def _prlimit_path() -> str | None:
    return shutil.which("prlimit")


@functools.cache
def _namespace_prefix() -> tuple[str, ...]:
    setpriv, unshare = shutil.which("setpriv"), shutil.which("unshare")
    if not (setpriv and unshare):
        return ()
    prefix = [setpriv, "--pdeathsig", "KILL", "--", unshare, "--pid", "--fork", "--kill-child"]
    if os.geteuid() != 0:
        prefix += ["--user", "--map-current-user"]
    return (*prefix, "--")
