"""Execute one attempt as a sandboxed process and report events as they happen.

Parameters reach the program only as data: environment variables and a JSON
file. Nothing a caller sends is ever spliced into shell text.
"""

from __future__ import annotations

import asyncio
import codecs
import collections
import contextlib
import errno
import fcntl
import functools
import json
import logging
import os
import signal
import stat
import subprocess
import sys
import threading
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import Any

from ondeck import blocking, storable
from ondeck.domain import LogChunk, Outcome, RunStatus, utcnow
from ondeck.durations import format_duration
from ondeck.masking import Masker, StreamMasker
from ondeck.runner import isolation, processes
from ondeck.runner.attempt import Attempt, Event, Finished, Output, Started
from ondeck.runner.workspace import Workspace
from ondeck.spec.params import param_env_name

log = logging.getLogger(__name__)

SAFE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_ENTRY = Path(__file__).with_name("python_entry.py")
_READ_SIZE = 64 * 1024
_PENDING_MAX = 64  # chunks not yet taken by the consumer before reading pauses
_REAP_WAIT_SECONDS = 10
# How long output may stay open once the attempt's processes are gone (see ``_supervise``).
_OUTPUT_LINGER_SECONDS = 2.0
_ABANDONED = "\n[ondeck] stopped reading output: a process that left the run holds it open\n"
_OUTPUTS_MAX = 1024 * 1024


# The longest string, its NUL included, ``execve`` takes (MAX_ARG_STRLEN, 32 pages): one
# longer failed the attempt's start with "Argument list too long".
_ENV_STRING_MAX = 32 * 4096


def _env_value(value: Any) -> str:
    if isinstance(value, str):
        return value
    if value is None:
        return ""
    return json.dumps(value, separators=(",", ":"))


def build_env(attempt: Attempt, workspace: Workspace) -> dict[str, str]:
    """A minimal environment: nothing of the server's own environment leaks in."""
    env = dict(attempt.extra_env)  # secrets: what ondeck sets below is never theirs to change
    env |= {
        "PATH": SAFE_PATH,
        "HOME": str(workspace.work),
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "TMPDIR": str(workspace.root),  # the attempt's own, as private as work
        "ONDECK_RUN_ID": attempt.run_id,
        "ONDECK_ATTEMPT": str(attempt.number),
        "ONDECK_WORKSPACE": str(workspace.work),
        "ONDECK_PARAMS": str(workspace.params_file),
        "ONDECK_OUTPUTS": str(workspace.outputs_file),
    }
    variables = {name: param_env_name(name) for name in attempt.params}
    taken = collections.Counter(variables.values())
    for name, value in attempt.params.items():
        variable, text = variables[name], _env_value(value)
        # The JSON file has every param; the environment not one whose variable another
        # param would be too (``a`` and ``A``, ``a-b`` and ``a_b``, names not in ASCII),
        # one not representable there (a NUL), nor one longer than the kernel passes.
        if (
            taken[variable] == 1
            and "\0" not in text
            and len(variable) + len(text.encode()) + 2 <= _ENV_STRING_MAX
        ):
            env[variable] = text
    return env


def build_argv(attempt: Attempt, workspace: Workspace) -> list[str]:
    if attempt.runtime == "exec":
        program = attempt.args
    elif attempt.runtime == "bash":
        # As GitHub Actions does: no rc files, stop at the first failing command or pipe stage.
        # The script is given inline, as $0 "script": no file, so one inode less per attempt
        # (hence also no ${BASH_SOURCE[0]}); the spec caps its size at one argument's limit.
        program = ["bash", "--noprofile", "--norc", "-eo", "pipefail", "-c", "--"]
        program += [attempt.script or "", "script", *attempt.args]
    else:
        script = workspace.script_file
        script.write_text(attempt.script or "", encoding="utf-8")
        if attempt.entrypoint == "main":
            program = [sys.executable, "-I", str(_ENTRY), str(script)]
        else:
            program = [sys.executable, "-I", str(script), *attempt.args]
    prefix = isolation.command(
        attempt.isolation, attempt.limits, workspace.root, attempt.hidden, attempt.run_as
    )
    return [*prefix, *program]


