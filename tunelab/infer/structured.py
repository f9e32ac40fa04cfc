"""Structured output that always finishes: one grammar per row, steered to a complete document in budget.

`GrammarState` wraps one row's matcher (xgrammar's, or llguidance's behind the same interface). While the remaining budget is comfortably above what
the document still needs, the model picks freely inside the grammar mask. Once the budget comes down to the
closer's path (tunelab.infer._closer: close strings, arrays and objects, fill required keys with the
smallest values it finds), the row is forced along that path and marked `closed_early`.

The grammar step an engine runs per decoding step, over its rows (one module: `constrain`, `settle`,
`advance` below; `remaining` = max_new_tokens - tokens generated so far):

    forced = constrain(states, remaining, logits, bitmask)   # forced closing tokens; masks on the other rows
    picks = ...                                              # the engine picks from the masked logits
    tokens = settle(states, remaining, forced, picks)        # forced, else the pick vetted (exactness: the
    advance(states, tokens)                                  #   closer's token if the pick leaves too little)

The guarantee: if the closer's path from the start fits max_new_tokens (`state.fits`), every answer is a
complete document. With `vet` it holds whenever string content (a token inside a value string with no quote
or backslash) adds at most GROWTH tokens to the closer's path: `vet` simulates the closer after every other
token (one `,` in an array of objects with required keys can add 20+ tokens; a key picks its value, which
may be such an object), and after string content only once the budget comes within GROWTH tokens per step
of the last estimate. Without `vet` (an engine
that samples after masking) the state keeps `slack` tokens in reserve, which covers what one token adds
only in practice (the default; vetting callers pass slack=0). Cost: `closer_runs`, `closer_seconds`,
`grammar_seconds()` (bench/structured_output.py prints ms per token). Keywords no backend enforces are
checked on the finished answer (`violations`); an engine that can start a row again asks `resample`.
"""

from __future__ import annotations

import functools
import time

import torch

from tunelab.errors import TunelabError
from tunelab.infer._closer import Closer, Lexer, memo_for, vocab_for

GROWTH = 16  # tokens one free token is assumed to add at most to the closer's path, between re-checks
MAX_RESAMPLES = 3  # answers a row draws again when the check refuses its finished one (then the closer's)
RESAMPLE_TEMPERATURE = 1.0  # of those draws (Gumbel noise on the logits: greedy rows sample too)
_TOTAL = {"closer_seconds": 0.0, "grammar_seconds": 0.0}  # over every state in this process


def closer_seconds() -> float:
    """Seconds all GrammarStates of this process have spent in the closer (benches take differences)."""
    return _TOTAL["closer_seconds"]


def grammar_seconds() -> float:
    """Seconds this process has spent in the grammar step (constrain + settle + advance: masks, closer, checks)."""
    return _TOTAL["grammar_seconds"]


