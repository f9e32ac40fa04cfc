"""The "closer": from a grammar matcher's state, a short token path to a complete document, without the model.

Neither backend has a shortest-completion API, so the closer simulates one on a fork of the matcher (an
xgrammar GrammarMatcher, or llguidance's behind tunelab.infer.llguidance_backend.Matcher): take the
forced text (jump-forward tokens), else the first allowed token from short lists of closing tokens (`"}`,
`]`, `}` ...), small complete values (`0`, `""`, `null` ...) and openers, chosen by a tiny JSON lexer that
knows whether we are inside a string; else (enums, patterns, minLength, escapes) the shortest allowed token,
preferring one after which a closing token is allowed, and rotating away from tokens already used so a
pattern like `a+b` cannot loop. The path is not always the shortest possible, but it is a real,
grammar-accepted path: its length is an upper bound on what the document still needs.
"""

from __future__ import annotations

import re
from collections import Counter, OrderedDict

import numpy as np

STRING_CLOSERS = ('"}}}', '"}}', '"}]', '"]}', '"]]', '"}', '"]', '","', '",', '":', '"')
ESCAPES = ("n", "t", '"', "\\", "/")
CLOSERS = ("}}}", "}}", "]}", "}]", "]]", "}", "]")
SEPARATORS = (",", ":")
VALUES = ("0", '""', "{}", "[]", "null", "true", "false", "1", "2", "3", "4", "5", "6", "7", "8", "9")
OPENERS = ('"', "{", "[", "-")
MAX_REUSE = 4  # a value/opener token used this often in one path is passed over (e.g. 0.0000...); values
# are taken least used first ([0,1,2], not [0,0,0]: same length, and it passes uniqueItems)
LOOKAHEAD = 24  # fallback candidates tried for "a closing token is allowed next"
LONG_PROBES = 6  # longest allowed tokens also tried (an enum value or minLength in one token)
FALLBACK_POOL = 400  # shortest allowed tokens the fallback ranks (all single bytes fit)
MEMO_GRAMMARS, MEMO_PATHS = 32, 20_000  # grammars with a path memo; paths kept per grammar
_LITERAL = re.compile(rb'"(?:[^"\\]|\\.)*"|-?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?')


class Lexer:
    """Just enough JSON lexing to know whether the next byte is inside a string (an object key or a value) or
    an escape."""

    __slots__ = ("in_string", "escape", "in_key", "stack", "prev")

    def __init__(self, in_string: bool = False, escape: bool = False, in_key: bool = False, stack: bytes = b"",
                 prev: int = 0):
        self.in_string, self.escape, self.in_key = in_string, escape, in_key
        self.stack, self.prev = stack, prev  # open containers ({ or [), the last byte outside strings

    def copy(self) -> Lexer:
        return Lexer(self.in_string, self.escape, self.in_key, self.stack, self.prev)

    def feed(self, data: bytes) -> None:
        for b in data:
            if self.escape:
                self.escape = False
            elif self.in_string:
                if b == 0x5C:  # backslash
                    self.escape = True
                elif b == 0x22:  # quote
                    self.in_string, self.prev = False, b
            elif b == 0x22:  # a key opens after { or , inside an object
                self.in_string = True
                self.in_key = self.stack[-1:] == b"{" and self.prev in (0x7B, 0x2C)
            elif b in (0x7B, 0x5B):
                self.stack, self.prev = self.stack + bytes((b,)), b
            elif b in (0x7D, 0x5D):
                self.stack, self.prev = self.stack[:-1], b
            elif b > 0x20:
                self.prev = b


