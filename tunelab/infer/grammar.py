"""Constrained decoding with xgrammar: JSON Schema, regex or EBNF grammars as a transformers logits processor."""

from __future__ import annotations

import json
import re
import weakref
from pathlib import Path

from tunelab.errors import TunelabError

# (id(tokenizer), vocab size) -> (weakref to the tokenizer, xgr.GrammarCompiler). The weakref guards against
# a new tokenizer reusing a dead one's id; the compiler caches the grammars it compiles itself.
_COMPILERS: dict[tuple[int, int], tuple[weakref.ref, object]] = {}
SEPARATORS = (",", ":")
_LOG_PREFIX = re.compile(r"\[[0-9:]+\] \S+:\d+: ")  # "[15:47:11] /project/cpp/x.cc:5082: " in its messages  # compact JSON, the form task references and system prompts use


def _compiler(tokenizer, vocab_size: int | None = None):
    import xgrammar as xgr

    key = (id(tokenizer), vocab_size or len(tokenizer))
    hit = _COMPILERS.get(key)
    if hit is None or hit[0]() is not tokenizer:
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=key[1])
        _COMPILERS[key] = (weakref.ref(tokenizer), xgr.GrammarCompiler(info))
    return _COMPILERS[key][1]


def compile_grammar(tokenizer, schema: dict | str | Path | None = None, regex: str | None = None,
                    ebnf: str | None = None, vocab_size: int | None = None):
    """Compile (once per grammar and tokenizer) a JSON Schema, a regex or an EBNF grammar.

    JSON is generated compactly (`,` and `:` without spaces) with object keys in the schema's order. A schema
    is first checked against what xgrammar enforces (tunelab.infer.schema_support): a keyword it would ignore
    raises TunelabError naming the keyword and its JSON pointer.
    """
    source = None
    if isinstance(schema, Path) or (isinstance(schema, str) and not schema.lstrip().startswith("{")):
        path = source = Path(schema)
        try:
            schema = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise TunelabError(f"cannot read JSON Schema {path}: {e}") from None
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except ValueError as e:
            raise TunelabError(f"the JSON Schema given for constrained decoding is not JSON: {e}") from None
    if isinstance(schema, (dict, bool)):
        from tunelab.infer.schema_support import check_schema

        schema = check_schema(schema, source=str(source or "JSON Schema"))
        text, kind = json.dumps(schema), "schema"  # keep key order: it fixes the order keys are generated in
    elif regex is not None:
        text, kind = regex, "regex"
    elif ebnf is not None:
        text, kind = ebnf, "ebnf"
    else:
        raise TunelabError("constrained decoding needs a JSON Schema, a regex or an EBNF grammar")
    comp = _compiler(tokenizer, vocab_size)
    try:
        if kind == "schema":
            return comp.compile_json_schema(text, any_whitespace=False, separators=SEPARATORS)
        if kind == "regex":
            return comp.compile_regex(text)
        return comp.compile_grammar(text)
    except Exception as e:  # xgrammar raises RuntimeError with its parser message
        msg = _LOG_PREFIX.sub("", str(e)).strip()
        raise TunelabError(f"cannot compile the {kind}{f' {source}' if source else ''} for constrained decoding: "
                           f"{msg}") from None


def grammar_processor(compiled):
    """A fresh logits-processor list for one generate() call (xgrammar processors are single-use)."""
    import xgrammar as xgr
    from transformers import LogitsProcessorList

    return LogitsProcessorList([xgr.contrib.hf.LogitsProcessor(compiled)])


def schema_processor(tokenizer, schema: dict | str | Path, vocab_size: int | None = None):
    """Shorthand: a logits processor list constraining output to `schema`.

    vocab_size: the model's logits width (config.vocab_size) when it differs from len(tokenizer)."""
    return grammar_processor(compile_grammar(tokenizer, schema=schema, vocab_size=vocab_size))
