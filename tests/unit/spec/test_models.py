from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from ondeck.errors import InvalidDefinition
from ondeck.spec.environments import load_environments
from ondeck.spec.loader import load_directory, load_file, load_yaml, parse_definition
from ondeck.storable import DEPTH_MAX, nesting

HELLO = {"name": "hello", "run": {"runtime": "bash", "script": "echo hi"}}


def test_minimal_definition_gets_safe_defaults() -> None:
    automation = parse_definition(HELLO)
    assert automation.params_schema == {"type": "object", "properties": {}, "additionalProperties": False}
    assert automation.retries.attempts == 1
    assert automation.worker_group == "default"


def test_durations_are_parsed() -> None:
    automation = parse_definition({**HELLO, "timeout": "10m", "retries": {"attempts": 3, "backoff": "2s"}})
    assert automation.timeout == 600
    assert automation.retries.backoff == 2


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"name": "Bad Name"}, "name"),
        ({"run": {"runtime": "ruby", "script": "x"}}, "run.runtime"),
        ({"run": {"runtime": "bash"}}, "run"),
        ({"timeout": "soon"}, "timeout"),
        ({"concurrency": {"key": "${{ params.[ }}"}}, "concurrency.key"),
        ({"params": {"type": "string"}}, "params"),
        ({"unknown_field": 1}, "unknown_field"),
        (
            {"params": {"type": "object", "properties": {"x": {"default": float("nan")}}}},
            "params.properties.x.default",
        ),
    ],
)
def test_errors_name_the_field(change: dict[str, object], field: str) -> None:
    with pytest.raises(InvalidDefinition) as caught:
        parse_definition({**HELLO, **change}, "ops/hello.yaml")
    fields = [e["field"] for e in caught.value.extensions["errors"]]
    assert field in fields
    assert "ops/hello.yaml" in caught.value.detail


HUGE = "99999999999d"


@pytest.mark.parametrize(
    ("change", "field", "problem"),
    [
        ({"retries": {"attempts": 2, "backoff": HUGE}}, "retries.backoff", "at most 365d"),
        ({"retries": {"attempts": 2, "max_backoff": HUGE}}, "retries.max_backoff", "at most 365d"),
        (
            {"circuit_breaker": {"failures": 1, "within": HUGE, "cooldown": "1m"}},
            "circuit_breaker.within",
            "from 1s to 365d",
        ),
        (
            {"circuit_breaker": {"failures": 1, "within": "1m", "cooldown": HUGE}},
            "circuit_breaker.cooldown",
            "at most 365d",
        ),
        ({"approval": {"approvers": ["approver"], "timeout": 1e-305}}, "approval.timeout", "from 1s to 365d"),
        ({"rate_limit": {"limit": 1, "per": 1e-305}}, "rate_limit.per", "from 1s to 1d"),
        ({"rate_limit": {"limit": 1, "per": "2d"}}, "rate_limit.per", "from 1s to 1d"),
        ({"timeout": "9" * 400}, "timeout", "finite"),
        ({"timeout": 10**400}, "timeout", "finite"),
        ({"timeout": 0}, "timeout", "from 1s"),
        ({"limits": {"cpu": 0.5}}, "limits.cpu", "from 1s"),
        ({"limits": {"memory": "9" * 400 + "TiB"}}, "limits.memory", "a size is at most"),
        ({"limits": {"file_size": 1.5}}, "limits.file_size", "a whole number of bytes"),
        ({"timeout": []}, "timeout", "a number of seconds or a string"),
        ({"retries": {"backoff": {}}}, "retries.backoff", "a number of seconds or a string"),
        ({"rate_limit": {"limit": 1, "per": ["1m"]}}, "rate_limit.per", "a number of seconds or a string"),
    ],
)
def test_durations_and_sizes_out_of_bounds_are_refused_naming_the_field(
    change: dict[str, object], field: str, problem: str
) -> None:
    """Else they overflow a date or a window later, in the engine, as 500s or stuck runs."""
    with pytest.raises(InvalidDefinition) as caught:
        parse_definition({**HELLO, **change}, "ops/hello.yaml")
    assert f"ops/hello.yaml: {field}: " in caught.value.detail and problem in caught.value.detail
    assert field in [e["field"] for e in caught.value.extensions["errors"]]


