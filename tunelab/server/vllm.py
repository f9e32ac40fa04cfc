"""`tunelab serve --engine vllm`: the same base and adapters on vLLM, with tunelab's tenant keys in front.

A team that outgrows one machine runs vLLM. This module exports every adapter under `--adapters` for vLLM
(`tunelab export --format vllm`: its rank and module limits checked), builds the `vllm serve` command for the
base and those adapters, and runs a thin OpenAI-compatible proxy that applies keys.yaml (401 for an unknown
key, 404 for another tenant's adapter, /v1/models filtered per tenant) and forwards everything else to vLLM
byte for byte, streams included. The proxy is written here because vLLM has only one global `--api-key`.
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI, Header, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

import tunelab.server.schemas as S
from tunelab.errors import TunelabError
from tunelab.runs.adapter_folder import AdapterRoot
from tunelab.server.auth import OPEN, Keys, Tenant

FORWARDED = ("/v1/chat/completions", "/v1/completions")


@dataclass
class VllmPlan:
    base: str  # what vLLM loads: an HF model folder or hub id
    name: str  # the model name clients send for the base (vLLM's --served-model-name)
    adapters: dict[str, str] = field(default_factory=dict)  # name -> exported folder
    max_lora_rank: int = 16
    upstream_port: int = 8001

    @property
    def argv(self) -> list[str]:
        cmd = ["vllm", "serve", self.base, "--served-model-name", self.name, "--host", "127.0.0.1",
               "--port", str(self.upstream_port)]
        if self.adapters:
            cmd += ["--enable-lora", "--max-lora-rank", str(self.max_lora_rank), "--max-loras",
                    str(min(len(self.adapters), 8)), "--lora-modules",
                    *(f"{n}={p}" for n, p in sorted(self.adapters.items()))]
        return cmd

    @property
    def command(self) -> str:
        return shlex.join(self.argv)

    def proxy_command(self, port: int, keys: str | None = None) -> str:
        """The `tunelab serve` command that puts the key proxy on `port` in front of this vLLM server."""
        front = f"tunelab serve --engine vllm --model {shlex.quote(self.name)} --upstream " \
                f"http://127.0.0.1:{self.upstream_port} --port {port}"
        return front + (f" --keys {shlex.quote(str(keys))}" if keys else "")


def plan_vllm(model: str, adapters: str | Path | None, out: str | Path, upstream_port: int = 8001) -> VllmPlan:
    """Export each adapter folder under `adapters` for vLLM into `out/NAME` (refused with the reason when vLLM
    cannot serve it) and return the `vllm serve` plan for the base and all of them."""
    from tunelab.export import export
    from tunelab.export.adapter import VLLM_MAX_LORA_RANKS
    from tunelab.models import local_dir, resolve

    base = str(local_dir(resolve(model)))  # vLLM loads HF folders: a GGUF (the bundled model) converted once
    plan = VllmPlan(base=base, name=model, upstream_port=upstream_port)
    if adapters is None:
        return plan
    scan, out = AdapterRoot(adapters).scan(), Path(out)
    if scan.refused:  # an adapter that cannot be served is named, not skipped
        raise TunelabError("; ".join(f"--adapters {scan.root}: {n}: {why}" for n, why in scan.refused.items()))
    if not scan.found:
        raise TunelabError(f"--adapters {adapters}: no adapter folders (subfolders with adapter_config.json) there.")
    ranks = []
    for name, folder in scan.found.items():
        dest = out / name
        if dest.exists():
            shutil.rmtree(dest)  # a re-export replaces the last one (the export itself writes atomically)
        res = export(str(folder), dest, "vllm", model=model, max_lora_rank=512)
        ranks.append(int(res.info["rank"]))
        plan.adapters[name] = str(dest.resolve())
    plan.max_lora_rank = next(r for r in VLLM_MAX_LORA_RANKS if r >= max(ranks))
    return plan


def build_proxy(upstream: str, keys: Keys | None, base_name: str):
    """The key-checking proxy (FastAPI) in front of an OpenAI-compatible `upstream` (vLLM's URL)."""
    import httpx2 as httpx

    client = httpx.AsyncClient(base_url=upstream.rstrip("/"), timeout=None)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        await client.aclose()  # the upstream connections close with the proxy

    app = FastAPI(title="tunelab proxy", lifespan=lifespan)

    def error(status: int, message: str, code: str, param: str | None = None) -> JSONResponse:
        return JSONResponse(S.error_body(message, "invalid_request_error", param, code), status_code=status)

    def tenant(authorization: str | None) -> Tenant | None:
        return OPEN if keys is None else keys.tenant(authorization)

    def allowed(t: Tenant, model: str) -> bool:
        return model == base_name or t.may_use(model)

    async def forward(request: Request, path: str, authorization: str | None):
        t = tenant(authorization)
        if t is None:
            return error(401, "Incorrect API key provided.", "invalid_api_key")
        raw = await request.body()
        try:
            body = json.loads(raw)
        except ValueError:
            return error(400, "the request body is not valid JSON.", "invalid_json")
        model = body.get("model") if isinstance(body, dict) else None
        if not isinstance(model, str) or not allowed(t, model):  # another tenant's adapter looks like a missing one
            return error(404, f"The model `{model}` does not exist or you do not have access to it.",
                         "model_not_found", "model")
        req = client.build_request("POST", path, content=raw, headers={"Content-Type": "application/json"})
        resp = await client.send(req, stream=True)
        headers = {k: v for k, v in resp.headers.items() if k.lower() in ("content-type", "retry-after")}
        if body.get("stream"):
            async def relay():
                try:
                    async for chunk in resp.aiter_raw():
                        yield chunk
                finally:
                    await resp.aclose()  # a client that hangs up closes the upstream stream too
            return StreamingResponse(relay(), status_code=resp.status_code, headers=headers)
        content = await resp.aread()
        await resp.aclose()
        return Response(content, status_code=resp.status_code, headers=headers)

    for path in FORWARDED:
        async def route(request: Request, authorization: str | None = Header(None), _path: str = path):
            return await forward(request, _path, authorization)
        app.post(path)(route)

    @app.get("/v1/models")
    async def models(authorization: str | None = Header(None)):
        t = tenant(authorization)
        if t is None:
            return error(401, "Incorrect API key provided.", "invalid_api_key")
        data = (await client.get("/v1/models")).json()
        data["data"] = [m for m in data.get("data", []) if allowed(t, m.get("id", ""))]
        return data

    @app.get("/health")
    async def health():
        r = await client.get("/health")
        return Response(r.content, status_code=r.status_code)

    return app


def run_vllm(plan: VllmPlan, keys: str | None, host: str, port: int) -> None:
    """Start `vllm serve` for `plan` (it must be installed), wait for it, then run the key proxy on `port`
    until interrupted (the caller shows `plan.command` and `plan.proxy_command` first)."""
    exe = shutil.which("vllm")
    if exe is None:
        raise TunelabError("--run: `vllm` is not on PATH. vLLM pins other torch/transformers versions: install it "
                           "in its own venv (README: Serving), activate it, and run the command printed above.")
    proc = subprocess.Popen([exe, *plan.argv[1:]], stdout=sys.stderr)
    try:
        _wait_healthy(f"http://127.0.0.1:{plan.upstream_port}", proc)
        run_proxy(f"http://127.0.0.1:{plan.upstream_port}", keys, plan.name, host, port)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _wait_healthy(url: str, proc, timeout: float = 900) -> None:
    import httpx2 as httpx

    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise TunelabError(f"vllm serve exited with code {proc.returncode} before it was ready (output above).")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise TunelabError(f"vllm serve was not ready at {url} after {timeout:.0f} s.")


def run_proxy(upstream: str, keys: str | None, model: str, host: str, port: int) -> None:
    """The key proxy (`build_proxy`) in front of the vLLM server at `upstream`, on `host:port`, until interrupted."""
    import uvicorn

    uvicorn.run(build_proxy(upstream, Keys.load(keys), model), host=host, port=port, log_level="info")
