"""The ``ondeck`` command: run the server and workers, and drive them over HTTP.

Exit codes: 0 success (for runs: the run succeeded); 1 the run did not succeed
or a definition is invalid; 3 the server refused the request or is unreachable.

The commands that talk to a server need only HTTP: what the others use (the store, the
API, the runner, schemas) is imported in those commands, so the client ones start in
half the time.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import httpx
import typer
from pydantic import ValidationError

from ondeck import __version__
from ondeck.settings import TOKEN_FILE, Settings

if TYPE_CHECKING:
    from ondeck.store.store import Store

app = typer.Typer(help="ondeck: run automations on demand, safely.", no_args_is_help=True)
runs_app = typer.Typer(help="Inspect and control runs.", no_args_is_help=True)
automations_app = typer.Typer(help="Validate, apply and list automations.", no_args_is_help=True)
db_app = typer.Typer(help="Database maintenance.", no_args_is_help=True)
tokens_app = typer.Typer(help="API tokens (admin).", no_args_is_help=True)
secrets_app = typer.Typer(help="Secrets: write-only values injected into runs (admin).", no_args_is_help=True)
audit_app = typer.Typer(help="The tamper-evident audit log.", no_args_is_help=True)
app.add_typer(tokens_app, name="tokens")
app.add_typer(secrets_app, name="secrets")
app.add_typer(audit_app, name="audit")
schedules_app = typer.Typer(help="Cron schedules declared in automations.", no_args_is_help=True)
app.add_typer(schedules_app, name="schedules")
app.add_typer(runs_app, name="runs")
app.add_typer(automations_app, name="automations")
app.add_typer(db_app, name="db")

EXIT_RUN_FAILED = 1
EXIT_API = 3
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]


def main() -> None:
    app()


# --- talking to the server ---------------------------------------------------


def _token(settings: Settings) -> str | None:
    """``ONDECK_TOKEN``, else the bootstrap admin token a local server saved in its data dir."""
    if settings.token:
        return settings.token
    saved = settings.data_dir / TOKEN_FILE
    try:
        return saved.read_text().strip() or None
    except OSError:
        return None


UNAVAILABLE_PATIENCE = 120.0  # seconds a read waits out a server that answers 503 (see Api._again)


class Api:
    def __init__(self, settings: Settings) -> None:
        self.base = settings.url.rstrip("/")
        headers = {"User-Agent": f"ondeck-cli/{__version__}"}
        token = _token(settings)
        if token:
            headers["Authorization"] = f"Bearer {token}"
        self.client = httpx.Client(
            base_url=self.base, timeout=httpx.Timeout(30.0, read=None), headers=headers
        )
        self._waiting = False  # told the user the server is unavailable

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        since = time.monotonic()
        while True:
            try:
                response = self.client.request(method, f"/api/v1{path}", **kwargs)
            except httpx.TransportError as exc:
                _fail(f"cannot reach ondeck at {self.base} ({exc}); is `ondeck server` running?")
            if not self._again(response, since):
                break
        if response.status_code >= 400:
            _fail_problem(response)
        return response.json() if response.content else None

    def events(self, run_id: str) -> Any:
        """Yield (event, data) pairs from the run's SSE log stream."""
        since = time.monotonic()
        try:
            while True:
                with self.client.stream("GET", f"/api/v1/runs/{run_id}/logs/stream") as response:
                    if response.status_code >= 400:
                        response.read()
                        if self._again(response, since):
                            continue
                        _fail_problem(response)
                    event, data = "message", []
                    for line in response.iter_lines():
                        if line.startswith("event:"):
                            event = line[6:].strip()
                        elif line.startswith("data:"):
                            data.append(line[5:].removeprefix(" "))
                        elif not line and data:
                            yield event, json.loads("\n".join(data))
                            event, data = "message", []
                    return
        except httpx.TransportError as exc:
            _fail(f"log stream from {self.base} broke: {exc}")

    def _again(self, response: httpx.Response, since: float) -> bool:
        """Whether to send a request again that the server could not serve for now (a 503
        with ``Retry-After``: its database restarting, say), having waited as it asks, for
        up to ``UNAVAILABLE_PATIENCE`` seconds in all: a ``--wait`` or ``--follow`` outlives
        a short outage, as the run does. A write only with an ``Idempotency-Key`` and only
        when the store was unavailable: its outcome may be unknown, and the key makes a
        second send answer with the first's run if that was admitted after all."""
        header = response.headers.get("retry-after", "")
        if response.status_code != 503 or not (header.isascii() and header.isdigit()):
            return False  # an HTTP-date is not waited for: ondeck sends seconds
        request = response.request
        if request.method != "GET" and (
            "idempotency-key" not in request.headers
            or _problem_type(response) != "/problems/store-unavailable"
        ):
            return False
        delay = max(1, int(header))
        if time.monotonic() + delay - since > UNAVAILABLE_PATIENCE:
            return False
        if not self._waiting:
            typer.echo(f"ondeck at {self.base} cannot answer for now (503); waiting for it", err=True)
            self._waiting = True
        time.sleep(delay)
        return True