def test_durations_at_their_bounds_are_accepted() -> None:
    automation = parse_definition(
        {
            **HELLO,
            "timeout": "365d",
            "retries": {"attempts": 2, "backoff": 0, "max_backoff": "365d"},
            "rate_limit": {"limit": 1, "per": "1d"},
            "approval": {"approvers": ["approver"], "timeout": "1s"},
        }
    )
    assert automation.timeout == automation.retries.max_backoff == 365 * 86400


def test_a_yaml_nan_is_refused_not_kept_as_null(tmp_path: Path) -> None:
    path = tmp_path / "ratio.yaml"
    path.write_text(
        "name: ratio\nrun: {runtime: bash, script: 'true'}\nparams:\n  type: object\n"
        "  properties: {r: {type: number, maximum: .inf}}\n"
    )
    with pytest.raises(InvalidDefinition, match=r"params\.properties\.r\.maximum: NaN and Infinity"):
        load_file(path)


def test_same_definition_has_same_digest_and_changes_alter_it() -> None:
    assert parse_definition(HELLO).digest() == parse_definition(dict(HELLO)).digest()
    assert parse_definition(HELLO).digest() != parse_definition({**HELLO, "description": "x"}).digest()


def test_python_main_signature_becomes_the_schema() -> None:
    script = (
        "from typing import Literal\n"
        "def main(host: str, port: int = 22, env: Literal['dev', 'prod'] = 'dev', tags: list[str] = [], "
        "dry: bool = False, ratio: float | None = None):\n    return {}\n"
    )
    automation = parse_definition({"name": "py", "run": {"runtime": "python", "script": script}})
    assert automation.run.entrypoint == "main"
    schema = automation.params_schema
    assert schema["required"] == ["host"]
    assert schema["properties"]["port"] == {"type": "integer", "default": 22}
    assert schema["properties"]["env"] == {"enum": ["dev", "prod"], "default": "dev"}
    assert schema["properties"]["tags"] == {"type": "array", "items": {"type": "string"}, "default": []}
    assert schema["properties"]["dry"] == {"type": "boolean", "default": False}
    assert schema["additionalProperties"] is False


@pytest.mark.parametrize(
    ("script", "problem"),
    [("echo \0", "cannot hold a NUL"), ("#" * (128 * 1024), "at most 131071 bytes")],
    ids=["nul", "too-long"],
)
def test_a_bash_script_must_fit_in_one_argument(script: str, problem: str) -> None:
    with pytest.raises(InvalidDefinition) as caught:
        parse_definition({**HELLO, "run": {"runtime": "bash", "script": script}}, "ops/hello.yaml")
    assert problem in caught.value.detail and "run" in caught.value.detail
    parse_definition({**HELLO, "run": {"runtime": "bash", "script": "#" * (128 * 1024 - 1)}})


def test_python_without_main_is_a_plain_script() -> None:
    automation = parse_definition({"name": "py", "run": {"runtime": "python", "script": "print(1)"}})
    assert automation.run.entrypoint == "script"


def test_exec_runtime_needs_args() -> None:
    with pytest.raises(InvalidDefinition, match="args"):
        parse_definition({"name": "x", "run": {"runtime": "exec"}})


def test_file_reference_is_inlined_relative_to_the_yaml(tmp_path: Path) -> None:
    (tmp_path / "scripts").mkdir()
    (tmp_path / "scripts" / "go.sh").write_text("echo from file\n")
    (tmp_path / "a.yaml").write_text("name: a\nrun: {runtime: bash, file: scripts/go.sh}\n")
    assert load_file(tmp_path / "a.yaml").run.script == "echo from file\n"