def python_unusable(
    mode: str, user: tuple[int, int], python: str = sys.executable, entry: Path = _ENTRY
) -> str | None:
    """Why ``python`` automations cannot start as ``user`` (``ONDECK_SCRIPT_USER``) here,
    None if they can: that user must be able to run the interpreter they start with and
    read its library and this package, which a Python in a private home directory (as
    pyenv installs it), or a virtualenv there, does not allow."""
    check = "import sys; open(sys.argv[1], 'rb').close()"
    problem = isolation.trial(mode, [python, "-I", "-c", check, str(entry)], user)
    return None if problem is None else problem.splitlines()[-1]


def _prepare(attempt: Attempt) -> tuple[Workspace, list[str]]:
    """Make the workspace with the params file and the script in it; return it and the command."""
    workspace = Workspace.create(attempt.workspace_root, attempt.run_id, attempt.number)
    try:
        workspace.params_file.write_text(json.dumps(attempt.params), encoding="utf-8")
        argv = build_argv(attempt, workspace)
        if attempt.run_as is not None:
            workspace.give_to(*attempt.run_as)
        return workspace, argv
    except BaseException:
        workspace.remove()
        raise


class _OutputBudget:
    """Shared by both pipes: caps what is kept, but the pipes are always drained."""

    def __init__(self, limit: int) -> None:
        self.remaining = limit
        self.limit = limit
        self.truncated = False


class _Stream:
    """One pipe's text: decoded across reads, and masked across reads (a secret may
    arrive split over two)."""

    def __init__(self, name: str, masker: Masker) -> None:
        self.name = name
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._secrets = StreamMasker(masker)

    def text(self, data: bytes, last: bool) -> str:
        # NUL, which no store keeps in text, becomes U+FFFD as bytes that are not UTF-8 do.
        text = self._secrets.feed(self._decoder.decode(data, final=last).replace("\x00", "\ufffd"))
        return text + self._secrets.flush() if last else text


class _Output:
    """Both pipes of a program, read from event-loop callbacks into chunks for the
    consumer, with the budget shared by both.

    While _PENDING_MAX chunks wait for the consumer, reading pauses, so a flooding
    program blocks on its pipe instead of filling memory. Once the budget is spent,
    reads are discarded: the pipes are always drained, so the program never blocks
    on them for good.
    """

    def __init__(self, pipes: dict[int, str], budget: _OutputBudget, masker: Masker) -> None:
        self._loop = asyncio.get_running_loop()
        self._budget = budget
        self._streams = {fd: _Stream(name, masker) for fd, name in pipes.items()}
        self._chunks: collections.deque[LogChunk] = collections.deque()
        self._waiter: asyncio.Future[None] | None = None
        self._paused = False
        for fd in self._streams:
            os.set_blocking(fd, False)
        self._listen()

    async def next(self) -> LogChunk | None:
        """The next chunk, or None once both pipes are closed and every chunk was taken."""
        while not self._chunks:
            if not self._streams:
                return None
            self._waiter = self._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        if self._paused and len(self._chunks) <= _PENDING_MAX // 2:
            self._paused = False
            self._listen()
        return self._chunks.popleft()

    def _listen(self) -> None:
        for fd in self._streams:
            self._loop.add_reader(fd, self._read, fd)

    def close(self) -> None:
        """Stop reading and close the pipes still open."""
        for fd in list(self._streams):
            self._close(fd)

    def abandon(self) -> bool:
        """Stop reading pipes that only a process outside the attempt still holds open,
        saying so in the log; False, doing nothing, while the consumer has yet to catch up
        (reading is paused: what the pipes hold may still be the program's own)."""
        if not self._streams:
            return True
        if self._paused:
            return False
        for fd in list(self._streams):  # what each holds now: at most its size, then its end
            with contextlib.suppress(OSError):
                for _ in range(fcntl.fcntl(fd, fcntl.F_GETPIPE_SZ) // _READ_SIZE + 2):
                    if fd not in self._streams or not self._read(fd):
                        break
        if self._streams:
            for fd in list(self._streams):
                self._take_safely(fd, b"")  # as at its end: closed, what a stream held back shown
            self._put("system", _ABANDONED)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)
        return True

    def _read(self, fd: int) -> bool:
        """Read what ``fd`` has; whether there was any (False at its end, too)."""
        try:
            data = os.read(fd, _READ_SIZE)
        except BlockingIOError:
            return False
        except OSError:
            data = b""  # the pipe broke: as good as its end
        self._take_safely(fd, data)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)
        if len(self._chunks) >= _PENDING_MAX and not self._paused:
            self._paused = True
            for open_fd in self._streams:
                self._loop.remove_reader(open_fd)
        return bool(data)

    def _take_safely(self, fd: int, data: bytes) -> None:
        """``_take``, closing ``fd`` if it fails: a bug there must not leave a readable fd
        calling back forever."""
        name = self._streams[fd].name
        try:
            self._take(fd, data)
        except Exception:
            log.exception("reading the program's %s failed", name)
            if fd in self._streams:
                self._close(fd)

    def _take(self, fd: int, data: bytes) -> None:
        stream, budget = self._streams[fd], self._budget
        if not data:
            self._close(fd)
            if not budget.truncated:
                self._put(stream.name, stream.text(b"", last=True))
        elif not budget.truncated:
            if len(data) > budget.remaining:
                data = data[: budget.remaining]
                budget.truncated = True
            budget.remaining -= len(data)
            # Cut off: a tail held back as the possible start of a secret is dropped, as
            # the rest of it would be (``last`` would show it).
            self._put(stream.name, stream.text(data, last=False))
            if budget.truncated:
                marker = f"\n[ondeck] output truncated at {budget.limit} bytes; the rest was discarded\n"
                self._put("system", marker)

    def _put(self, stream: str, text: str) -> None:
        if text:
            self._chunks.append(LogChunk(stream, text, utcnow()))

    def _close(self, fd: int) -> None:
        self._loop.remove_reader(fd)
        os.close(fd)
        del self._streams[fd]


