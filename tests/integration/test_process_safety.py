"""Process safety against real ``ondeck`` processes: inert params, a clean
environment, no stray processes after timeout/cancel, worker loss, and output floods.

Every process check scans ``/proc`` for markers unique to one test (the run id in
the environment, or sleep durations with a random fraction), so these tests can
run in parallel with anything else.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from ondeck.engine import runs
from ondeck.store.store import Store
from tests.support import (
    TERMINAL,
    OndeckProcess,
    Server,
    base_env,
    put_automation,
    trigger,
    wait_for_run,
    wait_until,
)

LOG_CAP = 1024 * 1024
TRUNCATION_MARKER = "[ondeck] output truncated"


# --- /proc helpers -----------------------------------------------------------


def _alive(pid: int) -> bool:
    """True unless the process is gone or a zombie (a zombie runs nothing)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2 :].split()[0] not in ("Z", "X")


def _pids() -> list[int]:
    return [int(entry.name) for entry in Path("/proc").iterdir() if entry.name.isdigit()]


def run_processes(run_id: str) -> list[int]:
    """Live processes whose environment carries ``ONDECK_RUN_ID=<run_id>``."""
    marker = f"ONDECK_RUN_ID={run_id}".encode()
    found = []
    for pid in _pids():
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if marker in environ and _alive(pid):
            found.append(pid)
    return found


def processes_running(*tokens: str) -> dict[str, list[int]]:
    """For each token, the live processes whose command line contains it."""
    found: dict[str, list[int]] = {token: [] for token in tokens}
    for pid in _pids():
        if pid == os.getpid():
            continue
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        for token in tokens:
            if token in cmdline and _alive(pid):
                found[token].append(pid)
    return found


def server_environ(pid: int) -> list[bytes]:
    return Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")


def unique_sleep(base: int) -> str:
    """A sleep duration no other test uses, so ``/proc`` scans only find ours."""
    return f"{base}.{random.randint(100000, 999999)}"


def unique_name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


# --- HTTP helpers ------------------------------------------------------------


def get_run(client: httpx.Client, run_id: str) -> dict[str, Any]:
    response = client.get(f"/runs/{run_id}")
    assert response.status_code == 200, response.text
    run: dict[str, Any] = response.json()
    return run


def all_logs(client: httpx.Client, run_id: str, limit: int = 1000) -> list[dict[str, Any]]:
    """Every log entry of the run, paging with ``after``."""
    entries: list[dict[str, Any]] = []
    after = 0
    while True:
        response = client.get(f"/runs/{run_id}/logs", params={"after": after, "limit": limit})
        assert response.status_code == 200, response.text
        page = response.json()["entries"]
        entries.extend(page)
        if len(page) < limit:
            return entries
        after = page[-1]["seq"]


def log_text(client: httpx.Client, run_id: str) -> str:
    return "".join(entry["text"] for entry in all_logs(client, run_id))


def wait_running(client: httpx.Client, run_id: str, timeout: float = 30.0) -> dict[str, Any]:
    def running() -> dict[str, Any] | None:
        run = get_run(client, run_id)
        assert run["status"] not in TERMINAL, f"run ended before it was seen running: {run}"
        return run if run["status"] == "running" else None

    return wait_until(running, timeout=timeout, message=f"run {run_id} to be running")


def leftover_workspaces(data_dir: Path, run_id: str, root: Path | None = None) -> list[Path]:
    root = root or data_dir / "workspaces"
    return sorted(root.glob(f"{run_id}-*")) if root.exists() else []


# --- fixtures ----------------------------------------------------------------


@pytest.fixture
def run_ids() -> Iterator[list[str]]:
    """Run ids a test started; whatever of theirs is still alive afterwards is killed.

    Needed after a worker is SIGKILLed (its scripts are orphaned), and keeps a
    failing test from leaving sleeps behind.
    """
    ids: list[str] = []
    yield ids
    for run_id in ids:
        for pid in run_processes(run_id):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    data = tmp_path / "data"
    (data / "automations").mkdir(parents=True)
    return data


