"""Load automation files from a directory; errors name the file and the field."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from ondeck.errors import InvalidDefinition
from ondeck.spec.models import Automation
from ondeck.storable import value_problems


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
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
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
