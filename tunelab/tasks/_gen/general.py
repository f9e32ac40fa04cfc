"""Generator for general: checkable everyday questions to catch forgetting after a finetune.

Arithmetic, unit conversion, world facts a small instruct model knows, and instruction following
(uppercase, exactly three words, JSON only ...). Each example stores its own check,
{"metric": contains | exact_match | regex, "reference": ...}, which the reference answer passes.
Phrasings and every value pool (countries, operand pairs, words ...) are partitioned by split.
"""

from __future__ import annotations

import random
import re

from tunelab.tasks._gen import general_pools as P
from tunelab.tasks._gen._common import partition, split_rng, unique, with_ids

NAME = "general"
SIZES = {"train": 300, "validation": 100, "test": 200}
STATIC_FILES = ("task.yaml",)
SHARES = (4, 2, 4)
WEIGHTS = {"add": 6, "sub": 6, "mul": 6, "units": 8, "capital": 6, "element": 4, "fact": 6, "opposite": 6,
           **{kind: 5 for kind in P.INSTRUCTIONS}}


def _number(value: int) -> str:
    """A regex for an integer written with or without a thousands comma, not inside a longer number."""
    forms = {str(value), f"{value:,}"}
    return r"(?<![\d.,])(?:" + "|".join(re.escape(f) for f in sorted(forms)) + r")(?!\.?\d)"


def _operands(op: str) -> list[tuple[int, int]]:
    if op == "mul":
        return [(a, b) for a in range(2, 13) for b in range(2, 13)]
    if op == "sub":
        return [(a, b) for a in range(20, 100) for b in range(1, a) if a != 2 * b]  # never answer = operand
    return [(a, b) for a in range(2, 61) for b in range(2, 61)]


def _pools() -> dict[str, dict[str, list]]:
    # 4:2:4 rather than 6:2:2: this is a regression set, so test gets the widest variety
    pools = {f"phrasing/{k}": partition(list(range(len(v))), f"{NAME}/phrasing/{k}", SHARES)
             for k, v in {**P.ARITHMETIC, **P.INSTRUCTIONS, "units": P.UNIT_PHRASINGS, "capital": P.CAPITAL_PHRASINGS,
                          "element": P.ELEMENT_PHRASINGS, "opposite": P.OPPOSITE_PHRASINGS}.items()}
    pools.update({f"pairs/{op}": partition(_operands(op), f"{NAME}/pairs/{op}", SHARES) for op in P.ARITHMETIC})
    for name, items in (("capitals", P.CAPITALS), ("elements", P.ELEMENTS), ("facts", P.FACTS), ("opposites", P.OPPOSITES),
                        ("things", P.THINGS), ("words", P.REPEAT_WORDS), ("lists", P.LIST_CATEGORIES)):
        pools[name] = partition(items, f"{NAME}/{name}", SHARES)
    return pools


def make_example(pools: dict, split: str, rng: random.Random) -> dict:
    """One question, its reference answer and the check that scores it."""
    cat = rng.choices(list(WEIGHTS), weights=list(WEIGHTS.values()))[0]
    pick = lambda name: rng.choice(pools[name][split])  # noqa: E731
    phr = pick(f"phrasing/{cat}") if f"phrasing/{cat}" in pools else None
    if cat in P.ARITHMETIC or cat in ("number_only", "end_done"):
        op = cat if cat in P.ARITHMETIC else "add"
        a, b = pick(f"pairs/{op}")
        value = {"add": a + b, "sub": a - b, "mul": a * b}[op]
        table = P.ARITHMETIC[cat] if cat in P.ARITHMETIC else P.INSTRUCTIONS[cat]
        question = table[phr].format(a=a, b=b)
        if cat == "number_only":
            answer, check = str(value), ("exact_match", str(value))
        elif cat == "end_done":
            answer, check = f"{a} + {b} = {value}. Done", ("regex", _number(value) + r"[\s\S]*\bDone\W*$")
        else:
            answer, check = str(value), ("regex", _number(value))
    elif cat == "units":
        frm, to, factor = rng.choice(P.UNITS)
        n = rng.randint(2, 9)
        question = P.UNIT_PHRASINGS[phr].format(n=n, frm=frm, to=to)
        answer, check = f"{n * factor:,}", ("regex", _number(n * factor))
    elif cat in ("capital", "upper", "start_sure", "one_word", "json_answer"):
        country, city = pick("capitals")
        table = P.CAPITAL_PHRASINGS if cat == "capital" else P.INSTRUCTIONS[cat]
        question = table[phr].format(country=country)
        question = question[0].upper() + question[1:]
        answer, check = {
            "capital": (city, ("regex", rf"(?i)\b{city}\b")),
            "upper": (city.upper(), ("regex", rf"^(?=[\s\S]*\b{city.upper()}\b)[^a-z]*$")),
            "start_sure": (f"Sure. The capital of {country} is {city}.", ("regex", rf"^\W*Sure\b[\s\S]*\b{city}\b")),
            "one_word": (city, ("regex", rf"(?i)^\W*{city}\W*$")),
            "json_answer": (f'{{"answer": "{city}"}}',
                            ("regex", r'^\s*(?:```(?:json)?\s*)?\{\s*"answer"\s*:\s*"' + city + r'"\s*\}\s*(?:```)?\s*$')),
        }[cat]
    elif cat == "element":
        element, symbol = pick("elements")
        question = P.ELEMENT_PHRASINGS[phr].format(element=element)
        question = question[0].upper() + question[1:]
        answer, check = symbol, ("regex", rf"\b{symbol}\b")
    elif cat == "fact":
        question, answer, metric, ref = pick("facts")
        check = (metric, ref)
    elif cat in ("opposite", "lower"):
        word, opposite = pick("opposites")
        table = P.OPPOSITE_PHRASINGS if cat == "opposite" else P.INSTRUCTIONS[cat]
        question = table[phr].format(word=word)
        first = opposite.split("|")[0]
        if cat == "opposite":
            answer, check = first.capitalize(), ("regex", rf"(?i)\b(?:{opposite})\b")
        else:
            answer, check = first, ("regex", rf"^(?=[\s\S]*\b(?:{opposite})\b)[^A-Z]*$")
    elif cat == "three_words":
        thing, answer = pick("things")
        question = P.INSTRUCTIONS[cat][phr].format(thing=thing)
        check = ("regex", r"^\W*\w+(?:[\s,;-]+\w+){2}\W*$")
    elif cat == "repeat":
        w = pick("words")
        question = P.INSTRUCTIONS[cat][phr].format(w=w)
        answer, check = f"{w} {w} {w}", ("regex", rf"(?i)^\W*{w}\s+{w}\s+{w}\W*$")
    else:  # list_three
        what, answer = pick("lists")
        question = P.INSTRUCTIONS[cat][phr].format(cat=what)
        item = r"\s*[\w'-]+(?: [\w'-]+){0,2}\s*"  # one to three words
        check = ("regex", rf"^{item},{item},{item}\.?\s*$")
    return {"question": question, "answer": answer, "check": {"metric": check[0], "reference": check[1]},
            "meta": {"category": cat, "phrasing": phr}}


def examples(sizes: dict[str, int], seed: int = 0) -> dict[str, list[dict]]:
    """The splits: {split: [{id, question, answer, check, meta}]}."""
    pools = _pools()
    return {
        split: with_ids(NAME, split, unique(lambda r, s=split: make_example(pools, s, r), n, split_rng(NAME, split, seed), "question"))
        for split, n in sizes.items()
    }
