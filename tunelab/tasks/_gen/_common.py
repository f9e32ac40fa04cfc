"""Shared generator machinery: seed-independent pool partitions, per-split RNGs, optional-slot templates."""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")
SPLITS = ("train", "validation", "test")

# Names with a sensible first and last name; shared by orders-json, shop-sql and handbook-qa
# (each task partitions them under its own namespace).
FIRST_NAMES = """
Maria Liam Sofia Noah Aisha Mateo Chloe Ethan Yuki Omar Ingrid Lucas Priya Diego Hannah Tariq Elena Jonas
Fatima Samuel Grace Viktor Amara Felix Leila Hugo Nadia Oscar Mei Rafael Zoe Andrei Keiko Tomas Ruth Emeka
Clara Pablo Sanna Idris Beatriz Kofi Lena Marco Anika Dmitri Rosa Henrik Layla Arjun Eva Jamal Irene Nikolai
Paula Kenji Mira Theo Adaeze Sergio Freya Ravi Lucia Bruno Selin Caleb Ines Mohammed Alma Stefan Yara Colin
Daria Hamid Julia Kwame Astrid Luis Naomi Pieter Carmen Faisal Helga Ivan Joanna Kai Lorenzo Marta Nils
Olga Patrick Rania Simon Tanvi Ulrich Vera Wei Ximena Yusuf Zainab Alice Bilal Cora Dario Edith Farid Gemma
""".split()
LAST_NAMES = """
Lopez Chen Okafor Novak Schmidt Rossi Tanaka Haddad Larsen Kowalski Singh Moreau Silva Petrov Nguyen Brennan
Fischer Mendes Kaya Andersen Ortiz Yamamoto Mbeki Dubois Costa Ivanova Walsh Horvath Sato Quinn Romero Berg
Nakamura Adeyemi Keller Rahman Santos Lindqvist Marino Patel Hughes Vargas Kim Osei Lambert Ferreira Jansen
Demir Kovacs Rivera Abbott Bauer Castillo Dahl Eriksen Fontaine Garcia Holm Ibrahim Jovanovic Kruger Leclerc
Molina Nilsson Oyelaran Pereira Quintero Richter Sorensen Tran Usman Vasquez Weber Xu Yilmaz Zimmermann Arslan
Bianchi Carvalho Duarte Engel Fuentes Gallo Hoffmann Ito Jung Kaur Lund Meyer Nowak Ochoa Park Reyes Strand
""".split()


def partition(items: Sequence[T], namespace: str, weights: tuple[int, int, int] = (6, 2, 2)) -> dict[str, list[T]]:
    """Split a pool into disjoint train/validation/test parts, the same for every seed.

    Items are ordered by sha256(namespace + item) and cut in proportion to `weights`; validation and
    test each get at least one item. Order inside each part follows the pool's order.
    """
    ranked = sorted(range(len(items)), key=lambda i: hashlib.sha256(f"{namespace}:{items[i]}".encode()).hexdigest())
    total = sum(weights)
    n_val = max(1, round(len(items) * weights[1] / total))
    n_test = max(1, round(len(items) * weights[2] / total))
    if len(items) - n_val - n_test < 1:
        raise ValueError(f"pool {namespace!r} has {len(items)} items: too few to partition three ways")
    cut = {"test": set(ranked[:n_test]), "validation": set(ranked[n_test:n_test + n_val])}
    parts: dict[str, list[T]] = {s: [] for s in SPLITS}
    for i, item in enumerate(items):
        split = "test" if i in cut["test"] else "validation" if i in cut["validation"] else "train"
        parts[split].append(item)
    return parts


def split_rng(task: str, split: str, seed: int) -> random.Random:
    """An RNG for one split of one task (string seeds hash deterministically across Python runs)."""
    return random.Random(f"{task}/{split}/{seed}")


_OPTIONAL = re.compile(r"\[\[(.*?)\]\]", re.S)
_SLOT = re.compile(r"\{(\w+)\}")


def fill(template: str, slots: dict[str, object]) -> str:
    """Fill `{slot}`s; a `[[...]]` segment is kept only when every slot inside it has a value."""

    def optional(m: re.Match) -> str:
        inner = m.group(1)
        return inner if all(slots.get(s) not in (None, "") for s in _SLOT.findall(inner)) else ""

    text = _OPTIONAL.sub(optional, template)
    text = _SLOT.sub(lambda m: str(slots[m.group(1)]), text)
    text = re.sub(r"[ \t]+\n", "\n", text)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def unique(make: Callable[[random.Random], dict], n: int, rng: random.Random, key: str) -> list[dict]:
    """Call `make(rng)` until `n` examples with distinct `example[key]` exist (first wins)."""
    seen: set[str] = set()
    out: list[dict] = []
    for _ in range(n * 50):
        if len(out) == n:
            return out
        ex = make(rng)
        k = json.dumps(ex[key], sort_keys=True)
        if k not in seen:
            seen.add(k)
            out.append(ex)
    if len(out) < n:
        raise RuntimeError(f"only {len(out)} distinct examples of {n}: the pools are too small")
    return out


def with_ids(task: str, split: str, rows: list[dict]) -> list[dict]:
    """Put a stable `id` (task-split-00000) first in every example."""
    return [{"id": f"{task}-{split}-{i:05d}", **row} for i, row in enumerate(rows)]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    """One compact JSON object per line, UTF-8, non-ASCII kept."""
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