def _problem_type(response: httpx.Response) -> str | None:
    try:
        kind = response.json().get("type")
    except (ValueError, AttributeError):
        return None
    return kind if isinstance(kind, str) else None


def _settings() -> Settings:
    """The settings from ``ONDECK_*``; one that does not read is an error naming it."""
    try:
        return Settings()
    except ValidationError as exc:
        problems = "; ".join(
            f"ONDECK_{'_'.join(map(str, error['loc'])).upper()}: {error['msg']}"
            if error["loc"]
            else error["msg"]
            for error in exc.errors(include_url=False)
        )
        _fail(f"invalid settings: {problems}", code=2)


def _fail(message: str, code: int = EXIT_API) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def _existing_store(settings: Settings) -> Store:
    """The database of an installation, for the commands that read it directly: a clear
    error, and nothing created, where there is none (say, ONDECK_DATA_DIR not set as the
    server's) or it cannot be reached."""
    from sqlalchemy import make_url

    url = make_url(settings.resolved_database_url)
    where = url.render_as_string(hide_password=True)
    hint = "set ONDECK_DATA_DIR or ONDECK_DATABASE_URL as the server has them"
    if url.get_backend_name() == "sqlite" and url.database and not Path(url.database).exists():
        _fail(f"no ondeck database at {where}: {hint}")
    store = _reachable_store(settings)
    current = store.is_current()
    if not current:
        store.dispose()
        _fail(f"the database at {where} is not an ondeck database of this version: {hint}, or upgrade it")
    return store


def _reachable_store(settings: Settings) -> Store:
    """The configured store, once it answered: where it cannot be reached, one clear line
    and exit code 3, not the traceback of whatever first tried (a server's start-up, say)."""
    from sqlalchemy import make_url
    from sqlalchemy.exc import DBAPIError

    from ondeck.errors import StoreUnavailable
    from ondeck.store.store import Store

    store = Store(settings.resolved_database_url)
    try:
        store.ping()
    except (DBAPIError, StoreUnavailable) as exc:
        store.dispose()
        where = make_url(settings.resolved_database_url).render_as_string(hide_password=True)
        reason = (
            exc.orig if isinstance(exc, DBAPIError) else exc.detail.removeprefix("database unavailable: ")
        )
        _fail(f"cannot reach the database at {where}: {reason}")
    return store


def _fail_problem(response: httpx.Response) -> NoReturn:
    try:
        body = response.json()
        message = f"{body.get('title', 'error')} ({response.status_code}): {body.get('detail', '')}"
    except ValueError:
        message = f"HTTP {response.status_code}: {response.text[:200]}"
    _fail(message)


def _api() -> Api:
    return Api(_settings())


# --- params ------------------------------------------------------------------


