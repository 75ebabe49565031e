"""Execute one attempt as a sandboxed process and report events as they happen.

Parameters reach the program only as data: environment variables and a JSON
file. Nothing a caller sends is ever spliced into shell text.
"""

from __future__ import annotations

import asyncio
import codecs
import json
import re
import signal
import sys
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import Any

from ondeck.domain import LogChunk, Outcome, RunStatus, utcnow
from ondeck.durations import format_duration
from ondeck.masking import Masker, StreamMasker
from ondeck.runner import isolation, processes
from ondeck.runner.attempt import Attempt, Event, Finished, Output, Started
from ondeck.runner.workspace import Workspace

SAFE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_ENTRY = Path(__file__).with_name("python_entry.py")
_READ_SIZE = 64 * 1024
_OUTPUTS_MAX = 1024 * 1024
_EOF = object()


def param_env_name(name: str) -> str:
    return "ONDECK_PARAM_" + re.sub(r"[^A-Za-z0-9]", "_", name).upper()


def _env_value(value: Any) -> str:
    if isinstance(value, str):
        return value
    if value is None:
        return ""
    return json.dumps(value, separators=(",", ":"))


def build_env(attempt: Attempt, workspace: Workspace) -> dict[str, str]:
    """A minimal environment: nothing of the server's own environment leaks in."""
    env = {
        "PATH": SAFE_PATH,
        "HOME": str(workspace.work),
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "TMPDIR": str(workspace.tmp),
        "ONDECK_RUN_ID": attempt.run_id,
        "ONDECK_ATTEMPT": str(attempt.number),
        "ONDECK_WORKSPACE": str(workspace.work),
        "ONDECK_PARAMS": str(workspace.params_file),
        "ONDECK_OUTPUTS": str(workspace.outputs_file),
    }
    for name, value in attempt.params.items():
        text = _env_value(value)
        if "\0" not in text:  # not representable in the environment; the JSON file has it
            env[param_env_name(name)] = text
    env.update(attempt.extra_env)
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
        script = workspace.root / "script.py"
        script.write_text(attempt.script or "", encoding="utf-8")
        if attempt.entrypoint == "main":
            program = [sys.executable, "-I", str(_ENTRY), str(script)]
        else:
            program = [sys.executable, "-I", str(script), *attempt.args]
    return [*isolation.command(attempt.isolation, attempt.limits), *program]


