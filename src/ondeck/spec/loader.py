"""Load automation files from a directory; errors name the file and the field."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError
from yaml.events import AliasEvent, CollectionEndEvent, CollectionStartEvent, Event, ScalarEvent

from ondeck.errors import InvalidDefinition
from ondeck.spec.models import Automation
from ondeck.storable import DEPTH_MAX, value_problems

TOO_DEEP = f"nested more than {DEPTH_MAX} levels of mappings and lists deep"
VALUES_MAX = 1_000_000  # a definition holds hundreds
TOO_MANY = f"more than {VALUES_MAX:,} values once its aliases are expanded"
_OPEN = -1  # the height of what an anchor names until it is whole


@dataclass(frozen=True)
class DefinitionError:
    file: str
    field: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}: {self.field}" if self.field else self.file
        return f"{where}: {self.message}"


def errors_from_validation(exc: ValidationError, file: str) -> list[DefinitionError]:
    errors = []
    for error in exc.errors():
        field = ".".join(str(part) for part in error["loc"])
        message = error["msg"].removeprefix("Value error, ")
        errors.append(DefinitionError(file, field, message))
    return errors


def summarize(exc: ValidationError) -> str:
    """The errors as ``field: message; ...``, without the input values (they may be secret)."""
    errors = errors_from_validation(exc, "")
    return "; ".join(f"{e.field}: {e.message}" if e.field else e.message for e in errors)


def load_yaml(text: str) -> Any:
    """``text`` parsed as YAML (safely); a ``yaml.YAMLError`` if it nests mappings and lists
    more than ``DEPTH_MAX`` levels deep, as JSON input may not, or if it holds more than
    ``VALUES_MAX`` values once its aliases are expanded.

    PyYAML builds a value recursively, a few calls per level: 10,000 nested lists ran out
    of Python's stack (a RecursionError, before anything was validated). So the nesting is
    measured first, from the parser's events (which come without recursion), an alias
    counting as deep as what it names: a chain of them nests as deep as the lists they
    form, and one inside what it names would nest without end. An alias also counts as
    many values as what it names: a few lines of aliases of aliases name billions, which
    PyYAML shares but everything that walks the definition afterwards goes through.
    """
    stack: list[_Open] = []  # per mapping or list open
    named: dict[str, tuple[int, int]] = {}  # per anchor: how deep and how many values; _OPEN until whole
    values = 0  # so far, aliases expanded
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(event, CollectionStartEvent):
            if len(stack) == DEPTH_MAX:
                raise _refusal(TOO_DEEP, event)
            if event.anchor is not None:
                named[event.anchor] = (_OPEN, 0)
            stack.append(_Open(event.anchor))
            continue
        if isinstance(event, CollectionEndEvent):
            closed = stack.pop()
            height, count = closed.deepest + 1, closed.values + 1
            if closed.anchor is not None:
                named[closed.anchor] = (height, count)
            values += 1  # its own values were counted as they came
        elif isinstance(event, AliasEvent):
            height, count = named.get(event.anchor or "", (0, 1))
            if height == _OPEN:
                raise _refusal(f"*{event.anchor} is inside what it names: {TOO_DEEP}", event)
            if len(stack) + height > DEPTH_MAX:
                raise _refusal(TOO_DEEP, event)
            values += count
        elif isinstance(event, ScalarEvent):
            height, count = 0, 1
            if event.anchor is not None:
                named[event.anchor] = (height, count)
            values += count
        else:
            continue
        if values > VALUES_MAX:
            raise _refusal(TOO_MANY, event)
        if stack:
            stack[-1].deepest = max(stack[-1].deepest, height)
            stack[-1].values += count
    return yaml.load(text, Loader=_UniqueKeys)  # a SafeLoader


class _UniqueKeys(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a mapping that holds a key twice: it kept the last,
    so a file with two ``run:`` ran the second, and ``validate`` passed it.

    Checked on the composed document, before anything is built: building a merge
    (``<<``) rewrites the nodes it merges from, and what it brings may be overridden."""

    def construct_document(self, node: yaml.Node) -> Any:
        _refuse_repeated_keys(node)
        return super().construct_document(node)