@pytest.fixture
def processes() -> Iterator[list[OndeckProcess]]:
    started: list[OndeckProcess] = []
    yield started
    for proc in reversed(started):
        proc.stop()


@pytest.fixture
def start_server(
    database_url: str, data_dir: Path, processes: list[OndeckProcess]
) -> Callable[..., tuple[Server, dict[str, str]]]:
    """A server of our own on the parametrised database; returns it and its env."""

    def start(extra_args: list[str] | None = None, **extra_env: str) -> tuple[Server, dict[str, str]]:
        env = base_env(data_dir, database_url, **extra_env)
        server = Server(env, data_dir / "server.log", extra=extra_args)
        processes.append(server)
        server.start()
        return server, env

    return start


# --- 1. params are data; the script's environment and cwd are its own ----------


def test_params_are_inert_and_environment_is_clean(
    start_server: Callable[..., tuple[Server, dict[str, str]]],
    data_dir: Path,
    tmp_path: Path,
    run_ids: list[str],
) -> None:
    server, _ = start_server(SECRET_SHOULD_NOT_LEAK="1", ONDECK_EXTRA_SERVER_ONLY="also-secret")
    # Sanity: the server really has the secret, so its absence below means something.
    assert b"SECRET_SHOULD_NOT_LEAK=1" in server_environ(server.pid)

    markers = [tmp_path / f"pwned-{i}" for i in range(3)]
    canary = data_dir / "canary"  # the server's HOME: `rm -rf ~` must not reach it
    canary.write_text("still here")
    params = {
        "x": f"$(touch {markers[0]}); rm -rf ~",
        "y": f"`touch {markers[1]}` && rm -rf ~",
        "z": f"'; touch {markers[2]}; echo '\" $HOME ${{HOME}} *",
    }
    name = unique_name("inert")
    script = r"""
echo "x=[$ONDECK_PARAM_X]"
echo "y=[$ONDECK_PARAM_Y]"
echo "z=[$ONDECK_PARAM_Z]"
echo "params=$(cat "$ONDECK_PARAMS")"
echo "leak=[${SECRET_SHOULD_NOT_LEAK-unset}]"
env | sort
entries=$(ls -A | wc -l)
names=$(compgen -e | tr '\n' ' ')
printf '{"cwd": "%s", "home": "%s", "workspace": "%s", "entries": %s, "env": "%s", "params": %s}' \
  "$PWD" "$HOME" "$ONDECK_WORKSPACE" "$entries" "$names" "$(cat "$ONDECK_PARAMS")" > "$ONDECK_OUTPUTS"
"""
    with server.client() as client:
        put_automation(
            client,
            {
                "name": name,
                "params": {"type": "object", "properties": {k: {"type": "string"} for k in params}},
                "run": {"runtime": "bash", "script": script},
                "timeout": "30s",
            },
        )
        run_ids.append(run_id := trigger(client, name, params)["id"])
        run = wait_for_run(client, run_id)
        assert run["status"] == "succeeded", run
        assert run["exit_code"] == 0

        text = log_text(client, run_id)
        for key, value in params.items():
            assert f"{key}=[{value}]" in text, text
        assert "leak=[unset]" in text, text
        # $ONDECK_PARAMS holds the exact params as JSON (the literal text is in it).
        assert "$(touch " in text.split("params=", 1)[1]

    for marker in markers:
        assert not marker.exists(), f"a param was executed: {marker} exists"
    assert canary.read_text() == "still here"

    outputs = run["outputs"]
    assert outputs is not None, run
    assert outputs["params"] == params  # the outputs file came back through GET /runs/{id}
    env_names = set(outputs["env"].split())
    assert "ONDECK_RUN_ID" in env_names and "ONDECK_PARAM_X" in env_names  # sanity: the listing works
    # Nothing of the server's own environment (tokens, database URL, ...) reaches the script,
    # except PATH and HOME, which the runner sets to values of its own.
    server_only = set(server.env) - {"PATH", "HOME"}
    assert {"SECRET_SHOULD_NOT_LEAK", "ONDECK_EXTRA_SERVER_ONLY", "ONDECK_DATABASE_URL"} <= server_only
    assert not server_only & env_names, f"leaked into the script: {sorted(server_only & env_names)}"
    assert server.env["ONDECK_DATABASE_URL"] not in text

    cwd = Path(outputs["cwd"])
    workspaces = (data_dir / "workspaces").resolve()
    assert cwd.is_relative_to(workspaces), (cwd, workspaces)
    assert cwd.parent.name.startswith(f"{run_id}-1-"), cwd  # a directory for this run and attempt
    assert outputs["home"] == outputs["workspace"] == str(cwd)
    assert outputs["entries"] == 0, "the workspace was not fresh"
    assert not cwd.exists() and not cwd.parent.exists(), "the workspace outlived the run"
    assert leftover_workspaces(data_dir, run_id) == []


