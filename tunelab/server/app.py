"""The HTTP routes (FastAPI): each translates HTTP to one call of a ServeService handler (auth, models, chat)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

import tunelab.server.schemas as S
from tunelab.errors import TunelabError
from tunelab.runs.adapter_folder import AdapterRoot
from tunelab.server.auth import Keys
from tunelab.server.schemas import ApiError
from tunelab.server.service import ServeService

log = logging.getLogger(__name__)


def build_app(service: ServeService) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        service.close()  # the engine thread stops with the server

    app = FastAPI(title="tunelab", version="1", lifespan=lifespan)
    app.state.service = service

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError):
        service.metrics.requests.labels(request.url.path, str(e.status)).inc()
        return JSONResponse(e.body, status_code=e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, e: RequestValidationError):
        err = e.errors()[0]
        param = ".".join(str(x) for x in err["loc"] if x != "body")
        service.metrics.requests.labels(request.url.path, "400").inc()
        return JSONResponse(S.error_body(f"{param}: {err['msg']}", "invalid_request_error", param), status_code=400)

    def ok(path: str, body):
        service.metrics.requests.labels(path, "200").inc()
        if isinstance(body, dict):
            return body
        return StreamingResponse(body, media_type="text/event-stream")

    @app.post("/v1/chat/completions")
    async def chat(body: S.ChatCompletionRequest, authorization: str | None = Header(None)):
        return ok("/v1/chat/completions", await service.chat.chat(service.tenant(authorization), body, authorization))

    @app.post("/v1/completions")
    async def completions(body: S.CompletionRequest, authorization: str | None = Header(None)):
        return ok("/v1/completions", await service.chat.complete(service.tenant(authorization), body, authorization))

    @app.get("/v1/models")
    async def models(authorization: str | None = Header(None)):
        return ok("/v1/models", service.models.list(service.tenant(authorization)))

    @app.post("/v1/load_lora_adapter")
    def load(body: S.LoadAdapterRequest, authorization: str | None = Header(None)):  # sync: runs in a worker
        return PlainTextResponse(service.models.load(service.tenant(authorization), body))

    @app.post("/v1/unload_lora_adapter")
    def unload(body: S.UnloadAdapterRequest, authorization: str | None = Header(None)):
        return PlainTextResponse(service.models.unload(service.tenant(authorization), body))

    @app.get("/admin/rollouts/{alias}")
    def rollout_state(alias: str, authorization: str | None = Header(None)):  # sync: reads the registry
        return ok("/admin/rollouts", service.models.rollout(service.tenant(authorization), alias))

    @app.post("/admin/rollouts/{alias}")
    def rollout_change(alias: str, body: S.RolloutRequest, authorization: str | None = Header(None)):
        return ok("/admin/rollouts", service.models.change_rollout(service.tenant(authorization), alias, body))

    @app.get("/v1/logs")
    def logs(authorization: str | None = Header(None), model: str | None = None, adapter: str | None = None,
             since: float | None = None, until: float | None = None, limit: int = 100, tenant: str | None = None):
        return ok("/v1/logs", service.logs.list(service.tenant(authorization), model=model, adapter=adapter,
                                                since=since, until=until, limit=limit, of_tenant=tenant))

    @app.post("/v1/feedback")
    def feedback(body: S.FeedbackRequest, authorization: str | None = Header(None)):
        return ok("/v1/feedback", service.logs.feedback(service.tenant(authorization), body))

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": service.base_name, "queue_depth": service.scheduler.depth()}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(service.metrics.text(), media_type="text/plain; version=0.0.4")

    return app


def serve_http(service: ServeService, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info",
               while_serving: Callable[[int], object] | None = None,
               mount: Callable[[FastAPI], object] | None = None) -> object:
    """Serve `service` over HTTP (uvicorn, on a thread) while this thread runs the engine loop.

    The engine loop runs here because this is the thread that loaded the model and owns torch's OpenMP pool
    (see tunelab.server.scheduler); build the service with `engine_thread=False`. Runs until interrupted
    (Ctrl-C or SIGTERM: uvicorn stops taking requests, finishes those in flight, then the engine stops), or,
    given `while_serving`, until `while_serving(port)` returns on a thread of its own: its result is returned.
    port 0 picks a free port. mount: called with the app before it serves (`tunelab serve --ui` adds the UI)."""
    import signal

    import uvicorn

    app = build_app(service)
    if mount is not None:
        mount(app)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level))
    result: dict[str, object] = {}

    def http() -> None:
        try:
            server.run()
        except BaseException as e:  # noqa: BLE001 - e.g. SystemExit(1) when the port is taken: reported below
            result["error"] = e
        finally:
            service.scheduler.close()  # the engine loop below returns

    def client() -> None:
        while not server.started and "error" not in result and http_thread.is_alive():
            time.sleep(0.02)
        if server.started:
            try:
                result["value"] = while_serving(server.servers[0].sockets[0].getsockname()[1])
            except BaseException as e:  # noqa: BLE001 - raised again on this thread's caller
                result["client_error"] = e
        server.should_exit = True

    def stop(signum, frame) -> None:
        server.force_exit = server.should_exit  # a second Ctrl-C does not wait for requests in flight
        server.should_exit = True

    http_thread = threading.Thread(target=http, name="tunelab-http", daemon=True)
    main = threading.current_thread() is threading.main_thread()
    old = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)} if main else {}
    try:
        http_thread.start()
        if while_serving is not None:
            threading.Thread(target=client, name="tunelab-client", daemon=True).start()
        service.scheduler.run()
    finally:
        server.should_exit = True
        http_thread.join(timeout=30)
        service.scheduler.close()
        for s, h in old.items():
            signal.signal(s, h)
    if "client_error" in result:
        raise result["client_error"]
    if not server.started:
        raise TunelabError(f"the server could not listen on {host}:{port} (uvicorn's reason is above): "
                           "choose another --port, or stop what uses it.")
    if isinstance(result.get("error"), Exception):  # uvicorn failed after it started: not a clean stop
        raise result["error"]
    return result.get("value")


def load_serving_engine(model: str, root: AdapterRoot | None, dtype: str = "auto", device: str = "auto",
                        merged: str | None = None, load_in: str | None = None):
    """The engine for serving `root`'s adapters: they load later, on demand, so the engine kind is chosen now
    from the folders (a soft prompt or DoRA adapter needs the generate-based engine). Requests come as users
    send them (interactive): on the CPU a request alone runs on llama.cpp (tunelab.infer.routed)."""
    from tunelab.infer import load_engine
    from tunelab.infer.load import kind_for

    kind, why = kind_for(root.scan().found if root else {})
    if why:
        log.warning(why)
    return load_engine(model, dtype=dtype, device=device, merge=merged, load_in=load_in, kind=kind,
                       interactive=True)


def serve(model: str, adapters: AdapterRoot | str | None = None, keys: str | None = None, host: str = "127.0.0.1",
          port: int = 8000, capacity: int = 8, pin: list[str] = (), dtype: str = "auto", device: str = "auto",
          max_waiting: int = 256, merged: str | None = None, indexes: dict | None = None,
          load_in: str | None = None, log: str | None = None, log_retention=None, otlp: str | None = None,
          mount: Callable[[FastAPI], object] | None = None) -> None:
    """Load the model once and serve it (uvicorn) until interrupted; see `tunelab serve --help`.
    adapters: the adapter root (`AdapterRoot(path).scan()` says beforehand what it serves).
    log: the request log's URL (tunelab.ops.requestlog; None: requests.sqlite beside the registry, "off": none),
    kept by `log_retention`; otlp: also send its spans to this OTLP/HTTP endpoint (tunelab.ops.otel)."""
    from tunelab.ops.requestlog import RequestLog

    root = adapters if isinstance(adapters, AdapterRoot) or adapters is None else AdapterRoot(adapters)
    keyring = Keys.load(keys)  # a bad keys file fails before the model loads
    request_log = None if log == "off" else RequestLog.open(log)  # so does an unreachable log store
    sinks = ()
    if otlp:
        from tunelab.ops.otel import OtelSink

        sinks = (OtelSink.otlp(otlp),)
    engine = load_serving_engine(model, root, dtype=dtype, device=device, merged=merged, load_in=load_in)
    service = ServeService(engine, model, root, keyring, capacity, list(pin), max_waiting, indexes=indexes,
                           engine_thread=False, request_log=request_log, log_retention=log_retention,
                           log_sinks=sinks)
    serve_http(service, host, port, mount=mount)