def test_directory_load_reports_each_broken_file_and_duplicates(tmp_path: Path) -> None:
    (tmp_path / "good.yaml").write_text("name: good\nrun: {runtime: bash, script: 'true'}\n")
    (tmp_path / "bad.yaml").write_text("name: bad\nrun: {runtime: bash}\ntimeout: forever\n")
    (tmp_path / "broken.yml").write_text("name: [unclosed\n")
    (tmp_path / "dupe.yaml").write_text("name: good\nrun: {runtime: bash, script: 'true'}\n")
    automations, problems = load_directory(tmp_path)
    assert [a.name for a in automations] == ["good"]
    text = "\n".join(problems)
    assert "bad.yaml: timeout" in text
    assert "broken.yml" in text and "invalid YAML" in text
    assert "already defined" in text


def _alias_chain(levels: int) -> str:
    """A mapping of lists, each but the first holding the one before it: YAML nested
    ``levels`` deep with no deep text."""
    return "x0: &a0 []\n" + "".join(f"x{i}: &a{i} [*a{i - 1}]\n" for i in range(1, levels - 1))


def test_yaml_nests_as_deep_as_json_input_may_and_no_deeper() -> None:
    def nested(levels: int) -> list[str]:
        flow_maps = "{a: " * levels + "1" + "}" * levels
        block_maps = "".join(f"{'  ' * i}a:\n" for i in range(levels - 1)) + "  " * (levels - 1) + "a: 1\n"
        return ["[" * levels + "]" * levels, flow_maps, block_maps, _alias_chain(levels)]

    for text in nested(DEPTH_MAX):
        assert nesting(load_yaml(text)) == DEPTH_MAX
    for text in nested(DEPTH_MAX + 1):
        with pytest.raises(yaml.YAMLError, match=f"nested more than {DEPTH_MAX} levels"):
            load_yaml(text)
    with pytest.raises(yaml.YAMLError, match=r"\*a is inside what it names"):
        load_yaml("x: &a [1, [*a]]")


def test_yaml_whose_aliases_expand_past_a_million_values_is_refused(tmp_path: Path) -> None:
    """Nine lines of aliases of aliases name a billion values ("billion laughs"): PyYAML
    shares them, but validating, hashing or storing the definition walks every one, so a
    server would hang at start on such a file, and validate with it."""
    laughs = 'l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]\n' + "".join(
        f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 10)}]\n" for i in range(1, 9)
    )
    with pytest.raises(yaml.YAMLError, match="more than 1,000,000 values once its aliases are expanded"):
        load_yaml(laughs)
    fine = "".join(f"x{i}: &x{i} [*x{i - 1}, *x{i - 1}]\n" for i in range(1, 17))
    assert str(load_yaml("x0: &x0 [1]\n" + fine)["x16"]).count("1") == 2**16  # half a million in all
    (tmp_path / "laughs.yaml").write_text("name: laughs\nrun: {runtime: bash, script: 'true'}\n" + laughs)
    automations, problems = load_directory(tmp_path)
    assert automations == [] and "laughs.yaml" in problems[0] and "1,000,000 values" in problems[0]


def test_a_file_nested_10000_levels_deep_is_a_load_error_naming_it(tmp_path: Path) -> None:
    """PyYAML's composer recurses once per level: such a file was a RecursionError (a
    traceback from validate, and a server that did not start), as were an alias chain
    and an alias inside what it names (when validated)."""
    header = "run: {runtime: bash, script: 'true'}\n"
    (tmp_path / "good.yaml").write_text("name: good\n" + header)
    (tmp_path / "lists.yaml").write_text("name: lists\n" + header + "tags: " + "[" * 10_000 + "]" * 10_000)
    (tmp_path / "maps.yaml").write_text(
        "name: maps\n" + header + "params: " + "{a: " * 10_000 + "1" + "}" * 10_000
    )
    (tmp_path / "aliases.yaml").write_text("name: aliases\n" + header + _alias_chain(10_000))
    (tmp_path / "cycle.yaml").write_text("name: cycle\n" + header + "tags: &t [*t]\n")
    (tmp_path / "environments.yaml").write_text("environments: " + "[" * 10_000 + "]" * 10_000)
    automations, problems = load_directory(tmp_path)
    assert [a.name for a in automations] == ["good"]
    assert sorted(p.split(":")[0] for p in problems) == [
        str(tmp_path / name) for name in ("aliases.yaml", "cycle.yaml", "lists.yaml", "maps.yaml")
    ]
    assert all("invalid YAML: " in p and f"nested more than {DEPTH_MAX} levels" in p for p in problems)
    with pytest.raises(
        InvalidDefinition, match=f"environments.yaml: invalid YAML: nested more than {DEPTH_MAX}"
    ):
        load_environments(tmp_path)


