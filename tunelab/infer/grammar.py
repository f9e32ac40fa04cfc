"""Constrained decoding: JSON Schema, regex or EBNF grammars, each schema on the backend that enforces it.

xgrammar compiles regexes, EBNF and every schema whose keywords it enforces (tunelab.infer.schema_support
says which); the other schemas go to llguidance (tunelab.infer.llguidance_backend), which enforces more and
leaves what neither enforces to a check on the finished answer (the engine then re-samples that row).
"""

from __future__ import annotations

import json
import re
import warnings
import weakref
from pathlib import Path

from tunelab.errors import TunelabError

# (id(tokenizer), vocab size) -> (weakref to the tokenizer, xgr.GrammarCompiler). The weakref guards against
# a new tokenizer reusing a dead one's id; the compiler caches the grammars it compiles itself.
_COMPILERS: dict[tuple[int, int], tuple[weakref.ref, object, object]] = {}
SEPARATORS = (",", ":")
_LOG_PREFIX = re.compile(r"\[[0-9:]+\] \S+:\d+: ")  # "[15:47:11] /project/cpp/x.cc:5082: " in its messages  # compact JSON, the form task references and system prompts use


def _compiler(tokenizer, vocab_size: int | None = None, info: bool = False):
    """xgrammar's GrammarCompiler for this tokenizer and logits width (its TokenizerInfo with info=True)."""
    import xgrammar as xgr

    key = (id(tokenizer), vocab_size or len(tokenizer))
    hit = _COMPILERS.get(key)
    if hit is None or hit[0]() is not tokenizer:
        tok_info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=key[1])
        _COMPILERS[key] = (weakref.ref(tokenizer), xgr.GrammarCompiler(tok_info), tok_info)
    return _COMPILERS[key][2 if info else 1]


def compile_grammar(tokenizer, schema: dict | str | Path | None = None, regex: str | None = None,
                    ebnf: str | None = None, vocab_size: int | None = None,
                    backends: tuple[str, ...] = ("xgrammar", "llguidance")):
    """Compile a JSON Schema (on xgrammar or llguidance, see the module docstring), a regex or an EBNF grammar.

    JSON is generated compactly (`,` and `:` without spaces) with object keys in the schema's order. A schema
    neither backend can compile (a remote `$ref`, an unsatisfiable schema, a regex neither reads) raises
    TunelabError naming the keyword and why. backends: those a schema may use, in order (the benches compare
    ("xgrammar",), xgrammar alone, and ("llguidance",) on the same schemas).
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
        return _compile_schema(tokenizer, schema, f"the schema {source}" if source else "the schema", vocab_size,
                               backends)
    elif regex is not None:
        text, kind = regex, "regex"
    elif ebnf is not None:
        text, kind = ebnf, "ebnf"
    else:
        raise TunelabError("constrained decoding needs a JSON Schema, a regex or an EBNF grammar")
    comp = _compiler(tokenizer, vocab_size)
    try:
        if kind == "regex":
            return comp.compile_regex(text)
        return comp.compile_grammar(text)
    except Exception as e:  # xgrammar raises RuntimeError with its parser message
        raise TunelabError(f"cannot compile the {kind} for constrained decoding: {_clean(e)}") from None


def _compile_schema(tokenizer, schema: dict | bool, source: str, vocab_size: int | None, backends: tuple):
    """xgrammar's CompiledGrammar where it enforces every keyword, else llguidance's LLGrammar (with the check
    on the answer for what neither enforces); TunelabError naming the keyword and why where neither can."""
    from tunelab.infer import llguidance_backend as llg
    from tunelab.infer.schema_support import audit_schema, llguidance_open, normalise, refusal

    fixed = normalise(schema)
    errors, warns = audit_schema(fixed)
    for w in warns:
        warnings.warn(f"{source}: {w}", stacklevel=4)
    comp = _compiler(tokenizer, vocab_size)
    xgr_error = None
    if not errors and "xgrammar" in backends:
        try:  # keep key order: it fixes the order keys are generated in
            return comp.compile_json_schema(json.dumps(fixed), any_whitespace=False, separators=SEPARATORS)
        except Exception as e:  # xgrammar raises RuntimeError with its parser message
            xgr_error = _clean(e)
    if "llguidance" not in backends or not llg.available():
        raise TunelabError(refusal(errors, source) if errors else
                           f"cannot compile {source} for constrained decoding: {xgr_error}")
    ll_schema, left_open = llguidance_open(fixed)
    try:
        return llg.compile_schema(tokenizer, _compiler(tokenizer, vocab_size, info=True), ll_schema, left_open, schema)
    except TunelabError as e:
        why = f" (xgrammar: {xgr_error})" if xgr_error else ""
        if errors:
            why = f" (xgrammar alone: {errors[0][1]!r} at {errors[0][0] or '/'}: {errors[0][2]})"
        raise TunelabError(f"cannot compile {source} for constrained decoding: {e}{why}") from None


def _clean(e: Exception) -> str:
    return _LOG_PREFIX.sub("", str(e)).strip()


def grammar_processor(compiled):
    """A fresh logits-processor list for one generate() call (xgrammar processors are single-use)."""
    import xgrammar as xgr
    from transformers import LogitsProcessorList

    return LogitsProcessorList([xgr.contrib.hf.LogitsProcessor(compiled)])


def schema_processor(tokenizer, schema: dict | str | Path, vocab_size: int | None = None):
    """Shorthand: a logits processor list constraining output to `schema`.

    vocab_size: the model's logits width (config.vocab_size) when it differs from len(tokenizer)."""
    return grammar_processor(compile_grammar(tokenizer, schema=schema, vocab_size=vocab_size))