def parse_params(pairs: list[str], schema: dict[str, Any]) -> dict[str, Any]:
    """``k=v`` (typed by the automation's schema) or ``k:=<json>`` (taken as JSON)."""
    from ondeck.spec.params import coerce_text  # imported here: see the module's docstring
    from ondeck.storable import strict_json

    properties = schema.get("properties", {})
    params: dict[str, Any] = {}
    for pair in pairs:
        if ":=" in pair and pair.index(":=") < pair.find("=") + 1:
            key, raw = pair.split(":=", 1)
            try:
                params[key] = strict_json(raw)
            except ValueError as exc:
                _fail(f"-p {key}:= needs JSON: {exc}", code=2)
        elif "=" in pair:
            key, text = pair.split("=", 1)
            params[key] = coerce_text(text, properties.get(key, {}))
        else:
            _fail(f"-p takes key=value or key:=json, not {pair!r}", code=2)
    return params


# --- output ------------------------------------------------------------------


def _print_run(run: dict[str, Any], as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps(run, indent=2))
        return
    typer.echo(f"run {run['id']}  {run['automation']} v{run['version']}  {run['status']}")
    for label in ("params", "outputs"):
        if run.get(label):
            typer.echo(f"  {label}: {json.dumps(run[label])}")
    if run.get("exit_code") is not None:
        typer.echo(f"  exit code: {run['exit_code']}")
    if run.get("error"):
        typer.echo(f"  error: {run['error']}")
    for transition in run.get("transitions") or []:
        typer.echo(f"  {transition['at']}  -> {transition['to_status']}: {transition['reason']}")


def _follow(api: Api, run_id: str, *, all_to_stderr: bool = False) -> None:
    """The run's live output, each stream to ours; all of it to stderr where stdout is for
    the run's JSON (``--json``)."""
    for event, data in api.events(run_id):
        if event == "log":
            stream = sys.stdout if data["stream"] == "stdout" and not all_to_stderr else sys.stderr
            stream.write(data["text"])
            stream.flush()


def _wait(api: Api, run_id: str) -> dict[str, Any]:
    while True:
        run: dict[str, Any] = api.request("GET", f"/runs/{run_id}", params={"wait": 30})
        if run["status"] in ("succeeded", "failed", "timed_out", "cancelled", "rejected"):
            return run


def _finish(api: Api, run: dict[str, Any], wait: bool, follow: bool, as_json: bool) -> None:
    if follow:
        _follow(api, run["id"], all_to_stderr=as_json)
    if wait or follow:
        run = _wait(api, run["id"])
        if as_json:
            _print_run(run, True)
        else:
            typer.echo(
                f"run {run['id']} {run['status']}" + (f": {run['error']}" if run.get("error") else ""),
                err=True,
            )
            if run.get("outputs"):  # beside the status: stdout is the run's own (--follow)
                typer.echo(f"  outputs: {json.dumps(run['outputs'])}", err=True)
        if run["status"] != "succeeded":
            raise typer.Exit(EXIT_RUN_FAILED)
        return
    _print_run(run, as_json)


# --- commands ----------------------------------------------------------------


@app.command()
def run(
    name: str,
    param: Annotated[list[str], typer.Option("-p", "--param", help="key=value or key:=json")] = [],  # noqa: B006
    wait: Annotated[bool, typer.Option(help="Wait for the run to end; exit 0 only on success.")] = False,
    follow: Annotated[bool, typer.Option(help="Stream the live log (implies --wait).")] = False,
    idempotency_key: Annotated[str | None, typer.Option(help="Repeat-safe trigger key.")] = None,
    callback_url: Annotated[str | None, typer.Option(help="URL told how the run ended.")] = None,
    as_json: JsonOption = False,
) -> None:
    """Trigger automation NAME."""
    api = _api()
    automation = api.request("GET", f"/automations/{name}")
    params = parse_params(param, automation["definition"].get("params", {}))
    headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
    body: dict[str, Any] = {"params": params}
    if callback_url:
        body["callback_url"] = callback_url
    created = api.request("POST", f"/automations/{name}/runs", json=body, headers=headers)
    if not as_json and (wait or follow):
        typer.echo(f"run {created['id']} {created['status']}", err=True)
    _finish(api, created, wait, follow, as_json)


