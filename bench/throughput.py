"""Latency and throughput of trivial runs against a real ``ondeck server``.

    .venv/bin/python bench/throughput.py [--backend sqlite|postgresql|both] [--runs N]

For each backend this starts ``ondeck server`` (embedded workers, concurrency 16 each)
in a temporary data directory (PostgreSQL: a fresh schema, dropped afterwards),
defines a bash automation whose script is ``true``, and measures:

  spawn       the bare cost of starting such a process on this machine (prlimit … --
              bash --noprofile --norc -eo pipefail script.sh, new session, piped output)
              under stdlib asyncio (the reference) and uvloop, and of starting it
              the way the runner does (ondeck-launch: PID namespace and limits);
  latency     sequential runs: created_at → started_at (server timestamps; started_at
              is stamped at claim, before the spawn) and created_at → finished_at;
  throughput  N runs triggered over 32 keep-alive connections: runs/s from the first
              trigger to the last finished_at, and the trigger request rate meanwhile;
  admission   the same N triggers against a server started with --no-worker;
  drain       then a fresh server with a worker executes those N queued runs.

It prints figures and never asserts: a measuring tool, not a test. The machine
has to be quiet for the figures to mean anything; the load average is printed.
Targets (product issue): p50 latency < 15 ms above process spawn; > 300 runs/s on 2 cores.
See bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import math
import os
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Coroutine, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ondeck.runner import isolation
from ondeck.runner.attempt import ResourceLimits
from ondeck.runner.workspace import Workspace
from ondeck.settings import default_worker_processes
from tests.support import TERMINAL, base_env, free_port, pg_schema_url

CLIENTS = 32
CONCURRENCY = "16"
ACTIVE = "pending,waiting_approval,queued,running"
LIMITS = ResourceLimits(memory_bytes=4 << 30, cpu_seconds=3600, processes=4096, file_size_bytes=1 << 30)
SAFE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


# --- small helpers ----------------------------------------------------------------


def ts(value: str) -> float:
    return datetime.fromisoformat(value).timestamp()


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f} ms"


def p50_p99(values: list[float]) -> str:
    return f"{ms(pct(values, 50))} / {ms(pct(values, 99))}"


def load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def cpu_seconds(pid: int) -> tuple[float, float]:
    """(the process's own CPU, CPU of its reaped children) in seconds, from /proc."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan"), float("nan")
    tick = os.sysconf("SC_CLK_TCK")
    utime, stime, cutime, cstime = (int(fields[i]) for i in (11, 12, 13, 14))
    return (utime + stime) / tick, (cutime + cstime) / tick


def database_cpu_seconds() -> float:
    """CPU seconds of the PostgreSQL server on this machine, if it runs here (else 0): its
    processes' own, and the postmaster's reaped children's (backends that exited)."""
    total = 0.0
    for proc in Path("/proc").iterdir():
        with contextlib.suppress(OSError, ValueError):
            if not proc.name.isdigit() or (proc / "comm").read_text().strip() != "postgres":
                continue
            parent = (proc / "stat").read_text().rsplit(")", 1)[1].split()[1]
            postmaster = Path(f"/proc/{parent}/comm").read_text().strip() != "postgres"
            own, reaped = cpu_seconds(int(proc.name))
            if not math.isnan(own):  # it exited meanwhile
                total += own + (reaped if postmaster else 0.0)
    return total


def machine_cpu_seconds() -> float:
    """CPU seconds all cores spent on anything (all but idle and I/O wait), from /proc/stat."""
    user, nice, system, _idle, _iowait, irq, softirq, steal = (
        int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]
    )
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


@dataclasses.dataclass(frozen=True)
class Cpu:
    """CPU seconds so far: the server and its embedded workers, their scripts, the
    database server (PostgreSQL on this machine), and the whole machine."""

    own: float
    scripts: float
    database: float
    machine: float

    def __sub__(self, other: Cpu) -> Cpu:
        pairs = zip(dataclasses.astuple(self), dataclasses.astuple(other), strict=True)
        return Cpu(*(a - b for a, b in pairs))

    def per(self, count: int) -> str:
        count = max(1, count)
        return (
            f"{ms(self.own / count)} / {ms(self.scripts / count)} / {ms(self.database / count)}"
            f" / {ms(self.machine / count)}"
        )


CPU_COLUMNS = "(server / scripts / database / machine)"


