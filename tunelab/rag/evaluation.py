"""How good is an index on a task: recall@k and MRR against gold passages; and task evals with retrieval."""

from __future__ import annotations

from pathlib import Path

from tunelab.errors import TunelabError
from tunelab.evaluate.harness import EvalResult, evaluate_task
from tunelab.rag.index import Hit, RagIndex, load_index
from tunelab.rag.prompt import with_passages
from tunelab.tasks import Task, load_task

GOLD_FIELD = "doc_id"


def _gold_examples(task: Task, split: str, limit: int | None = None) -> list[dict]:
    examples = task.examples(split, limit=limit)
    missing = [ex.get("id", i) for i, ex in enumerate(examples) if not ex.get(GOLD_FIELD)]
    if missing:
        raise TunelabError(f"task {task.name!r} split {split!r}: example {missing[0]!r} (and {len(missing) - 1} "
                           f"more) has no `{GOLD_FIELD}`; retrieval eval needs each example's gold document id.")
    return examples


def evaluate_retrieval(index: RagIndex | str | Path, task: str | Task, k: int = 5, split: str = "test",
                       limit: int | None = None) -> dict:
    """{"recall_at_k", "mrr", "n", "k", "misses"}: a question counts as found when a chunk of its gold
    document (`doc_id`) is among the top k chunks; MRR uses the rank of the first such chunk (0 past k)."""
    index = load_index(index) if not isinstance(index, RagIndex) else index
    task = load_task(task) if not isinstance(task, Task) else task
    examples = _gold_examples(task, split, limit)
    results = index.search_many([task.prompt(ex) for ex in examples], k)
    found, rr, misses = 0, 0.0, []
    for ex, hits in zip(examples, results):
        rank = next((i for i, h in enumerate(hits, 1) if h.doc_id == str(ex[GOLD_FIELD])), None)
        if rank is None:
            misses.append(ex.get("id"))
        else:
            found += 1
            rr += 1.0 / rank
    n = len(examples)
    return {"recall_at_k": found / n, "mrr": rr / n, "n": n, "k": k, "task": task.name, "split": split,
            "index": str(index.folder), "kind": index.kind, "misses": misses}


class Retrieved:
    """An eval `augment`: each example's messages with its retrieved passages (searched in one batch)."""

    def __init__(self, index: RagIndex, hits: dict[str, list[Hit]], k: int):
        self.hits = hits
        self.info = {"index": str(index.folder), "key": index.manifest["key"], "kind": index.kind, "k": k}
        if index.reranker is not None:
            self.info["reranker"] = {"name": index.reranker.name, **index.reranker.identity}

    def __call__(self, example: dict, messages: list[dict]) -> list[dict]:
        return with_passages(messages, self.hits[str(example.get("id"))])


def retrieval_augment(index: RagIndex | str | Path, task: str | Task, split: str = "test",
                      limit: int | None = None, k: int | None = None) -> Retrieved:
    """Search `index` once for every example of the split (k passages each) and return the eval `augment`
    that puts them into each example's prompt."""
    idx = load_index(index) if not isinstance(index, RagIndex) else index
    k = k or idx.config.k
    t = load_task(task) if not isinstance(task, Task) else task
    examples = t.examples(split, limit=limit)
    if len({str(ex.get("id")) for ex in examples}) != len(examples):
        raise TunelabError(f"task {t.name!r} split {split!r}: --rag needs a unique `id` on every example.")
    found = idx.search_many([t.prompt(ex) for ex in examples], k)
    return Retrieved(idx, {str(ex.get("id")): hits for ex, hits in zip(examples, found)}, k)


def evaluate_with_rag(task: str, index: str | Path, k: int | None = None, split: str = "test",
                      limit: int | None = None, **eval_options) -> EvalResult:
    """`tunelab eval --rag IDX`: retrieve k passages per example from `index`, put them into the prompt
    (tunelab.rag.prompt's template), then evaluate as `evaluate_task` does (options passed through)."""
    augment = retrieval_augment(index, task, split, limit, k)
    return evaluate_task(task, split=split, limit=limit, augment=augment, **eval_options)


def augment_messages(index: str | Path, messages: list[dict], query: str, k: int | None = None) -> list[dict]:
    """`tunelab generate --rag`: `messages` with the passages `index` retrieves for `query`."""
    return with_passages(messages, load_index(index).search(query, k))
