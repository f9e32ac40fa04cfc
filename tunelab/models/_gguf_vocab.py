"""A Hugging Face BPE tokenizer as GGUF metadata: tokens, token types, merges, special tokens, pre-tokenizer,
chat template (the keys llama.cpp's converter writes, so llama.cpp, Ollama and transformers read them)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from tunelab.errors import TunelabError

# llama.cpp picks its pre-tokenizer regex by name. We name it from how the tokenizer splits a probe text:
# the hash of the token ids below, measured on tokenizers whose llama.cpp name is known.
PROBE = ("Hello  world!\n\n  \t 3333 33 ça va? 日本語 ünïcödé <|im_start|>x  'll I'M don't 1234567 ..., --- 🦙")
PRE_TOKENIZERS = {
    "e0b73b0399d8dfbd": "smollm",  # SmolLM / SmolLM2 (the bundled model's GGUF says tokenizer.ggml.pre=smollm)
}


def pre_tokenizer(tokenizer) -> str | None:
    """llama.cpp's pre-tokenizer name for `tokenizer`, or None when the probe does not recognise it."""
    ids = tokenizer.encode(PROBE, add_special_tokens=False)
    return PRE_TOKENIZERS.get(hashlib.sha256(str(ids).encode()).hexdigest()[:16])


def tokenizer_model(folder: Path) -> str:
    """The GGUF tokenizer model ("gpt2" for byte-level BPE); other kinds are refused before anything is written."""
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise TunelabError(f"{folder} has no tokenizer.json; the GGUF writer needs a fast (tokenizers) tokenizer.")
    model = json.loads(path.read_text(encoding="utf-8")).get("model", {})
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise TunelabError(f"{path}: a {model.get('type')} tokenizer"
                           + (" with byte_fallback (sentencepiece-style)" if model.get("byte_fallback") else "")
                           + "; the GGUF writer handles byte-level BPE (GPT-2 style) tokenizers. Use llama.cpp's "
                           "convert_hf_to_gguf.py for this model.")
    return "gpt2"


def add_tokenizer(writer, folder: Path, tokenizer, vocab_size: int, pre: str | None = None) -> str:
    """Write the tokenizer of `folder` into a GGUFWriter; returns the pre-tokenizer name used."""
    import gguf

    writer.add_tokenizer_model(tokenizer_model(folder))
    pre = pre or pre_tokenizer(tokenizer) or "default"
    writer.add_tokenizer_pre(pre)
    vocab = tokenizer.get_vocab()
    by_id = {i: t for t, i in vocab.items()}
    added = {t.content: t for t in tokenizer.added_tokens_decoder.values()}
    tokens, types = [], []
    for i in range(vocab_size):  # the embedding may have more rows than the tokenizer has tokens
        text = by_id.get(i)
        if text is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif text in added:
            tokens.append(text)
            types.append(gguf.TokenType.CONTROL if added[text].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(text)
            types.append(gguf.TokenType.NORMAL)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(folder, load_merges=True, n_vocab=vocab_size)
    if special.chat_template is None and getattr(tokenizer, "chat_template", None):
        special.chat_template = tokenizer.chat_template
    special.add_to_gguf(writer, quiet=True)
    return pre