# --- 2. timeout kills the whole process tree ------------------------------------


def test_timeout_kills_every_process_of_the_run(server: Server, run_ids: list[str]) -> None:
    background, subshell, foreground = unique_sleep(300), unique_sleep(301), unique_sleep(1000)
    detached, stubborn = unique_sleep(302), unique_sleep(303)
    script = f"""
sleep {background} &
( sleep {subshell}; echo ) &
setsid sleep {detached} &
( trap '' TERM; sleep {stubborn} ) &
sleep {foreground}
"""
    name = unique_name("timeout")
    tokens = (
        f"sleep {background}",
        f"sleep {subshell}",
        f"sleep {foreground}",
        f"sleep {detached}",
        f"sleep {stubborn}",
    )
    with server.client() as client:
        put_automation(client, {"name": name, "run": {"runtime": "bash", "script": script}, "timeout": "2s"})
        run_ids.append(run_id := trigger(client, name)["id"])

        # While it runs, every one of those processes exists (so the check below can fail).
        wait_until(
            lambda: all(processes_running(*tokens).values()), timeout=20, message="the run's sleeps to start"
        )
        assert run_processes(run_id)

        run = wait_for_run(client, run_id, timeout=30)
        assert run["status"] == "timed_out", run
        assert "timed out after 2s" in (run["error"] or ""), run

    def nothing_left() -> bool:
        return not run_processes(run_id) and not any(processes_running(*tokens).values())

    # The runner kills before it reports; allow only for the kernel to finish the kills.
    wait_until(nothing_left, timeout=5, message=f"no process of run {run_id} left")
    assert leftover_workspaces(Path(server.env["ONDECK_DATA_DIR"]), run_id) == []


# --- 3. a worker killed mid-run ------------------------------------------------


LEASE_SECONDS = "3"
GRACE_SECONDS = "0.5"  # under a third of the lease, as settings require


def _start_worker(
    env: dict[str, str], data_dir: Path, processes: list[OndeckProcess], label: str
) -> OndeckProcess:
    worker = OndeckProcess(["worker", "--concurrency", "2"], env, data_dir / f"{label}.log")
    processes.append(worker)
    return worker.start()


def _running_on(client: httpx.Client, run_id: str, worker: OndeckProcess, attempt: int) -> None:
    """Wait until ``worker`` runs attempt ``attempt`` and its script process exists."""

    def on_worker() -> bool:
        assert worker.process is not None and worker.process.poll() is None, worker.log()
        run = get_run(client, run_id)
        assert run["status"] not in TERMINAL, run
        return run["status"] == "running" and run["attempt"] == attempt and bool(run_processes(run_id))

    wait_until(on_worker, timeout=45, message=f"run {run_id} attempt {attempt} running on the worker")
    run = get_run(client, run_id)
    assert run["attempts"][-1]["worker"].split(":")[1] == str(worker.pid), run["attempts"]


