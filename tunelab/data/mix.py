"""Mix several datasets by weight: how many rows each gives, and a seeded sample of them.

The rule is Hugging Face `interleave_datasets(..., stopping_strategy="first_exhausted")`'s, without its
repeats: the mix is as large as it can be while every source keeps its share and no row is used twice,
so the source that runs out first is used whole and the others are sampled down to their shares.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass

from tunelab.errors import TunelabError


def mix_counts(sizes: Sequence[int], weights: Sequence[float]) -> list[int]:
    """Rows to take from each source: proportional to `weights`, none more than the source holds."""
    if len(sizes) != len(weights) or not sizes:
        raise TunelabError("data.mix: give one weight per dataset")
    empty = [i for i, n in enumerate(sizes) if n == 0]
    if empty:
        raise TunelabError(f"data.mix entry {empty[0]} has no training rows; remove it or give it data")
    shares = [w / sum(weights) for w in weights]
    total = min(n / p for n, p in zip(sizes, shares))
    return [min(n, max(1, round(total * p))) for n, p in zip(sizes, shares)]


@dataclass
class Mixed:
    """A mixed training set: the rows (shuffled together) and, per source, which of its rows were used."""

    rows: list
    picked: list[list[int]]  # per source: the sorted row indices taken from it

    def record(self, i: int) -> dict:
        """What run.json keeps about source `i`: rows used, and a hash of exactly which ones."""
        digest = hashlib.sha256(json.dumps(self.picked[i]).encode()).hexdigest()
        return {"rows_used": len(self.picked[i]), "rows_used_sha256": digest}


def sample_mix(sources: Sequence[Sequence], weights: Sequence[float], seed: int) -> Mixed:
    """Sample each source down to its `mix_counts` share (seeded) and shuffle the rows together."""
    rng = random.Random(f"data.mix/{seed}")
    counts = mix_counts([len(s) for s in sources], weights)
    picked = [sorted(rng.sample(range(len(s)), k)) for s, k in zip(sources, counts)]
    order = [(i, j) for i, idx in enumerate(picked) for j in idx]
    rng.shuffle(order)
    return Mixed([sources[i][j] for i, j in order], picked)