def test_bundled_examples_are_valid() -> None:
    from ondeck.settings import BUNDLED_EXAMPLES

    automations, problems = load_directory(BUNDLED_EXAMPLES)
    assert problems == []
    assert {"hello", "disk-report", "always-fails", "slow-count", "deploy"} <= {a.name for a in automations}


def test_a_process_limit_beyond_what_linux_allows_is_refused() -> None:
    """One too large for the launcher's arguments failed every run."""
    parse_definition({**HELLO, "limits": {"processes": 4 * 1024 * 1024}})
    with pytest.raises(InvalidDefinition, match=r"limits\.processes"):
        parse_definition({**HELLO, "limits": {"processes": 2**64}})


@pytest.mark.parametrize(
    ("default", "problem"),
    [
        ("1e400", "not a JSON value"),
        ("b'x'", "not a JSON value"),
        ("{1, 2}", "not a JSON value"),
        ("'a\\x00b'", "NUL"),
    ],
)
def test_a_main_default_json_cannot_hold_is_refused(default: str, problem: str) -> None:
    """It became the schema's default, which the store then could not keep (a 500)."""
    script = f"def main(x={default}):\n    return {{}}\n"
    with pytest.raises(InvalidDefinition, match=problem):
        parse_definition({"name": "py", "run": {"runtime": "python", "script": script}})


@pytest.mark.parametrize(
    "name", ["PATH", "HOME", "TMPDIR", "ONDECK_RUN_ID", "ONDECK_PARAM_ENV", "LD_PRELOAD"]
)
def test_a_secret_named_as_a_variable_ondeck_sets_or_one_that_changes_loading_is_refused(name: str) -> None:
    """Injected over PATH, runs failed to start ("cannot run bash"); over ONDECK_PARAM_ENV,
    it would stand for a param."""
    with pytest.raises(InvalidDefinition, match=rf"x.yaml: secrets: .*{name}: ondeck sets PATH"):
        parse_definition({**HELLO, "secrets": ["API_KEY", name]}, "x.yaml")
    assert parse_definition({**HELLO, "secrets": ["API_KEY", "PATHS", "MY_LD_X"]}).secrets[0] == "API_KEY"


def test_a_key_given_twice_is_refused_naming_both_lines(tmp_path: Path) -> None:
    """PyYAML kept the last: a file with two ``run:`` ran the second, and passed validation."""
    (tmp_path / "dup.yaml").write_text(
        "name: dup\nrun: {runtime: bash, script: echo first}\nrun: {runtime: bash, script: echo second}\n"
    )
    _, problems = load_directory(tmp_path)
    (problem,) = problems
    assert "dup.yaml: invalid YAML: 'run' appears twice (first at line 2)" in problem and "line 3" in problem
    merged = "base: &base {a: 1, b: 2}\nuse: {<<: *base, b: 3}\n"  # a merge's keys may be overridden
    assert load_yaml(merged)["use"] == {"a": 1, "b": 3}
    # Building a merge rewrites the node merged from: one built later held both x's then.
    chained = "a: &a {x: 1}\ndefs: {inner: {b: &b {<<: *a, x: 2}}}\nc: {<<: *b, y: 3}\n"
    assert load_yaml(chained)["c"]["y"] == 3  # loads (what x is, is PyYAML's own doing)
    with pytest.raises(yaml.YAMLError, match="'x' appears twice"):
        load_yaml('x: 1\n"x": 2\n')
    with pytest.raises(yaml.YAMLError, match="'x' appears twice"):
        load_yaml("outer:\n  inner: {x: 1, x: 2}\n")
