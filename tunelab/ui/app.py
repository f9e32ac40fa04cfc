"""The UI app (FastAPI): its pages' routers under /ui, the login page, the package's own script; `serve_ui` runs
it alone (`tunelab ui`) and `mount_ui` puts it into a server's app (`tunelab serve --ui`)."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI, Form, HTTPException, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from tunelab.errors import TunelabError
from tunelab.runs.html_page import esc
from tunelab.server.auth import Keys
from tunelab.ui import eval_pages, ops_pages, playground, review_pages, runs_pages, train_pages
from tunelab.ui.access import COOKIE, Access, LoginNeeded, UiContext, check_binding, ctx
from tunelab.ui.shell import BASE, button, field, ui_page

STATIC = Path(__file__).parent / "static"
ROUTERS = (runs_pages, train_pages, eval_pages, playground, ops_pages, review_pages)


def _login_page(message: str = "") -> str:
    form = (f'<form class="box" method="post" action="{BASE}/login">'
            + field("API key (from keys.yaml)", "key", kind="password", extra="required autofocus")
            + button("Log in") + "</form>")
    note = f'<p class="why">{esc(message)}</p>' if message else ""
    return ui_page("Log in", "", "not logged in", [note, form], script=False)


def build_ui(context: UiContext) -> FastAPI:
    """The UI as an app of its own, with every route under /ui (mount it at / or include it in another app)."""
    app = FastAPI(title="tunelab ui", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.ui = context
    for module in ROUTERS:
        app.include_router(module.router, prefix=BASE)

    @app.exception_handler(LoginNeeded)
    async def login_needed(request: Request, e: LoginNeeded):
        return HTMLResponse(_login_page(), status_code=401)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        if request.url.path.startswith(f"{BASE}/api/"):
            return JSONResponse({"detail": e.detail}, status_code=e.status_code)
        return HTMLResponse(ui_page(f"Error {e.status_code}", "", "", [f'<p class="why">{esc(e.detail)}</p>']),
                            status_code=e.status_code)

    @app.exception_handler(TunelabError)
    async def bad_input(request: Request, e: TunelabError):
        return HTMLResponse(ui_page("Error", "", "", [f'<p class="why">{esc(e)}</p>']), status_code=400)

    @app.get("/", include_in_schema=False)
    @app.get(BASE, include_in_schema=False)
    @app.get(f"{BASE}/", include_in_schema=False)
    def home():
        return RedirectResponse(f"{BASE}/runs", status_code=307)

    @app.get(f"{BASE}/static/{{name}}", include_in_schema=False)
    def static(name: str):
        path = STATIC / name
        if "/" in name or not path.is_file():
            raise HTTPException(404, "no such file")
        return FileResponse(path, media_type="text/javascript" if name.endswith(".js") else None)

    @app.post(f"{BASE}/login", include_in_schema=False)
    def login(request: Request, key: str = Form(...)):
        token = ctx(request).access.login(key)
        if token is None:
            return HTMLResponse(_login_page("That key is not in keys.yaml."), status_code=401)
        r = RedirectResponse(f"{BASE}/runs", status_code=303)
        r.set_cookie(COOKIE, token, httponly=True, samesite="strict", path="/")
        return r

    @app.post(f"{BASE}/logout", include_in_schema=False)
    def logout(request: Request):
        ctx(request).access.logout(request.cookies.get(COOKIE))
        r = RedirectResponse(f"{BASE}/login", status_code=303)
        r.delete_cookie(COOKIE, path="/")
        return r

    @app.get(f"{BASE}/login", response_class=HTMLResponse, include_in_schema=False)
    def login_form():
        return _login_page()

    return app


def mount_ui(server_app: FastAPI, host: str, runs_root: str | Path = "runs", log_url: str | None = None) -> None:
    """Put the UI at /ui of a `tunelab serve` app: its playground and Serve page use that server's service and
    keys (required off loopback)."""
    service = server_app.state.service
    check_binding(host, service.keys)
    ui = build_ui(UiContext(Access(service.keys), Path(runs_root), service=service, log_url=log_url))
    server_app.mount(BASE, _Prefixed(ui))


class _Prefixed:
    """An ASGI wrapper that gives the mounted UI its full path back (its routes are declared under /ui)."""

    def __init__(self, app: FastAPI):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] in ("http", "websocket"):
            path = scope["path"]  # Starlette versions differ: some strip the mount's prefix, some keep it
            scope = {**scope, "path": path if path.startswith(BASE) else BASE + path, "root_path": ""}
        await self.app(scope, receive, send)


def serve_ui(host: str = "127.0.0.1", port: int = 7860, keys: str | Path | None = None,
             runs_root: str | Path = "runs", model: str | None = None, adapters: str | Path | None = None,
             indexes: dict | None = None, log_url: str | None = None, log_level: str = "warning") -> None:
    """Run the UI alone until interrupted (see `tunelab ui --help`). model/adapters: what the playground serves
    (loaded on its first use); without a keys file only loopback addresses are allowed."""
    import uvicorn

    keyring = Keys.load(keys)
    check_binding(host, keyring)
    make = None
    if model is not None:
        def make():
            from tunelab.runs.adapter_folder import AdapterRoot
            from tunelab.server import ServeService
            from tunelab.server.app import load_serving_engine

            root = AdapterRoot(adapters) if adapters else None
            return ServeService(load_serving_engine(model, root), model, root, keyring, indexes=indexes)
    context = UiContext(Access(keyring), Path(runs_root), make_service=make, log_url=log_url)
    uvicorn.run(build_ui(context), host=host, port=port, log_level=log_level)