@runs_app.command("list")
def runs_list(
    automation: Annotated[str | None, typer.Option(help="Only this automation.")] = None,
    status: Annotated[list[str], typer.Option(help="Only these statuses.")] = [],  # noqa: B006
    limit: int = 20,
    as_json: JsonOption = False,
) -> None:
    """Recent runs, newest first."""
    query: dict[str, Any] = {"limit": limit, "status": status}
    if automation:
        query["automation"] = automation
    page = _api().request("GET", "/runs", params=query)
    if as_json:
        typer.echo(json.dumps(page, indent=2))
        return
    for item in page["items"]:
        typer.echo(f"{item['id']}  {item['status']:<10} {item['automation']:<24} {item['created_at']}")


@runs_app.command("show")
def runs_show(run_id: str, as_json: JsonOption = False) -> None:
    """One run with its transitions."""
    _print_run(_api().request("GET", f"/runs/{run_id}"), as_json)


@runs_app.command("logs")
def runs_logs(
    run_id: str,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep streaming until the run ends.")
    ] = False,
    as_json: JsonOption = False,
) -> None:
    """A run's output."""
    api = _api()
    if follow and not as_json:
        _follow(api, run_id)
        return
    after = 0
    while True:
        page = api.request("GET", f"/runs/{run_id}/logs", params={"after": after, "limit": 5000})
        for entry in page["entries"]:
            if as_json:
                typer.echo(json.dumps(entry))
            else:
                (sys.stdout if entry["stream"] == "stdout" else sys.stderr).write(entry["text"])
            after = entry["seq"]
        if len(page["entries"]) < 5000:
            return


@runs_app.command("cancel")
def runs_cancel(run_id: str, as_json: JsonOption = False) -> None:
    """Cancel a queued or running run."""
    _print_run(_api().request("POST", f"/runs/{run_id}/cancel"), as_json)


@runs_app.command("rerun")
def runs_rerun(
    run_id: str,
    wait: bool = False,
    follow: bool = False,
    as_json: JsonOption = False,
) -> None:
    """Run again with the same params."""
    api = _api()
    _finish(api, api.request("POST", f"/runs/{run_id}/rerun"), wait, follow, as_json)


@automations_app.command("list")
def automations_list(as_json: JsonOption = False) -> None:
    """Automations in the catalog."""
    page = _api().request("GET", "/automations")
    if as_json:
        typer.echo(json.dumps(page, indent=2))
        return
    for item in page["items"]:
        typer.echo(f"{item['name']:<24} v{item['version']:<4} {item['runtime']:<7} {item['description']}")


@automations_app.command("show")
def automations_show(name: str, as_json: JsonOption = False) -> None:
    """One automation: its params, and its triggers with each schedule's next fire time."""
    found = _api().request("GET", f"/automations/{name}")
    if as_json:
        typer.echo(json.dumps(found, indent=2))
        return
    definition = found["definition"]
    runtime = definition["run"]["runtime"]
    typer.echo(f"{found['name']} v{found['version']} ({runtime}): {definition.get('description', '')}")
    typer.echo(f"  params: {json.dumps(definition.get('params', {}).get('properties', {}))}")
    for trigger in found["triggers"]:
        kind = next(k for k in ("webhook", "event", "schedule", "slack") if k in trigger)
        detail = json.dumps(trigger[kind])
        if kind == "schedule":
            detail += " paused" if trigger.get("paused") else f" next {trigger.get('next_fire_at')}"
        typer.echo(f"  trigger #{trigger['index']} {kind}: {detail}")


