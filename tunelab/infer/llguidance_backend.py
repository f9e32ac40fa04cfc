"""The second grammar backend: JSON Schemas compiled by llguidance, behind the matcher interface xgrammar's has.

tunelab.infer.grammar picks it per schema where xgrammar would not enforce a keyword (schema_support says
which). llguidance enforces more (allOf merged, pattern beside minLength/maxLength, type-specific keywords
without `type`, multipleOf on decimals, ...); what it does not enforce (uniqueItems, not, if/then/else,
oneOf exclusivity, propertyNames, lookarounds, ...) it is told to leave open ("lenient", oneOf coerced to
anyOf), and `LLGrammar.check` validates the finished answer with jsonschema instead: the engine re-samples
that row (tunelab.infer.structured). `Matcher` wraps an llguidance matcher in the methods GrammarState and
the closer call on an xgrammar GrammarMatcher (fork, accept_token, fill_next_token_bitmask, ...), so the
"always finishes" logic is the same code for both backends.
"""

from __future__ import annotations

import copy
import json
import re
import weakref
from dataclasses import dataclass, field

from tunelab.errors import TunelabError
from tunelab.infer.schema_support import nodes, resolve

# compact JSON with keys in the schema's order, as xgrammar's grammars are generated (grammar.SEPARATORS)
OPTIONS = {"whitespace_flexible": False, "item_separator": ",", "key_separator": ":"}
LENIENT = {**OPTIONS, "lenient": True, "coerce_one_of": True}
_TOKENIZERS: dict[tuple[int, int], tuple[weakref.ref, object]] = {}
_UNIMPLEMENTED = re.compile(r'Unimplemented keys: \[([^\]]*)\]')
_UNSATISFIABLE = re.compile(r"nsatisfiable[^\n]*\n?\s*while processing [^\s#]*#(/[^\s]+)")
MAX_PRUNED = 8  # unsatisfiable definitions replaced by `false` before a schema is refused


def available() -> bool:
    """Whether llguidance is installed (it is a dependency; a broken install leaves xgrammar alone)."""
    try:
        import llguidance  # noqa: F401
    except ImportError:
        return False
    return True


def ll_tokenizer(tokenizer, info):
    """llguidance's view of `tokenizer` (built once per tokenizer and logits width, ~0.3 s), with the stop
    tokens of xgrammar's TokenizerInfo `info` so both backends end a document on the same token."""
    import llguidance.hf

    key = (id(tokenizer), info.vocab_size)
    hit = _TOKENIZERS.get(key)
    if hit is None or hit[0]() is not tokenizer:
        try:
            llt = llguidance.hf.from_tokenizer(tokenizer, n_vocab=info.vocab_size,
                                               eos_token=list(info.stop_token_ids))
        except ValueError as e:  # a slow (Python) tokenizer
            raise TunelabError(f"llguidance cannot read this tokenizer ({e}); only xgrammar's keywords apply.") from None
        _TOKENIZERS[key] = (weakref.ref(tokenizer), llt)
    return _TOKENIZERS[key][1]


@dataclass(eq=False)
class LLGrammar:
    """A JSON Schema compiled by llguidance. tokenizer_info: xgrammar's description of the same tokenizer (the
    closer's vocabulary); schema: what `check` validates finished answers against; post_checked: (JSON
    pointer, keyword) pairs the grammar leaves to that check."""

    grammar: str
    tokenizer: object  # llguidance.LLTokenizer
    tokenizer_info: object
    schema: dict | bool
    post_checked: tuple[tuple[str, str], ...] = ()
    backend: str = "llguidance"
    _template: object = field(default=None, repr=False)
    _validator: object = field(default=None, repr=False)

    def matcher(self) -> Matcher:
        """A fresh matcher at the start of the document (a copy of one built at compile time)."""
        return Matcher(self._template.deep_copy(), frozenset(self.tokenizer_info.stop_token_ids))

    def check(self, text: str) -> list[str]:
        """What is wrong with a finished answer (JSON pointer: message), [] when it is valid."""
        try:
            doc = json.loads(text)
        except ValueError as e:
            return [f"/: not JSON ({e})"]
        errors = sorted(self._validator.iter_errors(doc), key=lambda e: len(e.path))
        return [f"/{'/'.join(str(p) for p in e.absolute_path)}: {e.message[:200]}" for e in errors[:3]]


