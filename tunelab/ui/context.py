"""What every UI route needs: the access rules, where runs go, the serving service (for the playground and the
Serve page), and the tenant of the request (or a redirect to the login page)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import HTTPException, Request

from tunelab.server.auth import Tenant
from tunelab.ui.access import COOKIE, Access
from tunelab.ui.shell import BASE


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