def test_killed_worker_run_is_failed_by_the_reaper(
    start_server: Callable[..., tuple[Server, dict[str, str]]],
    data_dir: Path,
    processes: list[OndeckProcess],
    run_ids: list[str],
) -> None:
    workspaces = data_dir / "elsewhere"  # ONDECK_WORKSPACES_DIR: the worker and the reaper use it
    server, env = start_server(
        ["--no-worker"],
        ONDECK_LEASE_SECONDS=LEASE_SECONDS,
        ONDECK_KILL_GRACE_SECONDS=GRACE_SECONDS,
        ONDECK_WORKSPACES_DIR=str(workspaces),
    )
    name = unique_name("lost")
    with server.client() as client:
        put_automation(
            client,
            {
                "name": name,
                "run": {"runtime": "bash", "script": f"echo started; sleep {unique_sleep(60)}"},
                "timeout": "5m",
                "retries": {"attempts": 1},
            },
        )
        run_ids.append(run_id := trigger(client, name)["id"])
        worker = _start_worker(env, data_dir, processes, "worker")
        _running_on(client, run_id, worker, attempt=1)
        assert len(leftover_workspaces(data_dir, run_id, workspaces)) == 1

        worker.kill(signal.SIGKILL)
        killed_at = time.monotonic()

        def ended() -> dict[str, Any] | None:
            run = get_run(client, run_id)
            return run if run["status"] in TERMINAL else None

        run = wait_until(
            ended, timeout=20, interval=0.2, message=f"run {run_id} to end after its worker died"
        )
        assert time.monotonic() - killed_at < 20
        assert run["status"] == "failed", run
        assert "worker lost" in (run["error"] or ""), run
        assert run["attempt"] == 1 and len(run["attempts"]) == 1
        assert run["attempts"][0]["status"] == "failed"
        assert "worker lost" in (run["attempts"][0]["error"] or "")
        assert run["finished_at"] is not None
        # The script died with its worker (PID namespace + parent-death signal) and the
        # reaper removed the attempt's workspace: nothing of the lost attempt lives on.
        wait_until(lambda: run_processes(run_id) == [], timeout=10, message="orphans to die")
        wait_until(
            lambda: leftover_workspaces(data_dir, run_id, workspaces) == [],
            timeout=10,
            message="workspace removal",
        )


def test_killed_worker_run_is_retried_on_a_new_worker(
    start_server: Callable[..., tuple[Server, dict[str, str]]],
    data_dir: Path,
    processes: list[OndeckProcess],
    run_ids: list[str],
) -> None:
    server, env = start_server(
        ["--no-worker"], ONDECK_LEASE_SECONDS=LEASE_SECONDS, ONDECK_KILL_GRACE_SECONDS=GRACE_SECONDS
    )
    name = unique_name("retry")
    script = f"""
if [ "$ONDECK_ATTEMPT" = 2 ]; then
  echo "attempt 2 done"
  echo '{{"attempt": 2}}' > "$ONDECK_OUTPUTS"
  exit 0
fi
sleep {unique_sleep(60)}
"""
    with server.client() as client:
        put_automation(
            client,
            {
                "name": name,
                "run": {"runtime": "bash", "script": script},
                "timeout": "5m",
                "retries": {"attempts": 2, "backoff": "0s"},
            },
        )
        run_ids.append(run_id := trigger(client, name)["id"])
        first = _start_worker(env, data_dir, processes, "worker-1")
        _running_on(client, run_id, first, attempt=1)

        first.kill(signal.SIGKILL)
        # Attempt 1 must be dead before attempt 2 may start: a run never executes twice at once.
        wait_until(lambda: run_processes(run_id) == [], timeout=10, message="attempt 1 to die")
        second = _start_worker(env, data_dir, processes, "worker-2")

        run = wait_for_run(client, run_id, timeout=40)
        assert run["status"] == "succeeded", run
        assert run["attempt"] == 2
        assert run["outputs"] == {"attempt": 2}
        lost, retried = run["attempts"]
        assert lost["status"] == "failed" and "worker lost" in (lost["error"] or ""), lost
        assert lost["worker"].split(":")[1] == str(first.pid)
        assert retried["status"] == "succeeded", retried
        assert retried["worker"].split(":")[1] == str(second.pid)
        assert "attempt 2 done" in log_text(client, run_id)


