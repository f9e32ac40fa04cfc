"""Generator for shop-sql: a small SQLite shop database with house rules, and questions with gold SQL.

House rules a base model cannot guess: soft deletes (`deleted_at IS NULL`), money in integer cents,
status letters and tier numbers, "sales" meaning shipped or delivered orders. Question phrasings,
customers, products, countries, categories, order ids, months and the (year, status) and (year, tier)
pairs are partitioned train/validation/test independently of the seed, so no held-out gold query (up to
whitespace and case) is also a train query. Every gold query is executed while generating; most return rows.
"""

from __future__ import annotations

import datetime as dt
import random
import re
import sqlite3
from pathlib import Path

from tunelab.tasks._gen._common import FIRST_NAMES, LAST_NAMES, SPLITS, partition, split_rng, unique, with_ids
from tunelab.tasks._gen.shop_sql_questions import FAMILIES

NAME = "shop-sql"
SIZES = {"train": 1000, "validation": 200, "test": 200}
STATIC_FILES = ("task.yaml",)

DDL = [  # also the schema in task.yaml's system prompt (a test checks they agree)
    "CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT, email TEXT, country TEXT, tier INTEGER, created_at TEXT, deleted_at TEXT)",
    "CREATE TABLE products (id INTEGER PRIMARY KEY, sku TEXT, name TEXT, category TEXT, price_cents INTEGER, stock INTEGER, deleted_at TEXT)",
    "CREATE TABLE orders (id INTEGER PRIMARY KEY, customer_id INTEGER, status TEXT, ordered_at TEXT, total_cents INTEGER, deleted_at TEXT)",
    "CREATE TABLE order_items (order_id INTEGER, product_id INTEGER, quantity INTEGER, unit_price_cents INTEGER)",
]
COUNTRIES = ["France", "Germany", "Spain", "Italy", "Canada", "Brazil", "Japan", "India", "Kenya", "Mexico",
             "Norway", "Poland", "Portugal", "Sweden", "Australia", "Ireland", "Chile", "Egypt", "Vietnam", "Netherlands"]
CATEGORY_NOUNS = {
    "kitchen": ["Chef Knife", "Saucepan", "Colander", "Whisk", "Mixing Bowl", "Spatula"],
    "garden": ["Trowel", "Hose Reel", "Pruning Shears", "Watering Can", "Seed Tray", "Rake"],
    "office": ["Stapler", "Desk Tray", "Label Maker", "Monitor Riser", "Paper Shredder", "Whiteboard"],
    "toys": ["Puzzle Box", "Kite", "Building Set", "Plush Fox", "Yo-Yo", "Marble Run"],
    "books": ["Atlas", "Cookbook", "Field Guide", "Poetry Collection", "Sketch Journal", "Almanac"],
    "sports": ["Jump Rope", "Kettlebell", "Tennis Racket", "Foam Roller", "Sports Bottle", "Swim Goggles"],
    "audio": ["Headphones", "Speaker", "Turntable", "Earbuds", "Radio", "Soundbar"],
    "lighting": ["Floor Lamp", "Reading Lamp", "String Lights", "Lantern", "Night Light", "Pendant Light"],
    "bath": ["Bath Mat", "Towel Set", "Soap Dish", "Shower Caddy", "Robe", "Toothbrush Holder"],
    "pets": ["Dog Bed", "Cat Tree", "Leash", "Pet Bowl", "Chew Toy", "Bird Cage"],
    "travel": ["Suitcase", "Neck Pillow", "Packing Cubes", "Passport Wallet", "Duffel Bag", "Luggage Tag"],
    "crafts": ["Yarn Bundle", "Paint Set", "Glue Gun", "Embroidery Kit", "Clay Pack", "Brush Set"],
}
BRANDS = ["Aurora", "Nimbus", "Kestrel", "Juniper", "Orbit", "Summit", "Harbor", "Pioneer", "Zephyr", "Willow",
          "Quartz", "Ember", "Lumen", "Tundra", "Cobalt", "Meadow", "Falcon", "Sierra", "Beacon", "Drift"]
PRODUCT_NAMES = [f"{b} {n}" for b in BRANDS for nouns in CATEGORY_NOUNS.values() for n in nouns]
CATEGORY_OF = {f"{b} {n}": c for b in BRANDS for c, nouns in CATEGORY_NOUNS.items() for n in nouns}
DOMAINS = ["mail.com", "inbox.net", "post.org", "webmail.co", "letters.io"]
TIERS = {"basic": 0, "silver": 1, "gold": 2}
STATUSES = {"pending": "P", "shipped": "S", "delivered": "D", "cancelled": "C", "refunded": "R"}
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
DB_SIZES = {"customers": {"train": 90, "validation": 30, "test": 30}, "products": {"train": 60, "validation": 20, "test": 20}}
N_ORDERS = 400
YEARS = [2022, 2023, 2024, 2025]


