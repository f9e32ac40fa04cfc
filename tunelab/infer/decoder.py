"""The decoder forward the batched engine runs: a Llama-family model's own weights over a slot KV cache.

Written by hand (on the model's modules and weights) because transformers' forward builds a 4D mask, a cache
object and position tensors on every call, its `generate` cannot admit or retire rows between steps, and its
continuous batching (`generate_batch`, paged attention) takes neither a per-request adapter nor a per-request
logits processor. Llama, Mistral, Qwen2 and SmolLM share this block: pre-norm RMSNorm, rotary attention with
grouped KV heads, SwiGLU MLP; anything else runs on the generate-based engine.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from tunelab.errors import TunelabError
from tunelab.infer.lora import TARGETS, AdapterSlots, MultiLoraLinear

SUPPORTED = {"llama", "mistral", "qwen2"}


def check_supported(model) -> None:
    cfg = model.config
    kind = getattr(cfg, "model_type", "?")
    if kind not in SUPPORTED:
        raise TunelabError(f"the batched engine runs {sorted(SUPPORTED)} models, not {kind!r}.")
    if getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", kind == "mistral"):
        raise TunelabError(f"{kind} with a sliding attention window runs on the generate-based engine.")
    if getattr(cfg, "hidden_act", "silu") != "silu":
        raise TunelabError(f"activation {cfg.hidden_act!r} runs on the generate-based engine.")


class SlotCache:
    """K and V for every layer in one tensor (L, 2, S, kv_heads, T, D): S row slots, T positions.

    Active rows always occupy slots 0..B-1 (a retired row's slot is filled by moving the last one in), so a
    decoding step attends over a view of the first B slots, never a gathered copy."""

    def __init__(self, layers: int, kv_heads: int, head_dim: int, slots: int, dtype, device, length: int = 256):
        self.shape = (layers, 2, slots, kv_heads, length, head_dim)
        self.kv = torch.zeros(self.shape, dtype=dtype, device=device)
        self.lengths = [0] * slots  # tokens held per slot
        self.version = 0  # bumped by every change but a decoding step's own K/V (Decoder's tail copy checks it)

    @property
    def capacity(self) -> int:
        return self.kv.shape[4]

    def reserve(self, length: int) -> None:
        """Grow the position axis (in steps of 32) so every slot can hold `length` tokens. Decoding attends over
        the whole capacity (a contiguous view, see Decoder._decode_attention), so it is kept tight."""
        if length <= self.capacity:
            return
        new = -(-length // 32) * 32
        kv = torch.zeros(*self.kv.shape[:4], new, self.kv.shape[5], dtype=self.kv.dtype, device=self.kv.device)
        kv[:, :, :, :, :self.capacity] = self.kv
        self.kv = kv
        self.version += 1

    def move(self, src: int, dst: int) -> None:
        n = self.lengths[src]
        self.kv[:, :, dst, :, :n] = self.kv[:, :, src, :, :n]
        self.lengths[dst], self.lengths[src] = n, 0
        self.version += 1

    def load_prefix(self, slot: int, prefix: torch.Tensor) -> None:
        """Copy a cached prompt prefix (L, 2, kv_heads, P, D) into the start of `slot`."""
        n = prefix.shape[3]
        self.kv[:, :, slot, :, :n] = prefix
        self.lengths[slot] = n
        self.version += 1

    def prefix(self, slot: int, n: int) -> torch.Tensor:
        return self.kv[:, :, slot, :, :n].clone()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Decoder:
    """Runs prefill (one row, many tokens) and decode (many rows, one token each) over a SlotCache."""

    def __init__(self, model, slots: AdapterSlots):
        check_supported(model)
        self.model = model
        inner = model.model
        self.embed, self.norm, self.rotary = inner.embed_tokens, inner.norm, inner.rotary_emb
        self.layers = list(inner.layers)
        self.head = model.lm_head
        cfg = model.config
        self.heads = cfg.num_attention_heads
        self.kv_heads = getattr(cfg, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.heads
        self.slots = slots
        self._tail: tuple | None = None  # (cache key, packed K/V copy) for cascade decoding, see _tail_for
        for i, layer in enumerate(self.layers):  # route every adapted linear layer through the adapter stacks
            for parent in (layer.self_attn, layer.mlp):
                for name in TARGETS:
                    mod = getattr(parent, name, None)
                    if isinstance(mod, torch.nn.Linear):
                        setattr(parent, name, MultiLoraLinear(mod, (i, name), slots))

    def new_cache(self, slots: int, length: int = 256) -> SlotCache:
        p = next(self.model.parameters())
        return SlotCache(len(self.layers), self.kv_heads, self.head_dim, slots, p.dtype, p.device, length)

    def _attn(self, layer, i: int, h: torch.Tensor, cos, sin, cache: SlotCache, step: _Step) -> torch.Tensor:
        """h: (B, T, d). Writes this step's K/V into the cache at (step.slots, step.positions), then attends:
        decoding over the first B slots' whole capacity, prefill segment by segment over each row's span."""
        att = layer.self_attn
        B, T, _ = h.shape
        q = att.q_proj(h).view(B, T, self.heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = att.k_proj(h).view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        v = att.v_proj(h).view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        kv = cache.kv[i]  # (2, S, Hkv, Tcap, D)
        kv[0][step.slot_idx, step.head_idx, step.pos_idx] = k  # (B, Hkv, T, D)
        kv[1][step.slot_idx, step.head_idx, step.pos_idx] = v
        if step.shared is not None:  # decoding rows that share prompt prefixes: each prefix once
            tail = self._tail[1][i]  # (2, B, Hkv, Ts, D): the rows' positions from shared.start, packed
            tail[0][step.slot_idx, step.head_idx, step.tail_idx] = k
            tail[1][step.slot_idx, step.head_idx, step.tail_idx] = v
            o = self._cascade_attention(q, tail[0], tail[1], step.bias, att.scaling, step.shared, i)
        elif step.bias is not None:  # decoding: the first B slots, whole capacity (contiguous views)
            o = self._decode_attention(q, kv[0, :B], kv[1, :B], step.bias, att.scaling)
        else:  # prefill of packed rows: each segment attends over its own slot's positions
            parts = []
            for (a, b), slot, span, mask in zip(step.segments, step.seg_slots, step.spans, step.masks):
                keys, values = kv[0, slot:slot + 1, :, :span], kv[1, slot:slot + 1, :, :span]  # (1, Hkv, span, D)
                parts.append(F.scaled_dot_product_attention(q[:, :, a:b], keys, values, attn_mask=mask,
                                                            scale=att.scaling,
                                                            enable_gqa=self.heads != self.kv_heads))
            o = parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)  # (1, H, T, D)
        return att.o_proj(o.transpose(1, 2).reshape(B, T, -1))

    def _decode_attention(self, q, keys, values, bias, scale) -> torch.Tensor:
        """One query per row as two batched matmuls over contiguous cache views: q (B, H, 1, D), keys/values
        (B, Hkv, Tcap, D), bias (B, 1, 1, Tcap) with -inf past each row's end. torch's CPU flash kernel took
        12 ms a layer for 64 rows of the bundled model and a strided (B, Hkv, span, D) view 3 ms; this 0.5."""
        B, H, _, D = q.shape
        qg = q.view(B, self.kv_heads, H // self.kv_heads, D)  # heads h*G .. h*G+G-1 share kv head h
        scores = torch.matmul(qg, keys.transpose(-1, -2)).float().mul_(scale).add_(bias)  # (B, Hkv, G, Tcap)
        probs = torch.softmax(scores, dim=-1).to(values.dtype)
        return torch.matmul(probs, values).view(B, H, 1, D)

    def _cascade_attention(self, q, keys, values, bias, scale, shared: SharedPrefixes, layer: int) -> torch.Tensor:
        """`_decode_attention` for rows whose first positions hold a shared prompt prefix (cascade attention):
        each group's prefix is attended once for all its rows, as one matmul against the prefix's keys (a few-shot
        prompt's 1,000 tokens are read once per step, not once per row), and each row's own positions from
        `shared.start` on as in `_decode_attention`, over the packed tail copy (see `_tail_for`). The two parts
        merge by their log-sum-exps (the same softmax as over the whole row).
        q (B, H, 1, D); keys/values (B, Hkv, Ts, D), positions start.. of the first B slots; bias (B, 1, 1, Ts)
        also masks each row's positions below its own group's prefix length (they are in the prefix part)."""
        B, H, _, D = q.shape
        Hkv, G = self.kv_heads, H // self.kv_heads
        qg = q.view(B, Hkv, G, D)  # heads h*G .. h*G+G-1 share kv head h
        own = torch.matmul(qg, keys.transpose(-1, -2)).float().mul_(scale).add_(bias)  # (B, Hkv, G, Ts)
        out, lse = _attend_part(own, values)  # (B, Hkv, G, D), (B, Hkv, G, 1)
        for kv, idx in shared.groups:  # kv (L, 2, Hkv, P, D); idx: the group's rows (None: all, in order)
            n = B if idx is None else len(idx)
            qs = (qg if idx is None else qg.index_select(0, idx)).transpose(0, 1).reshape(Hkv, n * G, D)
            # few passes over the (Hkv, n*G, P) scores (they cost more than the matmuls): the scale goes into q
            # where that is exact (a power of two: head_dim 64's 1/8), the rest as in _attend_part
            exact = math.frexp(scale)[0] == 0.5
            sp = torch.matmul(qs * scale if exact else qs, kv[layer, 0].transpose(-1, -2))  # (Hkv, n*G, P)
            if not exact:
                sp = sp.float().mul_(scale)
            o, lp = _attend_part(sp, kv[layer, 1])  # (Hkv, n*G, D), (Hkv, n*G, 1)
            o = o.view(Hkv, n, G, D).transpose(0, 1)  # (n, Hkv, G, D)
            lp = lp.view(Hkv, n, G, 1).transpose(0, 1)
            mine = lse if idx is None else lse.index_select(0, idx)
            both = torch.logaddexp(mine, lp)
            merged = (out if idx is None else out.index_select(0, idx)) * (mine - both).exp() + o * (lp - both).exp()
            if idx is None:
                out, lse = merged, both
            else:
                out.index_copy_(0, idx, merged)
                lse.index_copy_(0, idx, both)
        return out.to(values.dtype).view(B, H, 1, D)

    def _run(self, x: torch.Tensor, cache: SlotCache, step: _Step) -> torch.Tensor:
        """x: (B, T, d) embeddings. Returns the final hidden states (B, T, d)."""
        cos, sin = self.rotary(x, step.positions)  # (B, T, D)
        cos, sin = cos.unsqueeze(1).to(x.dtype), sin.unsqueeze(1).to(x.dtype)
        h = x
        for i, layer in enumerate(self.layers):
            h = h + self._attn(layer, i, layer.input_layernorm(h), cos, sin, cache, step)
            mlp = layer.mlp
            z = layer.post_attention_layernorm(h)
            h = h + mlp.down_proj(mlp.act_fn(mlp.gate_proj(z)) * mlp.up_proj(z))
        return self.norm(h)

    @torch.inference_mode()
    def prefill(self, rows: list[tuple[int, list[int]]], cache: SlotCache) -> torch.Tensor:
        """Run each (slot, tokens) after the `cache.lengths[slot]` positions the slot holds, all rows packed
        into one (1, N) sequence (the linear layers see N rows at once). Logits of each row's last token (R, V)."""
        dev = cache.kv.device
        starts = [cache.lengths[s] for s, _ in rows]
        cache.reserve(max(st + len(t) for st, (_, t) in zip(starts, rows)))
        cache.version += 1
        ids = torch.tensor([t for _, toks in rows for t in toks], device=dev).view(1, -1)
        positions = torch.cat([torch.arange(st, st + len(t), device=dev) for st, (_, t) in zip(starts, rows)])
        slots = torch.cat([torch.full((len(t),), s, device=dev) for s, t in rows])
        step = _Step(positions.view(1, -1), slots.view(1, -1), self.kv_heads)
        ends, a = [], 0
        for st, (s, toks) in zip(starts, rows):
            n, span = len(toks), st + len(toks)
            # token j (at st + j) sees positions 0 .. st + j of its own slot
            mask = torch.arange(span, device=dev).view(1, span) <= positions[a:a + n].view(n, 1)  # (n, span)
            step.add_segment(a, a + n, s, span, mask.view(1, 1, n, span))
            cache.lengths[s] = span
            a += n
            ends.append(a - 1)
        h = self._run(self.embed(ids), cache, step)  # (1, N, d)
        return self.head(h[0, ends]).float()  # (R, V)

    def _tail_for(self, cache: SlotCache, rows: int, start: int) -> None:
        """Keep a packed copy of the first `rows` slots' positions from `start` on, every layer (L, 2, B, Hkv, Ts, D):
        as a strided view of the cache, bmm copied that part of K and V in every layer of every step (17 ms a
        step at 64 few-shot rows); the copy is made again only when the cache changed otherwise (a row joined or
        left, the capacity grew), and each step writes its new K/V into both."""
        key = (id(cache.kv), cache.version, rows, start, cache.capacity)
        if self._tail is None or self._tail[0] != key:
            self._tail = None  # the old copy goes before the new one is made
            self._tail = (key, cache.kv[:, :, :rows, :, start:].clone())

    @torch.inference_mode()
    def decode(self, tokens: list[int], cache: SlotCache, shared: SharedPrefixes | None = None) -> torch.Tensor:
        """One new token for each of the first B slots; returns logits (B, V). shared: the prompt prefixes rows
        share (their KV also sits at the start of each row's slot), attended once per group."""
        B = len(tokens)
        dev = cache.kv.device
        lengths = cache.lengths[:B]
        cache.reserve(max(lengths) + 1)
        ids = torch.tensor(tokens, device=dev).view(B, 1)
        positions = torch.tensor(lengths, device=dev).view(B, 1)
        step = _Step(positions, torch.arange(B, device=dev).view(B, 1), self.kv_heads)
        s0, cap = (shared.start if shared is not None else 0), cache.capacity
        seen = torch.arange(s0, cap, device=dev).view(1, 1, 1, cap - s0)
        step.bias = torch.zeros(B, 1, 1, cap - s0, device=dev)  # each row sees its own positions only
        step.bias.masked_fill_(seen > positions.view(B, 1, 1, 1), float("-inf"))
        if shared is not None:  # ... and, in its slot, not those its group's prefix holds
            step.shared = shared
            self._tail_for(cache, B, s0)
            step.tail_idx = step.pos_idx - s0
            step.bias.masked_fill_(seen < torch.tensor(shared.lengths, device=dev).view(B, 1, 1, 1), float("-inf"))
        h = self._run(self.embed(ids), cache, step)
        for b in range(B):
            cache.lengths[b] += 1
        return self.head(h[:, 0]).float()  # (B, V)


def _attend_part(scores: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One part of each row's attention (its own positions, or a shared prefix): softmax(scores) @ values in fp32
    and the part's log-sum-exp (..., 1), by which the parts merge. The max is taken in the scores' dtype, the
    subtraction writes fp32, and the sum divides the output, not the scores (fewer passes over them)."""
    top = scores.amax(-1, keepdim=True).float()
    e = torch.sub(scores, top).exp_()
    total = e.sum(-1, keepdim=True)
    return torch.matmul(e.to(values.dtype), values).float().div_(total), top + total.log()


class _Step:
    """Where one forward's tokens go: positions and slots (B, T), and how they attend (a decoding bias, or
    prefill segments of a packed row, each with its slot, span and causal mask)."""

    def __init__(self, positions: torch.Tensor, slots: torch.Tensor, kv_heads: int):
        B, T = positions.shape
        self.positions = positions
        self.slot_idx = slots.view(B, 1, T)
        self.head_idx = torch.arange(kv_heads, device=positions.device).view(1, -1, 1)
        self.pos_idx = positions.view(B, 1, T)
        self.bias: torch.Tensor | None = None
        self.shared: SharedPrefixes | None = None
        self.tail_idx: torch.Tensor | None = None  # decoding with shared prefixes: positions in the tail copy
        self.segments, self.seg_slots, self.spans, self.masks = [], [], [], []

    def add_segment(self, a: int, b: int, slot: int, span: int, mask: torch.Tensor) -> None:
        self.segments.append((a, b))
        self.seg_slots.append(slot)
        self.spans.append(span)
        self.masks.append(mask)


class SharedPrefixes:
    """Prompt prefixes that decoding rows share (the engine's prefix cache hands each row one): `groups` is
    [(prefix KV (L, 2, Hkv, P, D), the group's row indices, None for all rows in order)], `lengths` each row's
    group's P, `start` the smallest P (the rows' own part of the slot is read from there on)."""

    def __init__(self, groups: list[tuple[torch.Tensor, list[int]]], rows: int, device):
        self.lengths = [0] * rows
        self.groups = []
        for kv, members in groups:
            for r in members:
                self.lengths[r] = kv.shape[3]
            whole = members == list(range(rows))
            self.groups.append((kv, None if whole else torch.tensor(members, device=device)))
        self.start = min(self.lengths)
