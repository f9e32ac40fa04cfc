"""`tunelab rag`: index a corpus, query it, measure recall."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from tunelab.cli._app import JsonOpt, _print_json, app, out

# column titles for the score names of tunelab.rag.index.SCORE_MEANINGS (and the "dense" stage: a cosine)
LABELS = {"rrf": "RRF", "bm25": "BM25", "full-text": "full-text", "dense": "cosine", "cosine": "cosine",
          "cross-encoder": "cross-encoder", "judge": "judge log-odds"}

rag_app = typer.Typer(help="Retrieval: index a corpus, query it, measure recall against gold passages.",
                      no_args_is_help=True)
app.add_typer(rag_app, name="rag")


@rag_app.command("index")
def rag_index(
    corpus: Annotated[str, typer.Argument(help="JSONL (id, text, title?), folder of .md/.txt, or a task name")],
    out_dir: Annotated[Path, typer.Option("--out", help="index folder (versions are kept side by side)")],
    kind: Annotated[str | None, typer.Option(help="bm25 | dense | hybrid (default hybrid)")] = None,
    chunk_tokens: Annotated[int | None, typer.Option(help="chunk size in the embedder's tokens")] = None,
    overlap: Annotated[int | None, typer.Option(help="tokens shared by neighbouring chunks")] = None,
    embedder: Annotated[str | None, typer.Option(help="sentence-transformers folder (default: MiniLM)")] = None,
    store: Annotated[str | None, typer.Option(help="postgresql://... (pgvector); default: files in --out")]
    = None,
    stemmer: Annotated[str | None, typer.Option(help="BM25 stemmer language, e.g. english (PyStemmer)")] = None,
    reranker: Annotated[Path | None, typer.Option(help="local cross-encoder folder to rerank with")] = None,
    embed_dtype: Annotated[str | None, typer.Option(help="float32 | bfloat16 (faster on AVX512-BF16/AMX CPUs)")]
    = None,
    as_json: JsonOpt = False,
) -> None:
    """Chunk a corpus and index it (a new version when the corpus, chunking or embedder changed)."""
    from tunelab.rag import build_index

    idx = build_index(corpus, out_dir, kind, chunk_tokens, overlap, embedder, store, stemmer, reranker,
                      embed_dtype)
    m = idx.manifest
    if as_json:
        return _print_json(m)
    out.print(f"[green]indexed[/green] {m['corpus']['docs']} documents as {m['chunks']} chunks "
              f"({m['retrieval']['kind']}, {m['store']['kind']}) into {idx.folder}  key {m['key'][:12]}")


@rag_app.command("query")
def rag_query(
    index: Annotated[Path, typer.Argument(help="index folder (or one version folder)")],
    question: str,
    k: Annotated[int, typer.Option("-k", help="passages to return")] = 5,
    embedder: Annotated[str | None, typer.Option(help="refused unless it is the index's embedder")] = None,
    as_json: JsonOpt = False,
) -> None:
    """The top-k passages for a question, each with its rank and every retriever's own rank and score."""
    from tunelab.rag import query_index

    res = query_index(index, question, k, embedder)
    if as_json:
        return _print_json([h.__dict__ for h in res.hits])
    stages = [s for s in ("bm25", "full-text", "dense", "rrf") if any(s in h.stages for h in res.hits)]
    score_col = res.hits[0].score_name if res.hits else "score"
    t = Table("#", LABELS.get(score_col, score_col), *(LABELS[s] for s in stages),
              caption="retriever columns: #rank there, then its own score")
    t.add_column("chunk", no_wrap=True)
    t.add_column("title")
    t.add_column("text")
    for h in res.hits:
        own = [f"#{h.stages[s]['rank']} {h.stages[s]['score']:.4g}" if s in h.stages else "-" for s in stages]
        t.add_row(str(h.rank), f"{h.score:.4f}", *own, escape(h.id), escape(h.title), escape(h.text))
    out.print(t)
    for name, meaning in res.meanings.items():
        out.print(f"[dim]{escape(LABELS.get(name, name))}: {escape(meaning)}[/dim]")
    if "rrf" in stages or score_col == "rrf":
        out.print("[dim]-: not among that retriever's candidates[/dim]")


@rag_app.command("eval")
def rag_eval(
    index: Annotated[Path, typer.Argument(help="index folder (or one version folder)")],
    task: Annotated[str, typer.Option(help="task whose examples carry doc_id (e.g. handbook-qa)")],
    k: Annotated[int, typer.Option("-k")] = 5,
    split: Annotated[str, typer.Option()] = "test",
    limit: Annotated[int | None, typer.Option(help="first N examples")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Recall@k and MRR of an index against a task's gold passages."""
    from tunelab.rag import evaluate_retrieval

    r = evaluate_retrieval(index, task, k, split, limit)
    if as_json:
        return _print_json(r)
    out.print(f"{r['task']}/{r['split']} ({r['kind']}, n={r['n']}): recall@{k} {r['recall_at_k']:.4f}  "
              f"MRR@{k} {r['mrr']:.4f}  misses: {len(r['misses'])}")

