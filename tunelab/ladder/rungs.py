"""The escalation ladder's rungs, cheapest first, and which of them a task can run.

The order is the guide's: try the cheap fixes before finetuning. Each rung is a combination of a few knobs
(few-shot examples, constrained decoding, retrieval, a LoRA adapter); `cost` orders them for "the cheapest
rung that meets the target" (prompt changes < decoding changes < an index to keep < a model to train).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Rung:
    name: str
    label: str  # what a report calls it
    few_shot: bool = False
    constrained: bool = False
    rag: str | None = None  # "bm25" | "hybrid"
    lora: bool = False
    cost: int = 0
    rerank: bool = False  # the retrieved candidates are reranked (a cross-encoder, or the base model as judge)
    optional: bool = False  # runs only when asked for (named in --rungs, or its ladder option)


RUNGS: tuple[Rung, ...] = (
    Rung("prompt", "zero-shot prompt", cost=0),
    Rung("few-shot", "few-shot prompt", few_shot=True, cost=1),
    Rung("constrained", "constrained decoding", constrained=True, cost=2),
    Rung("bm25", "BM25 RAG", rag="bm25", cost=3),
    Rung("hybrid", "hybrid RAG", rag="hybrid", cost=4),
    # optional: the base model as judge costs a forward pass per (question, candidate) pair
    Rung("hybrid+rerank", "hybrid RAG + rerank", rag="hybrid", rerank=True, cost=5, optional=True),
    Rung("lora", "LoRA", lora=True, cost=6),
    Rung("lora+constrained", "LoRA + constrained", lora=True, constrained=True, cost=7),
    Rung("rag+lora", "RAG + LoRA", rag="hybrid", lora=True, cost=8),
)
BY_NAME = {r.name: r for r in RUNGS}


@dataclass
class RungPlan:
    """The rungs to run on a task and, for the others, why not."""

    rungs: list[Rung] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # rung name -> reason


def plan_rungs(has_schema: bool, has_corpus: bool, can_train: bool, wanted: list[str] | None = None,
               has_train: bool = True, optional: bool = False) -> RungPlan:
    """Which rungs apply: constrained ones need a schema, RAG ones a corpus, LoRA ones training data or an
    adapter, few-shot a train split to take examples from; `wanted` (rung names) restricts the ladder.
    Optional rungs (hybrid+rerank) run when named in `wanted` or when `optional` is set."""
    from tunelab.errors import TunelabError

    if wanted:
        unknown = [w for w in wanted if w not in BY_NAME]
        if unknown:
            raise TunelabError(f"unknown rung(s) {unknown} in --rungs; the rungs are: {', '.join(BY_NAME)}.")
    plan = RungPlan()
    for r in RUNGS:
        if wanted and r.name not in wanted and not (r.optional and optional):
            continue
        if r.few_shot and not has_train:
            plan.skipped[r.name] = "no train split to take few-shot examples from"
        elif r.constrained and not has_schema:
            plan.skipped[r.name] = "the task has no JSON Schema or grammar to constrain decoding with"
        elif r.rag and not has_corpus:
            plan.skipped[r.name] = "the task has no corpus to retrieve from (give one with --corpus)"
        elif r.lora and not can_train:
            plan.skipped[r.name] = "no training data and no --adapter"
        elif r.optional and not (optional or wanted):
            plan.skipped[r.name] = "optional: run it with --rerank (or name it in --rungs)"
        else:
            plan.rungs.append(r)
    return plan
