"""Administration routes: tokens, secrets, environments, audit (admins only)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Body, Query, Response
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, WithJsonSchema

from ondeck.api.deps import INT64_MAX, AdminDep, NodeDep, ReaderDep, StrictRoute, call
from ondeck.auth import tokens
from ondeck.durations import YEAR, parse_duration, within
from ondeck.engine import audit_log, environments, secret_store
from ondeck.errors import InvalidRequest
from ondeck.spec.environments import Environment, parse_environment

router = APIRouter(route_class=StrictRoute)


# At most a year (far beyond, the expiry date overflowed); none means the token never expires.
Lifetime = Annotated[
    float,
    BeforeValidator(parse_duration),
    AfterValidator(within(1, YEAR)),
    WithJsonSchema({"type": "string", "examples": ["30d", "12h"]}),
]


class TokenIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    roles: list[str]
    expires_in: Lifetime | None = Field(
        None, description="Lifetime such as 30d or 12h, from 1s to 365d; none = no expiry."
    )


class TokenOut(BaseModel):
    name: str
    roles: list[str]
    created_by: str
    created_at: datetime
    expires_at: datetime | None
    last_used_at: datetime | None
    revoked_at: datetime | None


class IssuedTokenOut(TokenOut):
    token: str = Field(description="Shown only in this response; store it now.")


def _token_out(record: Any) -> dict[str, Any]:
    return {k: getattr(record, k) for k in TokenOut.model_fields}


@router.post("/tokens", response_model=IssuedTokenOut, status_code=201, tags=["tokens"])
async def create_token(node: NodeDep, principal: AdminDep, body: TokenIn) -> IssuedTokenOut:
    issued = await call(tokens.create, node.store, principal, body.name, body.roles, body.expires_in)
    return IssuedTokenOut(token=issued.token, **_token_out(issued.record))


@router.get("/tokens", response_model=list[TokenOut], tags=["tokens"])
async def list_tokens(node: NodeDep, principal: AdminDep) -> list[TokenOut]:
    return [TokenOut(**_token_out(r)) for r in await call(tokens.listing, node.store)]


@router.delete("/tokens/{name}", status_code=204, tags=["tokens"])
async def revoke_token(node: NodeDep, principal: AdminDep, name: str) -> Response:
    await call(tokens.revoke, node.store, principal, name)
    return Response(status_code=204)


class SecretIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    value: str = Field(description="Write-only: never returned by any endpoint.")
    scope: str = Field("global", description="global, environment:<name> or automation:<name>.")


class SecretOut(BaseModel):
    name: str
    scope: str
    updated_by: str
    created_at: datetime
    updated_at: datetime


@router.put("/secrets/{name}", response_model=SecretOut, tags=["secrets"])
async def put_secret(node: NodeDep, principal: AdminDep, name: str, body: SecretIn) -> SecretOut:
    info = await call(secret_store.put, node.store, node.vault, principal, name, body.scope, body.value)
    return SecretOut(**info.__dict__)


@router.get("/secrets", response_model=list[SecretOut], tags=["secrets"])
async def list_secrets(node: NodeDep, principal: AdminDep) -> list[SecretOut]:
    """Names and metadata only."""
    return [SecretOut(**s.__dict__) for s in await call(secret_store.listing, node.store)]


@router.delete("/secrets/{name}", status_code=204, tags=["secrets"])
async def delete_secret(node: NodeDep, principal: AdminDep, name: str, scope: str = "global") -> Response:
    await call(secret_store.delete, node.store, principal, name, scope)
    return Response(status_code=204)


@router.get("/environments", response_model=list[Environment], tags=["environments"])
async def list_environments(node: NodeDep, principal: ReaderDep) -> list[Environment]:
    return await call(environments.listing, node.store)


@router.get("/environments/{name}", response_model=Environment, tags=["environments"])
async def get_environment(node: NodeDep, principal: ReaderDep, name: str) -> Environment:
    return await call(environments.get, node.store, name)


@router.put("/environments/{name}", response_model=Environment, tags=["environments"])
async def put_environment(
    node: NodeDep, principal: AdminDep, name: str, definition: Annotated[dict[str, Any], Body()]
) -> Environment:
    definition.setdefault("name", name)
    if definition["name"] != name:
        raise InvalidRequest(f"name in the body ({definition['name']!r}) differs from the URL ({name!r})")
    return await call(environments.put, node.store, principal, parse_environment(definition))


class AuditOut(BaseModel):
    id: int
    at: datetime
    actor: str
    action: str
    target: str
    detail: dict[str, Any]
    prev_hash: str
    hash: str


class AuditPage(BaseModel):
    items: list[AuditOut]
    next_cursor: int | None


@router.get("/audit", response_model=AuditPage, tags=["audit"])
async def list_audit(
    node: NodeDep,
    principal: AdminDep,
    action: str | None = None,
    actor: str | None = None,
    target: str | None = None,
    cursor: Annotated[int | None, Query(ge=1, le=INT64_MAX)] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> AuditPage:
    """Newest first. Each entry's hash covers the previous one: see `ondeck audit verify`."""
    items, next_cursor = await call(
        audit_log.page, node.store, action=action, actor=actor, target=target, before=cursor, limit=limit
    )
    return AuditPage(items=[AuditOut(**e.__dict__) for e in items], next_cursor=next_cursor)
