"""The automation catalog: apply definitions as new versions, look them up."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from weakref import WeakKeyDictionary

from pydantic import ValidationError

from ondeck.auth.policy import may_view, require
from ondeck.auth.principals import Permission, Principal
from ondeck.domain import AutomationVersion, utcnow
from ondeck.errors import Conflict, Forbidden, NotFound, UnloadableDefinition
from ondeck.spec.loader import summarize
from ondeck.spec.models import Access, Automation
from ondeck.store.store import Store

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Applied:
    version: AutomationVersion
    changed: bool


def apply(store: Store, automation: Automation) -> Applied:
    """Store ``automation`` as a new version unless it equals the current one."""
    digest = automation.digest()
    with store.transaction() as tx:
        current = tx.current_automation(automation.name)
        if current is not None and current.digest == digest:
            return Applied(current, changed=False)
        saved = tx.save_automation_version(automation.name, automation.definition(), digest, utcnow())
        return Applied(saved, changed=True)


def get(store: Store, name: str, version: int | None = None) -> AutomationVersion:
    with store.read() as tx:
        found = tx.current_automation(name) if version is None else tx.automation_version(name, version)
    if found is None:
        what = f"automation {name!r}" + (f" version {version}" if version is not None else "")
        raise NotFound(f"{what} does not exist")
    return found


_seen: WeakKeyDictionary[Store, dict[str, AutomationVersion]] = WeakKeyDictionary()


def current(store: Store, name: str) -> AutomationVersion:
    """The current version of ``name`` as this process last read it, without a read when
    it has one. Another process may have applied a newer version since, so a writer that
    relies on it first checks ``Transaction.current_version`` in its own transaction (as
    admission does) and calls ``forget`` when it differs."""
    seen = _seen.setdefault(store, {})
    found = seen.get(name)
    if found is None:
        found = seen[name] = get(store, name)
    return found


def forget(store: Store, name: str) -> None:
    _seen.get(store, {}).pop(name, None)


def still_current(store: Store, version: AutomationVersion) -> bool:
    """Whether ``version`` is still the current one (read now); forgets it if not."""
    with store.read() as tx:
        if tx.current_version(version.name) == version.version:
            return True
    forget(store, version.name)
    return False


def list_current(store: Store) -> list[AutomationVersion]:
    with store.read() as tx:
        return tx.current_automations()


def _access(version: AutomationVersion) -> Access | None:
    raw = version.definition.get("access")
    return Access.model_validate(raw) if raw is not None else None


def visible(store: Store, principal: Principal) -> list[AutomationVersion]:
    """The catalog as ``principal`` may see it."""
    return [v for v in list_current(store) if may_view(principal, _access(v))]


def visible_names(store: Store, principal: Principal) -> set[str] | None:
    """Names ``principal`` may see, or None when it may see everything."""
    if principal.is_admin:
        return None
    versions = list_current(store)
    shown = {v.name for v in versions if may_view(principal, _access(v))}
    return None if len(shown) == len(versions) and principal.can(Permission.READ) else shown


def get_visible(
    store: Store, principal: Principal, name: str, version: int | None = None
) -> AutomationVersion:
    found = get(store, name, version)
    current = found if version is None else get(store, name)
    if not may_view(principal, _access(current)):
        raise Forbidden(f"{principal.describe()} may not see automation {name!r}")
    return found


def apply_as(store: Store, principal: Principal, automation: Automation) -> Applied:
    """``apply`` on behalf of an admin, audited."""
    require(principal, Permission.ADMIN, "change automations")
    check_unique_hooks(store, automation)
    applied = apply(store, automation)
    if applied.changed:
        with store.transaction() as tx:
            tx.append_audit(
                principal.name,
                "automation.put",
                f"automation:{automation.name}",
                {"version": applied.version.version, "digest": applied.version.digest},
                utcnow(),
            )
    return applied


_parsed: dict[str, Automation] = {}
_refused: dict[str, str] = {}


def definition_of(version: AutomationVersion) -> Automation:
    """The stored definition as a model, parsed once per digest (versions never change).

    Raises ``UnloadableDefinition`` for a version this release's spec refuses (it was
    stored under a looser check): every reader of stored versions must survive that.
    """
    found = _parsed.get(version.digest)
    if found is not None:
        return found
    why = _refused.get(version.digest)
    if why is None:
        try:
            found = _parsed[version.digest] = Automation.model_validate(version.definition)
            return found
        except ValidationError as exc:
            why = _refused[version.digest] = summarize(exc)
            log.warning("automation %r version %d no longer loads: %s", version.name, version.version, why)
    raise UnloadableDefinition(
        f"automation {version.name!r} version {version.version} no longer loads: {why}; "
        "apply a corrected definition"
    )


def definitions(store: Store) -> list[Automation]:
    """Current definitions as models, leaving out (and logging once) any that no longer
    load, so one bad version does not stop schedules, webhooks or ChatOps for the rest."""
    loaded = []
    for version in list_current(store):
        try:
            loaded.append(definition_of(version))
        except UnloadableDefinition:
            continue
    return loaded


def webhook_owners(store: Store) -> dict[str, AutomationVersion]:
    """Webhook ids and the current versions that declare them, read from what is stored
    rather than through the spec, so a version that no longer loads keeps its ids."""
    owners = {}
    for version in list_current(store):
        for trigger in version.definition.get("triggers") or []:
            hook = trigger.get("webhook") if isinstance(trigger, dict) else None
            if isinstance(hook, dict) and isinstance(hook.get("id"), str):
                owners[hook["id"]] = version
    return owners


def check_unique_hooks(store: Store, automation: Automation) -> None:
    """Refuse a definition whose webhook id another automation already uses."""
    owners = webhook_owners(store)
    for hook_id in (t.webhook.id for t in automation.triggers if t.webhook is not None):
        owner = owners.get(hook_id)
        if owner is not None and owner.name != automation.name:
            raise Conflict(f"webhook id {hook_id!r} is already used by {owner.name!r}")
