"""A fresh directory per attempt, removed afterwards whatever happened."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import stat
import tempfile
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Workspace:
    """``root`` holds what ondeck writes for the script (params, a Python script) and reads
    back (outputs), and is the script's ``TMPDIR``; ``work``, empty at the start, is its
    working directory and ``HOME``. No more than that: each directory is an inode and a
    block allocated and freed per attempt, which is most of a workspace's cost, and on
    some filesystems (ext4 without a journal) allocation slows as freed inodes pile up.
    A third directory for ``TMPDIR`` alone cost about a twentieth of the machine's CPU per
    trivial attempt (the runner's part, without a database), and more as the bench went on."""

    root: Path

    @cached_property
    def work(self) -> Path:
        """The script's working directory and HOME."""
        return self.root / "work"

    @cached_property
    def params_file(self) -> Path:
        return self.root / "params.json"

    @cached_property
    def outputs_file(self) -> Path:
        return self.root / "outputs.json"

    @cached_property
    def script_file(self) -> Path:
        """A Python automation's script (bash scripts go inline: see ``build_argv``)."""
        return self.root / "script.py"

    @classmethod
    def create(cls, parent: Path, run_id: str, attempt: int) -> Workspace:
        prefix = f"{run_id}-{attempt}-"
        try:
            root = tempfile.mkdtemp(prefix=prefix, dir=parent)  # mode 0700
        except FileNotFoundError:
            parent.mkdir(parents=True, exist_ok=True)
            root = tempfile.mkdtemp(prefix=prefix, dir=parent)
        workspace = cls(Path(root))
        workspace.work.mkdir()
        return workspace

    def give_to(self, uid: int, gid: int) -> None:
        """Make the workspace the script's user's. The files ondeck wrote in it (params,
        a Python script) stay ondeck's, readable: the workspace (mode 0700) is the
        script user's alone."""
        for path in self.root.iterdir():
            if path.is_file():
                path.chmod(0o644)
        for directory in (self.root, self.work):
            os.chown(directory, uid, gid)

    @classmethod
    def remove_abandoned(cls, parent: Path, run_id: str, attempt: int) -> None:
        """Remove what a dead worker left of one attempt (``create`` names dirs run-attempt-*)."""
        for root in parent.glob(f"{run_id}-{attempt}-*"):
            cls(root).remove()

    def remove_if_untouched(self) -> bool:
        """Remove the workspace if it holds no more than ondeck put there (params, a Python
        script) and the script's outputs file: a few system calls, cheap enough for an
        event loop. False, having removed what it could, if there is more: then
        ``remove``, off the loop."""
        try:
            self.work.rmdir()
            for path in (self.params_file, self.outputs_file, self.script_file):
                path.unlink(missing_ok=True)
            self.root.rmdir()
        except OSError:  # not empty, not a directory, made read-only...
            return False
        return True

    def remove(self) -> None:
        """Delete everything, including what a script made read-only, however deep.

        Where modes bind this process (but for root with CAP_DAC_OVERRIDE), directories
        are made writable first, each through a descriptor of its own: changed by path,
        one a process outliving its attempt (isolation by process group alone) re-pointed
        meanwhile would have its mode changed, and its contents deleted, elsewhere."""
        with contextlib.suppress(OSError):
            parent = os.open(self.root.parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                _remove_tree(parent, self.root.name, make_writable=not _overrides_modes())
            finally:
                os.close(parent)
        if os.path.lexists(self.root):
            log.warning("%s is left: some of it could not be removed", self.root)


@functools.cache
def _overrides_modes() -> bool:
    """Whether this process may write to any directory whatever its mode: root with
    CAP_DAC_OVERRIDE (bit 1 of its effective capabilities), which a container may drop."""
    with contextlib.suppress(OSError, ValueError, StopIteration):
        status = Path("/proc/self/status").read_text().splitlines()
        effective = next(line.split()[1] for line in status if line.startswith("CapEff:"))
        return bool(int(effective, 16) & (1 << 1))
    return os.geteuid() == 0


_DIRECTORY = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


# The walk keeps the descriptors of this many levels and climbs back to them without a
# lookup; below them it climbs through ``..``. It goes no deeper than the deepest.
_HELD_LEVELS = 16
_DEEPEST = 100_000


@dataclass
class _Level:
    """A directory on the way down: its name in its parent, its identity (device and
    inode), the entries still to remove (name, and whether it was a directory), and its
    descriptor while the walk is below it, if it is one of the levels held."""

    name: str
    identity: tuple[int, int]
    entries: list[tuple[str, bool]]
    held: int | None = None


def _remove_tree(parent: int, name: str, *, make_writable: bool) -> None:
    """Remove ``name`` from the directory ``parent`` (a descriptor) and everything below it.

    Without recursion, and with a bounded number of descriptors however deep: the walk
    holds those of the first ``_HELD_LEVELS`` levels (as ``rmtree`` holds every level's);
    below them it keeps each level's identity and remaining names, and climbs back through
    ``..``, checked against the identity it left there (as fts does). A directory down
    there is made this process's, mode 0700, as it is entered: a process outliving its
    attempt (as the script's user) can then neither move one away nor put another in its
    place, with its identity recycled. Never by path, never through a link, never into
    another filesystem (a mount is left). With ``make_writable``, every directory is made
    this process's and writable before it is listed, through its own descriptor."""
    current = _open_directory(name, parent)
    if current is None:  # not a directory (a file, a link): removed as it is
        os.unlink(name, dir_fd=parent)
        return
    levels: list[_Level] = []
    try:
        status = os.fstat(current)
        device = status.st_dev
        levels.append(_enter(current, status, name, make_writable))
        while True:
            level = levels[-1]
            if level.entries:
                child, is_directory = level.entries.pop()
                below = _open_directory(child, current) if is_directory else None
                if below is None:  # a file or a link, or one by now
                    with contextlib.suppress(OSError):
                        os.unlink(child, dir_fd=current)
                    continue
                try:
                    status = os.fstat(below)
                except OSError:
                    os.close(below)
                    continue
                if status.st_dev != device or len(levels) >= _DEEPEST:
                    os.close(below)  # left: its removal fails
                    continue
                lock = make_writable or len(levels) >= _HELD_LEVELS
                if len(levels) <= _HELD_LEVELS:
                    level.held = current
                else:
                    os.close(current)
                current = below
                levels.append(_enter(current, status, child, lock))
                continue
            levels.pop()
            if not levels:
                break
            above = levels[-1]
            if above.held is not None:
                os.close(current)
                current, above.held = above.held, None
            else:
                up = os.open("..", _DIRECTORY, dir_fd=current)
                os.close(current)
                current = up
                if _identity(os.fstat(current)) != above.identity:
                    return
            with contextlib.suppress(OSError):
                os.rmdir(level.name, dir_fd=current)
    finally:
        os.close(current)
        for level in levels:
            if level.held is not None:
                os.close(level.held)
    os.rmdir(name, dir_fd=parent)


def _open_directory(name: str, parent: int) -> int | None:
    try:
        return os.open(name, _DIRECTORY, dir_fd=parent)
    except OSError:
        return None


def _enter(directory: int, status: os.stat_result, name: str, make_writable: bool) -> _Level:
    """The level of ``directory`` (an ``O_PATH`` descriptor), made writable first if asked;
    a directory that cannot be listed is taken as empty (its removal then fails)."""
    if make_writable:
        itself = f"/proc/self/fd/{directory}"  # this very directory, whatever its path now
        with contextlib.suppress(OSError):
            if status.st_uid != os.geteuid():  # the script user's: root's, first
                os.chown(itself, os.geteuid(), os.getegid())
            os.chmod(itself, stat.S_IRWXU)
    entries = []
    with contextlib.suppress(OSError):
        listing = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=directory)
        try:
            with os.scandir(listing) as scanned:
                entries = [(entry.name, entry.is_dir(follow_symlinks=False)) for entry in scanned]
        finally:
            os.close(listing)
    return _Level(name, _identity(status), entries)


def _identity(status: os.stat_result) -> tuple[int, int]:
    return status.st_dev, status.st_ino
