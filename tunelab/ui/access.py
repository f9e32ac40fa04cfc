"""Who is looking at the UI, and what they may see: open on loopback without keys; with keys.yaml (required on
any other address) a key logs in, admins see everything and a tenant only its own adapters and what was made
from them or they were made from. Also the UI's shared context (UiContext) and the routes' tenant checks."""

from __future__ import annotations

import ipaddress
import secrets
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import HTTPException, Request

from tunelab.errors import TunelabError
from tunelab.runs import list_artifacts, show
from tunelab.server.auth import OPEN, Keys, Tenant
from tunelab.ui.shell import BASE

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


# --- the UI's context and the routes' checks --------------------------------------------------------------
class LoginNeeded(Exception):
    """Raised by `tenant_of` for a page request without a valid key: the app answers with the login page."""


@dataclass
class UiContext:
    """One UI's settings and shared state, built once and kept on the app (`app.state.ui`).

    runs_root: where training runs from the Train page go (a subfolder each). service: the ServeService the
    playground chats through (`tunelab serve --ui` passes its own); make_service: builds one on first use
    (`tunelab ui --model ... --adapters ...`). log_url: the request log the ops pages read."""

    access: Access
    runs_root: Path = Path("runs")
    service: object | None = None
    make_service: Callable[[], object] | None = None
    log_url: str | None = None  # the request log (tunelab.ops.requestlog); None: the file beside the registry
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _log: object | None = None

    def requests(self):
        """The request log (tunelab.ops.requestlog): the serving service's own store when the UI runs inside
        `tunelab serve`, else `log_url` (opened once)."""
        store = getattr(getattr(self.service, "logs", None), "store", None)
        if store is not None:
            return store
        with self._lock:
            if self._log is None:
                from tunelab.ops.requestlog import RequestLog

                self._log = RequestLog.open(self.log_url)
            return self._log

    def serving(self):
        """The serving service, built on first use; None when the UI has none (no --model given)."""
        with self._lock:
            if self.service is None and self.make_service is not None:
                self.service = self.make_service()
            return self.service


def ctx(request: Request) -> UiContext:
    return request.app.state.ui


def tenant_of(request: Request) -> Tenant:
    """The request's tenant. Pages without one raise LoginNeeded (the login form); API calls get a 401."""
    t = ctx(request).access.tenant(request.headers.get("authorization"), request.cookies.get(COOKIE))
    if t is None:
        if request.url.path.startswith(f"{BASE}/api/") or request.headers.get("authorization"):
            raise HTTPException(401, "a valid API key is needed (Authorization: Bearer KEY, or log in)")
        raise LoginNeeded()
    return t


def admin_of(request: Request) -> Tenant:
    """The request's tenant when it is an admin; a 403 otherwise (training and actions are admins' work)."""
    t = tenant_of(request)
    if not t.admin:
        raise HTTPException(403, "this needs an admin key: a tenant sees its own adapters, evals and logs")
    return t


def who(t: Tenant) -> str:
    return f"{t.name}{' (admin)' if t.admin else ''}"