def _date(rng: random.Random, start: dt.date, end: dt.date) -> str:
    return (start + dt.timedelta(days=rng.randrange((end - start).days + 1))).isoformat()


def build_db(seed: int = 0) -> sqlite3.Connection:
    """The shop database in memory; the same rows for the same seed whatever the split sizes."""
    rng = random.Random(f"{NAME}/db/{seed}")
    first, last = partition(FIRST_NAMES, f"{NAME}/first"), partition(LAST_NAMES, f"{NAME}/last")
    names: list[str] = []
    for split in SPLITS:
        pool = sorted({f"{f} {la}" for f in first[split] for la in last[split]})
        names += rng.sample(pool, DB_SIZES["customers"][split])
    products: list[str] = []
    product_parts = partition(PRODUCT_NAMES, f"{NAME}/product")
    for split in SPLITS:
        products += rng.sample(product_parts[split], DB_SIZES["products"][split])
    rng.shuffle(names)
    rng.shuffle(products)
    db = sqlite3.connect(":memory:")
    for stmt in DDL:
        db.execute(stmt)
    end = dt.date(2025, 12, 31)
    customers = []
    for i, name in enumerate(names, 1):
        created = _date(rng, dt.date(2021, 1, 1), dt.date(2025, 6, 30))
        email = f"{name.lower().replace(' ', '.')}@{rng.choice(DOMAINS)}"
        deleted = _date(rng, dt.date.fromisoformat(created), end) if rng.random() < 0.1 else None
        tier = rng.choices([0, 1, 2], weights=[6, 3, 1])[0]
        customers.append((i, name, email, rng.choice(COUNTRIES), tier, created, deleted))
    db.executemany("INSERT INTO customers VALUES (?, ?, ?, ?, ?, ?, ?)", customers)
    prices: set[int] = set()
    for i, name in enumerate(products, 1):
        price = rng.randint(3, 240) * 100 + rng.choice([0, 50, 99, 95, 49])
        while price in prices:  # unique prices: "most expensive" never ties
            price += 1
        prices.add(price)
        cat = CATEGORY_OF[name]
        sku = f"{cat[:3].upper()}-{1000 + i * 37 % 9000}"
        deleted = _date(rng, dt.date(2022, 1, 1), end) if rng.random() < 0.1 else None
        db.execute("INSERT INTO products VALUES (?, ?, ?, ?, ?, ?, ?)",
                   (i, sku, name, cat, price, rng.choice([0, 2, 3, 5, 8, 12, 15, 20, 30, 45, 60, 90, 120]), deleted))
    product_prices = dict(db.execute("SELECT id, price_cents FROM products"))
    buyers = [c for c in customers if rng.random() < 0.85]
    for oid in range(1, N_ORDERS + 1):
        cust = rng.choice(buyers)
        ordered = _date(rng, max(dt.date.fromisoformat(cust[5]), dt.date(2022, 1, 1)), end)
        status = rng.choices("PSDCR", weights=[1, 2, 5, 1, 1])[0]
        lines = [(pid, rng.choices([1, 2, 3, 4, 5], weights=[5, 3, 2, 1, 1])[0])
                 for pid in rng.sample(sorted(product_prices), rng.randint(1, 4))]
        total = sum(q * product_prices[p] for p, q in lines)
        deleted = _date(rng, dt.date.fromisoformat(ordered), end) if rng.random() < 0.05 else None
        db.execute("INSERT INTO orders VALUES (?, ?, ?, ?, ?, ?)", (oid, cust[0], status, ordered, total, deleted))
        db.executemany("INSERT INTO order_items VALUES (?, ?, ?, ?)", [(oid, p, q, product_prices[p]) for p, q in lines])
    db.commit()
    return db


def write_assets(out: Path, seed: int = 0) -> None:
    """Write shop.sqlite (compacted) into `out`."""
    path = out / "shop.sqlite"
    path.unlink(missing_ok=True)
    disk = sqlite3.connect(path)
    build_db(seed).backup(disk)
    disk.execute("VACUUM")
    disk.close()