def _refuse_repeated_keys(root: yaml.Node) -> None:
    """Every mapping of the document, once each (an alias is the node it names), without
    recursion; keys compared as scalars (``x`` and ``"x"`` are one key)."""
    pending, seen = [root], set()
    while pending:
        node = pending.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, yaml.SequenceNode):
            pending.extend(node.value)
        elif isinstance(node, yaml.MappingNode):
            first: dict[tuple[str, str], int] = {}
            for key, value in node.value:
                pending.extend((key, value))
                if key.tag == "tag:yaml.org,2002:merge" or not isinstance(key, yaml.ScalarNode):
                    continue
                if (key.tag, key.value) in first:
                    line = first[key.tag, key.value]
                    twice = f"{key.value!r} appears twice (first at line {line + 1})"
                    raise yaml.constructor.ConstructorError(None, None, twice, key.start_mark)
                first[key.tag, key.value] = key.start_mark.line


@dataclass
class _Open:
    """A mapping or list being parsed: its anchor, its deepest child, the values in it."""

    anchor: str | None
    deepest: int = 0
    values: int = 0


def _refusal(problem: str, event: Event) -> yaml.YAMLError:
    mark = event.start_mark
    where = f", at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return yaml.YAMLError(problem + where)


def parse_definition(data: Any, file: str = "<request>") -> Automation:
    """Validate a definition (already parsed from YAML or JSON)."""
    if not isinstance(data, dict):
        raise InvalidDefinition(
            f"{file}: an automation must be a mapping",
            errors=[{"file": file, "field": "", "message": "not a mapping"}],
        )
    unstorable = [
        DefinitionError(file, ".".join(map(str, path)), message) for path, message in value_problems(data)
    ]
    if unstorable:  # the models would keep NaN as null
        raise InvalidDefinition("; ".join(map(str, unstorable)), errors=[e.__dict__ for e in unstorable])
    try:
        return Automation.model_validate(data)
    except ValidationError as exc:
        errors = errors_from_validation(exc, file)
        raise InvalidDefinition("; ".join(map(str, errors)), errors=[e.__dict__ for e in errors]) from exc


def load_file(path: Path) -> Automation:
    """Parse one YAML file; ``run.file`` is read relative to it and inlined."""
    file = str(path)
    try:
        data = load_yaml(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidDefinition(f"{file}: cannot read: {exc}", errors=[]) from exc
    except yaml.YAMLError as exc:
        raise InvalidDefinition(
            f"{file}: invalid YAML: {exc}",
            errors=[{"file": file, "field": "", "message": f"invalid YAML: {exc}"}],
        ) from exc
    if isinstance(data, dict) and isinstance(data.get("run"), dict):
        data = _inline_script_file(data, path)
    return parse_definition(data, file)


def _inline_script_file(data: dict[str, Any], path: Path) -> dict[str, Any]:
    run = dict(data["run"])
    ref = run.get("file")
    if ref is None:
        return data
    if run.get("script") is not None:
        raise InvalidDefinition(
            f"{path}: run.file: give either script or file, not both",
            errors=[{"file": str(path), "field": "run.file", "message": "both script and file"}],
        )
    target = (path.parent / str(ref)).resolve()
    try:
        run["script"] = target.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidDefinition(
            f"{path}: run.file: cannot read {target}: {exc}",
            errors=[{"file": str(path), "field": "run.file", "message": str(exc)}],
        ) from exc
    # The version stores the script text itself, so a run never depends on the file later.
    return {**data, "run": run}


def automation_files(directory: Path) -> list[Path]:
    # environments.yaml beside the automations describes environments, not an automation.
    return sorted(
        p
        for p in directory.rglob("*")
        if p.suffix in (".yaml", ".yml") and p.is_file() and p.name != "environments.yaml"
    )


def load_directory(directory: Path) -> tuple[list[Automation], list[str]]:
    """Every automation under ``directory``, and one message per broken file.

    Duplicate names are errors too: two files must not fight over one name.
    """
    if not directory.is_dir():
        return [], [f"{directory}: not a directory"]
    automations: list[Automation] = []
    problems: list[str] = []
    seen: dict[str, Path] = {}
    for path in automation_files(directory):
        try:
            automation = load_file(path)
        except InvalidDefinition as exc:
            problems.append(exc.detail)
            continue
        if automation.name in seen:
            problems.append(
                f"{path}: name: {automation.name!r} is already defined in {seen[automation.name]}"
            )
            continue
        seen[automation.name] = path
        automations.append(automation)
    return automations, problems
