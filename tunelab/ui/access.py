"""Who is looking at the UI, and what they may see: open on loopback without keys; with keys.yaml (required on
any other address) a key logs in, admins see everything and a tenant only its own adapters and what was made
from them or they were made from."""

from __future__ import annotations

import ipaddress
import secrets
import threading
from pathlib import Path

from tunelab.errors import TunelabError
from tunelab.runs import list_artifacts, show
from tunelab.server.auth import OPEN, Keys, Tenant

COOKIE = "tunelab_ui"
OWNED_KINDS = ("adapter", "model", "run")  # the registry rows a tenant's adapter names pick out


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and localhost."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_binding(host: str, keys: Keys | None) -> None:
    """Refuse to serve the UI on a non-loopback address without a keys file."""
    if keys is None and not is_loopback(host):
        raise TunelabError(f"--host {host}: the UI on an address other than loopback needs --keys keys.yaml (an "
                           "admin tenant logs in with its key; see docs/serving.md); or bind 127.0.0.1.")
    if keys is not None and not any(t.admin for t in keys.by_hash.values()):
        raise TunelabError("the UI's keys file has no admin tenant (admin: true): nobody could train or act; "
                           "add one (docs/serving.md).")


class Access:
    """The keys (None: everyone is the one open admin) and the logged-in sessions (token -> tenant)."""

    def __init__(self, keys: Keys | None):
        self.keys = keys
        self._sessions: dict[str, Tenant] = {}
        self._lock = threading.Lock()

    def tenant(self, authorization: str | None, cookie: str | None) -> Tenant | None:
        """The tenant of a request (an `Authorization: Bearer KEY` header or the session cookie); None: log in."""
        if self.keys is None:
            return OPEN
        if authorization:
            return self.keys.tenant(authorization)
        with self._lock:
            return self._sessions.get(cookie or "")

    def login(self, key: str) -> str | None:
        """A new session token for a valid key, else None."""
        tenant = self.keys.tenant(f"Bearer {key}") if self.keys is not None else OPEN
        if tenant is None:
            return None
        token = secrets.token_urlsafe(24)
        with self._lock:
            self._sessions[token] = tenant
        return token

    def logout(self, cookie: str | None) -> None:
        with self._lock:
            self._sessions.pop(cookie or "", None)


def owns(tenant: Tenant, name: str | None, path: str | None) -> bool:
    """Whether an adapter row (its name or its folder's name) is one of the tenant's adapters."""
    return tenant.adapters is None or any(x and x in tenant.adapters for x in (name, Path(path or "").name))


def visible_ids(tenant: Tenant) -> set[int] | None:
    """The registry ids `tenant` may see (None: all): its adapters, everything made from them (evals, merges,
    exports) and everything they were made from (base models, datasets, recipes)."""
    if tenant.adapters is None:
        return None
    seeds = [r["id"] for r in list_artifacts() if r["kind"] in OWNED_KINDS and owns(tenant, r["name"], r["path"])]
    seen, stack = set(seeds), [(i, d) for i in seeds for d in ("made_from", "used_by")]
    while stack:
        aid, direction = stack.pop()
        for n in show(aid)[direction]:
            if n["id"] not in seen:
                seen.add(n["id"])
                stack.append((n["id"], direction))
    return seen


def may_see(tenant: Tenant, aid: int) -> bool:
    ids = visible_ids(tenant)
    return ids is None or aid in ids