@functools.cache
def _devnull() -> int:
    """/dev/null for every program's stdin, opened once (``subprocess.DEVNULL`` opens it per start)."""
    return os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)


class _Child:
    """A started program: its pid and its exit status, which the event loop learns from
    a pidfd (or, where there are none, a thread waiting for it). asyncio's subprocess
    transports, with their protocol, stream readers, child watcher and a task per pipe,
    cost three times the CPU per run."""

    def __init__(self, popen: subprocess.Popen[bytes]) -> None:
        self.pid = popen.pid
        self._popen = popen
        self._loop = asyncio.get_running_loop()
        self.exited: asyncio.Future[int] = self._loop.create_future()
        try:
            pidfd = os.pidfd_open(self.pid)
        except OSError:  # a kernel before 5.3, or a sandbox that refuses it
            waiter = threading.Thread(target=self._wait_in_thread, name=f"wait-{self.pid}", daemon=True)
            waiter.start()
        else:
            self._loop.add_reader(pidfd, self._reap, pidfd)

    @classmethod
    def start(cls, argv: list[str], cwd: Path, env: dict[str, str]) -> tuple[_Child, dict[int, str]]:
        """Start ``argv`` in a session of its own; returns it and its output pipes' read ends."""
        fds: list[int] = []
        try:
            fds.extend(os.pipe())
            fds.extend(os.pipe())
            popen = subprocess.Popen(
                argv,
                cwd=cwd,
                env=env,
                stdin=_devnull(),
                stdout=fds[1],
                stderr=fds[3],
                start_new_session=True,
            )
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        os.close(fds[1])
        os.close(fds[3])
        try:
            return cls(popen), {fds[0]: "stdout", fds[2]: "stderr"}
        except BaseException:  # it runs, but nothing would watch it: it must not outlive this
            with contextlib.suppress(ProcessLookupError):
                os.killpg(popen.pid, signal.SIGKILL)
            popen.wait()
            os.close(fds[0])
            os.close(fds[2])
            raise

    def _reap(self, pidfd: int) -> None:
        self._loop.remove_reader(pidfd)
        os.close(pidfd)
        self._exited(self._status())  # it has exited: waiting does not block

    def _wait_in_thread(self) -> None:
        code = self._status()
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
            self._loop.call_soon_threadsafe(self._exited, code)

    def _status(self) -> int:
        try:
            _, status = os.waitpid(self.pid, 0)
        except ChildProcessError:  # reaped by someone else (or SIGCHLD ignored): as asyncio does
            return 255
        return os.waitstatus_to_exitcode(status)

    def _exited(self, code: int) -> None:
        self._popen.returncode = code
        if not self.exited.done():
            self.exited.set_result(code)


