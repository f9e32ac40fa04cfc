"""Tiny random models of real architectures (Llama like SmolLM2, and Qwen2) for fast tests."""

from __future__ import annotations

import torch

ARCHS = ("llama", "qwen2")


def tiny_config(arch: str = "llama", vocab_size: int = 49152, **overrides):
    """A few-layer config of `arch` with small dims; SmolLM2-style GQA and tied embeddings."""
    from transformers import LlamaConfig, Qwen2Config

    common = dict(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
        tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2,
    )
    common.update(overrides)
    if arch == "llama":
        return LlamaConfig(head_dim=common["hidden_size"] // common["num_attention_heads"], **common)
    if arch == "qwen2":
        return Qwen2Config(**common)
    raise ValueError(f"unknown tiny arch {arch!r}; choose from {ARCHS}")


def tiny_model(arch: str = "llama", tokenizer=None, seed: int = 0, dtype=torch.float32, **overrides):
    """Build (model, tokenizer): a random tiny `arch` model sized to the bundled SmolLM2 tokenizer."""
    from transformers import AutoModelForCausalLM

    if tokenizer is None:
        from tunelab.models.load import load_tokenizer

        tokenizer = load_tokenizer("smollm2-135m-instruct")
    config = tiny_config(arch, vocab_size=len(tokenizer), **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.eval()
    return model, tokenizer
