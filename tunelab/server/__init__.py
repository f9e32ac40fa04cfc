"""An OpenAI-compatible server: one base model, many tenants' LoRA adapters, token-level batching."""

from tunelab.server.app import build_app, serve, serve_http
from tunelab.server.service import ApiError, ServeService
from tunelab.server.tenants import Keys, hash_key

__all__ = ["ApiError", "Keys", "ServeService", "build_app", "hash_key", "serve", "serve_http"]
