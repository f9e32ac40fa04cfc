"""Inference: load a base with named adapters and generate (batched, per-row adapters and grammars, streaming)."""
