"""The ``ondeck`` command as a user types it, against a real server with the bundled examples."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from ondeck.settings import BUNDLED_EXAMPLES
from tests.support import ADMIN_TOKEN, Server, base_env


@pytest.fixture(scope="module")
def examples_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    data = tmp_path_factory.mktemp("cli")
    env = base_env(data, f"sqlite:///{data / 'ondeck.db'}", BUNDLED_EXAMPLES)
    server = Server(env, data / "server.log").start()
    yield server
    server.stop()


def ondeck(server: Server, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {
        "PATH": "/usr/bin:/bin",
        "ONDECK_URL": server.url,
        "HOME": str(cwd or Path.cwd()),
        "ONDECK_TOKEN": ADMIN_TOKEN,
    }
    return subprocess.run(
        [sys.executable, "-m", "ondeck", *args], env=env, capture_output=True, text=True, timeout=120, cwd=cwd
    )


def test_run_hello_follow_prints_the_live_log_and_exits_zero(examples_server: Server) -> None:
    result = ondeck(examples_server, "run", "hello", "-p", "name=world", "--wait", "--follow")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "hello, world!\n"
    assert "succeeded" in result.stderr


def test_run_follow_json_keeps_stdout_for_the_run_s_json(examples_server: Server) -> None:
    """The live output went to stdout before the JSON: neither the run's output nor JSON."""
    result = ondeck(examples_server, "run", "hello", "-p", "name=json", "--follow", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["status"] == "succeeded" and result.stderr == "hello, json!\n"


def test_run_that_fails_exits_one_after_retries(examples_server: Server) -> None:
    result = ondeck(examples_server, "run", "always-fails", "--follow")
    assert result.returncode == 1
    assert result.stdout.count("trying") == 3
    assert "failed: exit code 3" in result.stderr


def test_python_main_params_are_typed_from_the_schema(examples_server: Server) -> None:
    result = ondeck(examples_server, "run", "disk-report", "-p", "warn_percent=0", "--wait", "--json")
    assert result.returncode == 0, result.stderr
    run = json.loads(result.stdout)
    assert run["params"]["warn_percent"] == 0 and run["outputs"]["warning"] is True


def test_waiting_for_a_run_shows_its_outputs_beside_its_status(examples_server: Server) -> None:
    result = ondeck(examples_server, "run", "disk-report", "-p", "path=/", "--wait")
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""  # a run's own output only, with --follow
    status, outputs = result.stderr.splitlines()[-2:]
    assert status.endswith(" succeeded")
    assert json.loads(outputs.removeprefix("  outputs: "))["path"] == "/"


def test_bad_param_is_a_clear_error(examples_server: Server) -> None:
    result = ondeck(examples_server, "run", "hello", "-p", "greeting=yo")
    assert result.returncode == 3
    assert "/greeting" in result.stderr and "Invalid parameters" in result.stderr


@pytest.mark.parametrize(
    "param", ["delay=nan", "delay=inf", "delay=-1e999", "delay:=NaN", "delay:=1e999", "delay:=[Infinity]"]
)
def test_a_number_json_cannot_hold_is_a_clear_error(examples_server: Server, param: str) -> None:
    """Each was a traceback (exit 1, "the run failed"): the request body could not be made."""
    result = ondeck(examples_server, "run", "slow-count", "-p", param)
    assert "Traceback" not in result.stderr
    if ":=" in param:
        assert result.returncode == 2 and "needs JSON" in result.stderr
    else:  # taken as text, which the schema refuses
        assert result.returncode == 3 and "/delay" in result.stderr


def test_idempotency_key_returns_the_same_run(examples_server: Server) -> None:
    first = ondeck(examples_server, "run", "hello", "--idempotency-key", "cli-k1", "--json")
    again = ondeck(examples_server, "run", "hello", "--idempotency-key", "cli-k1", "--json")
    assert json.loads(first.stdout)["id"] == json.loads(again.stdout)["id"]


def test_runs_commands(examples_server: Server) -> None:
    run = json.loads(ondeck(examples_server, "run", "slow-count", "-p", "count=600", "--json").stdout)
    cancel = ondeck(examples_server, "runs", "cancel", run["id"])
    assert cancel.returncode == 0 and run["id"] in cancel.stdout
    finished = ondeck(examples_server, "runs", "show", run["id"], "--json")
    assert json.loads(finished.stdout)["id"] == run["id"]
    listing = ondeck(examples_server, "runs", "list", "--automation", "slow-count")
    assert run["id"] in listing.stdout
    rerun = ondeck(examples_server, "runs", "rerun", run["id"], "--json")
    new = json.loads(rerun.stdout)
    assert new["rerun_of"] == run["id"]
    ondeck(examples_server, "runs", "cancel", new["id"])
    hello = json.loads(ondeck(examples_server, "run", "hello", "--wait", "--json").stdout)
    logs = ondeck(examples_server, "runs", "logs", hello["id"])
    assert logs.stdout == "hello, world!\n"
    followed = ondeck(examples_server, "runs", "logs", hello["id"], "--follow")
    assert followed.stdout == "hello, world!\n"


def test_unreachable_server_is_a_clear_error(tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin", "ONDECK_URL": "http://127.0.0.1:9", "HOME": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, "-m", "ondeck", "runs", "list"], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 3 and "cannot reach ondeck" in result.stderr


@pytest.mark.parametrize("command", [["server"], ["runs", "list"]], ids=" ".join)
def test_a_setting_that_does_not_read_is_a_clear_error(tmp_path: Path, command: list[str]) -> None:
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "ONDECK_DATA_DIR": str(tmp_path)}
    env |= {"ONDECK_LOG_CAP_BYTES": "1000", "ONDECK_PORT": "9"}
    result = subprocess.run(
        [sys.executable, "-m", "ondeck", *command], env=env, capture_output=True, text=True, timeout=60
    )
    assert (result.returncode, result.stderr) == (
        2,
        "error: invalid settings: ONDECK_LOG_CAP_BYTES: Input should be greater than or equal to 1024\n",
    )


@pytest.mark.parametrize("command", [["server"], ["worker"], ["db", "upgrade"]], ids=" ".join)
def test_an_unreachable_database_is_a_clear_error_at_start(tmp_path: Path, command: list[str]) -> None:
    """One line naming the database (without its password) and why, not a traceback."""
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": str(tmp_path),
        "ONDECK_DATA_DIR": str(tmp_path),
        "ONDECK_DATABASE_URL": "postgresql+psycopg://ondeck:the-password@127.0.0.1:9/ondeck",
        "ONDECK_PORT": "9",
    }
    result = subprocess.run(
        [sys.executable, "-m", "ondeck", *command], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 3, result.stderr
    assert result.stderr.startswith(
        "error: cannot reach the database at postgresql+psycopg://ondeck:***@127.0.0.1:9"
    )
    assert "Traceback" not in result.stderr and "the-password" not in result.stderr


def test_automations_validate_and_apply(examples_server: Server, tmp_path: Path) -> None:
    good, bad = tmp_path / "good", tmp_path / "bad"
    good.mkdir()
    bad.mkdir()
    (good / "a.yaml").write_text("name: cli-applied\nrun: {runtime: bash, script: 'echo applied'}\n")
    assert ondeck(examples_server, "automations", "validate", str(good)).returncode == 0
    applied = ondeck(examples_server, "automations", "apply", str(good))
    assert applied.returncode == 0 and "cli-applied: version 1 (created)" in applied.stdout
    again = ondeck(examples_server, "automations", "apply", str(good))
    assert "cli-applied: version 1 (unchanged)" in again.stdout
    (good / "a.yaml").write_text("name: cli-applied\nrun: {runtime: bash, script: 'echo again'}\n")
    changed = ondeck(examples_server, "automations", "apply", str(good))
    assert "cli-applied: version 2 (updated)" in changed.stdout
    for command in ("validate", "apply"):  # the wrong directory, most likely
        empty = ondeck(examples_server, "automations", command, str(tmp_path / "bad"))
        assert (empty.returncode, empty.stderr) == (
            1,
            f"error: {tmp_path / 'bad'}: no automation files (*.yaml, *.yml) under it\n",
        )
        missing = ondeck(examples_server, "automations", command, str(tmp_path / "missing"))
        assert (missing.returncode, missing.stderr) == (
            2,
            f"error: {tmp_path / 'missing'}: not a directory\n",
        )
    assert "cli-applied" in ondeck(examples_server, "automations", "list").stdout

    (bad / "b.yaml").write_text("name: b\nrun: {runtime: bash, script: x}\nretries: {attempts: 0}\n")
    result = ondeck(examples_server, "automations", "validate", str(bad))
    assert result.returncode == 1 and "b.yaml: retries.attempts" in result.stderr
    assert ondeck(examples_server, "automations", "apply", str(bad)).returncode == 1


def test_a_file_nested_10000_levels_deep_is_an_error_naming_it_for_validate_and_server_start(
    examples_server: Server, tmp_path: Path
) -> None:
    """PyYAML recurses once per level: validate printed a RecursionError's traceback, and
    a server given such a file did not start."""
    automations = tmp_path / "automations"
    automations.mkdir()
    (automations / "good.yaml").write_text("name: beside-deep\nrun: {runtime: bash, script: 'true'}\n")
    deep = automations / "deep.yaml"
    deep.write_text("name: deep\nrun: {runtime: bash, script: 'true'}\ntags: " + "[" * 10_000 + "]" * 10_000)
    result = ondeck(examples_server, "automations", "validate", str(automations))
    assert result.returncode == 1, result.stderr
    assert result.stderr.startswith(f"error: {deep}: invalid YAML: nested more than 200 levels")
    assert "Traceback" not in result.stderr

    data = tmp_path / "data"
    data.mkdir()
    server = Server(base_env(data, f"sqlite:///{data / 'ondeck.db'}", automations), data / "server.log")
    server.start()
    try:
        with server.client() as client:
            assert [a["name"] for a in client.get("/automations").json()["items"]] == ["beside-deep"]
        assert f"automation not loaded: {deep}: invalid YAML: nested more than 200 levels" in server.log()
    finally:
        server.stop()


def test_automations_show_lists_triggers_with_next_fire(examples_server: Server) -> None:
    shown = ondeck(examples_server, "automations", "show", "nightly-report")
    assert shown.returncode == 0, shown.stderr
    assert "trigger #0 schedule" in shown.stdout and "next 20" in shown.stdout
    listed = ondeck(examples_server, "schedules", "list")
    assert "nightly-report" in listed.stdout


def test_db_upgrade(tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin", "ONDECK_DATA_DIR": str(tmp_path / "d"), "HOME": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, "-m", "ondeck", "db", "upgrade"], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0 and (tmp_path / "d" / "ondeck.db").exists()


def test_commands_that_read_the_database_say_clearly_when_there_is_none(tmp_path: Path) -> None:
    """Without the server's ONDECK_DATA_DIR, they met an empty database they had just made."""
    env = {"PATH": "/usr/bin:/bin", "ONDECK_DATA_DIR": str(tmp_path / "d"), "HOME": str(tmp_path)}
    for command in (["audit", "verify"], ["secrets", "rotate-key"]):
        result = subprocess.run(
            [sys.executable, "-m", "ondeck", *command], env=env, capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 3, result.stderr
        assert (
            result.stderr.startswith("error: no ondeck database at sqlite:///")
            and "ONDECK_DATA_DIR" in result.stderr
        )
        assert "Traceback" not in result.stderr
    assert not (tmp_path / "d").exists()
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "ondeck.db").touch()  # a database, but not ondeck's
    result = subprocess.run(
        [sys.executable, "-m", "ondeck", "audit", "verify"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 3 and "not an ondeck database" in result.stderr, result.stderr