def embedded_workers(server_pid: int) -> list[int]:
    """Live child processes of the server that are its embedded ``ondeck worker``."""
    try:
        children = Path(f"/proc/{server_pid}/task/{server_pid}/children").read_text().split()
    except OSError:
        return []
    found = []
    for child in map(int, children):
        with contextlib.suppress(OSError):
            if b"worker" in Path(f"/proc/{child}/cmdline").read_bytes() and _alive(child):
                found.append(child)
    return found


def test_embedded_worker_is_a_child_that_is_restarted_and_dies_with_its_server(
    start_server: Callable[..., tuple[Server, dict[str, str]]], run_ids: list[str]
) -> None:
    server, _ = start_server()
    first = wait_until(lambda: embedded_workers(server.pid), timeout=30, message="the embedded worker")
    assert len(first) == 1
    name = unique_name("embedded")
    with server.client() as client:
        put_automation(client, {"name": name, "run": {"runtime": "bash", "script": "echo hi"}})

        def executed_by() -> int:
            run_ids.append(run_id := trigger(client, name)["id"])
            run = wait_for_run(client, run_id)
            assert run["status"] == "succeeded", run
            return int(run["attempts"][0]["worker"].split(":")[1])

        assert executed_by() == first[0] != server.pid

        os.kill(first[0], signal.SIGKILL)
        second = wait_until(
            lambda: [pid for pid in embedded_workers(server.pid) if pid != first[0]],
            timeout=30,
            message="the embedded worker to be started again",
        )
        assert executed_by() == second[0]

    server.kill(signal.SIGKILL)
    wait_until(lambda: not _alive(second[0]), timeout=30, message="the worker to stop with its server")


def test_several_embedded_workers_each_execute_runs_and_stop_with_the_server(
    start_server: Callable[..., tuple[Server, dict[str, str]]], tmp_path: Path, run_ids: list[str]
) -> None:
    server, _ = start_server(ONDECK_WORKER_PROCESSES="2", ONDECK_WORKER_CONCURRENCY="1")
    workers = wait_until(
        lambda: (found := embedded_workers(server.pid)) and len(found) == 2 and found,
        timeout=30,
        message="two embedded workers",
    )
    gate = tmp_path / "gate"
    name = unique_name("two-workers")
    script = 'echo waiting; while [ ! -e "$ONDECK_PARAM_GATE" ]; do sleep 0.05; done'
    with server.client() as client:
        params = {"type": "object", "properties": {"gate": {"type": "string"}}}
        put_automation(client, {"name": name, "params": params, "run": {"runtime": "bash", "script": script}})
        started = [trigger(client, name, {"gate": str(gate)})["id"] for _ in range(2)]
        run_ids.extend(started)
        # One run at a time per process: both running at once means both processes execute.
        running = [wait_running(client, run_id) for run_id in started]
        pids = {int(run["attempts"][-1]["worker"].split(":")[1]) for run in running}
        assert pids == set(workers)
        gate.touch()
        assert [wait_for_run(client, run_id)["status"] for run_id in started] == ["succeeded"] * 2

    server.stop()
    wait_until(lambda: not any(map(_alive, workers)), timeout=30, message="the workers to stop")
    assert "restarting" not in server.log()


