"""Reranking on handbook-qa: retrieval quality and the RAG rung's answer score, with and without a reranker.

A hybrid index (BM25 + MiniLM, reciprocal-rank fusion) of the handbook-qa corpus; on the first --limit test
questions it measures recall@1, recall@k and MRR@k of the fused order, then of the same candidates reranked
(the top --depth of each fused list rescored). The default reranker is the base model as a yes/no relevance
judge (tunelab.rag.JudgeReranker, one forward pass per pair); --reranker FOLDER uses a local cross-encoder.
Then it runs the ladder's `hybrid` and `hybrid+rerank` rungs on the same questions with the base model
(k passages in the prompt, greedy) and prints their answer score (handbook-qa's `contains`) with 95% CIs.
Each (question, passage) pair is judged once: the retrieval measurement and the rung share the scores.

    python bench/rerank.py                      # 30 questions, depth 5, k 3: 150 judged pairs
    python bench/rerank.py --limit 200 --depth 10

Measured (2-core AMD EPYC shared with other jobs, load ~15, so times are inflated): recall@1 0.967 fused vs
0.367 judged, recall@3 1.000 vs 0.800; answer `contains` 0.433 vs 0.367 (95% CIs overlap); 1595 s in all.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from _common import BUNDLED, fmt, log, print_table, save_json

TASK = "handbook-qa"


class Cached:
    """A reranker whose scores are remembered per (query, passage): the rung reuses what retrieval judged."""

    def __init__(self, inner):
        self.inner, self.name, self.depth, self.identity = inner, inner.name, inner.depth, inner.identity
        self.memo: dict[tuple[str, str], float] = {}
        self.seconds, self.pairs = 0.0, 0

    def score(self, pairs):
        new = list(dict.fromkeys(p for p in pairs if p not in self.memo))
        if new:
            t0 = time.perf_counter()
            self.memo.update(zip(new, self.inner.score(new)))
            self.seconds += time.perf_counter() - t0
            self.pairs += len(new)
        return [self.memo[p] for p in pairs]


def retrieval_rows(index, reranker, limit: int, k: int) -> tuple[list[list], dict]:
    from tunelab.rag import evaluate_retrieval

    rows, out = [], {}
    for name, idx in (("hybrid (RRF)", index), (f"hybrid + {reranker.name}", index.with_reranker(reranker))):
        at1 = evaluate_retrieval(idx, TASK, k=1, limit=limit)
        atk = evaluate_retrieval(idx, TASK, k=k, limit=limit)
        out[name] = {"recall_at_1": at1["recall_at_k"], f"recall_at_{k}": atk["recall_at_k"], "mrr": atk["mrr"]}
        rows.append([name, fmt(at1["recall_at_k"], 3), fmt(atk["recall_at_k"], 3), fmt(atk["mrr"], 3)])
    return rows, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--limit", type=int, default=30, help="handbook-qa test questions")
    ap.add_argument("--depth", type=int, default=5, help="fused candidates the judge rescores per question")
    ap.add_argument("-k", type=int, default=3, help="passages in the prompt (the ladder's default)")
    ap.add_argument("--reranker", help="a local cross-encoder folder instead of the base model as judge")
    ap.add_argument("--model", default=BUNDLED)
    ap.add_argument("--no-answers", action="store_true", help="retrieval only (no generation)")
    ap.add_argument("--out", help="also write the results as JSON")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-rerank-"))
    os.environ["TUNELAB_REGISTRY"] = str(tmp / "registry.sqlite")  # the bench's index and ladder stay out of yours
    import torch

    from tunelab.infer import load_engine
    from tunelab.ladder import run_ladder
    from tunelab.rag import build_index, load_reranker

    start = time.perf_counter()
    index = build_index(TASK, tmp / "ladder" / "index-hybrid", kind="hybrid")  # the ladder's own index path
    engine = load_engine(args.model, device="cpu")
    reranker = Cached(load_reranker(args.reranker or "judge", engine, args.depth))
    rows, results = retrieval_rows(index, reranker, args.limit, args.k)
    per_pair = reranker.seconds / max(1, reranker.pairs)
    log.print(f"retrieval done ({time.perf_counter() - start:.0f} s; {reranker.pairs} pairs judged, "
              f"{per_pair * 1000:.0f} ms each)")
    what = (f"{args.model} as a yes/no judge" if args.reranker is None else f"cross-encoder {args.reranker}")
    depth = "every fused candidate" if reranker.depth is None else f"the top {max(args.k, reranker.depth)}"
    print_table(f"retrieval on {TASK} ({args.limit} test questions, hybrid index)",
                ["ranking", "recall@1", f"recall@{args.k}", f"MRR@{args.k}"], rows,
                f"reranker: {what}, rescoring {depth} fused candidates; {reranker.pairs} pairs in "
                f"{reranker.seconds:.0f} s ({per_pair * 1000:.0f} ms a pair, {torch.get_num_threads()} threads)")
    if not args.no_answers:
        res = run_ladder(TASK, args.model, tmp / "ladder", ["hybrid"], limit=args.limit, k=args.k, engine=engine,
                         rerank=reranker)
        answer_rows = []
        for r in res.results:
            results[r.label] = {"score": r.score, "ci95": r.ci95, "s_per_example": r.latency_s,
                                "failures": r.failures}
            answer_rows.append([r.label, fmt(r.score, 3), f"{r.ci95[0]:.3f}-{r.ci95[1]:.3f}",
                                r.failures.get("knowledge", 0), fmt(r.latency_s, 2)])
        print_table(f"the ladder's RAG rungs on {TASK} ({args.limit} questions, k={args.k}, {args.model})",
                    ["rung", f"answer {res.primary}", "95% CI", "knowledge failures", "generation s/example"],
                    answer_rows, f"recommendation over these two rungs: {res.recommendation.rung}")
    results["wall_s"] = time.perf_counter() - start
    log.print(f"total {results['wall_s']:.0f} s")
    save_json(args.out, {"argv": sys.argv[1:], "results": results})


if __name__ == "__main__":
    main()
