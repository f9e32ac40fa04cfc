"""The Playground: one prompt sent to the base and to adapters side by side, streaming, through the serving
service's chat (the same code as /v1/chat/completions: tenancy, JSON Schema grammars, retrieval, seeds)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import ValidationError

import tunelab.server.schemas as S
from tunelab.runs.html_page import esc
from tunelab.server.auth import Tenant
from tunelab.ui.access import ctx, tenant_of, who
from tunelab.ui.shell import button, field, missing, ui_page

router = APIRouter()
NO_SERVICE = ("The playground chats through a model the UI serves: start it with `tunelab ui --model MODEL "
              "--adapters DIR` (and `--rag-index NAME=DIR`), or `tunelab serve --ui`.")


def _form(service, t: Tenant) -> str:
    models = [m["id"] for m in service.models.list(t)["data"]]
    boxes = "".join(f'<label><input type="checkbox" name="models" value="{esc(m)}"'
                    f'{" checked" if i < 2 else ""}> {esc(m)}</label> ' for i, m in enumerate(models))
    indexes = [("", "(none)")] + [(n, n) for n in service.chat.indexes]
    return ('<form id="chat-form" class="box" data-keep="playground">'
            f'<fieldset><legend>Models side by side</legend>{boxes}</fieldset>'
            + field("System prompt", "system", "textarea", "")
            + field("Message", "message", "textarea", "", extra="required")
            + '<div class="row">'
            + field("Temperature", "temperature", value="0", kind="number", extra='min=0 max=2 step=0.1')
            + field("Seed", "seed", value="0", kind="number")
            + field("Max tokens", "max_tokens", value="128", kind="number", extra="min=1 max=4096")
            + field("Retrieval index", "rag_index", "select", "", options=indexes)
            + "</div>"
            + field("JSON Schema (optional: the answer is constrained to it)", "schema", "textarea", "")
            + button("Send", extra="id=send") + "</form>"
            '<div id="panes" class="panes" aria-live="polite"></div>')


@router.get("/playground", response_class=HTMLResponse)
def playground_page(request: Request, t: Tenant = Depends(tenant_of)):
    service = ctx(request).serving()
    body = [missing(NO_SERVICE)] if service is None else [_form(service, t)]
    return ui_page("Playground", "playground", who(t), body)


@router.post("/api/chat")
async def chat(request: Request, t: Tenant = Depends(tenant_of)):
    """One chat completion (streamed when asked) for the tenant, as /v1/chat/completions answers it."""
    service = ctx(request).serving()
    if service is None:
        return JSONResponse(S.error_body(NO_SERVICE, "invalid_request_error"), status_code=503)
    try:
        body = S.ChatCompletionRequest.model_validate(await request.json())
    except (ValidationError, ValueError) as e:
        return JSONResponse(S.error_body(f"bad chat request: {e}", "invalid_request_error"), status_code=400)
    try:
        result = await service.chat.chat(t, body)
    except S.ApiError as e:
        return JSONResponse(e.body, status_code=e.status, headers=e.headers)
    if isinstance(result, dict):
        return result
    return StreamingResponse(result, media_type="text/event-stream")
