"""Metrics split by input length in tokens, so a short-context regression after a long-context finetune shows."""

from __future__ import annotations

from collections.abc import Sequence

from tunelab.errors import TunelabError
from tunelab.evaluate.scoring import bootstrap_ci


def parse_edges(text: str | Sequence[int] | None) -> list[int] | None:
    """Bucket edges from "256,1024" (or a list of ints): positive, strictly increasing token counts.

    None or "" gives None (no bucketing). TunelabError naming --by-length for anything else."""
    if text is None or text == "":
        return None
    parts = text.split(",") if isinstance(text, str) else list(text)
    try:
        edges = [int(str(p).strip()) for p in parts]
    except ValueError:
        raise TunelabError(f"--by-length {text!r}: give bucket edges in tokens separated by commas, "
                           "e.g. --by-length 256,1024.") from None
    if any(e <= 0 for e in edges) or any(b <= a for a, b in zip(edges, edges[1:])):
        raise TunelabError(f"--by-length {text!r}: the edges must be positive and increasing, e.g. 256,1024.")
    return edges


def bucket_label(lo: int, hi: int | None) -> str:
    """'0-255', '256-1023', '1024+': the token counts a bucket holds (lo inclusive, hi exclusive)."""
    return f"{lo}+" if hi is None else f"{lo}-{hi - 1}"


def by_length(scores: list[dict[str, float]], lengths: Sequence[int], edges: Sequence[int]) -> dict[str, list[dict]]:
    """Per metric, one entry per bucket of input tokens: {"bucket", "lo", "hi", "n", "score", "ci95"}.

    scores: per example {metric: score} (non-numeric entries are skipped). lengths: input tokens per
    example. edges: increasing bucket edges; [256, 1024] makes buckets 0-255, 256-1023, 1024+. Empty
    buckets are listed with n 0 and score None, so every run shows the same rows.
    """
    if len(scores) != len(lengths):
        raise ValueError(f"{len(scores)} score rows but {len(lengths)} lengths")
    bounds = list(zip([0, *edges], [*edges, None]))
    metrics = list(dict.fromkeys(m for row in scores for m, v in row.items() if isinstance(v, float)))
    out: dict[str, list[dict]] = {}
    for metric in metrics:
        rows = []
        for lo, hi in bounds:
            values = [row[metric] for row, n in zip(scores, lengths)
                      if metric in row and lo <= n and (hi is None or n < hi)]
            cell = {"bucket": bucket_label(lo, hi), "lo": lo, "hi": hi, "n": len(values), "score": None,
                    "ci95": None}
            if values:
                cell.update(score=sum(values) / len(values), ci95=list(bootstrap_ci(values)))
            rows.append(cell)
        out[metric] = rows
    return out