class Figures:
    """Named figures of one backend, printed as they come and tabulated at the end."""

    def __init__(self, backend: str) -> None:
        self.backend = backend
        self.rows: dict[str, str] = {}

    def add(self, name: str, value: str) -> None:
        self.rows[name] = value
        print(f"  {name:<50} {value}", flush=True)


# --- bare process spawn -----------------------------------------------------------


def measure_spawn(count: int) -> dict[str, tuple[list[float], list[float]]]:
    """Per variant: seconds until create_subprocess_exec returned, and until the process exited.

    Variants: the issue's bare prlimit + bash under uvloop and stdlib asyncio, and bash
    started the way the runner starts it here (PID namespace and limits; see
    ondeck.runner.isolation) under stdlib asyncio.
    """
    mode = isolation.best()
    results: dict[str, tuple[list[float], list[float]]] = {}
    with tempfile.TemporaryDirectory() as data:
        tmp = Path(data, "workspace")  # hidden with the rest of the data directory, as a run's is
        tmp.mkdir()
        prefix = isolation.command(isolation.GROUP, LIMITS, tmp)
        script = tmp / "script.sh"
        script.write_text("true\n")
        argv = [*prefix, "bash", "--noprofile", "--norc", "-eo", "pipefail", str(script)]

        async def spawn_all(argv: list[str]) -> tuple[list[float], list[float]]:
            execs, totals = [], []
            for _ in range(count + 5):
                start = time.perf_counter()
                process = await asyncio.create_subprocess_exec(
                    *argv,
                    cwd=tmp,
                    env={"PATH": SAFE_PATH, "HOME": str(tmp)},
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.PIPE,
                    start_new_session=True,
                )
                execs.append(time.perf_counter() - start)
                await process.communicate()
                totals.append(time.perf_counter() - start)
            return execs[5:], totals[5:]  # the first few warm caches

        run: Callable[[Coroutine[Any, Any, Any]], Any] = asyncio.run
        with contextlib.suppress(ImportError):
            import uvloop

            run = uvloop.run
            results["uvloop"] = run(spawn_all(argv))
        results["asyncio"] = asyncio.run(spawn_all(argv))
        if mode != isolation.GROUP:
            isolated = [*isolation.command(mode, LIMITS, tmp, [Path(data)]), *argv[len(prefix) :]]
            results[f"asyncio, {mode}"] = asyncio.run(spawn_all(isolated))
    return results


def workspace_cost(parent: Path, count: int = 500) -> float:
    """CPU seconds (this process's, user and system) to make and remove one workspace under
    ``parent`` as the runner does (two directories and the params file). On ext4 without
    a journal this grows while runs churn through inodes, and a bench inherits what the
    one before it churned: printed beside the figures, as the bare spawn is."""
    with tempfile.TemporaryDirectory(prefix="ondeck-bench-ws-", dir=parent) as root:
        start = time.process_time()
        for number in range(count):
            workspace = Workspace.create(Path(root), "bench", number)
            workspace.params_file.write_text("{}")
            workspace.remove_if_untouched()
        return (time.process_time() - start) / count