class GrammarState:
    """One row's grammar: xgrammar matcher + the 'always finish' logic."""

    def __init__(self, compiled, max_new_tokens: int, slack: int = GROWTH, seed: int | None = None):
        """slack: tokens kept in reserve for what a free token may add; GROWTH (safe in practice) unless the
        caller vets every pick (`vet`), which makes 0 exact. compiled: xgrammar's CompiledGrammar or a
        grammar object with its own `matcher()` (tunelab.infer.llguidance_backend.LLGrammar, whose `check`
        validates finished answers). seed: of the Gumbel noise that re-samples a row (`resample`)."""
        self.grammar = compiled
        self.max_new_tokens = max_new_tokens
        self.slack = slack
        self.seed = 0 if seed is None else seed
        self.closer_runs, self.closer_seconds = 0, 0.0
        self._closer = Closer(vocab_for(compiled), memo_for(compiled))
        self._stop = self._closer.vocab.stop_ids[0]
        self._clean = None  # torch view of the vocabulary's no-control-bytes mask, made on first use
        self._check = getattr(compiled, "check", None)
        self.attempts = 0  # answers drawn again after the check refused a finished one
        self._closing = False  # the last attempt: the closer's document from the start
        self._noise = None  # torch.Generator of a re-sample's Gumbel noise
        self._start()
        start = self._estimate(max_new_tokens)
        self.shortest = start  # closer tokens from the start (None: no complete document found in budget)
        self.fits = start is not None and start <= max_new_tokens
        self._gave_up = start is None

    def _start(self) -> None:
        """A fresh document: the matcher at its start and nothing generated."""
        import xgrammar as xgr

        self.matcher = self.grammar.matcher() if hasattr(self.grammar, "matcher") else xgr.GrammarMatcher(self.grammar)
        self.closed_early = False
        self.steps = 0  # tokens accepted
        self._text = bytearray()  # the bytes accepted so far (the closer memo's key)
        self._lex = Lexer()
        self._plan: list[int] | None = None  # closer path from the current state, when fresh
        self._plan_at = -1  # self.steps when _plan was right
        self._known = (0, 0)  # (closer length, steps) of the last simulation: the base of the estimate bound
        self._pending: tuple[int, list[int]] | None = None  # (vetted token, closer path after it)
        self._forcing = False
        self._gave_up = False
        self._abandoned = False
        self._verdict: list[str] | None = None  # the check's findings on the finished answer, once asked

    # -- the closer ------------------------------------------------------------------------------------
    def _estimate(self, limit: int) -> int | None:
        """Length of the closer's path from the current state (simulated unless fresh), None beyond `limit`."""
        if self._plan_at == self.steps and self._plan is not None:
            return len(self._plan) if len(self._plan) <= limit else None
        plan = self._recall(self.matcher, self._lex, bytes(self._text), limit)
        if plan is None:
            return None
        self._plan, self._plan_at, self._known = plan, self.steps, (len(plan), self.steps)
        return len(plan)

    def _recall(self, *args, **kwargs) -> list[int] | None:
        t0 = time.perf_counter()
        plan = self._closer.recall(*args, **kwargs)
        dt = time.perf_counter() - t0
        self.closer_runs += 1
        self.closer_seconds += dt
        _TOTAL["closer_seconds"] += dt
        return plan

    def _bound(self, steps: int) -> int:
        """An estimate (not a proof) of the most the closer's path can need `steps` tokens from now."""
        known, at = self._known
        return known + GROWTH * (steps - at)

    def _start_forcing(self, need: int) -> int:
        self._forcing = True
        self.closed_early = self.closed_early or need > 0
        return self._plan[0] if self._plan else self._stop

    # -- the engine-facing interface ------------------------------------------------------------------
    def forced_token(self, remaining: int) -> int | None:
        """None while the model may choose freely; else the token that steers to the shortest completion."""
        if self.is_terminated() or self._abandoned or remaining <= 0:
            return None
        if self._forcing:
            return self._plan[0] if self._plan else self._stop
        if self._gave_up or remaining > self._bound(self.steps) + self.slack:
            return None
        need = self._estimate(remaining)
        if need is None:  # no complete document within what is left: leave the row to the model
            self._gave_up = True
            return None
        return self._start_forcing(need) if remaining <= need + self.slack else None

    def vet(self, token_id: int, remaining: int) -> int:
        """`token_id` if the closer can still finish within `remaining - 1` after it, else the closer's token."""
        if self._forcing or self._gave_up or self._abandoned or self.is_terminated():
            return token_id
        fresh = self._plan_at == self.steps and self._plan is not None
        if fresh and self._plan and self._plan[0] == token_id:
            return token_id
        text = self._closer.vocab.text(token_id)
        in_string = self._lex.in_string and not self._lex.in_key and not self._lex.escape and b'"' not in text \
            and b"\\" not in text  # a key's content commits to its value (an object with required keys)
        if in_string and remaining - 1 > self._bound(self.steps + 1) + self.slack:
            return token_id  # string content far from the end: it can add little (GROWTH) to the closer's path
        probe = self.matcher.fork()
        if not probe.accept_token(token_id):
            return token_id  # not in the grammar: accept() will say so
        lex = self._lex.copy()
        lex.feed(text)
        after = self._recall(probe, lex, bytes(self._text) + text, remaining - 1, hint=self._plan)
        if after is not None:
            self._pending = (token_id, after)
            return token_id
        need = self._estimate(remaining)
        if need is None:
            self._gave_up = True
            return token_id
        return self._start_forcing(need)

    def fill_mask(self, bitmask, row: int, clean: bool = True) -> None:
        """Fill row `row` of an xgrammar token bitmask (xgr.allocate_token_bitmask) with the allowed tokens.

        Tokens with raw control bytes are left out: xgrammar's JSON strings admit them, JSON does not.
        clean=False leaves that to the caller, which ANDs `clean_mask()` into many rows at once."""
        self.matcher.fill_next_token_bitmask(bitmask, row)
        if clean:
            bitmask[row] &= self.clean_mask().to(bitmask.device)

    def clean_mask(self):
        """(ceil(V / 32),) int32 bitmask of the tokens without raw control bytes."""
        if self._clean is None:
            self._clean = torch.from_numpy(self._closer.vocab.clean.view("int32"))
        return self._clean

    def accept(self, token_id: int) -> None:
        """Advance by one generated token; TunelabError if the grammar rejects it."""
        if not self.matcher.accept_token(int(token_id)):
            text = self._closer.vocab.text(int(token_id))
            raise TunelabError(f"token {token_id} ({text!r}) is not allowed by the grammar after {self.steps} "
                               "tokens: apply fill_mask (or the forced token) before picking.")
        if not self.matcher.is_terminated():  # the stop token's text is no part of the document
            self._lex.feed(self._closer.vocab.text(int(token_id)))
            self._text += self._closer.vocab.text(int(token_id))
        fresh = self._plan_at == self.steps and self._plan is not None
        self.steps += 1
        pending, self._pending = self._pending, None
        if fresh and self._plan and self._plan[0] == token_id:
            self._plan, self._plan_at = self._plan[1:], self.steps
            self._known = (len(self._plan), self.steps)
        elif pending is not None and pending[0] == token_id:
            self._plan, self._plan_at, self._known = pending[1], self.steps, (len(pending[1]), self.steps)
        elif self._forcing and not self.matcher.is_terminated():
            self._forcing = False  # the caller did not take the forced token: re-plan at the next step
            self._plan = None

    def active(self) -> bool:
        """Still generating under the grammar: not terminated, not abandoned."""
        return not self._abandoned and not self.matcher.is_terminated()

    def abandon(self) -> None:
        """Stop steering this row (its generation was ended by something else, e.g. a stop string)."""
        self._abandoned = True

    def is_terminated(self) -> bool:
        """The document is complete and the stop token was accepted."""
        return self.matcher.is_terminated()

    def is_complete(self) -> bool:
        """The text so far is a complete document (the stop token may still be missing)."""
        return self.matcher.is_terminated() or self.matcher.is_completed()

    @property
    def finish_reason(self) -> str:
        """"stop" (finished by the model), "length_closed" (steered to a close) or "length" (cut unfinished)."""
        if not self.is_complete():
            return "length"
        return "length_closed" if self.closed_early else "stop"

    # -- the check on the finished answer (keywords no grammar backend enforces) ----------------------------
    def violations(self) -> list[str]:
        """What the grammar's check finds wrong with the finished document ([] when valid or unchecked)."""
        if self._check is None or not self.is_complete():
            return []
        if self._verdict is None:
            self._verdict = self._check(self._text.decode("utf-8", "replace"))
        return self._verdict

    def resample(self, may_restart: bool = True) -> bool:
        """Whether this row starts its answer again because the check refused the finished one (then the
        state is back at the start and the engine must drop the row's tokens). Bounded: MAX_RESAMPLES
        answers drawn with seeded Gumbel noise (a sample at RESAMPLE_TEMPERATURE, greedy rows included),
        then one last attempt that takes the closer's document from the start ("closed validly" when it
        passes). may_restart: False once text was handed out (streamed): the verdict stays in `report`."""
        if not may_restart or self._closing or not self.violations():
            return False
        self.attempts += 1
        if self.attempts > MAX_RESAMPLES:
            self._closing = True
        self._noise = torch.Generator().manual_seed(self.seed * 7919 + self.attempts)
        self._start()
        if self._closing:
            need = self._estimate(self.max_new_tokens)
            if need is None:
                self._gave_up = True
            else:
                self._start_forcing(need)
                self.closed_early = True
        return True

    def noise(self, size: int):
        """(size,) Gumbel noise times RESAMPLE_TEMPERATURE for a re-sampled row's logits, else None."""
        if self._noise is None or self._forcing:
            return None
        u = torch.rand(size, generator=self._noise).clamp_(1e-10, 1 - 1e-7)
        return -torch.log(-torch.log(u)) * RESAMPLE_TEMPERATURE

    def report(self) -> dict:
        """The grammar's outcome for the completion's metadata: backend, the keywords left to the check on the
        answer, answers drawn again, whether the last attempt was the closer's document, and whether the
        answer is a complete document that passed the check (valid) with what failed when not."""
        bad = self.violations()
        out = {"backend": getattr(self.grammar, "backend", "xgrammar"), "resampled": self.attempts,
               "closed": self._closing, "valid": self.is_complete() and not bad}
        checked = getattr(self.grammar, "post_checked", ())
        if checked:
            out["post_checked"] = [f"{k} at {p or '/'}" for p, k in checked]
        if bad:
            out["violations"] = bad
        return out


