"""The runner on its own: real processes, no database."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ondeck.domain import Outcome, RunStatus
from ondeck.runner import isolation, process, processes
from ondeck.runner import workspace as workspace_module
from ondeck.runner.attempt import Attempt, Finished, Output, ResourceLimits
from ondeck.runner.process import param_env_name, run_attempt
from ondeck.runner.workspace import Workspace
from tests.support import wait_until

LIMITS = ResourceLimits(memory_bytes=2 << 30, cpu_seconds=60, processes=4096, file_size_bytes=1 << 30)


@pytest.fixture(params=[isolation.LAUNCHER, isolation.NAMESPACE, isolation.GROUP])
def contained(request: pytest.FixtureRequest) -> str:
    """Run a test with each way of starting an attempt (see runner.isolation)."""
    mode: str = request.param
    assert isolation.available(mode), f"this host should support isolation by {mode} (make install)"
    return mode


def make(tmp_path: Path, script: str | None, **fields: Any) -> Attempt:
    values: dict[str, Any] = {
        "run_id": f"r{time.monotonic_ns()}",
        "number": 1,
        "runtime": "bash",
        "script": script,
        "args": [],
        "entrypoint": "script",
        "params": {},
        "timeout": 30.0,
        "limits": LIMITS,
        "log_budget": 1 << 20,
        "workspace_root": tmp_path / "ws",
        "kill_grace": 1.0,
    }
    values.update(fields)
    return Attempt(**values)


def execute(attempt: Attempt, cancel_after: float | None = None) -> tuple[Outcome, str]:
    async def go() -> tuple[Outcome, str]:
        cancel = asyncio.Event()
        if cancel_after is not None:
            asyncio.get_running_loop().call_later(cancel_after, cancel.set)
        text, outcome = [], None
        async for event in run_attempt(attempt, cancel):
            if isinstance(event, Output):
                text.append(event.chunk.text)
            elif isinstance(event, Finished):
                outcome = event.outcome
        assert outcome is not None
        return outcome, "".join(text)

    return asyncio.run(go())


def test_params_are_inert_data(tmp_path: Path, contained: str) -> None:
    marker = tmp_path / "pwned"
    evil = f"$(touch {marker}); `touch {marker}`; rm -rf ~"
    script = 'echo "[$ONDECK_PARAM_TARGET]"; cat "$ONDECK_PARAMS"'
    outcome, text = execute(make(tmp_path, script, params={"target": evil}, isolation=contained))
    assert outcome.status == RunStatus.SUCCEEDED
    assert f"[{evil}]" in text
    assert not marker.exists()


def test_environment_is_minimal_and_typed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SERVER_ONLY_SECRET", "leak")
    params = {"count": 3, "flag": True, "list": [1, 2], "dashed-name": "x"}
    _outcome, text = execute(make(tmp_path, "env", params=params))
    env = dict(line.split("=", 1) for line in text.splitlines() if "=" in line)
    assert "SERVER_ONLY_SECRET" not in env
    assert env["ONDECK_PARAM_COUNT"] == "3"
    assert env["ONDECK_PARAM_FLAG"] == "true"
    assert env["ONDECK_PARAM_LIST"] == "[1,2]"
    assert env["ONDECK_PARAM_DASHED_NAME"] == "x"
    assert env["ONDECK_ATTEMPT"] == "1"
    assert env["HOME"] == env["PWD"]
    assert param_env_name("a.b-c") == "ONDECK_PARAM_A_B_C"


def test_secrets_change_no_variable_ondeck_sets(tmp_path: Path) -> None:
    """A definition stored before such names were refused (see ``Automation.secrets``)."""
    extra = {"PATH": "/nowhere", "ONDECK_RUN_ID": "forged", "ONDECK_PARAM_ENV": "prod", "API_KEY": "k3y!"}
    attempt = make(
        tmp_path, 'echo "$PATH $ONDECK_RUN_ID $ONDECK_PARAM_ENV"', params={"env": "dev"}, extra_env=extra
    )
    outcome, text = execute(attempt)
    assert outcome.status == RunStatus.SUCCEEDED
    assert text.split() == [process.SAFE_PATH, attempt.run_id, "dev"]


def test_params_that_would_share_a_variable_are_in_the_file_only(tmp_path: Path) -> None:
    """``mode`` and ``MODE`` were both ONDECK_PARAM_MODE, the value last in the params
    winning (PostgreSQL orders a JSON object's keys its own way): one a rule checked could
    be passed by sending the other, or filled by a default beside it."""
    params = {"mode": "safe", "MODE": "rm -rf", "a-b": 1, "a_b": 2, "имя": "x", "тип": "y", "ok": "fine"}
    script = 'env | grep ^ONDECK_PARAM_; echo; cat "$ONDECK_PARAMS"'
    outcome, text = execute(make(tmp_path, script, params=params))
    variables, file = text.split("\n\n")
    assert outcome.status == RunStatus.SUCCEEDED
    assert (variables, json.loads(file)) == ("ONDECK_PARAM_OK=fine", params)


def test_a_param_too_long_for_the_environment_reaches_the_script_in_the_file(
    tmp_path: Path,
) -> None:
    """One over the kernel's 128 KiB per variable failed the attempt's start ("Argument
    list too long"); the longest that fits is still in the environment."""
    longest = "y" * (32 * 4096 - len("ONDECK_PARAM_FITS=") - 1)
    params = {"long": "x" * (128 * 1024), "fits": longest}
    script = 'echo "${ONDECK_PARAM_LONG-unset} ${#ONDECK_PARAM_FITS}"; wc -c < "$ONDECK_PARAMS"'
    outcome, text = execute(make(tmp_path, script, params=params))
    unset, fits, size = text.split()
    assert outcome.status == RunStatus.SUCCEEDED
    assert (unset, int(fits)) == ("unset", len(longest)) and int(size) > 128 * 1024 + len(longest)


def test_workspace_is_fresh_and_removed(tmp_path: Path) -> None:
    outcome, text = execute(make(tmp_path, "pwd; ls -A | wc -l; touch left-behind; chmod 000 .."))
    lines = text.split()
    assert outcome.status == RunStatus.SUCCEEDED
    assert lines[1] == "0"
    assert not Path(lines[0]).exists()
    assert list((tmp_path / "ws").iterdir()) == []


def test_tmpdir_is_private_to_the_attempt_and_removed_with_it(tmp_path: Path) -> None:
    """TMPDIR is the workspace's root, the working directory's parent (see Workspace)."""
    script = 'f=$(mktemp); echo "$TMPDIR $f"; ls -ld "$TMPDIR"; cd ..; pwd'
    outcome, text = execute(make(tmp_path, script))
    tmpdir, made, mode, *_, parent = text.split()
    assert outcome.status == RunStatus.SUCCEEDED
    assert Path(tmpdir).parent == tmp_path / "ws" and Path(made).parent == Path(tmpdir) == Path(parent)
    assert mode == "drwx------"
    assert not Path(made).exists() and list((tmp_path / "ws").iterdir()) == []


def test_a_workspace_with_more_than_ondeck_put_there_is_not_removed_on_the_loop(tmp_path: Path) -> None:
    """``remove_if_untouched`` takes only what ondeck makes (and the outputs file); for
    anything else it leaves the rest, and what points elsewhere alone, to ``remove``."""
    untouched = Workspace.create(tmp_path, "r1", 1)
    untouched.params_file.write_text("{}")
    untouched.outputs_file.write_text("{}")
    untouched.script_file.write_text("def main(): pass")
    assert untouched.remove_if_untouched() and not untouched.root.exists()

    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").touch()
    for touch in (
        lambda ws: (ws.work / "file").touch(),
        lambda ws: (ws.root / "extra").mkdir(),
        lambda ws: (ws.work.rmdir(), ws.work.symlink_to(outside)),
    ):
        workspace = Workspace.create(tmp_path / "ws", "r2", 1)
        touch(workspace)
        assert not workspace.remove_if_untouched() and workspace.root.exists()
        workspace.remove()
        assert not workspace.root.exists()
    assert (outside / "keep").exists()


def test_removing_a_workspace_changes_nothing_its_links_point_to(tmp_path: Path) -> None:
    """Where modes bind the worker, ``remove`` makes what a script made read-only
    writable first (``_remove_tree``): a link is removed, never followed."""
    outside = tmp_path / "outside"
    outside.mkdir(mode=0o500)
    (outside / "kept").write_text("not the workspace's")
    workspace = Workspace.create(tmp_path / "ws", "r1", 1)
    read_only = workspace.work / "read-only"
    read_only.mkdir()
    (read_only / "link").symlink_to(outside)
    (read_only / "file").touch()
    read_only.chmod(0o500)
    parent = os.open(workspace.root.parent, os.O_PATH | os.O_DIRECTORY)
    try:
        workspace_module._remove_tree(parent, workspace.root.name, make_writable=True)
    finally:
        os.close(parent)
    assert not workspace.root.exists()
    assert outside.stat().st_mode & 0o777 == 0o500 and (outside / "kept").read_text() == "not the workspace's"


@pytest.mark.parametrize("make_writable", [True, False], ids=["modes bind", "modes overridden"])
def test_a_tree_nested_deeper_than_descriptors_or_recursion_allow_is_removed(
    tmp_path: Path, make_writable: bool
) -> None:
    """3,000 levels (read-only where modes bind), past Python's recursion limit, removed by
    a process that may open 32 descriptors: a walk holding one per level would stop."""
    workspace = Workspace.create(tmp_path / "ws", "r1", 1)
    directory = os.open(workspace.work, os.O_PATH | os.O_DIRECTORY)
    for _ in range(3000):
        os.mkdir("d", dir_fd=directory)
        below = os.open("d", os.O_PATH | os.O_DIRECTORY, dir_fd=directory)
        if make_writable:
            os.chmod(f"/proc/self/fd/{directory}", 0o500)
        os.close(directory)
        directory = below
    os.close(directory)
    remove = (
        "import resource, sys; from pathlib import Path; from ondeck.runner import workspace\n"
        "workspace._overrides_modes = lambda: sys.argv[2] == 'False'\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (32, 32))\n"
        "workspace.Workspace(Path(sys.argv[1])).remove()"
    )
    command = [sys.executable, "-c", remove, str(workspace.root), str(make_writable)]
    assert subprocess.run(command, capture_output=True, text=True, check=True, timeout=60).stderr == ""
    assert not workspace.root.exists()


@pytest.mark.parametrize("held", [True, False], ids=["levels held", "levels climbed"])
def test_removal_touches_nothing_of_where_the_tree_was_moved_under_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, held: bool
) -> None:
    """A process outliving its attempt moves a directory out while the walk is inside it.
    Where the walk holds the levels above, it goes on in them; where it climbs through
    ``..``, that is elsewhere now, and it stops. Nothing there is touched either way."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "victim").touch()
    workspace = Workspace.create(tmp_path / "ws", "r1", 1)
    (workspace.work / "a" / "b").mkdir(parents=True)
    (workspace.work / "victim").touch()
    enter = workspace_module._enter

    def moving(directory: int, status: os.stat_result, name: str, make_writable: bool) -> Any:
        level = enter(directory, status, name, make_writable)
        if name == "work":  # "a" first: "victim" is still to remove when the walk climbs
            level.entries.sort(key=lambda entry: entry[0] == "a")
        elif name == "a":
            (workspace.work / "a").rename(elsewhere / "a")
        return level

    monkeypatch.setattr(workspace_module, "_enter", moving)
    if not held:
        monkeypatch.setattr(workspace_module, "_HELD_LEVELS", 0)
    workspace.remove()
    assert sorted(path.name for path in elsewhere.iterdir()) == ["a", "victim"]
    if held:  # what was the workspace's is removed, the moved directory's content too
        assert list((elsewhere / "a").iterdir()) == [] and not workspace.root.exists()
    else:
        assert (workspace.work / "victim").exists()
        assert "is left: some of it could not be removed" in caplog.text


def test_bash_scripts_are_given_inline_and_get_their_args(tmp_path: Path) -> None:
    """$0 is "script"; args arrive as $1…; set -e holds; a script that starts with a dash
    is still the script, not options to bash."""
    script = '-x() { printf "[%s]" "$0" "$@"; }; -x "$@"; false; echo unreachable'
    outcome, text = execute(make(tmp_path, script, args=["a b", "$(c)"]))
    assert outcome.status == RunStatus.FAILED and outcome.exit_code == 1
    assert text == "[script][a b][$(c)]"


def test_outputs_file_becomes_outputs(tmp_path: Path) -> None:
    outcome, _ = execute(make(tmp_path, 'echo \'{"answer": 42}\' > "$ONDECK_OUTPUTS"'))
    assert outcome.outputs == {"answer": 42}


def test_outputs_are_read_only_from_a_file_the_script_made(tmp_path: Path) -> None:
    """Read by the worker, a link would hand the script a file it may not read; a FIFO
    would block the worker for good."""
    secret = tmp_path / "secret.json"
    secret.write_text('{"secret": "from the worker\'s side"}')
    secret.chmod(0o600)
    for made, error in (
        (f"ln -s {secret}", "outputs file is a symbolic link: write the outputs there"),
        ("mkfifo", "outputs file is not a regular file"),
        ("mkdir", "outputs file is not a regular file"),
    ):
        outcome, text = execute(make(tmp_path, f'{made} "$ONDECK_OUTPUTS"'))
        assert (outcome.status, outcome.outputs, outcome.error) == (RunStatus.FAILED, None, error), text


def test_outputs_that_are_not_an_object_fail_the_run(tmp_path: Path) -> None:
    outcome, _ = execute(make(tmp_path, 'echo "[1]" > "$ONDECK_OUTPUTS"'))
    assert outcome.status == RunStatus.FAILED and "JSON object" in (outcome.error or "")


def test_outputs_with_nan_or_infinity_fail_the_run(tmp_path: Path) -> None:
    """JSON has no form for them: stored, they could not be (PostgreSQL) or came back null."""
    outcome, _ = execute(make(tmp_path, 'echo \'{"a": [Infinity]}\' > "$ONDECK_OUTPUTS"'))
    assert outcome.status == RunStatus.FAILED and outcome.outputs is None
    assert outcome.error == "outputs file is not valid JSON: Infinity is not a JSON number"
    outcome, _ = execute(make(tmp_path, 'echo \'{"a": 1e400}\' > "$ONDECK_OUTPUTS"'))  # parsed, infinite
    assert outcome.status == RunStatus.FAILED and outcome.outputs is None
    assert outcome.error == "outputs file is not valid JSON: 1e400 is too large a number"


@pytest.mark.parametrize("levels", [201, 5000])
def test_outputs_nested_deeper_than_any_answer_can_show_fail_the_run(tmp_path: Path, levels: int) -> None:
    """Stored, 500 levels made every answer that showed the run a 500, the run list too;
    5000 were a RecursionError that failed the run as a runner error."""
    deep = "[" * (levels - 1) + "]" * (levels - 1)
    outcome, _ = execute(make(tmp_path, f'echo \'{{"a": {deep}}}\' > "$ONDECK_OUTPUTS"'))
    assert outcome.status == RunStatus.FAILED and outcome.outputs is None
    assert outcome.error == "outputs file nests more than 200 levels of objects and arrays"
    at_limit = "[" * 199 + "]" * 199
    outcome, _ = execute(make(tmp_path, f'echo \'{{"a": {at_limit}}}\' > "$ONDECK_OUTPUTS"'))
    assert outcome.status == RunStatus.SUCCEEDED and outcome.outputs is not None


def test_exit_code_is_recorded(tmp_path: Path, contained: str) -> None:
    outcome, _ = execute(make(tmp_path, "exit 7", isolation=contained))
    assert (outcome.status, outcome.exit_code, outcome.error) == (RunStatus.FAILED, 7, "exit code 7")


@pytest.mark.parametrize("mode", [isolation.LAUNCHER, isolation.NAMESPACE])
def test_supervisor_death_kills_every_process_of_the_attempt(tmp_path: Path, mode: str) -> None:
    """kill -9 of the process holding the attempt (the worker) leaves nothing running."""
    marker = f"ONDECK_RUN_ID=orphan-{time.monotonic_ns()}"
    prefix = " ".join(isolation.command(mode, LIMITS, tmp_path))
    holder = subprocess.Popen(
        [
            "bash",
            "-c",
            f"exec env {marker} ONDECK_ATTEMPT=1 {prefix} "
            "bash -c 'sleep 304.1 & setsid sleep 304.2 & sleep 304.3'",
        ],
        start_new_session=True,
    )
    run_id = marker.split("=", 1)[1]
    wait_until(lambda: len(processes.tagged_processes(run_id, 1)) >= 3, timeout=10, message="the sleeps")
    holder.kill()  # SIGKILL: no chance to clean up
    holder.wait()
    wait_until(
        lambda: processes.tagged_processes(run_id, 1) == [], timeout=10, message="every process to die"
    )


@pytest.mark.parametrize(
    "escape",
    [
        "setsid sleep 30.517",
        "setsid sleep 30.517 >/dev/null 2>&1",
        "setsid bash -c 'while :; do sleep 30.517 & sleep 0.002; done'",  # forks while swept
    ],
)
def test_isolated_by_group_alone_a_process_that_left_the_group_ends_with_the_attempt(
    tmp_path: Path, escape: str
) -> None:
    """With no PID namespace, a ``setsid`` child outlived a script that exited, and one
    holding the output pipes kept the attempt from ending until it did."""
    started = time.monotonic()
    attempt = make(tmp_path, f"{escape} & sleep 0.2", isolation=isolation.GROUP)
    outcome, _ = execute(attempt)
    assert outcome.status == RunStatus.SUCCEEDED and time.monotonic() - started < 20
    wait_until(
        lambda: processes.tagged_processes(attempt.run_id, 1) == [], timeout=10, message="the sleep to die"
    )


def test_output_held_open_by_a_process_that_escaped_the_attempt_does_not_keep_it_running(
    tmp_path: Path,
) -> None:
    """Isolated by group alone, a process that left the group and cleared its environment
    is found by nothing; holding the output pipes, it kept the attempt from ending."""
    script = "echo before; env -i setsid sleep 30.683 & sleep 0.2; printf 'after, a tail s'"
    started = time.monotonic()
    try:
        attempt = make(tmp_path, script, isolation=isolation.GROUP, timeout=10.0, redact=["secret"])
        outcome, text = execute(attempt)
        assert outcome.status == RunStatus.SUCCEEDED and time.monotonic() - started < 10
        # The "s" held back as the possible start of a secret is shown, as at the pipe's end.
        note = "[ondeck] stopped reading output: a process that left the run holds it open"
        assert text == f"before\nafter, a tail s\n{note}\n"
    finally:
        subprocess.run(["pkill", "-f", "sleep 30.683"], check=False)


def test_the_launcher_does_not_start_the_program_once_its_worker_is_gone(tmp_path: Path) -> None:
    """Had the worker died before the launcher tied itself to it, nothing would stop the script."""
    argv = isolation.command(isolation.LAUNCHER, LIMITS, tmp_path)
    argv[1] = "1"  # the worker's pid it expects; its parent is this test, as if re-parented
    marker = tmp_path / "started"
    result = subprocess.run([*argv, "touch", str(marker)], capture_output=True, timeout=10, check=False)
    assert result.returncode == 125 and b"is gone" in result.stderr
    assert not marker.exists()


@pytest.mark.parametrize("ids", [(2**32, 2**32), (2**32 - 1, 0)])
def test_the_launcher_refuses_ids_that_would_keep_or_wrap_to_root(
    tmp_path: Path, ids: tuple[int, int]
) -> None:
    """Cut to 32 bits, 2**32 is uid 0; -1 leaves the ids as they are (root's, capabilities and all)."""
    argv = isolation.command(isolation.LAUNCHER, LIMITS, tmp_path, user=ids)
    result = subprocess.run([*argv, "id", "-u"], capture_output=True, timeout=10, check=False, cwd=tmp_path)
    assert result.returncode == 125 and b"not a user or group id" in result.stderr
    assert result.stdout == b""


def test_the_launcher_hides_the_data_directory_other_workspaces_and_other_processes(
    tmp_path: Path,
) -> None:
    """A script runs as the server's user: without this it could read the master key and
    the database (every secret), other runs' params, and the worker's environment."""
    data = tmp_path / "data"
    (data / "workspaces" / "other-run").mkdir(parents=True)
    (data / "master.key").write_text("the key")
    (data / "workspaces" / "other-run" / "params.json").write_text('{"password": "theirs"}')
    script = """
        cat "$ONDECK_PARAMS"; echo; touch "$ONDECK_OUTPUTS"
        echo "listed: $(ls -A "$DATA" "$DATA/workspaces" | tr '\\n' ' ')"
        cat "$DATA/master.key" ../../../master.key ../../other-run/params.json 2>&1 || true
        touch "$DATA/planted" 2>&1 || true
        echo "processes: $(ls /proc | grep -c '^[0-9]')"
    """
    attempt = make(
        tmp_path,
        script,
        params={"x": 1},
        workspace_root=data / "workspaces",
        isolation=isolation.LAUNCHER,
        hidden=isolation.hidden(data, data / "workspaces"),
        extra_env={"DATA": str(data)},
    )
    assert attempt.hidden == (data,)
    outcome, text = execute(attempt)
    assert outcome.status == RunStatus.SUCCEEDED, text
    assert '{"x": 1}' in text  # its own workspace is there, writable
    assert "the key" not in text and "theirs" not in text and "No such file" in text
    (listed,) = [line for line in text.splitlines() if line.startswith("listed:")]
    assert "other-run" not in listed and "master.key" not in listed and "workspaces" in listed
    assert "Read-only file system" in text and not (data / "planted").exists()
    (count,) = [int(line.split()[-1]) for line in text.splitlines() if line.startswith("processes:")]
    assert count <= 5  # the namespace's first process, bash, its pipeline: not the host's
    assert (data / "master.key").read_text() == "the key"  # hidden, not touched


NOBODY = (65534, 65534)
as_root = pytest.mark.skipif(os.geteuid() != 0, reason="only root can run scripts as another user")


@pytest.fixture
def reachable(tmp_path: Path) -> Iterator[Path]:
    """A directory any user can reach (pytest's are its own user's alone)."""
    with tempfile.TemporaryDirectory(prefix="ondeck-test-") as directory:
        os.chmod(directory, 0o755)
        yield Path(directory)


@as_root
def test_a_script_runs_as_the_script_user_in_a_workspace_of_its_own(reachable: Path, contained: str) -> None:
    script = 'id -u; id -G; cat "$ONDECK_PARAMS"; echo; echo {} > "$ONDECK_OUTPUTS"; touch mine "$TMPDIR/t"'
    attempt = make(reachable, script, params={"x": 1}, isolation=contained, run_as=NOBODY)
    outcome, text = execute(attempt)
    assert outcome.status == RunStatus.SUCCEEDED, text
    assert text.splitlines()[:3] == ["65534", "65534", '{"x": 1}']


@as_root
def test_a_script_user_cannot_take_another_users_file_as_its_outputs(reachable: Path, contained: str) -> None:
    """A hard link to a file it may write but not own (where the system lets it link
    one at all) is not the script's own outputs file."""
    theirs = reachable / "theirs.json"
    theirs.write_text('{"owner": "root"}')
    theirs.chmod(0o666)  # protected_hardlinks lets anyone link a file they may read and write
    script = f'ln {theirs} "$ONDECK_OUTPUTS"'
    outcome, text = execute(make(reachable, script, isolation=contained, run_as=NOBODY))
    assert (outcome.status, outcome.outputs) == (RunStatus.FAILED, None), text
    assert outcome.error == "outputs file is not the script user's (a link to another user's file?)"
    script = 'echo \'{"owner": "nobody"}\' > "$ONDECK_OUTPUTS"'
    outcome, text = execute(make(reachable, script, isolation=contained, run_as=NOBODY))
    assert (outcome.status, outcome.outputs) == (RunStatus.SUCCEEDED, {"owner": "nobody"}), text


@as_root
def test_removing_a_workspace_as_root_changes_no_modes(tmp_path: Path) -> None:
    """Root deletes whatever the modes; changing them, by path, is what a process
    outliving its attempt could turn on files elsewhere (see ``Workspace.remove``). A
    file root cannot delete either (immutable) is left, and its directory as it was."""
    workspace = Workspace.create(tmp_path / "ws", "r1", 1)
    kept = workspace.work / "kept"
    kept.mkdir()
    (kept / "immutable").touch()
    if subprocess.run(["chattr", "+i", str(kept / "immutable")], check=False).returncode != 0:
        pytest.skip("making a file immutable needs CAP_LINUX_IMMUTABLE and a filesystem that can")
    kept.chmod(0o500)
    try:
        workspace.remove()
        assert kept.stat().st_mode & 0o777 == 0o500
        assert [path.name for path in workspace.root.rglob("*")] == ["work", "kept", "immutable"]
    finally:
        subprocess.run(["chattr", "-i", str(kept / "immutable")], check=True)
    workspace.remove()
    assert not workspace.root.exists()


@as_root
@pytest.mark.parametrize("owner", [None, NOBODY], ids=["root's", "the script user's"])
def test_root_without_the_capability_to_override_modes_still_removes_read_only_workspaces(
    reachable: Path, owner: tuple[int, int] | None
) -> None:
    """Root in a container that dropped CAP_DAC_OVERRIDE is held to modes as anyone is,
    and a directory the script user made read-only is not root's to make writable."""
    workspace = Workspace.create(reachable / "ws", "r1", 1)
    read_only = workspace.work / "read-only"
    read_only.mkdir()
    (read_only / "file").touch()
    if owner is not None:
        workspace.give_to(*owner)
        for path in (read_only, read_only / "file"):
            os.chown(path, *owner)
    read_only.chmod(0o500)
    remove = (
        "import sys; from pathlib import Path; from ondeck.runner import workspace; "
        "assert not workspace._overrides_modes(); workspace.Workspace(Path(sys.argv[1])).remove()"
    )
    drop = ["setpriv", "--bounding-set=-dac_override", "--inh-caps=-dac_override", "--"]
    if subprocess.run([*drop, "true"], check=False, timeout=30).returncode != 0:
        pytest.skip("dropping a capability needs CAP_SETPCAP")
    subprocess.run([*drop, sys.executable, "-c", remove, str(workspace.root)], check=True, timeout=30)
    assert not workspace.root.exists()


@as_root
def test_whether_python_automations_can_start_as_the_script_user_is_found_out(
    reachable: Path, contained: str
) -> None:
    """Installed where that user cannot read (a Python or virtualenv in root's home, say),
    every python run would fail; the worker warns at start instead (see Worker)."""
    python = "/usr/bin/python3"  # the system's, which anyone may run
    entry = reachable / "entry.py"
    entry.write_text("")
    assert process.python_unusable(contained, NOBODY, python, entry) is None
    private = reachable / "private"
    private.mkdir(mode=0o700)
    (private / "entry.py").write_text("")
    problem = process.python_unusable(contained, NOBODY, python, private / "entry.py")
    assert problem is not None and "Permission denied" in problem


@as_root
def test_a_script_user_cannot_undo_the_hiding(reachable: Path) -> None:
    """Root keeps the capabilities to unmount what covers the data directory; another user has none."""
    data = reachable / "data"
    (data / "workspaces").mkdir(parents=True)
    (data / "master.key").write_text("the key")
    script = (
        'umount -l "$DATA" 2>&1 || true; umount -l /proc 2>&1 || true; cat "$DATA/master.key" 2>&1 || true'
    )
    attempt = make(
        reachable,
        script,
        workspace_root=data / "workspaces",
        isolation=isolation.LAUNCHER,
        hidden=(data,),
        run_as=NOBODY,
        extra_env={"DATA": str(data)},
    )
    outcome, text = execute(attempt)
    assert outcome.status == RunStatus.SUCCEEDED, text
    assert "the key" not in text and "No such file" in text
    assert [line.split(":")[0] for line in text.splitlines()] == ["umount", "umount", "cat"]  # all refused


def test_the_script_user_must_exist_and_needs_root(monkeypatch: pytest.MonkeyPatch) -> None:
    assert isolation.script_user(str(os.geteuid())) == (os.geteuid(), os.getegid())
    for wrapping in (2**32 - 1, 2**32):
        with pytest.raises(ValueError, match="not a valid user id"):
            isolation.script_user(str(wrapping))
    with pytest.raises(ValueError, match="does not exist"):
        isolation.script_user("no-such-user-here")
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(ValueError, match="needs ondeck to run as root"):
        isolation.script_user("nobody")


def test_directories_holding_what_scripts_start_with_or_shared_are_not_hidden(tmp_path: Path) -> None:
    venv = Path(sys.prefix)
    assert isolation.hidden(venv.parent, tmp_path / "a", tmp_path / "a" / "b", tmp_path) == (tmp_path,)
    assert isolation.hidden(Path("/tmp"), Path("/dev/shm"), tmp_path) == (tmp_path,)


def test_a_workspace_outside_the_hidden_directories_stays_as_it_is(tmp_path: Path) -> None:
    """Workspaces on a shared directory (/dev/shm, say): the data directory is hidden alone."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "master.key").write_text("the key")
    attempt = make(
        tmp_path,
        'cat "$DATA/master.key" 2>&1 || true; cat "$ONDECK_PARAMS"',
        params={"x": 1},
        isolation=isolation.LAUNCHER,
        hidden=(data,),
        extra_env={"DATA": str(data)},
    )
    outcome, text = execute(attempt)
    assert outcome.status == RunStatus.SUCCEEDED and "the key" not in text and '{"x": 1}' in text


def test_bash_stops_at_the_first_failure(tmp_path: Path) -> None:
    outcome, text = execute(make(tmp_path, "false | true; echo unreachable"))
    assert outcome.status == RunStatus.FAILED and "unreachable" not in text


def test_timeout_kills_the_whole_group(tmp_path: Path, contained: str) -> None:
    attempt = make(
        tmp_path,
        "sleep 300.321 & (sleep 301.321; echo) & setsid sleep 302.321 & sleep 1000",
        timeout=1.0,
        isolation=contained,
    )
    started = time.monotonic()
    outcome, _ = execute(attempt)
    assert outcome.status == RunStatus.TIMED_OUT and "timed out after 1s" in (outcome.error or "")
    assert time.monotonic() - started < 10
    assert processes.tagged_processes(attempt.run_id, 1) == []


def test_term_ignoring_script_is_killed_after_grace(tmp_path: Path, contained: str) -> None:
    attempt = make(
        tmp_path, "trap '' TERM; echo ready; sleep 1000", timeout=0.5, kill_grace=0.5, isolation=contained
    )
    outcome, _ = execute(attempt)
    assert outcome.status == RunStatus.TIMED_OUT and outcome.exit_code == -9
    assert processes.tagged_processes(attempt.run_id, 1) == []


def test_cancel_stops_the_attempt(tmp_path: Path, contained: str) -> None:
    attempt = make(tmp_path, "sleep 1000", isolation=contained)
    outcome, _ = execute(attempt, cancel_after=0.3)
    assert outcome.status == RunStatus.CANCELLED
    assert processes.tagged_processes(attempt.run_id, 1) == []


def test_background_children_do_not_outlive_a_finished_run(tmp_path: Path, contained: str) -> None:
    attempt = make(tmp_path, "sleep 303.321 & echo done", isolation=contained)
    outcome, text = execute(attempt)
    assert outcome.status == RunStatus.SUCCEEDED and "done" in text
    assert processes.tagged_processes(attempt.run_id, 1) == []


def test_output_is_capped_and_pipes_are_drained(tmp_path: Path, contained: str) -> None:
    attempt = make(
        tmp_path,
        "head -c 5000000 /dev/zero | tr '\\0' y; echo; echo finished >&2",
        log_budget=10_000,
        isolation=contained,
    )
    outcome, text = execute(attempt)
    assert outcome.status == RunStatus.SUCCEEDED
    assert "output truncated at 10000 bytes" in text
    assert len(text) < 10_000 + 200


def test_a_consumer_that_falls_behind_blocks_the_program_instead_of_filling_memory(tmp_path: Path) -> None:
    """Under the cap, output waits for the consumer: reading pauses, so the pipe fills."""
    script = (
        "block=$(head -c 65536 /dev/zero | tr '\\0' x); i=0\n"
        'while :; do printf %s "$block"; i=$((i + 1)); echo $i > "$ONDECK_PARAM_OUT"; done'
    )
    written = tmp_path / "written"
    attempt = make(tmp_path, script, log_budget=1 << 30, params={"out": str(written)})

    async def go() -> tuple[int, Outcome]:
        cancel = asyncio.Event()
        events = run_attempt(attempt, cancel)
        await anext(events)  # Started
        first = await anext(events)  # output is being read now
        # Take nothing for a while: the count of 64 KiB blocks written must stop growing.
        last, steady_since = -1, time.monotonic()
        deadline = time.monotonic() + 30
        while time.monotonic() - steady_since < 1.0:
            assert time.monotonic() < deadline, "the program never blocked on its output"
            text = written.read_text().strip() if written.exists() else ""
            count = int(text) if text.isdigit() else 0
            if count != last:
                last, steady_since = count, time.monotonic()
            await asyncio.sleep(0.05)
        cancel.set()
        outcome = None
        async for event in events:
            if isinstance(event, Finished):
                outcome = event.outcome
        assert isinstance(first, Output) and outcome is not None
        return last, outcome

    blocks, outcome = asyncio.run(go())
    assert 0 < blocks < 200  # 64 chunks waiting plus the pipe's buffer; unbounded without the pause
    assert outcome.status == RunStatus.CANCELLED


def test_without_pidfds_a_thread_learns_of_the_exit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refused(_pid: int) -> int:
        raise OSError(38, "Function not implemented")  # ENOSYS: a kernel before 5.3

    monkeypatch.setattr(os, "pidfd_open", refused)
    outcome, text = execute(make(tmp_path, "echo hi; exit 3"))
    assert (outcome.status, outcome.exit_code, text) == (RunStatus.FAILED, 3, "hi\n")


def test_an_exit_status_taken_by_someone_else_still_ends_the_attempt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    waitpid = os.waitpid

    def reaped_elsewhere(pid: int, options: int) -> tuple[int, int]:
        waitpid(pid, options)
        raise ChildProcessError(10, "No child processes")

    monkeypatch.setattr(os, "waitpid", reaped_elsewhere)
    outcome, _ = execute(make(tmp_path, "exit 0"))
    assert (outcome.status, outcome.exit_code) == (RunStatus.FAILED, 255)  # as asyncio reports it


def test_a_consumer_that_leaves_at_the_start_leaves_no_process_and_no_open_pipe(tmp_path: Path) -> None:
    attempt = make(tmp_path, "sleep 301.234")

    async def go() -> None:
        events = run_attempt(attempt, asyncio.Event())
        await anext(events)  # Started
        await events.aclose()

    before = len(os.listdir("/proc/self/fd"))
    asyncio.run(go())
    assert len(os.listdir("/proc/self/fd")) == before
    assert processes.tagged_processes(attempt.run_id, 1) == []
    assert list((tmp_path / "ws").iterdir()) == []


def test_a_failure_while_reading_output_closes_that_stream_and_the_attempt_still_ends(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    text = process._Stream.text

    def fails_at_the_end(self: process._Stream, data: bytes, last: bool) -> str:
        if last:  # after the stream was closed at its end
            raise RuntimeError("a bug in the decoder")
        return text(self, data, last)

    monkeypatch.setattr(process._Stream, "text", fails_at_the_end)
    outcome, output = execute(make(tmp_path, "echo hi"))
    assert (outcome.status, output) == (RunStatus.SUCCEEDED, "hi\n")
    failures = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert sorted(failures) == ["reading the program's stderr failed", "reading the program's stdout failed"]


def test_both_streams_are_captured_and_labelled(tmp_path: Path) -> None:
    async def go() -> dict[str, str]:
        streams: dict[str, str] = {}
        async for event in run_attempt(make(tmp_path, "echo out; echo err >&2"), asyncio.Event()):
            if isinstance(event, Output):
                streams[event.chunk.stream] = streams.get(event.chunk.stream, "") + event.chunk.text
        return streams

    assert asyncio.run(go()) == {"stdout": "out\n", "stderr": "err\n"}


def test_memory_limit_applies(tmp_path: Path, contained: str) -> None:
    limits = ResourceLimits(memory_bytes=200 << 20, cpu_seconds=60, processes=4096, file_size_bytes=1 << 30)
    script = "python3 -c 'x = bytearray(500 * 1024 * 1024)'"
    outcome, text = execute(make(tmp_path, script, limits=limits, isolation=contained))
    assert outcome.status == RunStatus.FAILED and "MemoryError" in text


def test_file_size_limit_applies(tmp_path: Path, contained: str) -> None:
    limits = ResourceLimits(memory_bytes=2 << 30, cpu_seconds=60, processes=4096, file_size_bytes=1 << 20)
    script = "head -c 5000000 /dev/zero > big"
    outcome, _ = execute(make(tmp_path, script, limits=limits, isolation=contained))
    assert outcome.status == RunStatus.FAILED


def test_every_limit_is_set_for_the_script_and_its_children(tmp_path: Path, contained: str) -> None:
    limits = ResourceLimits(memory_bytes=3 << 30, cpu_seconds=77, processes=333, file_size_bytes=5 << 20)
    script = "bash -c 'ulimit -v; ulimit -t; ulimit -u; ulimit -f; ulimit -c'"
    outcome, text = execute(make(tmp_path, script, limits=limits, isolation=contained))
    assert outcome.status == RunStatus.SUCCEEDED
    # bash's ulimit reports -v and -f in kibibytes.
    assert text.split() == [str(3 << 20), "77", "333", str(5 << 10), "0"]


@pytest.mark.parametrize(("mode", "pid"), [(isolation.LAUNCHER, 2), (isolation.NAMESPACE, 1)])
def test_the_script_runs_in_a_namespace_of_its_own_and_its_exit_passes_through(
    tmp_path: Path, mode: str, pid: int
) -> None:
    """Through the launcher, under the namespace's first process: PID 1 ignores SIGTERM."""
    outcome, text = execute(make(tmp_path, 'echo "pid $$"; exit 3', isolation=mode))
    assert text == f"pid {pid}\n"
    assert (outcome.status, outcome.exit_code) == (RunStatus.FAILED, 3)


@pytest.mark.parametrize("mode", [isolation.LAUNCHER, isolation.GROUP])
def test_a_timeout_stops_a_script_with_sigterm_not_after_the_grace_period(tmp_path: Path, mode: str) -> None:
    """As PID 1 of its namespace, a script without a handler never got the SIGTERM: every
    timeout and cancel waited out the grace period for the SIGKILL."""
    attempt = make(tmp_path, "sleep 1000", timeout=0.5, kill_grace=60.0, isolation=mode)
    started = time.monotonic()
    outcome, _ = execute(attempt)
    assert (outcome.status, outcome.exit_code) == (RunStatus.TIMED_OUT, -15)
    assert time.monotonic() - started < 30


def test_python_main_receives_params_and_returns_outputs(tmp_path: Path) -> None:
    script = (
        "def main(name: str, times: int = 2):\n    print('hi', name)\n    return {'echo': name * times}\n"
    )
    attempt = make(tmp_path, script, runtime="python", entrypoint="main", params={"name": "ab", "times": 3})
    outcome, text = execute(attempt)
    assert outcome.status == RunStatus.SUCCEEDED and outcome.outputs == {"echo": "ababab"}
    assert "hi ab" in text


def test_python_main_non_dict_return_is_wrapped(tmp_path: Path) -> None:
    attempt = make(tmp_path, "def main():\n    return [1, 2]\n", runtime="python", entrypoint="main")
    assert execute(attempt)[0].outputs == {"result": [1, 2]}


def test_python_exception_fails_with_traceback_in_log(tmp_path: Path) -> None:
    attempt = make(
        tmp_path, "def main():\n    raise RuntimeError('nope')\n", runtime="python", entrypoint="main"
    )
    outcome, text = execute(attempt)
    assert outcome.status == RunStatus.FAILED and "RuntimeError: nope" in text


def test_exec_runtime_passes_args_without_a_shell(tmp_path: Path) -> None:
    outcome, text = execute(make(tmp_path, None, runtime="exec", args=["printf", "%s|", "a b", "$(id)"]))
    assert outcome.status == RunStatus.SUCCEEDED and text == "a b|$(id)|"


def test_missing_program_fails_cleanly(tmp_path: Path) -> None:
    outcome, _ = execute(make(tmp_path, None, runtime="exec", args=["/nonexistent/tool"]))
    assert outcome.status == RunStatus.FAILED


def test_a_secret_cut_by_the_output_cap_shows_none_of_its_characters(tmp_path: Path) -> None:
    secret = "SuperSecretTokenXYZ987"
    attempt = make(
        tmp_path,
        'head -c 1010 /dev/zero | tr "\\0" x; printf %s "$TOKEN"; echo; echo "$TOKEN"',
        log_budget=1024,
        extra_env={"TOKEN": secret},
        redact=(secret,),
    )
    outcome, text = execute(attempt)
    assert outcome.status == RunStatus.SUCCEEDED
    assert "output truncated at 1024 bytes" in text
    assert "Super" not in text and text.startswith("x" * 1010)


def test_outputs_holding_a_numeric_secret_are_masked(tmp_path: Path) -> None:
    attempt = make(
        tmp_path,
        'printf \'{"pin": %s, "text": "%s", "other": 12}\' "$PIN" "$PIN" > "$ONDECK_OUTPUTS"',
        extra_env={"PIN": "4711"},
        redact=("4711",),
    )
    outcome, _ = execute(attempt)
    assert outcome.outputs == {"pin": "***", "text": "***", "other": 12}
