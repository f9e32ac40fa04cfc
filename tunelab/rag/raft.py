"""Retrieval-aware training data (RAFT, Zhang et al. 2024, "RAFT: Adapting Language Model to Domain Specific
RAG"): each training question with the passages the index retrieves for it, in the prompt the RAG rungs use.

A LoRA trained closed-book never sees passages, so at answer time it ignores them; trained on these rows it
learns to read them. As in RAFT, most rows carry the gold passage among retrieved distractors (moved into the
top k when the retriever ranked it lower), and a share (`no_gold`) carries distractors only, so the adapter
also learns the facts themselves rather than trusting any passage. `tunelab train data.rag=INDEX` and the
ladder's RAG + LoRA rung train on them.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from tunelab.errors import TunelabError
from tunelab.rag.evaluation import GOLD_FIELD, _gold_examples
from tunelab.rag.index import Hit, RagIndex, load_index
from tunelab.rag.prompt import with_passages
from tunelab.runs.layout import atomic_write_text
from tunelab.tasks import Task, load_task

CANDIDATES = 10  # retrieved per question to find the gold passage and the distractors in


@dataclass(frozen=True)
class RaftData:
    """What raft_data wrote: chat JSONL files for train and validation, and how they were made."""

    train: Path
    validation: Path
    info: dict  # index, k, no_gold, seed, rows, gold_in_context share, gold found by the retriever share


def _passages(hits: list[Hit], gold_id: str, k: int, drop_gold: bool, rng: random.Random) -> tuple[list[Hit], bool]:
    """The k passages of one row and whether the gold one is among them."""
    gold = [h for h in hits if h.doc_id == gold_id]
    others = [h for h in hits if h.doc_id != gold_id]
    if drop_gold or not gold:
        return others[:k], False
    if gold[0] in hits[:k]:
        return hits[:k], True  # as retrieval will show it at answer time
    picked = others[:k - 1]
    picked.insert(rng.randrange(len(picked) + 1), gold[0])  # RAFT: the gold passage at a random position
    return picked, True


def raft_rows(index: RagIndex | str | Path, task: str | Task, split: str = "train", k: int = 3,
              no_gold: float = 0.2, seed: int = 0, limit: int | None = None) -> tuple[list[dict], dict]:
    """Chat rows (`{"messages": [...]}`, the answer as the last assistant turn) for `split` of `task` with
    passages from `index`, and counts of how they were made. Needs each example's gold `doc_id`."""
    if not 0.0 <= no_gold < 1.0:
        raise TunelabError(f"data.rag_no_gold={no_gold}: give a share in [0, 1), e.g. 0.2 (RAFT's 20%).")
    idx = load_index(index) if not isinstance(index, RagIndex) else index
    t = load_task(task) if not isinstance(task, Task) else task
    examples = _gold_examples(t, split, limit)
    found = idx.search_many([t.prompt(ex) for ex in examples], max(k, CANDIDATES))
    rng, rows, with_gold, retrieved = random.Random(seed), [], 0, 0
    for ex, hits in zip(examples, found):
        gold_id = str(ex[GOLD_FIELD])
        retrieved += any(h.doc_id == gold_id for h in hits[:k])
        passages, has_gold = _passages(hits, gold_id, k, rng.random() < no_gold, rng)
        with_gold += has_gold
        msgs = with_passages(t.messages(ex), passages)
        rows.append({"messages": [*msgs, {"role": "assistant", "content": t.reference(ex)}],
                     "meta": {"id": ex.get("id"), "gold_in_context": has_gold}})
    n = max(1, len(rows))
    return rows, {"rows": len(rows), "gold_in_context": round(with_gold / n, 3),
                  "gold_retrieved_at_k": round(retrieved / n, 3)}


def raft_data(index: RagIndex | str | Path, task: str | Task, out: str | Path, k: int = 3, no_gold: float = 0.2,
              seed: int = 0, limit_train: int | None = None) -> RaftData:
    """Write out/train.jsonl and out/validation.jsonl (RAFT rows of the task's train and validation splits)
    and out/raft.json (how they were made); each file appears whole or not at all."""
    idx = load_index(index) if not isinstance(index, RagIndex) else index
    t = load_task(task) if not isinstance(task, Task) else task
    if "validation" not in t.spec.splits:
        raise TunelabError(f"task {t.name!r} has no validation split; data.rag needs train and validation splits.")
    out = Path(out)
    info: dict = {"index": str(idx.folder), "index_key": idx.manifest.get("key"), "task": t.name, "k": k,
                  "no_gold": no_gold, "seed": seed, "method": "RAFT (Zhang et al. 2024)"}
    paths = {}
    for split, limit in (("train", limit_train), ("validation", None)):
        rows, counts = raft_rows(idx, t, split, k, no_gold, seed, limit)
        paths[split] = atomic_write_text(out / f"{split}.jsonl",
                                         "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        info[split] = counts
    atomic_write_text(out / "raft.json", json.dumps(info, indent=2) + "\n")
    return RaftData(paths["train"], paths["validation"], info)


def with_retrieval(recipe):
    """`recipe` (a tunelab Recipe with data.rag set) training on RAFT rows of its task, written into
    output_dir/raft-data: data.train / data.validation point at them, data.rag stays for the record."""
    d = recipe.data
    if d.task is None:
        raise TunelabError(f"data.rag={d.rag}: give data.task too (a task whose examples name their gold "
                           "document in doc_id); RAFT rows are built from its questions.")
    made = raft_data(d.rag, d.task, Path(recipe.output_dir) / "raft-data", k=d.rag_k, no_gold=d.rag_no_gold,
                     seed=recipe.train.seed, limit_train=d.limit_train)
    data = d.model_copy(update={"task": None, "train": str(made.train), "validation": str(made.validation)})
    return recipe.model_copy(update={"data": data})


def train_with_retrieval(recipe, resume: bool = False, force: bool = False) -> Path:
    """`tunelab train` for a recipe with data.rag: build its RAFT rows, then train on them."""
    from tunelab.train import train

    return train(with_retrieval(recipe) if recipe.data.rag else recipe, resume=resume, force=force)