class _ExitAwareProtocol(asyncio.subprocess.SubprocessStreamProtocol):
    """Tells when the process exits, even while its children still hold the pipes.

    ``Process.wait()`` only returns once every pipe is closed, which a
    background grandchild can delay forever; the group must be killed first.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(limit=_READ_SIZE, loop=loop)
        self.exited: asyncio.Future[None] = loop.create_future()

    def process_exited(self) -> None:
        super().process_exited()
        if not self.exited.done():
            self.exited.set_result(None)


def _prepare(attempt: Attempt) -> tuple[Workspace, list[str]]:
    """Make the workspace with the params file and the script in it; return it and the command."""
    workspace = Workspace.create(attempt.workspace_root, attempt.run_id, attempt.number)
    try:
        workspace.params_file.write_text(json.dumps(attempt.params), encoding="utf-8")
        return workspace, build_argv(attempt, workspace)
    except BaseException:
        workspace.remove()
        raise


class _OutputBudget:
    """Shared by both pipes: caps what is kept, but the pipes are always drained."""

    def __init__(self, limit: int) -> None:
        self.remaining = limit
        self.limit = limit
        self.truncated = False


async def _pump(
    stream: asyncio.StreamReader,
    name: str,
    budget: _OutputBudget,
    queue: asyncio.Queue[LogChunk | object],
    masker: Masker,
) -> None:
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    secrets = StreamMasker(masker)
    while True:
        data = await stream.read(_READ_SIZE)
        if not data:
            tail = secrets.feed(decoder.decode(b"", final=True)) + secrets.flush()
            if tail and not budget.truncated:
                await queue.put(LogChunk(name, tail, utcnow()))
            break
        if budget.truncated:
            continue
        if len(data) > budget.remaining:
            data = data[: budget.remaining]
            budget.truncated = True
        budget.remaining -= len(data)
        text = decoder.decode(data, final=budget.truncated)
        text = secrets.feed(text) + (secrets.flush() if budget.truncated else "")
        if text:
            await queue.put(LogChunk(name, text, utcnow()))
        if budget.truncated:
            marker = f"\n[ondeck] output truncated at {budget.limit} bytes; the rest was discarded\n"
            await queue.put(LogChunk("system", marker, utcnow()))
    await queue.put(_EOF)


def _read_outputs(path: Path) -> tuple[dict[str, Any] | None, str | None]:
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return None, None
    if size == 0:
        return None, None
    if size > _OUTPUTS_MAX:
        return None, f"outputs file is larger than {_OUTPUTS_MAX} bytes"
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        return None, f"outputs file is not valid JSON: {exc}"
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
    # File work happens off the event loop: it must keep serving while disks are slow.
    workspace, argv = await asyncio.to_thread(_prepare, attempt)
    process: asyncio.subprocess.Process | None = None
    try:
        loop = asyncio.get_running_loop()
        try:
            transport, protocol = await loop.subprocess_exec(
                lambda: _ExitAwareProtocol(loop),
                *argv,
                cwd=workspace.work,
                env=build_env(attempt, workspace),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                start_new_session=True,
            )
            process = asyncio.subprocess.Process(transport, protocol, loop)
        except OSError as exc:
            yield Finished(Outcome(RunStatus.FAILED, None, f"cannot start {argv[0]}: {exc.strerror}"))
            return
        yield Started(process.pid)
        async for event in _supervise(process, protocol.exited, attempt, cancel, workspace):
            yield event
    finally:
        if process is not None and processes.group_alive(process.pid):
            await processes.terminate(process.pid, attempt.run_id, attempt.number, 0, spare_leader=False)
        await asyncio.to_thread(workspace.remove)


async def _supervise(
    process: asyncio.subprocess.Process,
    exited: asyncio.Future[None],
    attempt: Attempt,
    cancel: asyncio.Event,
    workspace: Workspace,
) -> AsyncGenerator[Event, None]:
    assert process.stdout is not None and process.stderr is not None
    budget = _OutputBudget(max(attempt.log_budget, 0))
    queue: asyncio.Queue[LogChunk | object] = asyncio.Queue(maxsize=64)
    masker = Masker(attempt.redact)
    pumps = [
        asyncio.create_task(_pump(process.stdout, "stdout", budget, queue, masker)),
        asyncio.create_task(_pump(process.stderr, "stderr", budget, queue, masker)),
    ]
    stopper = asyncio.create_task(_stop_when_due(process.pid, exited, attempt, cancel))
    try:
        open_pipes = 2
        while open_pipes:
            item = await queue.get()
            if item is _EOF:
                open_pipes -= 1
            elif isinstance(item, LogChunk):
                yield Output(item)
        reason = await stopper
        code = await process.wait()
    finally:
        for task in (*pumps, stopper):
            task.cancel()
    if reason == "timeout":
        outcome = Outcome(RunStatus.TIMED_OUT, code, f"timed out after {format_duration(attempt.timeout)}")
    elif reason == "cancel":
        outcome = Outcome(RunStatus.CANCELLED, code, "cancelled")
    else:
        outputs, problem = _read_outputs(workspace.outputs_file)
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
    pid: int, exited: asyncio.Future[None], attempt: Attempt, cancel: asyncio.Event
) -> str | None:
    """Wait for exit, timeout or cancel; make sure the whole group is gone either way.

    Returns why the attempt was stopped (``timeout``/``cancel``) or None if it exited.
    Background children left after a normal exit are terminated too, which is
    also what closes the pipes they inherited.
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
    await exited
    return reason
