"""Plan micro-batches of tokenised examples: packed (first-fit-decreasing) or padded, and collate them.

A *packed* row holds several examples back to back. They never see each other: `position_ids` restart
at 0 for every example, and with no `attention_mask` transformers (5.x, `masking_utils.
find_packed_sequence_indices`) turns each run of consecutive positions into its own causal block (sdpa,
eager and flex masks; flash-attention uses the same positions as varlen boundaries). That detection is
skipped when a KV cache exists, so call the model with `use_cache=False` -- `model_inputs(batch)` does.

Batches are dicts of tensors:
    input_ids     (B, T) long, right-padded with `pad_id`
    position_ids  (B, T) long, 0.. per example; padding is one more block 0.. at the end of a row
    weights       (B, T) float32: weights[:, t] is the weight of predicting input_ids[:, t] from position
                  t-1 (see tunelab.data.tokenize); 0 at padding and at every example's first token, so no
                  token is ever predicted from another example's last token
    attention_mask (B, T) long, padded (unpacked) batches only: 1 real, 0 padding

A *flat* packed batch (`flat=True`) drops the padding altogether: every example of the micro-batch back
to back in one row (1, N), plus `cu_seq_lens` (E + 1,) long, the offsets where examples start (and N).
`tunelab.fast.attention.packed_attention` runs causal attention per example from those offsets, so no
mask is built and no token is spent on padding; any other attention falls back on the position ids.

With `share_prefix`, the tokens all examples of a flat batch start with (a task's system prompt) are held
once: segment 0 is the prefix, every later segment one example's remaining tokens, positions continuing
from the prefix, and `packed_attention` lets each example attend to the prefix and itself. The prefix's
loss weights are the sum of the examples' and `sources` (1, N) says which position predicts each token
(an example's first own token is predicted from the prefix's last), so the loss and its gradient equal
the unshared batch's exactly while the prefix is computed once instead of once per example. This needs
`packed_attention` (`shared_prefix` is passed to it); other attentions would see the examples cut off.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence

import torch

from tunelab.data.tokenize import Example
from tunelab.errors import TunelabError


def first_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Pack items of `lengths` into bins of `capacity`: longest first, each into the first bin it fits.

    Returns bins as lists of item indices (bin order = opening order). Ties keep input order, so the
    result is deterministic; a max-segment-tree over remaining capacities makes it O(n log n).
    """
    n = len(lengths)
    if n == 0:
        return []
    too_long = [i for i, length in enumerate(lengths) if length > capacity]
    if too_long:
        raise TunelabError(f"example {too_long[0]} has {lengths[too_long[0]]} tokens, more than the packing "
                           f"length {capacity}; tokenise with max_length={capacity}.")
    size = 1
    while size < n:
        size *= 2
    tree = [0] * (2 * size)  # tree[size + b]: room left in bin b; inner nodes hold the max of their children
    tree[size:size + n] = [capacity] * n
    for node in range(size - 1, 0, -1):
        tree[node] = max(tree[2 * node], tree[2 * node + 1])
    bins: list[list[int]] = []
    for i in sorted(range(n), key=lambda i: -lengths[i]):
        node = 1
        while node < size:  # descend to the leftmost bin with enough room
            node = 2 * node if tree[2 * node] >= lengths[i] else 2 * node + 1
        b = node - size
        if b == len(bins):
            bins.append([])
        bins[b].append(i)
        tree[node] -= lengths[i]
        node //= 2
        while node:
            tree[node] = max(tree[2 * node], tree[2 * node + 1])
            node //= 2
    return bins


def collate(examples: Sequence[Example], rows: Sequence[Sequence[int]], pad_id: int,
            packed: bool, flat: bool = False, share_prefix: int = 0) -> dict[str, torch.Tensor]:
    """Build one batch: each row is a list of indices into `examples` (one index when not packed).

    flat: packed only; all rows' examples in one padding-free row (1, N) with `cu_seq_lens`.
    share_prefix: flat only; when all examples start with the same >= share_prefix tokens (a task's system
    prompt), hold those tokens once (see the module docstring)."""
    if flat:
        if not packed:
            raise ValueError("flat batches are packed")
        return _collate_flat([examples[i] for row in rows for i in row], share_prefix)
    T = max(sum(len(examples[i]) for i in row) for row in rows)
    B = len(rows)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)  # (B, T)
    position_ids = torch.zeros((B, T), dtype=torch.long)  # (B, T)
    weights = torch.zeros((B, T), dtype=torch.float32)  # (B, T)
    attention_mask = torch.zeros((B, T), dtype=torch.long)  # (B, T)
    for b, row in enumerate(rows):
        if not packed and len(row) != 1:
            raise ValueError("unpacked rows hold exactly one example")
        pos = 0
        for i in row:
            ex = examples[i]
            n = len(ex)
            input_ids[b, pos:pos + n] = torch.tensor(ex.input_ids)
            position_ids[b, pos:pos + n] = torch.arange(n)
            weights[b, pos:pos + n] = torch.tensor(ex.weights)
            weights[b, pos] = 0.0  # never predict an example's first token from the previous example
            pos += n
        attention_mask[b, :pos] = 1
        position_ids[b, pos:] = torch.arange(T - pos)  # padding: its own block, attended by nothing real
    batch = {"input_ids": input_ids, "position_ids": position_ids, "weights": weights}
    if not packed:
        batch["attention_mask"] = attention_mask
    return batch


def common_prefix(exs: Sequence[Example]) -> int:
    """Tokens every example starts with, leaving each at least one token of its own."""
    n = min(len(ex) for ex in exs) - 1
    first = exs[0].input_ids
    for ex in exs[1:]:
        i = 0
        while i < n and ex.input_ids[i] == first[i]:
            i += 1
        n = i
    return n