def _load(directory: Path) -> list[Any]:
    from ondeck.spec.loader import load_directory

    if not directory.is_dir():
        _fail(f"{directory}: not a directory", code=2)
    automations, problems = load_directory(directory)
    for problem in problems:
        typer.echo(f"error: {problem}", err=True)
    if problems:
        raise typer.Exit(EXIT_RUN_FAILED)
    if not automations:  # the wrong directory, most likely: not "0 automations valid"
        _fail(f"{directory}: no automation files (*.yaml, *.yml) under it", code=EXIT_RUN_FAILED)
    return automations


@automations_app.command("validate")
def automations_validate(directory: Path) -> None:
    """Check every automation file under DIRECTORY; exit 1 on any error."""
    automations = _load(directory)
    typer.echo(f"{len(automations)} automations valid")


@automations_app.command("apply")
def automations_apply(directory: Path) -> None:
    """Validate, then push every automation under DIRECTORY to the server."""
    api = _api()
    for automation in _load(directory):
        result = api.request("PUT", f"/automations/{automation.name}", json=automation.definition())
        state = ("created" if result["version"] == 1 else "updated") if result["changed"] else "unchanged"
        typer.echo(f"{result['name']}: version {result['version']} ({state})")


@db_app.command("upgrade")
def db_upgrade() -> None:
    """Apply database migrations (the server also does this on start)."""
    store = _reachable_store(_settings())
    store.upgrade()
    store.dispose()
    typer.echo("database is up to date")


@app.command()
def server(
    host: Annotated[str | None, typer.Option(help="Default ONDECK_HOST or 127.0.0.1.")] = None,
    port: Annotated[int | None, typer.Option(help="Default ONDECK_PORT or 8000.")] = None,
    worker: Annotated[bool, typer.Option(help="Run an embedded worker.")] = True,
    worker_processes: Annotated[
        int | None, typer.Option(min=1, max=16, help="Embedded worker processes (ONDECK_WORKER_PROCESSES).")
    ] = None,
    log_level: str = "info",
) -> None:
    """API, scheduler, reaper and (unless --no-worker) embedded worker processes."""
    import uvicorn

    from ondeck import jsonlog
    from ondeck.api.app import create_app
    from ondeck.api.http import HttpProtocol

    settings = _settings()
    if worker_processes is not None:
        if not worker:
            raise typer.BadParameter("--worker-processes needs the embedded worker: drop --no-worker")
        settings = settings.model_copy(update={"worker_processes": worker_processes})
    _reachable_store(settings).dispose()
    jsonlog.configure(log_level.upper())
    application = create_app(settings, run_worker=worker)

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            node = getattr(application.state, "node", None)
            if node is not None:
                node.closing = True  # live log streams end (see api.runs._log_events)
            super().handle_exit(sig, frame)

    config = uvicorn.Config(
        application,
        host=host or settings.host,
        port=port or settings.port,
        log_config=None,
        access_log=False,
        # uvloop: about an eighth less CPU per request.
        loop="uvloop",
        http=HttpProtocol,  # httptools, answering even unparsable requests with a problem
        # Longer than clients' pools keep idle connections, so a request never lands on a
        # connection the server is closing at that moment.
        timeout_keep_alive=75,
        timeout_graceful_shutdown=int(settings.kill_grace_seconds) + 5,
    )
    served = Server(config)
    with contextlib.suppress(KeyboardInterrupt):
        served.run()
    if not served.started:  # as uvicorn.run does: the port taken, say (uvicorn logged why)
        raise typer.Exit(3)


def _ignore() -> None:
    pass