def _read_outputs(path: Path, owner: int) -> tuple[dict[str, Any] | None, str | None]:
    """The outputs a script left at ``path``, or why they cannot be taken. Only a regular
    file of the script user's (``owner``) is read: read by the worker, which may be root,
    a link to a file the script may not read (a symbolic one, or a hard one where the
    system allows linking others' files) would hand the script that file as outputs; a
    FIFO would block the worker."""
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None, None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return None, "outputs file is a symbolic link: write the outputs there"
        return None, f"outputs file cannot be read: {exc.strerror}"
    try:
        status = os.fstat(descriptor)
        if not stat.S_ISREG(status.st_mode):
            return None, "outputs file is not a regular file"
        if status.st_uid != owner:
            return None, "outputs file is not the script user's (a link to another user's file?)"
        with open(descriptor, "rb", closefd=False) as file:
            raw = file.read(_OUTPUTS_MAX + 1)
    finally:
        os.close(descriptor)
    if not raw:
        return None, None
    if len(raw) > _OUTPUTS_MAX:
        return None, f"outputs file is larger than {_OUTPUTS_MAX} bytes"
    problem = storable.json_problem(raw)
    if problem is not None:
        return None, f"outputs file holds text that cannot be stored: {problem}"
    deep = f"outputs file nests more than {storable.DEPTH_MAX} levels of objects and arrays"
    try:
        value = storable.strict_json(raw.decode("utf-8"))
    except RecursionError:
        return None, deep
    except (ValueError, UnicodeDecodeError) as exc:
        return None, f"outputs file is not valid JSON: {exc}"
    if storable.nesting(value) > storable.DEPTH_MAX:
        return None, deep
    if not isinstance(value, dict):
        return None, "outputs file must hold a JSON object"
    return value, None


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"killed by signal {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


async def run_attempt(attempt: Attempt, cancel: asyncio.Event) -> AsyncGenerator[Event, None]:
    """Run ``attempt``; yields Started, Output…, then exactly one Finished.

    Whatever happens — timeout, cancel, the consumer going away — every process
    of the attempt is killed and the workspace removed before this returns.
    """
    # Making a workspace is a few small writes, and so is removing one that holds no more
    # than that, as most do: both right here, as a hand-over to a thread would cost more.
    # A workspace with more in it, of any size, is removed off the event loop.
    workspace, argv = _prepare(attempt)
    child: _Child | None = None
    output: _Output | None = None
    masker = Masker(attempt.redact)
    try:
        try:
            child, pipes = _Child.start(argv, workspace.work, build_env(attempt, workspace))
        except OSError as exc:
            yield Finished(Outcome(RunStatus.FAILED, None, f"cannot start {argv[0]}: {exc.strerror}"))
            return
        output = _Output(pipes, _OutputBudget(max(attempt.log_budget, 0)), masker)
        yield Started(child.pid)
        async for event in _supervise(child, output, masker, attempt, cancel, workspace):
            yield event
    finally:
        try:
            if output is not None:
                output.close()
            if child is not None:
                await _end(child, attempt)
        finally:
            if not workspace.remove_if_untouched():
                await asyncio.to_thread(workspace.remove)


async def _end(child: _Child, attempt: Attempt) -> None:
    """Kill what is left of the attempt and wait (a while) for the program to be reaped."""
    if processes.group_alive(child.pid):
        await processes.terminate(child.pid, attempt.run_id, attempt.number, 0, spare_leader=False)
    if child.exited.done():
        return
    try:
        # Shielded: cancelling this wait must not cancel the exit for its other waiters.
        await asyncio.wait_for(asyncio.shield(child.exited), _REAP_WAIT_SECONDS)
    except TimeoutError:  # SIGKILLed but not gone (stuck in the kernel): reaped when it goes
        log.warning("run %s: the attempt's process %d has not exited yet", attempt.run_id, child.pid)


