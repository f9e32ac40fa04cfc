"""The batched engine: token-level (continuous) batching with an adapter, a grammar and sampling per row.

Each `step()` admits waiting requests into free rows (prefill, within a token budget) and then runs one
decoding step for every running row; rows that finish leave at once and their slot is reused by the next
request, so one long answer never holds a batch hostage. A prompt prefix seen before (a task's system
prompt) is not recomputed: its KV is copied from a small cache keyed by adapter and tokens.
"""

from __future__ import annotations

import os
import time
from collections import OrderedDict, deque

import torch

from tunelab.errors import TunelabError
from tunelab.infer.api import Request, RequestHandle, StepEngine, cut_at_stop, eos_ids, prompt_ids
from tunelab.infer.decoder import Decoder, SharedPrefixes
from tunelab.infer.grammar import compile_grammar
from tunelab.infer.lora import AdapterSlots, RowGroups, read_adapter
from tunelab.infer.structured import advance, constrain, new_state, settle

AGAIN = "again"  # a row whose answer the grammar re-samples (tunelab.infer.structured.GrammarState.resample)
MIN_SHARED = 16  # shorter common prefixes are recomputed: copying them costs about what computing them does
# decoding attends a shared prefix once per step (cascade) when every row's is at least this long: a few-shot
# block (~1,100 tokens) gains, a task's system prompt alone (orders-json: 239) decoded 10% slower than plain
# attention (the rows' own positions are then a strided view of the cache; bench/_shared_prefix.py)
CASCADE_MIN = 512


class Row(RequestHandle):
    """A request in flight (the handle add_request returns): its slot's adapter, grammar state and generator."""

    def __init__(self, req: Request, ids: list[int], adapter: int, arrival: float, decode):
        super().__init__(req, ids, decode, arrival)
        self.adapter = adapter
        p = req.params
        # vetted: the engine settles every pick (structured.settle), which keeps "always finishes" exact
        self.grammar = new_state(p.grammar, p.max_new_tokens, seed=p.seed) if p.grammar is not None else None
        self.generator = None
        self.shared: tuple[torch.Tensor, int] | None = None  # (a cached prefix's KV, positions of it in the slot)
        if p.temperature > 0:
            self.generator = torch.Generator().manual_seed(p.seed if p.seed is not None else
                                                           int.from_bytes(os.urandom(4), "little"))


