"""How the generation benches run an engine and compare decode steps: tokens/s over wall time, the pure decoding
steps' (rows, seconds), and the ratio of two rows' steps at the same positions."""

from __future__ import annotations

import time


def run_engine(engine, requests) -> dict:
    """Submit all, step until done; tokens/s over wall time and the pure decode steps' (rows, seconds)."""
    t0 = time.perf_counter()
    handles = [engine.add_request(q) for q in requests]
    unstarted, finished, steps = handles, 0, []
    while engine.has_unfinished():
        unstarted = [h for h in unstarted if h.first_token_time is None]  # not admitted yet
        admitting, n = bool(unstarted), len(handles) - len(unstarted) - finished  # n: rows running
        s0 = time.perf_counter()
        finished += len(engine.step())
        if not admitting:
            steps.append((n, time.perf_counter() - s0))
    wall = time.perf_counter() - t0
    done = [h.completion() for h in handles]
    tokens = sum(len(c.token_ids) for c in done)
    return {"tokens": tokens, "seconds": wall, "tokens_per_s": tokens / wall, "steps": steps,
            "texts": [c.text for c in done], "reasons": [c.finish_reason for c in done]}


def run_generate(engine, requests) -> dict:
    t0 = time.perf_counter()
    done = engine.generate(requests)
    wall = time.perf_counter() - t0
    tokens = sum(len(c.token_ids) for c in done)
    return {"tokens": tokens, "seconds": wall, "tokens_per_s": tokens / wall, "texts": [c.text for c in done]}


def leading_full_steps(runs: list[dict], rows: int) -> list[float]:
    """Seconds of the first decode steps that ran all `rows` rows, step by step, the fastest of the runs at
    each step (a step's cost grows with its position: the KV cache is longer)."""
    seqs = []
    for r in runs:
        seq = []
        for n, sec in r["steps"]:
            if n != rows:
                break
            seq.append(sec)
        seqs.append(seq)
    m = min(len(x) for x in seqs)
    return [min(x[i] for x in seqs) for i in range(m)]


def step_ratio(a: list[dict], b: list[dict], rows: int) -> float | None:
    """Mean step time of `b` over `a` at the same positions: the first steps where both ran all rows."""
    x, y = leading_full_steps(a, rows), leading_full_steps(b, rows)
    m = min(len(x), len(y))
    return sum(y[:m]) / sum(x[:m]) if m else None


def full_step_seconds(res: dict, rows: int) -> float | None:
    """Mean seconds of the decode steps that ran `rows` rows (the step-time comparison at equal batch)."""
    xs = [s for n, s in res["steps"] if n == rows]
    return sum(xs) / len(xs) if xs else None