class Vocab:
    """Token bytes and the candidate token ids of one tokenizer (shared by every closer on it)."""

    def __init__(self, info):
        self.decoded: list[bytes] = list(info.decoded_vocab)
        self.size = info.vocab_size
        self.stop_ids = list(info.stop_token_ids)
        special = set(info.special_token_ids) | set(self.stop_ids)
        by_text: dict[bytes, int] = {}
        for i, b in enumerate(self.decoded):
            if i not in special and b not in by_text:
                by_text[b] = i
        self.ids = {name: [by_text[s.encode()] for s in texts if s.encode() in by_text]
                    for name, texts in (("string", STRING_CLOSERS), ("escape", ESCAPES), ("close", CLOSERS),
                                        ("sep", SEPARATORS), ("value", VALUES), ("open", OPENERS))}
        nbytes = np.array([len(b) if i not in special else 1 << 20 for i, b in enumerate(self.decoded)])
        plain = np.array([0 if (len(b) == 1 and b.isalnum()) else 1 for b in self.decoded])
        nbytes = np.pad(nbytes, (0, max(0, self.size - len(nbytes))), constant_values=1 << 20)[:self.size]
        plain = np.pad(plain, (0, max(0, self.size - len(plain))), constant_values=1)[:self.size]
        self.order = np.lexsort((np.arange(self.size), plain, nbytes))  # shortest, alphanumeric, lowest id first
        self.usable = nbytes[self.order] < (1 << 20)
        readable = np.array([bool(re.fullmatch(rb"[A-Za-z0-9 ]*[A-Za-z0-9]", b)) for b in self.decoded] +
                            [False] * max(0, self.size - len(self.decoded)))[:self.size]
        self.readable = self.usable & readable[self.order]  # long fill-ins a reader would not mind
        # xgrammar's JSON strings admit raw control bytes (tab, \x01 ...), JSON does not: a word mask without them
        clean = np.ones(-(-self.size // 32) * 32, dtype=bool)
        clean[:len(self.decoded)] = [not any(c < 0x20 for c in b) for b in self.decoded]
        self.clean = np.packbits(clean, bitorder="little").view(np.uint32)  # (ceil(V / 32),)

    def text(self, token_id: int) -> bytes:
        return self.decoded[token_id] if token_id < len(self.decoded) else b""


_VOCABS: dict[tuple, Vocab] = {}


def vocab_for(compiled) -> Vocab:
    """The Vocab of a compiled grammar's tokenizer, built once per tokenizer description."""
    info = compiled.tokenizer_info
    key = (info.vocab_size, info.dump_metadata(), tuple(info.stop_token_ids))
    if key not in _VOCABS:
        _VOCABS[key] = Vocab(info)
    return _VOCABS[key]


def skeleton(text: bytes) -> bytes:
    """`text` with every finished string or number *value* (one followed by `,` `}` or `]`) emptied.

    Documents that differ only in such values usually leave the grammar in the same state (`"qty": 3,` and
    `"qty": 12,`), so their closer paths are the same: the key of the closer's memo. "Usually": a value can
    steer the grammar (an anyOf told apart by a string), so a remembered path is checked before use."""
    out, last = [], 0
    for m in _LITERAL.finditer(text):
        rest = text[m.end():].lstrip()
        if rest[:1] in (b",", b"}", b"]"):
            out.append(text[last:m.start()])
            out.append(b'""' if text[m.start()] == 0x22 else b"0")
            last = m.end()
    out.append(text[last:])
    return b"".join(out)


_MEMOS: OrderedDict[int, tuple[object, dict]] = OrderedDict()


def memo_for(compiled) -> dict:
    """The closer-path memo shared by every row under one compiled grammar (the last MEMO_GRAMMARS kept)."""
    key = id(compiled)
    if key in _MEMOS and _MEMOS[key][0] is compiled:
        _MEMOS.move_to_end(key)
        return _MEMOS[key][1]
    _MEMOS[key] = (compiled, {})  # the grammar is held so that its id is not reused while it is here
    while len(_MEMOS) > MEMO_GRAMMARS:
        _MEMOS.popitem(last=False)
    return _MEMOS[key][1]


class Closer:
    """Simulates a path to a complete document on a fork of a matcher; see the module docstring."""

    def __init__(self, vocab: Vocab, memo: dict | None = None):
        import xgrammar as xgr

        self.vocab = vocab
        self.bitmask = xgr.allocate_token_bitmask(1, vocab.size)  # (1, ceil(V / 32)) int32
        self.words = self.bitmask.numpy().view(np.uint32)
        self.memo = {} if memo is None else memo  # skeleton(text so far) -> closer path (see `skeleton`)
        self.memo_hits = 0

    def recall(self, matcher, lexer: Lexer, text: bytes, limit: int, hint: list[int] | None = None
               ) -> list[int] | None:
        """A path (at most `limit`) from a matcher (and its lexer) that has accepted `text`, or None.

        Before simulating, two known paths are tried: the one remembered for the skeleton of `text` (shared
        by every row and step under this grammar) and `hint` (the row's last path: after string content it
        usually still closes the document). One is used only after a fork of `matcher` accepts it and
        completes (one C++ call), so it is always a real path; else the path is simulated and remembered."""
        key = skeleton(text)
        for known in (self.memo.get(key), hint):
            if known is not None and len(known) <= limit:
                probe = matcher.fork()
                if self._replay(probe, known) and probe.is_completed():
                    self.memo_hits += 1
                    return known
        plan = self.path(matcher, lexer, limit)
        if plan is not None:
            if len(self.memo) >= MEMO_PATHS:
                self.memo.clear()
            self.memo[key] = plan
        return plan

    def _replay(self, probe, tokens: list[int]) -> bool:
        """`probe` accepts all of `tokens` (one call: xgrammar takes their bytes, llguidance's matcher the ids)."""
        if not tokens:  # nothing to accept (an empty string makes a terminated xgrammar matcher warn on stderr)
            return True
        if hasattr(probe, "accept_tokens"):
            return probe.accept_tokens(tokens)
        return probe.accept_string(b"".join(self.vocab.text(t) for t in tokens))

    def fill(self, m) -> None:
        """The allowed tokens of `m` into self.bitmask, without raw control bytes."""
        m.fill_next_token_bitmask(self.bitmask, 0)
        self.words[0] &= self.vocab.clean

    def _allowed(self, token_id: int) -> bool:
        return bool((self.words[0, token_id >> 5] >> (token_id & 31)) & 1)

    def _any_allowed(self, ids) -> int | None:
        for t in ids:
            if self._allowed(t):
                return t
        return None

    def path(self, matcher, lexer: Lexer, limit: int) -> list[int] | None:
        """Tokens (at most `limit`) that take `matcher` (not changed: a fork is used) to a complete document,
        or None when the closer finds none within `limit`."""
        m, lex = matcher.fork(), lexer.copy()
        path: list[int] = []
        used: Counter = Counter()
        seen: set[int] = set()  # token masks met on this path
        while not m.is_completed():
            if len(path) >= limit:
                return None
            forced = m.find_jump_forward_tokens()
            if forced:
                for t in forced:
                    if not m.accept_token(t):
                        return None
                    path.append(t)
                    lex.feed(self.vocab.text(t))
                continue
            self.fill(m)
            seen.add(hash(self.words.tobytes()))
            t = self._pick(m, lex, used, seen)
            if t is None or not m.accept_token(t):
                return None
            used[t] += 1
            path.append(t)
            lex.feed(self.vocab.text(t))
        return path if len(path) <= limit else None

    def _pick(self, m, lex: Lexer, used: Counter, seen: set) -> int | None:
        ids = self.vocab.ids
        if lex.escape:
            tiers = [ids["escape"]]
        elif lex.in_string:
            tiers = [ids["string"]]
        else:
            values = sorted((t for t in ids["value"] if used[t] < MAX_REUSE), key=used.__getitem__)  # stable:
            tiers = [ids["close"], ids["sep"], values + [t for t in ids["open"] if used[t] < MAX_REUSE]]  # rotate
        for tier in tiers:
            t = self._any_allowed(tier)
            if t is not None:
                return t
        return self._fallback(m, lex, used, seen)

    def _fallback(self, m, lex: Lexer, used: Counter, seen: set) -> int | None:
        """A short allowed token: the first, by least used character class (digit, lower, upper, each
        punctuation byte), after which a closing token is allowed, else the first that leads to a token mask
        not met before on this path (progress through a format like e-mail or URI), else the first."""
        bits = np.unpackbits(self.words[0].view(np.uint8), bitorder="little")[:self.vocab.size].astype(bool)
        order = self.vocab.order
        allowed = order[bits[order] & self.vocab.usable][:FALLBACK_POOL]
        if len(allowed) == 0:
            return None
        text = self.vocab.text
        firsts: dict[str, int] = {}
        for t in allowed.tolist():
            firsts.setdefault(_klass(text(t)), t)
        cands = sorted(firsts.values(), key=lambda t: (used[_klass(text(t))], used[t]))[:LOOKAHEAD]  # stable
        rev = order[::-1]
        longest = [t for t in rev[bits[rev] & self.vocab.readable[::-1]][:LONG_PROBES].tolist() if t not in cands]
        novel = None
        for t in longest + cands:  # a long token that lets the value close next saves the most
            probe, plex = m.fork(), lex.copy()
            if not probe.accept_token(t):
                continue
            plex.feed(text(t))
            if probe.is_completed():
                return _count(used, t, text(t))
            self.fill(probe)
            closing = self.vocab.ids["string"] if plex.in_string else self.vocab.ids["close"] + self.vocab.ids["sep"]
            if not plex.escape and self._any_allowed(closing) is not None:
                return _count(used, t, text(t))
            if novel is None and t not in longest and hash(self.words.tobytes()) not in seen:
                novel = t
        pick = novel if novel is not None else cands[0]
        return _count(used, pick, text(pick))


def _klass(data: bytes) -> str:
    if len(data) != 1:
        return "multi"
    c = chr(data[0])
    return "digit" if c.isdigit() else "lower" if c.islower() else "upper" if c.isupper() else c


def _count(used: Counter, token_id: int, data: bytes) -> int:
    used[_klass(data)] += 1
    return token_id