class BatchEngine(StepEngine):
    """Continuous batching over a Llama-family model loaded once, with any number of LoRA adapters."""

    def __init__(self, model, tokenizer, device: str = "cpu", max_batch: int = 64, prefill_tokens: int = 1024,
                 prefix_cache: int = 4):
        """prefix_cache: prompts whose KV is kept per adapter (base included): with 8 adapters in one batch and
        4 entries in all, every adapter's rows evicted the others' prefix and were prefilled in full."""
        self.model, self.tokenizer, self.device = model, tokenizer, device
        p = next(model.parameters())
        self.lora = AdapterSlots(model.config.num_hidden_layers, p.dtype, p.device)
        self.decoder = Decoder(model, self.lora)
        self.max_batch, self.prefill_tokens = max_batch, prefill_tokens
        self.cache = self.decoder.new_cache(max_batch)
        self.vocab_size = model.config.vocab_size
        self.waiting: deque[Row] = deque()
        self.running: list[Row] = []  # running[i] holds cache slot i
        self.prefixes: OrderedDict[tuple[int, tuple[int, ...]], torch.Tensor] = OrderedDict()
        self.prefix_cap = prefix_cache
        self.picker = Picker(eos_ids(model, tokenizer), self.vocab_size, max_batch)
        self._slices: dict = {}  # (id(prefix KV), n) -> (that KV, its first n positions, contiguous)
        self.cascade_min = CASCADE_MIN  # benches set it past any prompt to time plain attention as the peer
        self._decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)

    @property
    def eos(self) -> set[int]:
        """Token ids that end a sequence (the picker's)."""
        return self.picker.eos

    @eos.setter
    def eos(self, ids: set[int]) -> None:
        self.picker.eos = ids

    # adapters -------------------------------------------------------------------------------------------
    @property
    def adapters(self) -> list[str]:
        return [a.name for a in self.lora.loaded]

    def add_adapter(self, name: str, path: str, slot: int | None = None) -> None:
        p = next(self.model.parameters())
        lw = read_adapter(name, path, len(self.decoder.layers), p.dtype, p.device)
        for (layer, module), (a, b) in lw.weights.items():
            layer_mod = self.decoder.layers[layer]
            base = getattr(layer_mod.self_attn, module, None) or getattr(layer_mod.mlp, module)
            base = base.base  # the nn.Linear inside MultiLoraLinear
            if a.shape[1] != base.in_features or b.shape[0] != base.out_features:
                raise TunelabError(f"adapter {path} does not fit base model: layer {layer} {module} maps "
                                   f"{a.shape[1]} -> {b.shape[0]} features, the base's maps "
                                   f"{base.in_features} -> {base.out_features}.")
        self.lora.add(lw, slot)

    def remove_adapter(self, name: str) -> None:
        i = self.lora.index(name)
        if any(r.adapter == i for r in [*self.running, *self.waiting]):
            raise TunelabError(f"adapter {name!r} is in use by requests in flight; remove it when they finish.")
        self.lora.remove(name)
        # its slot goes to the next adapter loaded: its cached prefixes must not
        self.prefixes = OrderedDict((k, v) for k, v in self.prefixes.items() if k[0] != i)

    def compile_grammar(self, schema=None, regex: str | None = None, ebnf: str | None = None):
        """A grammar for SamplingParams.grammar, for this tokenizer and the model's logits width."""
        return compile_grammar(self.tokenizer, schema, regex, ebnf, vocab_size=self.vocab_size)

    # requests -------------------------------------------------------------------------------------------
    def add_request(self, req: Request) -> Row:
        """Queue a request; it is admitted by a later `step()`."""
        row = Row(req, prompt_ids(self.tokenizer, req), self.lora.index(req.adapter), time.perf_counter(),
                   self._decode)
        self.waiting.append(row)
        return row

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def abort(self, row: Row) -> None:
        """Drop a request (its client went away): a waiting one leaves the queue, a running one its slot now,
        so it decodes no further token. Its finish_reason becomes "cancelled"; a finished row is left as is."""
        if row.finish_reason is not None:
            return
        row.finish_reason = "cancelled"
        if row in self.waiting:
            self.waiting.remove(row)
        elif row in self.running:
            self._retire()

    @torch.inference_mode()
    def step(self) -> list[Row]:
        """Admit what fits, then decode one token for every running row. Returns the rows that finished."""
        finished = self._admit()
        if self.running:
            self.lora.groups = RowGroups([r.adapter for r in self.running], self.cache.kv.device, self.lora)
            logits = self.decoder.decode([r.token_ids[-1] for r in self.running], self.cache,
                                         self._shared())  # (B, V)
            self.picker.choose(self.running, logits)
            finished += self._retire()
        return finished

    def _admit(self) -> list[Row]:
        """Move waiting rows into free slots, prefilled together (one packed forward) within the token budget.
        A row that would share its prefix with a row being prefilled now waits one step, so it reuses that
        row's KV instead of computing it too; the rows behind it (another adapter's, another prompt's) still
        go now, so each adapter's first prompt is computed in one batch, not one adapter per step."""
        budget, batch, held = self.prefill_tokens, [], []
        while self.waiting and len(self.running) < self.max_batch and (budget > 0 or not self.running):
            row = self.waiting.popleft()
            slot = len(self.running)
            start = self._load_prefix(row, slot)
            if start == 0 and self.prefix_cap and any(s == 0 and r.adapter == row.adapter and _shared(r, row)
                                                      for r, _, s in batch):
                held.append(row)  # its prefix is being computed in this batch
                if len(held) >= self.max_batch:
                    break
                continue
            self.running.append(row)
            batch.append((row, slot, start))
            budget -= len(row.prompt_ids) - start
        self.waiting.extendleft(reversed(held))  # back at the front, in their order
        if batch:
            self._prefill(batch)
        return self._retire()  # rows that finished on their first token

    def _prefill(self, batch: list[tuple[Row, int, int]]) -> None:
        batch = sorted(batch, key=lambda b: b[0].adapter)  # each adapter's tokens one slice (lora.RowGroups)
        self.lora.groups = RowGroups([r.adapter for r, _, start in batch for _ in r.prompt_ids[start:]],
                                     self.cache.kv.device, self.lora)
        logits = self.decoder.prefill([(slot, r.prompt_ids[start:]) for r, slot, start in batch], self.cache)
        for r, slot, start in batch:
            self._remember_prefix(r, slot, start)
        self.picker.choose([r for r, _, _ in batch], logits)

    def _load_prefix(self, row: Row, slot: int) -> int:
        best, best_kv = 0, None
        for (adapter, toks), kv in self.prefixes.items():
            if adapter != row.adapter:
                continue
            n = len(os.path.commonprefix([toks, tuple(row.prompt_ids)]))
            if n > best:
                best, best_kv, best_key = n, kv, (adapter, toks)
        use = min(best, len(row.prompt_ids) - 1)  # at least one token is run to get the next-token logits
        if use < MIN_SHARED:
            self.cache.lengths[slot] = 0
            return 0
        self.prefixes.move_to_end(best_key)  # least recently used goes first
        self.cache.load_prefix(slot, best_kv[:, :, :, :use])
        row.cached_tokens, row.shared = use, (best_kv, use)
        return use

    def _remember_prefix(self, row: Row, slot: int, reused: int) -> None:
        if reused >= MIN_SHARED or self.prefix_cap == 0:
            return
        kv = self.cache.prefix(slot, len(row.prompt_ids))
        self.prefixes[(row.adapter, tuple(row.prompt_ids))] = kv
        row.shared = (kv, len(row.prompt_ids))
        while len(self.prefixes) > self.prefix_cap * (len(self.lora.loaded) + 1):
            self.prefixes.popitem(last=False)

    def _shared(self) -> SharedPrefixes | None:
        """The prompt prefixes the running rows share, for cascade attention: when every row holds one of at
        least CASCADE_MIN positions and some prefix is held by more than one row (else None: plain attention).
        A group attends over the positions all its rows hold (the shortest of theirs)."""
        groups: dict[int, tuple[torch.Tensor, list[int], int]] = {}
        for i, r in enumerate(self.running):
            if r.shared is None or r.shared[1] < self.cascade_min:
                return None
            kv, n = r.shared
            _, members, least = groups.setdefault(id(kv), (kv, [], n))
            members.append(i)
            groups[id(kv)] = (kv, members, min(least, n))
        if len(groups) == len(self.running):
            return None  # nothing is shared
        # each prefix's first n positions as one contiguous tensor, copied once while the group lasts
        slices = {}
        for kv, _, n in groups.values():
            old = self._slices.get((id(kv), n))  # (the prefix itself, so a reused id is not mistaken, slice)
            slices[(id(kv), n)] = old if old is not None and old[0] is kv else \
                (kv, kv if n == kv.shape[3] else kv[:, :, :, :n].contiguous())
        self._slices = slices
        return SharedPrefixes([(slices[(id(kv), n)][1], members) for kv, members, n in groups.values()],
                              len(self.running), self.cache.kv.device)

    def _retire(self) -> list[Row]:
        done = []
        for i in range(len(self.running) - 1, -1, -1):
            if self.running[i].finish_reason is None:
                continue
            if self.running[i].finish_reason == AGAIN:  # its prompt's KV comes back from the prefix cache
                self.running[i].finish_reason = None
                self.waiting.appendleft(self.running[i])
            else:
                done.append(self.running[i])
            last = len(self.running) - 1
            if i != last:
                self.cache.move(last, i)
                self.running[i] = self.running[last]
            else:
                self.cache.lengths[i] = 0
            self.running.pop()
        return done[::-1]