def new_state(grammar, max_new_tokens: int, vet: bool = True, seed: int | None = None):
    """The state of one row under SamplingParams.grammar. vet: the engine vets every pick (`settle`), which
    makes slack 0 exact; else the state keeps GROWTH tokens in reserve. seed: the request's (re-samples).
    A grammar object with its own `new_state` (the benches' peer, tunelab.infer.testing.MaskOnly) makes its
    own."""
    if hasattr(grammar, "new_state"):
        return grammar.new_state(max_new_tokens)
    return GrammarState(grammar, max_new_tokens, slack=0 if vet else GROWTH, seed=seed)


def _timed(fn):
    """`fn`, its seconds added to grammar_seconds()."""
    @functools.wraps(fn)
    def run(*args):
        t0 = time.perf_counter()
        try:
            return fn(*args)
        finally:
            _TOTAL["grammar_seconds"] += time.perf_counter() - t0
    return run


# -- the grammar step an engine runs per decoding step (states[i]: row i's state or None) ------------------
@_timed
def constrain(states: list, remaining: list[int], logits, bitmask) -> dict[int, int]:
    """First half: {row: the token it must take} for rows steered to a close; every other row under a grammar
    gets its mask applied to `logits` (B, V) in place. remaining[i]: tokens left in row i's budget; bitmask:
    an xgrammar bitmask (CPU) with at least B rows."""
    import xgrammar as xgr

    forced: dict[int, int] = {}
    masked = []
    for i, st in enumerate(states):
        if st is None or not st.active():
            continue
        tok = st.forced_token(remaining[i])
        if tok is None:
            st.fill_mask(bitmask, i, clean=False)
            masked.append(i)
            noise = st.noise(logits.shape[-1]) if hasattr(st, "noise") else None
            if noise is not None:  # a row drawn again after its answer failed the check
                logits[i] += noise.to(logits.device, logits.dtype)
        else:
            forced[i] = tok
    if masked:
        bitmask[torch.tensor(masked)] &= states[masked[0]].clean_mask()  # no raw control bytes, one op for all
        xgr.apply_token_bitmask_inplace(logits, bitmask[:len(states)].to(logits.device), indices=masked)
    return forced


