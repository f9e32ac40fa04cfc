"""BM25 over chunks with bm25s (its Lucene variant), English stopwords and an optional Snowball stemmer."""

from __future__ import annotations

from pathlib import Path

from tunelab.errors import TunelabError

METHOD = "lucene"


def _stemmer(language: str | None):
    if not language:
        return None
    try:
        import Stemmer
    except ImportError:
        raise TunelabError(f"stemmer {language!r} needs PyStemmer: pip install PyStemmer (or omit --stemmer)."
                           ) from None
    try:
        return Stemmer.Stemmer(language).stemWord
    except KeyError:
        raise TunelabError(f"unknown stemmer language {language!r}; one of "
                           f"{', '.join(Stemmer.algorithms())}.") from None


class Bm25:
    """A bm25s retriever and the tokenizer whose vocabulary it was built on."""

    def __init__(self, retriever, tokenizer, size: int):
        self.retriever, self.tokenizer, self.size = retriever, tokenizer, size

    @classmethod
    def build(cls, texts: list[str], stemmer: str | None = None) -> Bm25:
        import bm25s
        from bm25s.tokenization import Tokenizer

        tok = Tokenizer(stemmer=_stemmer(stemmer), stopwords="en", lower=True)
        ids = tok.tokenize(texts, return_as="ids", show_progress=False)
        retriever = bm25s.BM25(method=METHOD)
        retriever.index(ids, show_progress=False)
        return cls(retriever, tok, len(texts))

    def save(self, folder: Path) -> None:
        self.retriever.save(str(folder))
        self.tokenizer.save_vocab(save_dir=str(folder))
        self.tokenizer.save_stopwords(save_dir=str(folder))

    @classmethod
    def load(cls, folder: Path, stemmer: str | None, size: int) -> Bm25:
        import bm25s
        from bm25s.tokenization import Tokenizer

        tok = Tokenizer(stemmer=_stemmer(stemmer), stopwords=[], lower=True)
        tok.load_vocab(str(folder))
        tok.load_stopwords(str(folder))
        return cls(bm25s.BM25.load(str(folder)), tok, size)

    def search_many(self, queries: list[str], n: int) -> list[list[tuple[int, float]]]:
        """Top-n (chunk row, BM25 score) per query; rows with no query term in common are left out."""
        n = min(n, self.size)
        ids = self.tokenizer.tokenize(list(queries), update_vocab=False, return_as="ids", show_progress=False)
        rows, scores = self.retriever.retrieve(ids, k=n, show_progress=False, n_threads=1)
        return [[(int(r), float(s)) for r, s in zip(rr, ss) if s > 0] for rr, ss in zip(rows, scores)]
