"""Test helpers: waiting with deadlines, and real ondeck processes on free ports."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx

T = TypeVar("T")
# Every test server accepts this admin token (ONDECK_ADMIN_TOKEN); clients send it.
ADMIN_TOKEN = "odk_test-admin-token-0123456789abcdefghijklmnopqrstuv"
AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
TERMINAL = {"succeeded", "failed", "timed_out", "cancelled", "rejected"}


def wait_until(
    probe: Callable[[], T], timeout: float = 30.0, interval: float = 0.05, message: str = "condition"
) -> T:
    """Poll ``probe`` until it returns something truthy, or fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}")
        time.sleep(interval)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class OndeckProcess:
    """``ondeck server`` or ``ondeck worker`` as a real child process."""

    def __init__(self, args: list[str], env: dict[str, str], log: Path) -> None:
        self.args, self.env, self.log_path = args, env, log
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> OndeckProcess:
        self._log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "ondeck", *self.args],
            env=self.env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=self.env.get("ONDECK_DATA_DIR"),
        )
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def kill(self, signum: int = signal.SIGKILL) -> None:
        assert self.process is not None
        self.process.send_signal(signum)
        self.process.wait(timeout=60)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


class Server(OndeckProcess):
    def __init__(self, env: dict[str, str], log: Path, extra: list[str] | None = None) -> None:
        self.port = free_port()
        env = {**env, "ONDECK_PORT": str(self.port)}
        super().__init__(["server", *(extra or [])], env, log)
        self.url = f"http://127.0.0.1:{self.port}"

    def start(self) -> Server:
        super().start()
        with httpx.Client(base_url=self.url, timeout=5) as client:

            def ready() -> bool:
                assert self.process is not None
                if self.process.poll() is not None:
                    raise AssertionError(f"server exited early:\n{self.log()}")
                try:
                    return client.get("/readyz").status_code == 200
                except httpx.TransportError:
                    return False

            wait_until(ready, timeout=60, interval=0.1, message="server readiness")
        return self

    def client(self, token: str | None = ADMIN_TOKEN, **kwargs: Any) -> httpx.Client:
        """A client of ``/api/v1`` sending ``token`` (the admin's unless told otherwise)."""
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url + "/api/v1", timeout=60, headers=headers, **kwargs)


def base_env(
    data_dir: Path, database_url: str, automations_dir: Path | None = None, **extra: str
) -> dict[str, str]:
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(data_dir),
        "ONDECK_DATA_DIR": str(data_dir),
        "ONDECK_DATABASE_URL": database_url,
        "ONDECK_AUTOMATIONS_DIR": str(automations_dir or data_dir / "automations"),
        "ONDECK_POLL_SECONDS": "0.5",
        "ONDECK_KILL_GRACE_SECONDS": "2",
        "ONDECK_ADMIN_TOKEN": ADMIN_TOKEN,
        "ONDECK_TOKEN": ADMIN_TOKEN,
        "ONDECK_RATE_LIMIT": "",
        # One embedded worker keeps the parallel suite's servers light; tests that need
        # more (or the default, one per core) say so.
        "ONDECK_WORKER_PROCESSES": "1",
    }
    env.update(extra)
    return env


def wait_for_run(client: httpx.Client, run_id: str, timeout: float = 60.0) -> dict[str, Any]:
    """Poll until the run is terminal (the server long-polls with ``wait``)."""

    def finished() -> dict[str, Any] | None:
        run: dict[str, Any] = client.get(f"/runs/{run_id}", params={"wait": 5}).json()
        return run if run["status"] in TERMINAL else None

    return wait_until(finished, timeout=timeout, interval=0, message=f"run {run_id} to finish")


def put_automation(client: httpx.Client, definition: dict[str, Any]) -> dict[str, Any]:
    response = client.put(f"/automations/{definition['name']}", json=definition)
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    return result


def unique(prefix: str) -> str:
    """A name no other test uses (tests share servers)."""
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def trigger(client: httpx.Client, name: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
    """Start a run of ``name`` and return it (asserting the 202)."""
    response = client.post(f"/automations/{name}/runs", json={"params": params or {}})
    assert response.status_code == 202, response.text
    run: dict[str, Any] = response.json()
    return run


PG_ADMIN = os.environ.get("ONDECK_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")


def pg_schema_url(prefix: str = "t") -> Iterator[str]:
    """A fresh PostgreSQL schema as an ondeck database URL; dropped when the generator closes."""
    import psycopg

    schema = f"{prefix}_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    base = PG_ADMIN.replace("postgresql://", "postgresql+psycopg://", 1)
    try:
        yield f"{base}{'&' if '?' in base else '?'}options=-csearch_path%3D{schema}"
    finally:
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")