def alternate(script: str, description: str, measure: Callable[[int], None], unit: str, default: int) -> None:
    """The command line of a bench that measures ``measure(count)`` once per round (bench/
    runner.py, bench/store.py): ``--<unit> N``, ``--rounds R``, and ``--src`` trees, which
    the rounds alternate, each in a child process with that tree first on ``PYTHONPATH``."""
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(f"--{unit}", type=int, default=default, help=f"{unit} per round (default {default})")
    parser.add_argument("--rounds", type=int, default=3, help="rounds, each tree once per round (default 3)")
    parser.add_argument("--src", action="append", metavar="DIR", help="a source tree to measure (repeatable)")
    # One measurement, in this process (what each round starts).
    parser.add_argument("--here", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    count = getattr(args, unit)
    if args.here:
        measure(count)
        return
    trees = args.src or [str(Path(__file__).resolve().parents[1] / "src")]
    for number in range(1, args.rounds + 1):
        for tree in trees:
            print(f"round {number}, {tree}: ", end="", flush=True)
            env = {**os.environ, "PYTHONPATH": os.pathsep.join([tree, str(Path(__file__).parent)])}
            subprocess.run([sys.executable, script, "--here", f"--{unit}", str(count)], env=env, check=True)


# --- servers --------------------------------------------------------------------


@contextlib.contextmanager
def database(backend: str, data: Path) -> Iterator[str]:
    if backend == "sqlite":
        yield f"sqlite:///{data / 'ondeck.db'}"
        return
    yield from pg_schema_url("bench")


class BenchServer:
    """``ondeck server`` on a free port, optionally under ``py-spy record``."""

    def __init__(
        self,
        env: dict[str, str],
        log: Path,
        *,
        worker: bool,
        profile: str | None,
        src: str | None = None,
        profile_mode: str = "gil",
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log
        command = [sys.executable, "-m", "ondeck", "server", *([] if worker else ["--no-worker"])]
        if profile:
            # gil: only the thread holding the GIL is sampled, i.e. where the Python CPU goes;
            # wall: every thread, waiting or not (where the time goes).
            spy = str(Path(sys.executable).with_name("py-spy"))
            mode = "--gil" if profile_mode == "gil" else "--idle"
            options = [mode, "--threads", "--subprocesses", "--rate", "100", "--format", "raw", "-o", profile]
            command = [spy, "record", *options, "--", *command]
        self._log = log.open("ab")
        self.process = subprocess.Popen(
            command,
            env={**env, "ONDECK_PORT": str(self.port), **({"PYTHONPATH": src} if src else {})},
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=env["ONDECK_DATA_DIR"],
        )
        self.pid = self.process.pid
        deadline = time.monotonic() + 60
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited early:\n{self.log()}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(self.url + "/readyz", timeout=5).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"server not ready after 60 s:\n{self.log()}")
            time.sleep(0.1)
        if profile:
            self.pid = self._children(self.process.pid)[0]
        processes = int(env.get("ONDECK_WORKER_PROCESSES", "1")) if worker else 0
        self.worker_pids = self._embedded_workers(processes)

    def _embedded_workers(self, count: int) -> list[int]:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            found = []
            for pid in self._children(self.pid):
                with contextlib.suppress(OSError):
                    if b"worker" in Path(f"/proc/{pid}/cmdline").read_bytes():
                        found.append(pid)
            if len(found) >= count:
                time.sleep(1 if count else 0)  # let them import and start claiming
                return found
            time.sleep(0.1)
        raise RuntimeError(f"not {count} embedded worker processes:\n{self.log()}")

    def cpu(self) -> Cpu:
        own, scripts = cpu_seconds(self.pid)
        for pid in self.worker_pids:
            more = cpu_seconds(pid)
            own, scripts = own + more[0], scripts + more[1]
        return Cpu(own, scripts, database_cpu_seconds(), machine_cpu_seconds())

    @staticmethod
    def _children(pid: int) -> list[int]:
        with contextlib.suppress(OSError, ValueError):
            return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
        return [pid]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        """SIGTERM the server itself (py-spy, if any, then writes its profile and exits)."""
        if self.process.poll() is None:
            os.kill(self.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()


@contextlib.contextmanager
def environment(args: argparse.Namespace, backend: str, token: str) -> Iterator[dict[str, str]]:
    """A temporary data directory and database; the server environment for them."""
    with tempfile.TemporaryDirectory(prefix="ondeck-bench-") as tmp:
        data = Path(tmp)
        (data / "automations").mkdir()
        with database(backend, data) as url:
            env = base_env(
                data,
                url,
                ONDECK_WORKER_CONCURRENCY=CONCURRENCY,
                ONDECK_WORKER_PROCESSES=str(args.worker_processes),
                ONDECK_ADMIN_TOKEN=token,
                ONDECK_POLL_SECONDS="1.0",  # the default: wake-ups, not polling, should drive
            )
            env["ONDECK_BACKEND_NAME"] = backend  # for the bench only; ondeck ignores it
            env.pop("ONDECK_RATE_LIMIT", None)  # ondeck's own default unless --rate-limit says
            if args.rate_limit is not None:
                env["ONDECK_RATE_LIMIT"] = args.rate_limit
            if args.workspaces is None:
                yield env
                return
            with tempfile.TemporaryDirectory(prefix="ondeck-bench-", dir=args.workspaces) as workspaces:
                yield {**env, "ONDECK_WORKSPACES_DIR": workspaces}


@contextlib.contextmanager
def server(
    env: dict[str, str], args: argparse.Namespace, *, worker: bool = True, profile: str | None = None
) -> Iterator[BenchServer]:
    log = Path(env["ONDECK_DATA_DIR"]) / "server.log"
    proc = BenchServer(env, log, worker=worker, profile=profile, src=args.src, profile_mode=args.profile_mode)
    try:
        yield proc
    finally:
        proc.stop()
        errors = [line for line in proc.log().splitlines() if '"level": "error"' in line]
        if errors:
            kept = Path(tempfile.gettempdir()) / f"ondeck-bench-server-{proc.port}.log"
            shutil.copy(log, kept)
            print(f"  ! {len(errors)} error lines in the server log (kept in {kept}): {errors[0][:300]}")
        log.unlink()


def api(srv: BenchServer, token: str) -> httpx.Client:
    return httpx.Client(
        base_url=srv.url + "/api/v1", timeout=120, headers={"Authorization": f"Bearer {token}"}
    )


def define(client: httpx.Client) -> str:
    name = f"bench-{uuid.uuid4().hex[:8]}"
    definition = {"name": name, "run": {"runtime": "bash", "script": "true"}}
    client.put(f"/automations/{name}", json=definition).raise_for_status()
    return name


def trigger(client: httpx.Client, name: str) -> str:
    response = client.post(f"/automations/{name}/runs")
    response.raise_for_status()
    run_id: str = response.json()["id"]
    return run_id


def wait_terminal(client: httpx.Client, run_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        run: dict[str, Any] = client.get(f"/runs/{run_id}", params={"wait": 10}).json()
        if run["status"] in TERMINAL:
            return run
    raise RuntimeError(f"run {run_id} did not finish")


def all_runs(client: httpx.Client, name: str) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"automation": name, "limit": 500, **({"cursor": cursor} if cursor else {})}
        page = client.get("/runs", params=params).json()
        found.extend(page["items"])
        cursor = page["next_cursor"]
        if not cursor:
            return found


# --- phases -----------------------------------------------------------------------


def sequential_latency(
    srv: BenchServer, token: str, count: int, out: Figures, spawns: dict[str, float]
) -> None:
    with api(srv, token) as client:
        name = define(client)
        for _ in range(5):  # warm-up: the first claim parses the definition, pools fill
            wait_terminal(client, trigger(client, name))
        started, finished, request = [], [], []
        for _ in range(count):
            sent = time.perf_counter()
            run_id = trigger(client, name)
            request.append(time.perf_counter() - sent)
            run = wait_terminal(client, run_id)
            created = ts(run["created_at"])
            started.append(ts(run["started_at"]) - created)
            finished.append(ts(run["finished_at"]) - created)
    out.add(f"[latency, {count} sequential] trigger request RTT p50/p99", p50_p99(request))
    out.add("[latency] created→started p50/p99", p50_p99(started))
    out.add("[latency] created→finished p50/p99", p50_p99(finished))
    for name, spawn_p50 in spawns.items():
        out.add(f"[latency] created→finished p50 - {name} p50", ms(statistics.median(finished) - spawn_p50))


class _Connection:
    """One keep-alive HTTP/1.1 connection that POSTs trigger requests, and nothing else.

    The load generator shares the 2 cores with the server, so it is kept lean (as wrk
    is): a fixed request, and only the status line, Content-Length and body read back.
    An httpx client cost about 7 ms of CPU per request here, as much as the server.
    """

    def __init__(self, url: str, token: str, name: str) -> None:
        parts = httpx.URL(url)
        self.host, self.port = parts.host, parts.port or 80
        self.request = (
            f"POST /api/v1/automations/{name}/runs HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
            f"Authorization: Bearer {token}\r\nContent-Length: 0\r\n\r\n"
        ).encode()

    async def open(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)

    async def trigger(self) -> tuple[int, bytes]:
        self.writer.write(self.request)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length = 0
        for line in head.lower().split(b"\r\n"):
            if line.startswith(b"content-length:"):
                length = int(line[15:])
        return status, await self.reader.readexactly(length)

    def close(self) -> None:
        self.writer.close()


async def _trigger_all(url: str, token: str, name: str, count: int) -> tuple[float, float, list[str], int]:
    """POST ``count`` runs over CLIENTS connections; wall-clock start and end, run ids, failures."""
    ids: list[str] = []
    errors: list[str] = []
    remaining = count
    # Open the connections first so the timed part is requests, not TCP handshakes.
    connections = [_Connection(url, token, name) for _ in range(CLIENTS)]
    await asyncio.gather(*(connection.open() for connection in connections))

    async def one_client(connection: _Connection) -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            try:
                status, body = await connection.trigger()
            except (OSError, asyncio.IncompleteReadError) as exc:
                errors.append(repr(exc))
                await connection.open()
                continue
            if status == 202:
                ids.append(json.loads(body)["id"])
            else:
                errors.append(f"{status} {body[:200]!r}")

    start = time.time()
    await asyncio.gather(*(one_client(connection) for connection in connections))
    end = time.time()
    for connection in connections:
        connection.close()
    failures = len(errors)
    if errors:
        print(f"  ! {len(errors)} triggers failed, e.g. {errors[0]}", flush=True)
    return start, end, ids, failures


def throughput(srv: BenchServer, token: str, count: int, out: Figures) -> None:
    with api(srv, token) as client:
        name = define(client)
        wait_terminal(client, trigger(client, name))  # warm up the worker path
        cpu_before = srv.cpu()
        own_before = time.process_time()
        start, end, ids, failures = asyncio.run(_trigger_all(srv.url, token, name, count))
        failed = f"  ({failures} failed)" if failures else ""
        out.add(
            f"[throughput, {count} runs] trigger requests/s", f"{len(ids) / (end - start):.1f} /s{failed}"
        )
        while client.get("/runs", params={"automation": name, "status": ACTIVE, "limit": 1}).json()["items"]:
            time.sleep(0.2)
        used = srv.cpu() - cpu_before
        bench_cpu = time.process_time() - own_before
        mine = set(ids)
        runs = [r for r in all_runs(client, name) if r["id"] in mine]
    last = max(ts(r["finished_at"]) for r in runs)
    statuses: dict[str, int] = {}
    for run in runs:
        statuses[run["status"]] = statuses.get(run["status"], 0) + 1
    waited = [ts(r["started_at"]) - ts(r["created_at"]) for r in runs if r["started_at"]]
    out.add("[throughput] runs/s, first trigger → last finished_at", f"{len(runs) / (last - start):.1f} /s")
    out.add("[throughput] statuses", ", ".join(f"{k} {v}" for k, v in sorted(statuses.items())))
    out.add("[throughput] created→started p50/p99", p50_p99(waited))
    out.add(f"[throughput] CPU per run {CPU_COLUMNS}", used.per(len(runs)))
    out.add("[throughput] bench client CPU per run", ms(bench_cpu / len(runs)))


def admission_then_drain(env: dict[str, str], args: argparse.Namespace, token: str, out: Figures) -> None:
    """Admit N runs into a --no-worker server; then let a fresh server's worker drain them."""
    with server(env, args, worker=False) as srv:
        with api(srv, token) as client:
            name = define(client)
            trigger(client, name)  # warm-up; drained below with the rest
        cpu_before = srv.cpu()
        start, end, ids, failures = asyncio.run(_trigger_all(srv.url, token, name, args.runs))
        used = srv.cpu() - cpu_before
    failed = f"  ({failures} failed)" if failures else ""
    out.add("[admission, --no-worker] trigger requests/s", f"{len(ids) / (end - start):.1f} /s{failed}")
    out.add(f"[admission] CPU per trigger {CPU_COLUMNS}", used.per(len(ids)))
    profile = f"{args.profile}-{env['ONDECK_BACKEND_NAME']}-drain.txt" if args.profile else None
    with server(env, args, profile=profile) as srv, api(srv, token) as client:
        cpu_before = srv.cpu()
        while client.get("/runs", params={"automation": name, "status": ACTIVE, "limit": 1}).json()["items"]:
            time.sleep(0.2)
        used = srv.cpu() - cpu_before
        runs = all_runs(client, name)
    first = min(ts(r["started_at"]) for r in runs)
    last = max(ts(r["finished_at"]) for r in runs)
    out.add(
        f"[drain, {len(runs)} queued] runs/s, first start → last finish",
        f"{len(runs) / (last - first):.1f} /s",
    )
    out.add(f"[drain] CPU per run {CPU_COLUMNS}", used.per(len(runs)))


def bench_backend(args: argparse.Namespace, backend: str, spawns: dict[str, float]) -> Figures:
    source = (
        (f", src {args.src}" if args.src else "")
        + (f", rate limit {args.rate_limit!r}" if args.rate_limit is not None else "")
        + (f", workspaces in {args.workspaces}" if args.workspaces else "")
    )
    print(f"\n== {backend}{source} (load average {load()}) ==", flush=True)
    out = Figures(backend)
    token = "odk_" + secrets.token_urlsafe(32)
    profile = f"{args.profile}-{backend}.txt" if args.profile else None
    with environment(args, backend, token) as env:
        with server(env, args, profile=profile) as srv:
            sequential_latency(srv, token, args.latency_runs, out, spawns)
            throughput(srv, token, args.runs, out)
        if not args.skip_admission:
            admission_then_drain(env, args, token, out)
        workspaces = Path(env.get("ONDECK_WORKSPACES_DIR") or Path(env["ONDECK_DATA_DIR"], "workspaces"))
        out.add("[workspaces] make + remove one, CPU, after the phases", ms(workspace_cost(workspaces)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backend", choices=["sqlite", "postgresql", "both"], default="both")
    parser.add_argument("--runs", type=int, default=2000, help="runs in the throughput phase (default 2000)")
    parser.add_argument("--latency-runs", type=int, default=200, help="sequential runs (default 200)")
    parser.add_argument(
        "--src",
        metavar="DIR",
        help="run the server from this source tree (PYTHONPATH=DIR), e.g. a `git archive` of a commit "
        "or a candidate change, instead of the venv's ondeck",
    )
    parser.add_argument(
        "--rate-limit",
        metavar="SPEC",
        help="ONDECK_RATE_LIMIT for the server (default: ondeck's own, 6000/1m per principal; "
        "'' disables it). Triggers refused with 429 are counted as failed.",
    )
    parser.add_argument(
        "--workspaces",
        metavar="DIR",
        help="make runs' workspaces under DIR (ONDECK_WORKSPACES_DIR), e.g. /dev/shm/ondeck for a tmpfs; "
        "default: the data directory, as ondeck does",
    )
    parser.add_argument(
        "--worker-processes",
        type=int,
        default=default_worker_processes(),
        metavar="N",
        help="embedded worker processes (ONDECK_WORKER_PROCESSES; default ondeck's: one per usable "
        f"core, at most 2, here {default_worker_processes()})",
    )
    parser.add_argument("--skip-admission", action="store_true", help="skip the admission and drain phases")
    parser.add_argument(
        "--profile",
        metavar="PREFIX",
        help="run the servers with a worker under py-spy record (py-spy in the venv); collapsed "
        "stacks go to PREFIX-<backend>.txt and PREFIX-<backend>-drain.txt. Figures are then perturbed.",
    )
    parser.add_argument("--profile-mode", choices=["gil", "wall"], default="gil", help="py-spy sampling")
    args = parser.parse_args()
    # Killed with SIGTERM: still stop the servers, drop the schema and remove the data directory.
    signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(128 + signum))

    print(
        f"ondeck bench: {os.cpu_count()} CPUs, load average {load()}, "
        f"{args.worker_processes} embedded worker process(es) with concurrency {CONCURRENCY} each, "
        f"{CLIENTS} clients",
        flush=True,
    )
    spawn = measure_spawn(100)
    for loop, (execs, totals) in spawn.items():
        print(
            f"  bare spawn, {loop:<22}: create_subprocess_exec returned p50 {ms(statistics.median(execs))}, "
            f"exited p50 {ms(statistics.median(totals))} p99 {ms(pct(totals, 99))}",
            flush=True,
        )
    where = Path(args.workspaces or tempfile.gettempdir())
    print(f"  workspace make + remove, CPU ({where}): {ms(workspace_cost(where))}", flush=True)
    # The reference: stdlib asyncio spawns with vfork, as the runner does (see runner.process).
    spawns = {"bare spawn": statistics.median(spawn["asyncio"][1])}
    isolated = [name for name in spawn if name not in ("asyncio", "uvloop")]
    if isolated:
        spawns["namespaced spawn"] = statistics.median(spawn[isolated[0]][1])
    backends = ["sqlite", "postgresql"] if args.backend == "both" else [args.backend]
    results = [bench_backend(args, backend, spawns) for backend in backends]

    print(f"\n== summary (load average now {load()}) ==")
    width = max(len(name) for r in results for name in r.rows) + 2
    for name, value in spawns.items():
        print(f"  {name + ' → exit p50 (asyncio)':<{width}} {ms(value)}")
    print(f"  {'':<{width}} " + " ".join(f"{r.backend:>24}" for r in results))
    for name in results[0].rows:
        print(f"  {name:<{width}} " + " ".join(f"{r.rows.get(name, '-'):>24}" for r in results))
    print("\n  targets: p50 latency < 15 ms above process spawn; > 300 trivial runs/s on 2 cores")


if __name__ == "__main__":
    main()
