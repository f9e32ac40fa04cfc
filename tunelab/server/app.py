"""The HTTP routes (FastAPI): a thin layer over ServeService, which is built once and kept on the app."""

from __future__ import annotations

from contextlib import asynccontextmanager

from fastapi import FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from tunelab.server import schemas as S
from tunelab.server.service import ApiError, ServeService


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
        return ok("/v1/chat/completions", await service.chat(service.tenant(authorization), body))

    @app.post("/v1/completions")
    async def completions(body: S.CompletionRequest, authorization: str | None = Header(None)):
        return ok("/v1/completions", await service.complete(service.tenant(authorization), body))

    @app.get("/v1/models")
    async def models(authorization: str | None = Header(None)):
        return ok("/v1/models", service.models(service.tenant(authorization)))

    @app.post("/v1/load_lora_adapter")
    def load(body: S.LoadAdapterRequest, authorization: str | None = Header(None)):  # sync: runs in a worker
        return PlainTextResponse(service.load(service.tenant(authorization), body))

    @app.post("/v1/unload_lora_adapter")
    def unload(body: S.UnloadAdapterRequest, authorization: str | None = Header(None)):
        return PlainTextResponse(service.unload(service.tenant(authorization), body))

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": service.base_name, "queue_depth": service.scheduler.depth()}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(service.metrics.text(), media_type="text/plain; version=0.0.4")

    return app


def serve(model: str, adapters: str | None = None, keys: str | None = None, host: str = "127.0.0.1",
          port: int = 8000, capacity: int = 8, pin: list[str] = (), dtype: str = "auto", device: str = "auto",
          max_waiting: int = 256, merged: str | None = None, indexes: dict | None = None,
          load_in: str | None = None) -> None:
    """Load the model once and serve it (uvicorn) until interrupted; see `tunelab serve --help`."""
    import uvicorn

    from tunelab.infer import load_engine
    from tunelab.server.tenants import Keys

    engine = load_engine(model, dtype=dtype, device=device, merge=merged, load_in=load_in)
    service = ServeService(engine, model, adapters, Keys.load(keys), capacity, list(pin), max_waiting,
                           indexes=indexes)
    uvicorn.run(build_app(service), host=host, port=port, log_level="info")

