"""Retrieval: chunk a corpus, index it (BM25 / dense / hybrid; files or PostgreSQL + pgvector), search, eval."""

from tunelab.rag.corpus import Chunk, Doc, read_corpus
from tunelab.rag.evaluation import (
    augment_messages,
    evaluate_retrieval,
    evaluate_with_rag,
    retrieval_augment,
)
from tunelab.rag.index import (
    SCORE_MEANINGS,
    Hit,
    QueryResult,
    RagIndex,
    build_index,
    load_index,
    query_index,
    rrf,
)
from tunelab.rag.prompt import TEMPLATE, format_passages, with_passages
from tunelab.rag.rerank import CrossEncoderReranker, JudgeReranker, Reranker, load_reranker

__all__ = [
    "SCORE_MEANINGS", "TEMPLATE", "Chunk", "CrossEncoderReranker", "Doc", "Hit", "JudgeReranker", "QueryResult",
    "RagIndex", "Reranker", "augment_messages", "build_index", "evaluate_retrieval", "evaluate_with_rag",
    "format_passages", "load_index", "load_reranker", "query_index", "read_corpus", "retrieval_augment", "rrf",
    "with_passages",
]
