"""Request and response bodies of the OpenAI-compatible API (the fields tunelab serves) and its errors (ApiError)."""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")  # OpenAI clients send fields we do not use (logprobs=False)

    model: str
    max_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = None
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    stream_options: dict[str, Any] | None = None  # {"include_usage": true}: a last chunk with the usage
    rag_index: str | None = None  # tunelab extension: retrieve from this index (`serve --rag-index NAME=DIR`)
    rag_k: int = Field(3, ge=1, le=20)  # passages to retrieve
    user: str | None = None  # the end user (OpenAI's field): the request log keeps its SHA-256 only

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):  # [{"type": "text", "text": ...}, ...]
            return "".join(part.get("text", "") for part in self.content if part.get("type") == "text")
        return self.content or ""


class ResponseFormat(BaseModel):
    type: Literal["text", "json_object", "json_schema"] = "text"
    json_schema: dict[str, Any] | None = None  # {"name": ..., "schema": {...}, "strict": ...}


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    response_format: ResponseFormat | None = None


class CompletionRequest(_Sampling):
    prompt: str
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default for /v1/completions


class LoadAdapterRequest(BaseModel):
    lora_name: str
    lora_path: str | None = None  # a folder under the adapters root (default: the name)


class UnloadAdapterRequest(BaseModel):
    lora_name: str


class RolloutRequest(BaseModel):
    """POST /admin/rollouts/{alias}: set the versions' weights, or promote / roll back (tunelab.ops.rollout)."""

    model_config = ConfigDict(extra="forbid")

    action: Literal["set", "promote", "rollback"] = "set"
    weights: dict[str, float] | None = None  # set: {"v1": 90, "v2": 10}
    version: str | None = None  # promote: the version to serve; rollback: default the stable one


class FeedbackRequest(BaseModel):
    """POST /v1/feedback: a score or a label (or both) on one of the tenant's responses."""

    model_config = ConfigDict(extra="forbid")

    response_id: str = Field(min_length=1)  # the completion's `id`
    score: float | None = None
    label: str | None = Field(None, max_length=200)
    comment: str | None = Field(None, max_length=10_000)  # stored as the evaluation's explanation
    correction: str | None = Field(None, max_length=100_000)  # what the answer should have been
    name: str = Field("user_feedback", min_length=1, max_length=200)  # gen_ai.evaluation.name


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt: int, completion: int, cached: int = 0) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


def chat_response(rid: str, model: str, choices: list[dict], use: dict) -> dict:
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": choices, "usage": use}


def chat_chunk(rid: str, model: str, index: int, delta: dict, finish: str | None = None) -> dict:
    return {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": [{"index": index, "delta": delta, "finish_reason": finish}]}


def completion_response(rid: str, model: str, choices: list[dict], use: dict) -> dict:
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": choices, "usage": use}


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


class ApiError(Exception):
    """An error in OpenAI's shape, with its HTTP status (and headers, e.g. Retry-After)."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.body, self.headers = status, error_body(message, type_, param, code), headers or {}


def not_found(model: str) -> ApiError:
    """The 404 for a model name: the same for a missing adapter and another tenant's."""
    return ApiError(404, f"The model `{model}` does not exist or you do not have access to it.",
                    "invalid_request_error", "model", "model_not_found")


def too_many(message: str) -> ApiError:
    """A 429 the client may retry after a second."""
    return ApiError(429, message, "rate_limit_error", headers={"Retry-After": "1"})
