"""String metrics: exact match after normalisation, substring containment, regular-expression match."""

from __future__ import annotations

import json
import re
import unicodedata
from functools import lru_cache
from typing import Any


def as_text(reference: Any) -> str:
    """A text reference as a string: strings unchanged, anything else as compact JSON text."""
    if isinstance(reference, str):
        return reference
    return json.dumps(reference, ensure_ascii=False, separators=(",", ":"))


def normalize(text: str, *, casefold: bool = True, whitespace: bool = True, punctuation: bool = False) -> str:
    """Normalise text for comparison.

    Always: Unicode NFC (so a composed and a decomposed "é" compare equal) and strip the ends.
    casefold: compare case-insensitively (`str.casefold`, which also folds "ß" to "ss").
    whitespace: collapse every run of whitespace (spaces, tabs, newlines) to one space.
    punctuation: drop every character in a Unicode punctuation category (P*), e.g. . , ! ? " « ».
    """
    text = unicodedata.normalize("NFC", text)
    if punctuation:
        text = "".join(ch for ch in text if not unicodedata.category(ch).startswith("P"))
    if whitespace:
        text = " ".join(text.split())
    if casefold:
        text = text.casefold()
    return text.strip()


def exact_match(
    output: str, reference: Any, *, casefold: bool = True, whitespace: bool = True, punctuation: bool = False
) -> float:
    """1.0 when output equals the reference after normalisation (default: strip, collapse whitespace, casefold).

    See `normalize` for the options; `punctuation=True` also ignores punctuation.
    """
    opts = dict(casefold=casefold, whitespace=whitespace, punctuation=punctuation)
    return float(normalize(output, **opts) == normalize(as_text(reference), **opts))


def contains(output: str, reference: Any, *, casefold: bool = True, whitespace: bool = True) -> float:
    """1.0 when the reference occurs inside the output, both normalised as for exact_match.

    An empty reference is contained in every output (scores 1.0); tasks should not ship empty references.
    """
    opts = dict(casefold=casefold, whitespace=whitespace)
    return float(normalize(as_text(reference), **opts) in normalize(output, **opts))


@lru_cache(maxsize=256)
def compile_pattern(pattern: str, flags: int = 0) -> re.Pattern[str]:
    """Compile (and cache) a reference pattern; raises `re.error` for an invalid one."""
    return re.compile(pattern, flags)


def regex(output: str, reference: str, *, fullmatch: bool = False, ignorecase: bool = False) -> float:
    """1.0 when the reference regular expression matches the output (`re.search`; `fullmatch=True` to anchor).

    The output is stripped first. `ignorecase=True` adds `re.IGNORECASE`.
    """
    pattern = compile_pattern(reference, re.IGNORECASE if ignorecase else 0)
    text = output.strip()
    found = pattern.fullmatch(text) if fullmatch else pattern.search(text)
    return float(found is not None)
