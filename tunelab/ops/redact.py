"""Redaction of logged content: e-mail addresses, phone and card numbers, and a tenant's own patterns
(keys.yaml `redact:`), each replaced by a tag such as [EMAIL]."""

from __future__ import annotations

import re
from collections.abc import Iterable
from functools import lru_cache

from tunelab.errors import TunelabError

EMAIL = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}")
# 13-19 digits, spaces or dashes between them; kept only when the Luhn checksum holds (as card numbers do)
CARD = re.compile(r"(?<![\w-])(?:\d[ -]?){12,18}\d(?![\w-])")
# +CC and groups (+44 20 7946 0958, +1 (555) 123-4567), or groups with separators (555-123-4567, (555) 123 4567);
# 7-15 digits, not an ISO date
PHONE = re.compile(r"(?<![\w+])(?!\d{4}-\d\d-\d\d(?!\d))(?:\+\d{1,3}[ .-]?)?(?:\(\d{1,4}\)[ .-]?)?\d{2,4}(?:[ .-]\d{2,4}){1,4}(?![\w-])"
                   r"|(?<![\w+])\+\d{7,15}(?!\w)")


def luhn(digits: str) -> bool:
    """The Luhn checksum of a digit string (what card numbers carry)."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch) * (2 if i % 2 else 1)
        total += d - 9 if d > 9 else d
    return total % 10 == 0


def _card(m: re.Match) -> str:
    digits = re.sub(r"\D", "", m.group())
    return "[CARD]" if luhn(digits) else m.group()


def _phone(m: re.Match) -> str:
    digits = re.sub(r"\D", "", m.group())
    return "[PHONE]" if 7 <= len(digits) <= 15 else m.group()


def compile_patterns(patterns: Iterable[tuple[str, str]], where: str = "redact") -> list[tuple[str, re.Pattern]]:
    """A tenant's (tag, regex) pairs compiled; a bad regex is an error naming `where` and the pattern."""
    out = []
    for tag, pattern in patterns:
        try:
            out.append((tag, re.compile(pattern)))
        except re.error as e:
            raise TunelabError(f"{where}: {pattern!r} is not a regular expression ({e}); write a Python regex, "
                               r"e.g. 'ORD-\d{6}'.") from None
    return out


class Redactor:
    """Replaces e-mail addresses ([EMAIL]), card numbers ([CARD]), phone numbers ([PHONE]) and the tenant's
    own patterns ([TAG], or [REDACTED] for an untagged one) in text; the tenant's patterns run first."""

    def __init__(self, extra: Iterable[tuple[str, str]] = ()):
        self.extra = compile_patterns(extra)

    def __call__(self, text: str | None) -> str | None:
        if not text:
            return text
        for tag, rx in self.extra:
            text = rx.sub(f"[{tag.upper()}]", text)
        text = EMAIL.sub("[EMAIL]", text)
        text = CARD.sub(_card, text)
        return PHONE.sub(_phone, text)


@lru_cache(maxsize=256)
def redactor(extra: tuple[tuple[str, str], ...] = ()) -> Redactor:
    """One Redactor per distinct set of tenant patterns (compiled once)."""
    return Redactor(extra)
