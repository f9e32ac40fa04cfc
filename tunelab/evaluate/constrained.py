"""Constrained decoding with xgrammar: JSON Schema, regex or EBNF grammars as a transformers logits processor."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from tunelab.errors import TunelabError

_COMPILERS: dict[int, object] = {}  # id(tokenizer) -> xgr.GrammarCompiler (it caches grammars itself)
_GRAMMARS: dict[tuple[int, str], object] = {}  # (id(tokenizer), kind:sha) -> CompiledGrammar


def _compiler(tokenizer, vocab_size: int | None = None):
    import xgrammar as xgr

    key = id(tokenizer)
    if key not in _COMPILERS:
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size or len(tokenizer))
        _COMPILERS[key] = xgr.GrammarCompiler(info)
    return _COMPILERS[key]


def compile_grammar(tokenizer, schema: dict | str | Path | None = None, regex: str | None = None,
                    ebnf: str | None = None, vocab_size: int | None = None):
    """Compile (once per grammar and tokenizer) a JSON Schema, a regex or an EBNF grammar."""
    if isinstance(schema, Path) or (isinstance(schema, str) and not schema.lstrip().startswith("{")):
        path = Path(schema)
        try:
            schema = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise TunelabError(f"cannot read JSON Schema {path}: {e}") from None
    if isinstance(schema, dict):
        text, kind = json.dumps(schema, sort_keys=True), "schema"
    elif isinstance(schema, str):
        text, kind = schema, "schema"
    elif regex is not None:
        text, kind = regex, "regex"
    elif ebnf is not None:
        text, kind = ebnf, "ebnf"
    else:
        raise TunelabError("constrained decoding needs a JSON Schema, a regex or an EBNF grammar")
    key = (id(tokenizer), kind + ":" + hashlib.sha256(text.encode()).hexdigest())
    if key not in _GRAMMARS:
        comp = _compiler(tokenizer, vocab_size)
        try:
            if kind == "schema":
                _GRAMMARS[key] = comp.compile_json_schema(text, any_whitespace=False)
            elif kind == "regex":
                _GRAMMARS[key] = comp.compile_regex(text)
            else:
                _GRAMMARS[key] = comp.compile_grammar(text)
        except Exception as e:  # xgrammar raises RuntimeError with its parser message
            raise TunelabError(f"cannot compile the {kind} for constrained decoding: {e}") from None
    return _GRAMMARS[key]


def grammar_processor(compiled):
    """A fresh logits-processor list for one generate() call (xgrammar processors are single-use)."""
    import xgrammar as xgr
    from transformers import LogitsProcessorList

    return LogitsProcessorList([xgr.contrib.hf.LogitsProcessor(compiled)])


def schema_processor(tokenizer, schema: dict | str | Path):
    """Shorthand: a logits processor list constraining output to `schema`."""
    return grammar_processor(compile_grammar(tokenizer, schema=schema))
