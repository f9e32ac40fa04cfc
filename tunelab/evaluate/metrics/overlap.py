"""Text-overlap metrics: ROUGE-L (rouge-score), BLEU and chrF (sacrebleu), per example and per corpus.

Per-example scores are the libraries' sentence-level scores scaled to [0, 1] (sacrebleu's /100). The
`score` in metrics.json is the mean of the per-example scores (so its bootstrap CI describes the same
number); for BLEU and chrF metrics.json also reports `corpus`, the corpus-level score, which pools
n-gram counts over all examples and is the number papers quote. An empty output against an empty
reference scores 1.0 (the libraries return 0 for that pair).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from functools import lru_cache

from tunelab.evaluate.metrics.text import as_text

_WORD = re.compile(r"\w+")


class _UnicodeTokenizer:
    """Casefolded \\w+ words; rouge-score's default tokenizer drops every non-ASCII letter."""

    def tokenize(self, text: str) -> list[str]:
        return _WORD.findall(text.casefold())


@lru_cache(maxsize=1)
def _rouge():
    from rouge_score import rouge_scorer  # imported on first use: it pulls in nltk (~0.3 s)

    return rouge_scorer.RougeScorer(["rougeL"], tokenizer=_UnicodeTokenizer())


def _sacrebleu():
    import sacrebleu  # imported on first use, like rouge-score

    return sacrebleu


def _both_empty(output: str, reference: str) -> bool:
    return not output.strip() and not reference.strip()


def rouge_l(output: str, reference: str) -> float:
    """ROUGE-L F-measure (longest common subsequence of words; Unicode-aware, casefolded, no stemming)."""
    reference = as_text(reference)
    if _both_empty(output, reference):
        return 1.0
    return float(_rouge().score(reference, output)["rougeL"].fmeasure)


def bleu(output: str, reference: str, *, tokenize: str = "13a") -> float:
    """Sentence BLEU / 100 (sacrebleu defaults: exp smoothing, effective order; tokenize='zh' for Chinese)."""
    reference = as_text(reference)
    if _both_empty(output, reference):
        return 1.0
    return _sacrebleu().sentence_bleu(output, [reference], tokenize=tokenize).score / 100


def chrf(output: str, reference: str) -> float:
    """Sentence chrF / 100 (character n-grams up to 6, beta 2; sacrebleu defaults)."""
    reference = as_text(reference)
    if _both_empty(output, reference):
        return 1.0
    return _sacrebleu().sentence_chrf(output, [reference]).score / 100


def corpus_bleu(outputs: Sequence[str], references: Sequence[str]) -> float:
    """Corpus BLEU / 100 over all examples (one reference each)."""
    return _sacrebleu().corpus_bleu(list(outputs), [list(references)]).score / 100


def corpus_chrf(outputs: Sequence[str], references: Sequence[str]) -> float:
    """Corpus chrF / 100 over all examples (one reference each)."""
    return _sacrebleu().corpus_chrf(list(outputs), [list(references)]).score / 100
