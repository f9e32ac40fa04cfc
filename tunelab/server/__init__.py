"""An OpenAI-compatible server: one base model, many tenants' LoRA adapters, token-level batching."""

from tunelab.server.app import build_app, serve, serve_http
from tunelab.server.auth import Keys, hash_key
from tunelab.server.schemas import ApiError
from tunelab.server.service import ServeService

__all__ = ["ApiError", "Keys", "ServeService", "build_app", "hash_key", "serve", "serve_http"]