@app.command("worker")
def worker_command(
    concurrency: Annotated[int | None, typer.Option(help="Runs at once (ONDECK_WORKER_CONCURRENCY).")] = None,
    group: Annotated[str | None, typer.Option(help="Worker group to serve.")] = None,
    log_level: str = "info",
    parent_fd: Annotated[int | None, typer.Option(hidden=True)] = None,
) -> None:
    """Execute runs only; point several at one PostgreSQL database to scale out.

    ``--parent-fd`` is how ``ondeck server`` starts its embedded worker: the worker
    then leaves the reaper and callbacks to the server, and stops when it goes.
    """
    import uvloop

    from ondeck import jsonlog
    from ondeck.node import Node

    if parent_fd is None:  # an embedded worker's server has checked
        _reachable_store(_settings()).dispose()
    jsonlog.configure(log_level.upper())

    async def serve() -> None:
        node = Node(
            _settings(),
            load_automations=False,
            run_scheduler=False,
            worker_group=group,
            worker_concurrency=concurrency,
            run_services=parent_fd is None,
            parent_fd=parent_fd,
        )
        stop = node.detached
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            # An embedded worker stops when its server closes the socket, not on signals
            # sent to the whole group (see worker_process). A handler, not SIG_IGN: runs
            # must not inherit an ignored SIGTERM.
            loop.add_signal_handler(signum, stop.set if parent_fd is None else _ignore)
        await node.start()
        await stop.wait()
        await node.stop()

    # uvloop: 6-8% less CPU per run. The runner starts programs with subprocess (vfork),
    # not through the loop, whose own spawning forks.
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(serve())


@runs_app.command("approve")
def runs_approve(run_id: str, comment: str = "", as_json: JsonOption = False) -> None:
    """Approve a run that waits for approval."""
    _print_run(_api().request("POST", f"/runs/{run_id}/approve", json={"comment": comment}), as_json)


@runs_app.command("reject")
def runs_reject(run_id: str, comment: str = "", as_json: JsonOption = False) -> None:
    """Reject a run that waits for approval."""
    _print_run(_api().request("POST", f"/runs/{run_id}/reject", json={"comment": comment}), as_json)


@tokens_app.command("create")
def tokens_create(
    name: Annotated[str, typer.Option("--name", help="Unique name; also usable in approver lists.")],
    role: Annotated[list[str], typer.Option("--role", help="viewer, operator, approver or admin.")],
    expires: Annotated[str | None, typer.Option(help="Lifetime such as 30d (at most 365d).")] = None,
    as_json: JsonOption = False,
) -> None:
    """Create a token; it is printed once and never again."""
    body = {"name": name, "roles": role, "expires_in": expires}
    issued = _api().request("POST", "/tokens", json=body)
    if as_json:
        typer.echo(json.dumps(issued, indent=2))
        return
    typer.echo(issued["token"])
    typer.echo(f"token {name!r} ({', '.join(issued['roles'])}) created; it will not be shown again", err=True)


@tokens_app.command("list")
def tokens_list(as_json: JsonOption = False) -> None:
    """Tokens with their roles and last use (never their values)."""
    items = _api().request("GET", "/tokens")
    if as_json:
        typer.echo(json.dumps(items, indent=2))
        return
    for t in items:
        state = (
            "revoked" if t["revoked_at"] else f"expires {t['expires_at']}" if t["expires_at"] else "active"
        )
        typer.echo(f"{t['name']:<24} {','.join(t['roles']):<20} {state:<12} last used {t['last_used_at']}")


@tokens_app.command("revoke")
def tokens_revoke(name: str) -> None:
    """Revoke a token at once."""
    _api().request("DELETE", f"/tokens/{name}")
    typer.echo(f"token {name!r} revoked")


@secrets_app.command("set")
def secrets_set(
    name: str,
    scope: Annotated[str, typer.Option(help="global, environment:<name> or automation:<name>.")] = "global",
) -> None:
    """Set NAME to the value read from standard input (never from the command line)."""
    value = sys.stdin.read().removesuffix("\n")
    if not value:
        _fail('no value on standard input; e.g. `printf %s "$VALUE" | ondeck secrets set NAME`', code=2)
    _api().request("PUT", f"/secrets/{name}", json={"value": value, "scope": scope})
    typer.echo(f"secret {name} set in scope {scope}")


@secrets_app.command("list")
def secrets_list(as_json: JsonOption = False) -> None:
    """Secret names, scopes and who changed them (never values)."""
    items = _api().request("GET", "/secrets")
    if as_json:
        typer.echo(json.dumps(items, indent=2))
        return
    for s in items:
        typer.echo(f"{s['name']:<24} {s['scope']:<28} updated {s['updated_at']} by {s['updated_by']}")