def _collate_flat(exs: Sequence[Example], share_prefix: int = 0) -> dict[str, torch.Tensor]:
    p = common_prefix(exs) if share_prefix and len(exs) > 1 else 0
    if p < max(share_prefix, 1):
        p = 0
    if p:  # the shared prefix once, then every example's own tokens
        parts = [exs[0].input_ids[:p]] + [ex.input_ids[p:] for ex in exs]
        prefix_w = [sum(ws) for ws in zip(*(ex.weights[:p] for ex in exs))]  # each example's prefix loss, summed
        wparts = [prefix_w] + [ex.weights[p:] for ex in exs]
        positions = [torch.arange(p)] + [torch.arange(p, len(ex)) for ex in exs]
    else:
        parts, wparts = [ex.input_ids for ex in exs], [ex.weights for ex in exs]
        positions = [torch.arange(len(ex)) for ex in exs]
    lengths = [len(x) for x in parts]
    input_ids = torch.tensor([t for x in parts for t in x])[None]  # (1, N)
    position_ids = torch.cat(positions)[None]  # (1, N)
    weights = torch.tensor([w for x in wparts for w in x], dtype=torch.float32)[None]  # (1, N)
    cu = torch.tensor([0, *lengths]).cumsum(0)  # (S + 1,) segment offsets
    batch = {"input_ids": input_ids, "position_ids": position_ids, "weights": weights, "cu_seq_lens": cu}
    if p:
        sources = torch.arange(-1, input_ids.shape[1] - 1)[None]  # (1, N): token t is predicted from t - 1 ...
        sources[0, cu[1:-1]] = p - 1  # ... but each example's first own token from the prefix's last
        batch |= {"sources": sources, "shared_prefix": torch.tensor(p)}
    else:
        weights[0, cu[:-1]] = 0.0  # never predict an example's first token from the previous example
    return batch


def model_inputs(batch: dict[str, torch.Tensor]) -> dict:
    """Keyword arguments for `model(**...)`: the batch minus weights, plus `use_cache=False`.

    Without it the model builds a KV cache whenever `config.use_cache` is on (the default, in train
    mode too unless gradient checkpointing is on); transformers then skips packed-sequence detection
    and packed examples would attend to each other (seen with transformers 5.24).
    """
    keys = ("input_ids", "position_ids", "attention_mask")
    kwargs = {k: batch[k] for k in keys if k in batch} | {"use_cache": False}
    if "cu_seq_lens" in batch:  # flat batch: transformers passes these flash-attention kwargs to the attention
        cu = batch["cu_seq_lens"]
        longest = int((cu[1:] - cu[:-1]).max())
        kwargs |= {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest}
    if "shared_prefix" in batch:
        kwargs["shared_prefix"] = int(batch["shared_prefix"])
    return kwargs


class Batches:
    """Micro-batches of tokenised examples, planned once (deterministic for a seed), collated lazily.

    Args:
        examples: tokenised examples, each at most `max_length` tokens.
        batch_size: rows per micro-batch (packed sequences when packing, else examples).
        max_length: tokens per packed row (unused when not packing: examples are already cut to it).
        pad_id: token id used for padding (never trained on).
        packing: pack examples first-fit-decreasing; otherwise one example per row, right-padded.
        seed: shuffles the rows (and packing ties); use a different seed each epoch.
        max_tokens: optional cap on B x T slots per micro-batch (B shrinks for long rows).
        flat: packing only; yield padding-free (1, N) batches with `cu_seq_lens` (see `collate`).
        share_prefix: flat only; hold a common prefix of at least this many tokens once (see `collate`).
    """

    def __init__(self, examples: Sequence[Example], batch_size: int, max_length: int, pad_id: int,
                 packing: bool = True, seed: int = 0, max_tokens: int | None = None, flat: bool = False,
                 share_prefix: int = 0):
        self.examples, self.pad_id, self.packed, self.flat = examples, pad_id, packing, flat and packing
        self.share_prefix = share_prefix
        rng = random.Random(seed)
        order = list(range(len(examples)))
        rng.shuffle(order)
        if packing:
            bins = first_fit_decreasing([len(examples[i]) for i in order], max_length)
            rows = [[order[j] for j in b] for b in bins]
            rng.shuffle(rows)
        else:
            rows = [[i] for i in order]
        self.plan: list[list[list[int]]] = []  # batch -> row -> example index
        cur: list[list[int]] = []
        cur_width = 0
        for row in rows:
            width = self._width(row)
            fits = len(cur) < batch_size and (
                max_tokens is None or (len(cur) + 1) * max(width, cur_width) <= max_tokens)
            if cur and not fits:
                self.plan.append(cur)
                cur, cur_width = [], 0
            cur.append(row)
            cur_width = max(cur_width, width)
        if cur:
            self.plan.append(cur)

    def _width(self, row: Sequence[int]) -> int:
        return sum(len(self.examples[i]) for i in row)

    def __len__(self) -> int:
        return len(self.plan)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for rows in self.plan:
            yield collate(self.examples, rows, self.pad_id, self.packed, self.flat, self.share_prefix)

    @property
    def real_tokens(self) -> int:
        return sum(len(ex) for ex in self.examples)

    @property
    def slots(self) -> int:
        """Token slots the batches occupy, padding included (sum of B x T)."""
        return sum(len(rows) * max(map(self._width, rows)) for rows in self.plan)

    @property
    def efficiency(self) -> float:
        """Real tokens / slots: 1.0 means no padding at all."""
        return self.real_tokens / self.slots if self.plan else 1.0
