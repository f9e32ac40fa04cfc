"""Retrieval: chunk a corpus, index it (BM25 / dense / hybrid; files or PostgreSQL + pgvector), search, eval."""

from tunelab.rag.corpus import Chunk, Doc, read_corpus
from tunelab.rag.evaluation import (
    augment_messages,
    evaluate_retrieval,
    evaluate_with_rag,
    retrieval_augment,
)
from tunelab.rag.index import Hit, RagIndex, build_index, load_index, query_index, rrf
from tunelab.rag.prompt import TEMPLATE, format_passages, with_passages

__all__ = [
    "TEMPLATE", "Chunk", "Doc", "Hit", "RagIndex", "augment_messages", "build_index", "evaluate_retrieval",
    "evaluate_with_rag", "format_passages", "load_index", "query_index", "read_corpus", "retrieval_augment", "rrf",
    "with_passages",
]
