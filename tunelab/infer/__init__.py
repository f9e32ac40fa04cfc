"""Inference: load a base with named adapters and generate (token-level batching, adapter and grammar per row)."""

from tunelab.infer.api import Completion, Engine, Request, RequestHandle, SamplingParams, chat_prompt
from tunelab.infer.grammar import compile_grammar
from tunelab.infer.load import load_engine, resolve_device

__all__ = ["Completion", "Engine", "Request", "RequestHandle", "SamplingParams", "chat_prompt", "compile_grammar",
           "load_engine", "resolve_device"]