def test_a_stop_signal_to_server_and_worker_together_stops_both_without_a_restart(
    start_server: Callable[..., tuple[Server, dict[str, str]]], run_ids: list[str], database_url: str
) -> None:
    """As Ctrl-C in a terminal or a service manager's stop signals the whole group."""
    server, _ = start_server()
    (child,) = wait_until(lambda: embedded_workers(server.pid), timeout=30, message="the embedded worker")
    name = unique_name("group-stop")
    with server.client() as client:
        script = f"echo started; sleep {unique_sleep(60)}"
        runs_as = {"runtime": "bash", "script": script}
        put_automation(client, {"name": name, "run": runs_as, "retries": {"attempts": 3, "backoff": "0s"}})
        run_ids.append(run_id := trigger(client, name)["id"])
        wait_running(client, run_id)

        # A request waiting on the run keeps the server draining for a while after the
        # signal: the time in which a worker that stopped on the signal would have been
        # started again. (A live log stream ends at once, see the next test.)
        with ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(client.get, f"/runs/{run_id}", params={"wait": 60})
            store = Store(database_url)
            try:  # the wait's first step marks the run watched
                wait_until(lambda: runs.get(store, run_id).watched, timeout=30, message="the wait")
            finally:
                store.dispose()
            for pid in (server.pid, child):
                os.kill(pid, signal.SIGTERM)
            assert server.process is not None
            server.process.wait(timeout=60)
            with contextlib.suppress(httpx.HTTPError):
                waiting.result(timeout=60)
    wait_until(lambda: not _alive(child), timeout=30, message="the worker to stop")
    assert "restarting" not in server.log()
    assert embedded_workers(server.pid) == []
    assert run_processes(run_id) == []

    # The attempt was ended once, by the worker shutting down; its retry waits in the queue
    # instead of starting on a worker restarted during the shutdown.
    again, _ = start_server(["--no-worker"])
    with again.client() as client:
        run = get_run(client, run_id)
    assert run["status"] == "queued", run
    assert [(a["status"], a["error"]) for a in run["attempts"]] == [
        ("failed", "worker shut down during the attempt")
    ]


def test_a_stop_signal_ends_open_log_streams_at_once_without_an_error(
    start_server: Callable[..., tuple[Server, dict[str, str]]], run_ids: list[str]
) -> None:
    """The server waited for each open stream its whole graceful period (kill grace + 5 s),
    then cut it with an error in its log; the client resumes elsewhere with Last-Event-ID."""
    server, _ = start_server()
    name = unique_name("stream-stop")
    with server.client() as client:
        script = f"echo started; sleep {unique_sleep(60)}"
        put_automation(client, {"name": name, "run": {"runtime": "bash", "script": script}})
        run_ids.append(run_id := trigger(client, name)["id"])
        wait_running(client, run_id)
        with client.stream("GET", f"/runs/{run_id}/logs/stream") as stream:
            lines = stream.iter_lines()
            next(line for line in lines if "started" in line)
            signalled = time.monotonic()
            os.kill(server.pid, signal.SIGTERM)
            rest = list(lines)  # until the server ends the stream
            ended = time.monotonic() - signalled
    assert ended < 5 and not [line for line in rest if line.startswith("event: end")]
    assert server.process is not None
    server.process.wait(timeout=60)
    assert "Exception in ASGI application" not in server.log()


# --- 4. an output flood is capped and does not stall the server ------------------