class Picker:
    """Each row's next token from its logits (the engines that run their own forward share it): greedy or sampled,
    under a grammar its mask or forced closing token with the pick vetted (tunelab.infer.structured's grammar
    step); the token is appended and the row's finish_reason set when it ends."""

    def __init__(self, eos: set[int], vocab_size: int, rows: int):
        self.eos, self.vocab_size, self.rows = eos, vocab_size, rows
        self._bitmask = None

    def choose(self, rows: list[Row], logits: torch.Tensor) -> None:
        """Pick each row's next token (greedy or sampled; under a grammar: its mask or forced closing token,
        the pick vetted: tunelab.infer.structured's grammar step), append it."""
        states = [r.grammar for r in rows]
        grammar = any(st is not None for st in states)
        forced: dict[int, int] = {}
        if grammar:
            remaining = [r.params.max_new_tokens - len(r.token_ids) for r in rows]
            forced = constrain(states, remaining, logits, self._mask())
        picks = logits.argmax(-1).tolist()
        for i, r in enumerate(rows):
            if r.generator is not None and i not in forced:
                picks[i] = _sample(logits[i], r.params.temperature, r.params.top_p, r.generator)
        if grammar:
            picks = settle(states, remaining, forced, picks)
            advance(states, picks)
        now = time.perf_counter()
        for r, tok in zip(rows, picks):
            r.token_ids.append(tok)
            if r.first_token_time is None:
                r.first_token_time = now
            r.finish_reason = self._finished(r, tok)
            if r.finish_reason is not None and r.grammar is not None and r.grammar.resample(not r.streamed):
                r.finish_reason, r.token_ids = AGAIN, []  # failed the schema check: back to the queue (_retire)
            elif r.finish_reason is not None:
                r.finish_time = now

    def _mask(self):
        if self._bitmask is None:
            import xgrammar as xgr

            self._bitmask = xgr.allocate_token_bitmask(self.rows, self.vocab_size)
        return self._bitmask

    def _finished(self, r: Row, tok: int) -> str | None:
        p = r.params
        if r.grammar is not None and r.grammar.is_terminated():
            return r.grammar.finish_reason  # "stop", or "length_closed" when steered to its end
        if tok in self.eos and r.grammar is None and not p.ignore_eos:
            return "stop"
        if p.stop and cut_at_stop(r.text(), p.stop)[1]:
            return "stop"
        if len(r.token_ids) >= p.max_new_tokens:
            return r.grammar.finish_reason if r.grammar is not None else "length"
        return None


def _shared(a: Row, b: Row) -> bool:
    return len(os.path.commonprefix([a.prompt_ids, b.prompt_ids])) >= MIN_SHARED


def _sample(logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator) -> int:
    probs = torch.softmax(logits.float() / temperature, dim=-1)  # (V,)
    if top_p < 1.0:
        p, idx = probs.sort(descending=True)
        keep = p.cumsum(0) - p < top_p  # the smallest set whose mass reaches top_p
        probs = torch.zeros_like(probs).scatter_(0, idx[keep], p[keep])
    return int(torch.multinomial(probs.cpu(), 1, generator=gen))
