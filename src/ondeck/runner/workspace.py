"""A fresh directory per attempt, removed afterwards whatever happened."""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import tempfile
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path


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
        """Remove the workspace if it holds no more than ondeck put there and the script's
        outputs file: a few system calls, cheap enough for an event loop. False, having
        removed what it could, if there is more: then ``remove``, off the loop."""
        try:
            self.work.rmdir()
            self.params_file.unlink(missing_ok=True)
            self.outputs_file.unlink(missing_ok=True)
            self.root.rmdir()
        except OSError:  # not empty, not a directory, made read-only...
            return False
        return True

    def remove(self) -> None:
        """Delete everything, including files a script made read-only."""
        shutil.rmtree(self.root, onerror=_make_writable)
        shutil.rmtree(self.root, ignore_errors=True)


def _make_writable(_function: object, path: str, _exc: object) -> None:
    """``rmtree``'s error handler: make ``path`` and its directory writable, then remove it.
    A symbolic link is removed, never changed: ``chmod`` would change what it points to,
    which could be any file the worker (root, say) may change."""
    with contextlib.suppress(OSError):
        os.chmod(os.path.dirname(path), stat.S_IRWXU)  # rmtree walks real directories only
        if os.path.islink(path):
            os.unlink(path)
            return
        os.chmod(path, stat.S_IRWXU)
        shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else os.unlink(path)