class _Pools:
    """Which customers, products, countries, categories, order ids and months each split may name."""

    def __init__(self, db: sqlite3.Connection):
        first, last = partition(FIRST_NAMES, f"{NAME}/first"), partition(LAST_NAMES, f"{NAME}/last")
        product_parts = {s: set(p) for s, p in partition(PRODUCT_NAMES, f"{NAME}/product").items()}
        rows = db.execute("SELECT name, deleted_at IS NOT NULL FROM customers ORDER BY id").fetchall()
        split_of = {s: (set(first[s]), set(last[s])) for s in SPLITS}
        self.customers = {s: [(n, d) for n, d in rows if n.split()[0] in split_of[s][0] and n.split()[1] in split_of[s][1]]
                          for s in SPLITS}
        rows = db.execute("SELECT name, deleted_at IS NOT NULL FROM products ORDER BY id").fetchall()
        self.products = {s: [(n, d) for n, d in rows if n in product_parts[s]] for s in SPLITS}
        self.countries = partition(COUNTRIES, f"{NAME}/country")
        self.categories = partition(sorted(CATEGORY_NOUNS), f"{NAME}/category")
        ids = [i for (i,) in db.execute("SELECT id FROM orders ORDER BY id")]
        self.order_ids = partition(ids, f"{NAME}/order")
        self.months = partition([(y, m) for y in range(2022, 2026) for m in range(1, 13)], f"{NAME}/month")
        # families keyed only by a year and a status or tier have 20 or 12 gold queries in all: split the pairs
        self.year_status = partition([(y, s) for y in YEARS for s in STATUSES], f"{NAME}/year-status")
        self.year_tier = partition([(y, t) for y in YEARS for t in TIERS], f"{NAME}/year-tier")
        self.phrasings = {f.name: partition(list(range(len(f.phrasings))), f"{NAME}/phrasing/{f.name}") for f in FAMILIES}


def _slots(needed: set[str], pools: _Pools, split: str, rng: random.Random, trap: bool) -> dict[str, object]:
    """Values for every slot a family uses; `trap` picks a soft-deleted customer or product."""
    s: dict[str, object] = {}
    for kind, pool in (("customer", pools.customers[split]), ("product", pools.products[split])):
        if kind in needed:
            wanted = [n for n, deleted in pool if deleted == trap] or [n for n, _ in pool]
            s[kind] = rng.choice(wanted)
    s["country"] = rng.choice(pools.countries[split])
    s["category"] = rng.choice(pools.categories[split])
    s["order_id"] = rng.choice(pools.order_ids[split])
    s["year"] = rng.choice(YEARS)
    y, m = rng.choice(pools.months[split])
    s.update(month=MONTHS[m - 1], month_year=y, mm=f"{y}-{m:02d}")
    s["tier"] = rng.choice(list(TIERS))
    s["status"] = rng.choice(list(STATUSES))
    if "year" in needed and "tier" in needed:
        s["year"], s["tier"] = rng.choice(pools.year_tier[split])
    elif "year" in needed and "status" in needed:
        s["year"], s["status"] = rng.choice(pools.year_status[split])
    s["t"] = TIERS[s["tier"]]
    s["s"] = STATUSES[s["status"]]
    s["dollars"] = rng.choice([10, 15, 20, 25, 30, 40, 50, 60, 75, 100, 150])
    s["cents"] = s["dollars"] * 100
    s["units"] = rng.choice([5, 10, 15, 20, 25, 40])
    s["k"] = rng.randint(2, 5)
    return s


def _informative(rows: list[tuple]) -> bool:
    return bool(rows) and rows[0][0] not in (None, 0)


def make_example(db: sqlite3.Connection, pools: _Pools, split: str, rng: random.Random) -> dict:
    """One question with its gold SQL; resamples values until the answer is non-empty (traps aside)."""
    fam = rng.choice(FAMILIES)
    phrasing = rng.choice(pools.phrasings[fam.name][split])
    template = fam.phrasings[phrasing]
    needed = set(re.findall(r"\{(\w+)\}", template + fam.sql))
    trap = bool({"customer", "product"} & needed) and rng.random() < 0.06
    for _ in range(30):
        slots = _slots(needed, pools, split, rng, trap)
        sql = fam.sql.format(**{k: str(v).replace("'", "''") for k, v in slots.items()})
        rows = db.execute(sql).fetchall()
        if trap or _informative(rows):
            break
    return {"question": template.format(**slots), "sql": sql,
            "meta": {"family": fam.name, "phrasing": phrasing, "deleted_entity": trap}}


def normalise_sql(sql: str) -> str:
    """A gold query up to whitespace and case: two queries the same here are the same query."""
    return " ".join(sql.split()).casefold()


def examples(sizes: dict[str, int], seed: int = 0) -> dict[str, list[dict]]:
    """The splits: {split: [{id, question, sql, meta}]}; every gold query has been executed, and no
    validation or test gold query is also a train one (a RuntimeError if the pools ever allow it)."""
    db = build_db(seed)
    pools = _Pools(db)
    out = {
        split: with_ids(NAME, split, unique(lambda r, s=split: make_example(db, pools, s, r), n,
                                            split_rng(NAME, split, seed), "question"))
        for split, n in sizes.items()
    }
    train = {normalise_sql(r["sql"]) for r in out.get("train", [])}
    held = out.get("validation", []) + out.get("test", [])
    leaked = [r["id"] for r in held if normalise_sql(r["sql"]) in train]
    if leaked:
        raise RuntimeError(f"{len(leaked)} held-out gold queries are also train queries: {leaked[:5]}")
    return out