@_timed
def settle(states: list, remaining: list[int], forced: dict[int, int], picks: list[int]) -> list[int]:
    """Second half: each row's token: the forced one, else the pick (from the masked logits), vetted so the
    closer can still finish in budget. Rows without a live grammar keep their pick."""
    out = list(picks)
    for i, st in enumerate(states):
        if st is not None and st.active():
            out[i] = forced[i] if i in forced else st.vet(picks[i], remaining[i])
    return out


@_timed
def advance(states: list, tokens: list[int], pad_token_id: int | None = None) -> None:
    """Accept each row's token. A pad token the grammar refuses means the caller ended that row itself (an
    end-of-sequence or stop string inside `generate`): the row is abandoned, not failed."""
    for st, tok in zip(states, tokens):
        if st is None or not st.active():
            continue
        if tok == pad_token_id and not st.matcher.fork().accept_token(tok):
            st.abandon()
            continue
        st.accept(tok)


class StructuredLogitsProcessor:
    """A transformers LogitsProcessor running the grammar step (`constrain`, `settle`, `advance`) inside
    `model.generate`, one state per row.

    Per call: accept the previous step's tokens, then constrain; with `vet` (greedy decoding: the processor
    can see the pick) the masked argmax is settled too. All states must share generate's max_new_tokens.
    Rows that generate ends by itself (EOS, stop strings) are recognised by the pad token that follows.
    """

    def __init__(self, states: list[GrammarState], vet: bool = True, pad_token_id: int | None = None):
        self.states = list(states)
        self.vet = vet
        self.pad_token_id = pad_token_id
        self._prompt_len: int | None = None
        self._bitmask = None

    def __call__(self, input_ids, scores):  # input_ids (B, T), scores (B, V)
        import xgrammar as xgr

        if input_ids.shape[0] != len(self.states):
            raise TunelabError(f"{input_ids.shape[0]} rows in the batch but {len(self.states)} grammar states")
        if self._prompt_len is None:
            self._prompt_len = input_ids.shape[1]
            self._bitmask = xgr.allocate_token_bitmask(len(self.states), self.states[0]._closer.vocab.size)
        else:
            advance(self.states, input_ids[:, -1].tolist(), self.pad_token_id)
        step = input_ids.shape[1] - self._prompt_len
        remaining = [st.max_new_tokens - step for st in self.states]
        forced = constrain(self.states, remaining, scores, self._bitmask)
        if self.vet:
            picks = scores.argmax(-1).tolist()
            for i, tok in enumerate(settle(self.states, remaining, forced, picks)):
                if tok != picks[i]:
                    forced[i] = tok
        for i, tok in forced.items():
            scores[i].fill_(float("-inf"))
            scores[i, tok] = 0.0
        return scores

    def finish(self, new_ids) -> list[str]:
        """Accept each row's last generated token (generate makes no call after it); the finish reasons.

        new_ids: (B, T_new) the generated ids, as generate returned them after the prompt."""
        if new_ids.shape[1] and self._prompt_len is not None:
            advance(self.states, new_ids[:, -1].tolist(), self.pad_token_id)
        return [st.finish_reason for st in self.states]
