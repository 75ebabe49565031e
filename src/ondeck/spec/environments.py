"""Environments: where a run acts (dev, prod…), with their secrets scope and protection rules.

Defined in ``environments.yaml`` beside the automations, or through the API.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ondeck.errors import InvalidDefinition
from ondeck.spec.loader import errors_from_validation, load_yaml
from ondeck.spec.models import NAME_PATTERN, Period

FILE_NAME = "environments.yaml"


class Protection(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    approvers: list[str] = Field(min_length=1, description="Roles or token names.")
    required: int = Field(1, ge=1, le=10)
    allow_self_approval: bool = False
    timeout: Period = 3600.0


class Environment(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=NAME_PATTERN)
    description: str = ""
    allowed_roles: list[str] | None = Field(None, description="Roles that may run here; None = any.")
    protection: Protection | None = None


def parse_environment(data: Any, file: str = "<request>") -> Environment:
    try:
        return Environment.model_validate(data)
    except ValidationError as exc:
        errors = errors_from_validation(exc, file)
        raise InvalidDefinition("; ".join(map(str, errors)), errors=[e.__dict__ for e in errors]) from exc


def load_environments(directory: Path) -> list[Environment]:
    """Environments from ``directory/environments.yaml`` (none if the file is absent)."""
    path = directory / FILE_NAME
    if not path.is_file():
        return []
    try:
        data = load_yaml(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise InvalidDefinition(f"{path}: invalid YAML: {exc}") from exc
    items = data.get("environments") if isinstance(data, dict) else None
    if not isinstance(items, list):
        raise InvalidDefinition(f"{path}: environments: expected a list of environments")
    return [parse_environment(item, f"{path}: environments[{i}]") for i, item in enumerate(items)]