class Matcher:
    """An llguidance LLMatcher with the calls tunelab makes on xgrammar's GrammarMatcher. A token the grammar
    refuses is checked first (validate_tokens), so a refusal leaves the matcher usable, as xgrammar's does."""

    __slots__ = ("m", "stop_ids", "terminated")

    def __init__(self, m, stop_ids: frozenset, terminated: bool = False):
        self.m, self.stop_ids, self.terminated = m, stop_ids, terminated

    def fork(self) -> Matcher:
        return Matcher(self.m.deep_copy(), self.stop_ids, self.terminated)

    def accept_token(self, token_id: int) -> bool:
        if self.terminated:
            return False
        if token_id in self.stop_ids:  # llguidance's validate_tokens refuses it once the grammar has stopped
            if not self.m.is_accepting():
                return False
            self.m.consume_token(token_id)
            self.terminated = True
            return True
        return self.m.validate_tokens([token_id]) == 1 and self.m.consume_token(token_id)

    def accept_tokens(self, ids: list[int]) -> bool:
        """All of `ids`, or none (the closer replays a remembered path this way)."""
        if ids and ids[-1] in self.stop_ids:
            probe = self.fork()
            if not (probe.accept_tokens(ids[:-1]) and probe.accept_token(ids[-1])):
                return False
            self.m, self.terminated = probe.m, True
            return True
        if self.terminated or self.m.validate_tokens(ids) != len(ids):
            return False
        return self.m.consume_tokens(ids)

    def fill_next_token_bitmask(self, bitmask, row: int = 0) -> None:
        """Row `row` of an (N, ceil(V / 32)) int32 CPU bitmask (xgrammar's layout, which llguidance shares)."""
        v = bitmask[row]
        self.m.unsafe_compute_mask_ptr(v.data_ptr(), v.numel() * v.element_size())

    def find_jump_forward_tokens(self) -> list[int]:
        return self.m.compute_ff_tokens()

    def is_completed(self) -> bool:
        return self.terminated or self.m.is_accepting()

    def is_terminated(self) -> bool:
        return self.terminated


def compile_schema(tokenizer, info, schema: dict | bool, post_checked: list[tuple[str, str]],
                   original: dict | bool) -> LLGrammar:
    """`schema` (normalised, lookarounds out) compiled by llguidance; what it cannot enforce is added to
    `post_checked` and left open in the grammar; answers are checked against `original` (the user's schema,
    with the validator of its own draft). A definition llguidance proves unsatisfiable becomes `false` (the
    same meaning: an optional property that uses it is left out) up to MAX_PRUNED times. TunelabError
    naming the keyword where compiling fails still."""
    import jsonschema
    import llguidance

    llt = ll_tokenizer(tokenizer, info)
    checked = list(post_checked)
    for _ in range(MAX_PRUNED + 1):
        grammar, error = _grammar(schema, llt, checked)
        where = _UNSATISFIABLE.search(error or "")
        if error is None or not where or not where.group(1) or resolve(schema, where.group(1)) is None:
            break
        schema = _falsify(schema, where.group(1))
    if error is not None:
        raise TunelabError(_why(error))
    template = llguidance.LLMatcher(llt, grammar, log_level=0)
    if template.is_error():
        raise TunelabError(_why(template.get_error()))
    cls = jsonschema.validators.validator_for(original, default=jsonschema.Draft202012Validator)
    return LLGrammar(grammar, llt, info, original, tuple(dict.fromkeys(checked)), _template=template,
                     _validator=cls(original))


def _grammar(schema, llt, checked: list) -> tuple[str, str | None]:
    """(grammar, None), or (_, llguidance's error): strict first; where it names keywords it does not enforce,
    lenient (they are appended to `checked`), unless the schema is unsatisfiable somewhere."""
    import llguidance

    grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=OPTIONS)
    failed, msgs = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, llt)
    if not failed:
        return grammar, None
    if _UNSATISFIABLE.search(msgs[0]):
        return grammar, msgs[0]
    known = {k for _, k in checked}
    checked += [(p, k) for p, k in _left_open(msgs[0]) if k not in known]
    grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=LENIENT)
    failed, msgs = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, llt)
    return grammar, msgs[0] if failed else None


def _falsify(schema: dict, pointer: str) -> dict:
    """A copy of `schema` where the node at `pointer` and every `$ref` to it are `false` (llguidance then drops
    an optional property or array item that used it, or says where the schema is unsatisfiable next)."""
    out = copy.deepcopy(schema)
    *parent, last = pointer.split("/")
    resolve(out, "/".join(parent))[last.replace("~1", "/").replace("~0", "~")] = False
    for ptr, node in list(nodes(out)):
        if node.get("$ref") == "#" + pointer and ptr:
            *up, key = ptr.split("/")
            holder = resolve(out, "/".join(up))
            holder[int(key) if isinstance(holder, list) else key.replace("~1", "/").replace("~0", "~")] = False
    return out


def _left_open(msg: str) -> list[tuple[str, str]]:
    """(pointer, keyword) for what llguidance said it does not enforce (its first complaint only: the rest
    the lenient grammar leaves open too, and the check on the answer covers them all)."""
    m = _UNIMPLEMENTED.search(msg)
    if m:
        return [("", k.strip().strip('"')) for k in m.group(1).split(",") if k.strip()]
    if "oneOf" in msg:
        return [("", "oneOf")]
    if "format" in msg.lower():
        return [("", "format")]
    return [("", "(llguidance: " + msg.splitlines()[0][:80] + ")")]


def _why(msg: str) -> str:
    """llguidance's error as a refusal that names the keyword and why."""
    first = " ".join(line.strip() for line in msg.strip().splitlines()[:4] if line.strip()) or "unknown error"
    low = msg.lower()
    if "nsatisfiable" in msg:
        key = "required" if "required property" in msg else "type"
        return f"keyword {key!r}: unsatisfiable, no document is valid (llguidance: {first})"
    if "regex" in low or "look-around" in low:
        return f"keyword 'pattern': a regex llguidance cannot compile (llguidance: {first})"
    if "$ref" in msg or "retriev" in low or "reference" in low:
        return f"keyword '$ref': cannot be resolved; inline it under $defs (llguidance: {first})"
    return f"keyword '(unknown)': llguidance cannot compile it (llguidance: {first})"