@secrets_app.command("delete")
def secrets_delete(name: str, scope: str = "global") -> None:
    """Delete a secret."""
    _api().request("DELETE", f"/secrets/{name}", params={"scope": scope})
    typer.echo(f"secret {name} deleted from scope {scope}")


@secrets_app.command("rotate-key")
def secrets_rotate_key() -> None:
    """Re-encrypt every secret under a new master key (run where the database is reachable)."""
    from ondeck.engine import secret_store
    from ondeck.vault import Vault

    settings = _settings()
    store = _existing_store(settings)
    vault = Vault.open(settings.data_dir, settings.master_key)
    new, count = secret_store.rotate_key(store, vault, settings.data_dir)
    store.dispose()
    typer.echo(f"{count} secrets re-encrypted; new key saved to {settings.data_dir / 'master.key'}")
    if settings.master_key:
        typer.echo(
            "ONDECK_MASTER_KEY is set: set it to the new key below on every host, then restart:", err=True
        )
        typer.echo(new.keys[0].decode())


@audit_app.command("verify")
def audit_verify() -> None:
    """Recompute the audit chain from the database; exit 1 naming the first broken entry."""
    from ondeck.engine import audit_log

    store = _existing_store(_settings())
    result = audit_log.verify(store)
    store.dispose()
    if not result.intact:
        _fail(f"audit chain broken at entry {result.broken_id}: {result.reason}", code=EXIT_RUN_FAILED)
    typer.echo(f"audit chain intact: {result.entries} entries")


@audit_app.command("list")
def audit_list(
    action: str | None = None, actor: str | None = None, limit: int = 50, as_json: JsonOption = False
) -> None:
    """Recent audit entries, newest first."""
    query: dict[str, Any] = {"limit": limit}
    if action:
        query["action"] = action
    if actor:
        query["actor"] = actor
    page = _api().request("GET", "/audit", params=query)
    if as_json:
        typer.echo(json.dumps(page, indent=2))
        return
    for e in page["items"]:
        typer.echo(
            f"{e['id']:>6} {e['at']} {e['actor']:<16} {e['action']:<18} {e['target']} "
            + json.dumps(e["detail"])
        )


@runs_app.command("deliveries")
def runs_deliveries(run_id: str, as_json: JsonOption = False) -> None:
    """Callbacks and notifications of a run, with each attempt."""
    items = _api().request("GET", f"/runs/{run_id}/deliveries")
    if as_json:
        typer.echo(json.dumps(items, indent=2))
        return
    for d in items:
        typer.echo(f"{d['id']}  {d['kind']:<8} {d['status']:<9} {d['url']}")
        for a in d["attempt_log"]:
            typer.echo(f"    #{a['number']} {a['at']} {a['status_code'] or '-'} {a['error'] or ''}")


@schedules_app.command("list")
def schedules_list(as_json: JsonOption = False) -> None:
    """Every schedule with its next fire time."""
    items = _api().request("GET", "/schedules")
    if as_json:
        typer.echo(json.dumps(items, indent=2))
        return
    for s in items:
        state = "paused" if s["paused"] else f"next {s['next_fire_at']}"
        typer.echo(f"{s['automation']:<24} #{s['index']} {s['cron']:<18} {s['timezone']:<14} {state}")


@schedules_app.command("pause")
def schedules_pause(name: str, index: int = 0) -> None:
    """Stop schedule INDEX of automation NAME from firing."""
    _api().request("POST", f"/automations/{name}/schedules/{index}/pause")
    typer.echo(f"{name} schedule #{index} paused")


@schedules_app.command("resume")
def schedules_resume(name: str, index: int = 0) -> None:
    """Let a paused schedule fire again (missed ticks are not caught up)."""
    _api().request("POST", f"/automations/{name}/schedules/{index}/resume")
    typer.echo(f"{name} schedule #{index} resumed")