def test_output_flood_is_capped_and_server_stays_responsive(
    start_server: Callable[..., tuple[Server, dict[str, str]]], run_ids: list[str]
) -> None:
    server, _ = start_server(ONDECK_LOG_CAP_BYTES=str(LOG_CAP))
    name = unique_name("flood")
    # `timeout` ends the flood after 3 s with 124, which is the expected outcome here.
    script = "timeout 3 yes || test $? -eq 124\necho after-the-flood\n"
    latencies: list[float] = []
    with server.client() as client, httpx.Client(base_url=server.url, timeout=1.0) as health:
        put_automation(client, {"name": name, "run": {"runtime": "bash", "script": script}, "timeout": "60s"})
        run_ids.append(run_id := trigger(client, name)["id"])

        # The flood is on once output is being stored.
        wait_until(
            lambda: client.get(f"/runs/{run_id}/logs", params={"limit": 1}).json()["entries"],
            timeout=30,
            message="the flood to start",
        )

        def probe() -> bool:
            started = time.monotonic()
            response = health.get("/healthz")  # raises on a 1 s timeout
            latencies.append(time.monotonic() - started)
            assert response.status_code == 200, response.text
            return get_run(client, run_id)["status"] in TERMINAL

        wait_until(probe, timeout=30, interval=0.05, message="the flood to end")
        run = wait_for_run(client, run_id)
        entries = all_logs(client, run_id, limit=7)  # a small page size exercises paging

    assert run["status"] == "succeeded", run
    assert len(latencies) >= 5, f"too few health probes during the flood: {latencies}"
    assert max(latencies) < 1.0, latencies

    seqs = [entry["seq"] for entry in entries]
    assert seqs == sorted(set(seqs)), "paging returned duplicates or out-of-order entries"
    system = [e["text"] for e in entries if e["stream"] == "system"]
    output = sum(len(e["text"]) for e in entries if e["stream"] != "system")
    total = sum(len(e["text"]) for e in entries)
    assert sum(TRUNCATION_MARKER in text for text in system) == 1, system
    assert LOG_CAP // 2 <= output <= LOG_CAP, output
    assert total <= LOG_CAP + 200, total
    assert not any("after-the-flood" in e["text"] for e in entries), "output past the cap was stored"


# --- 5. cancel -----------------------------------------------------------------


def test_cancel_kills_the_run_and_finished_runs_refuse_it(server: Server, run_ids: list[str]) -> None:
    background, subshell, foreground = unique_sleep(500), unique_sleep(501), unique_sleep(502)
    tokens = (f"sleep {background}", f"sleep {subshell}", f"sleep {foreground}")
    script = f"sleep {background} &\n( sleep {subshell}; echo ) &\nsleep {foreground}\n"
    slow, quick = unique_name("cancel"), unique_name("quick")
    with server.client() as client:
        put_automation(client, {"name": slow, "run": {"runtime": "bash", "script": script}, "timeout": "5m"})
        put_automation(client, {"name": quick, "run": {"runtime": "bash", "script": "echo hi"}})
        run_ids.append(run_id := trigger(client, slow)["id"])
        wait_until(
            lambda: all(processes_running(*tokens).values()), timeout=20, message="the sleeps to start"
        )
        assert get_run(client, run_id)["status"] == "running"

        response = client.post(f"/runs/{run_id}/cancel")
        assert response.status_code == 202, response.text
        assert response.json()["cancel_requested"] is True

        run = wait_for_run(client, run_id, timeout=30)
        assert run["status"] == "cancelled", run

        wait_until(
            lambda: not run_processes(run_id) and not any(processes_running(*tokens).values()),
            timeout=5,
            message=f"no process of run {run_id} left",
        )
        assert leftover_workspaces(Path(server.env["ONDECK_DATA_DIR"]), run_id) == []

        # Cancelling a run that already ended is a conflict, as problem+json.
        done = client.post(f"/automations/{quick}/runs", json={"params": {}}, params={"wait": 30})
        assert done.status_code == 200 and done.json()["status"] == "succeeded", done.text
        for finished_id, status in ((run_id, "cancelled"), (done.json()["id"], "succeeded")):
            refused = client.post(f"/runs/{finished_id}/cancel")
            assert refused.status_code == 409, refused.text
            assert refused.headers["content-type"].startswith("application/problem+json")
            body = refused.json()
            assert body["status"] == 409 and body["type"] == "/problems/conflict", body
            assert status in body["detail"], body
            assert get_run(client, finished_id)["status"] == status  # unchanged