async def _supervise(
    child: _Child,
    output: _Output,
    masker: Masker,
    attempt: Attempt,
    cancel: asyncio.Event,
    workspace: Workspace,
) -> AsyncGenerator[Event, None]:
    stopper = asyncio.create_task(_stop_when_due(child.pid, child.exited, attempt, cancel))
    # Once the stopper is done, every process of the attempt is gone and the pipes close,
    # but for one that escaped it (isolation by group alone: see runner.isolation), which
    # could hold them open, and the attempt past its timeout, for as long as it runs.
    loop = asyncio.get_running_loop()
    linger: asyncio.TimerHandle | None = None
    ended = False

    def give_up() -> None:
        nonlocal linger
        if not output.abandon():
            linger = loop.call_later(_OUTPUT_LINGER_SECONDS, give_up)

    def stopped(_: object) -> None:
        nonlocal linger
        if not ended:  # (a done callback runs later: the attempt may have ended meanwhile)
            linger = loop.call_later(_OUTPUT_LINGER_SECONDS, give_up)

    stopper.add_done_callback(stopped)
    try:
        while (chunk := await output.next()) is not None:
            yield Output(chunk)
        reason = await stopper
        code = child.exited.result()  # the stopper returns once it is known
    finally:
        ended = True
        stopper.cancel()
        if linger is not None:
            linger.cancel()
    if reason == "timeout":
        outcome = Outcome(RunStatus.TIMED_OUT, code, f"timed out after {format_duration(attempt.timeout)}")
    elif reason == "cancel":
        outcome = Outcome(RunStatus.CANCELLED, code, "cancelled")
    else:
        owner = attempt.run_as[0] if attempt.run_as else os.geteuid()
        outputs, problem = _read_outputs(workspace.outputs_file, owner)
        if code != 0:
            outcome = Outcome(RunStatus.FAILED, code, _describe_exit(code), outputs)
        elif problem:
            outcome = Outcome(RunStatus.FAILED, code, problem)
        else:
            outcome = Outcome(RunStatus.SUCCEEDED, code, None, outputs)
    if masker:
        outcome = Outcome(
            outcome.status,
            outcome.exit_code,
            masker.text(outcome.error) if outcome.error else None,
            masker.json(outcome.outputs),
        )
    yield Finished(outcome)


async def _stop_when_due(
    pid: int, exited: asyncio.Future[int], attempt: Attempt, cancel: asyncio.Event
) -> str | None:
    """Wait for exit, timeout or cancel; make sure the whole group is gone either way.

    Returns why the attempt was stopped (``timeout``/``cancel``) or None if it exited.
    Background children left after a normal exit are terminated too (in the group, and
    by isolation by group alone, those that left it), which is also what closes the pipes
    they inherited.
    """
    cancelled = asyncio.create_task(cancel.wait())
    waiting: set[asyncio.Future[Any]] = {exited, cancelled}
    try:
        done, _ = await asyncio.wait(waiting, timeout=attempt.timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        cancelled.cancel()
    reason = None
    if exited not in done:
        reason = "cancel" if cancel.is_set() else "timeout"
    if reason is not None or processes.group_alive(pid):
        spare_leader = attempt.isolation != isolation.GROUP
        await processes.terminate(
            pid, attempt.run_id, attempt.number, attempt.kill_grace, spare_leader=spare_leader
        )
    elif attempt.isolation == isolation.GROUP:
        # No PID namespace ends a process that left the group (setsid) with the attempt; one
        # holding the output pipes would keep the attempt from ending for as long as it runs.
        # On a thread: reading every process's environment can wait on one stuck in the kernel.
        await blocking.run(processes.kill_tagged, attempt.run_id, attempt.number)
    if not exited.done():
        await asyncio.shield(exited)  # cancelling this wait must not cancel the exit itself
    return reason
