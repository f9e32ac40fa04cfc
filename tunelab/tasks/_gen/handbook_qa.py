"""Generator for handbook-qa: a handbook corpus about the fictional Quillmark Systems, and questions on it.

Every fact (a person's start date, a product's price, a leave entitlement...) is invented by the
seeded RNG, so no model knows it in advance; each question's short answer occurs verbatim in the
one document that holds it (`doc_id`); corpus.jsonl holds every fact. Question phrasings are
partitioned train/validation/test independently of the seed. One fact in five is held out of train on
purpose: train asks about every other fact at least once and never about those, and each validation and
test item says which kind it is (`fact_in_train`), so an eval can show that finetuning teaches the facts
it saw and not the others (retrieval reads them all).
"""

from __future__ import annotations

import datetime as dt
import itertools
import random
from pathlib import Path

from tunelab.tasks._gen._common import (
    FIRST_NAMES,
    LAST_NAMES,
    partition,
    split_rng,
    unique,
    with_ids,
    write_jsonl,
)
from tunelab.tasks._gen.handbook_qa_questions import PHRASINGS

NAME = "handbook-qa"
SIZES = {"train": 1000, "validation": 200, "test": 200}
STATIC_FILES = ("task.yaml",)

ROLES = ["Software Engineer", "Senior Software Engineer", "Data Analyst", "Product Manager", "UX Designer",
         "Support Specialist", "Sales Lead", "Accountant", "Recruiter", "QA Engineer", "Technical Writer",
         "Site Reliability Engineer", "Legal Counsel", "Office Coordinator", "Security Engineer", "Marketing Manager"]
DEPARTMENTS = ["Engineering", "Finance", "Sales", "Support", "People", "Marketing", "Legal", "Design"]
CITIES = ["Lisbon", "Tallinn", "Leeds", "Porto", "Gdansk", "Utrecht", "Bergen", "Lyon", "Graz", "Aarhus",
          "Valencia", "Cork", "Brno", "Turku", "Bologna", "Ghent", "Malmo", "Bilbao"]
STREETS = ["Linden Street", "Harbour Road", "Mill Lane", "Canal Quay", "Station Square", "Orchard Row",
           "Ropewalk", "Foundry Street", "Market Place", "Tannery Lane", "Dock Road", "Chapel Street"]
PRODUCTS = ["Brightline", "Cobblestone", "Dovetail", "Emberlog", "Fernweh", "Glasswing", "Halyard", "Inkwell",
            "Kettledrum", "Lodestar", "Millrace", "Nightjar", "Oxbow", "Pennant", "Quaystone", "Ridgeback",
            "Saltmarsh", "Tallow", "Umberfield", "Vellum", "Wicket", "Yarrow", "Ashgrove", "Bramble", "Cinderpath",
            "Driftwood", "Eelgrass", "Foxglove", "Gantry", "Hearthside"]
PRODUCT_KINDS = ["invoicing tool", "scheduling app", "inventory tracker", "survey platform", "analytics dashboard",
                 "document signer", "field-service app", "help-desk system", "payroll add-on", "route planner"]
AUDIENCES = ["small retailers", "clinics", "logistics firms", "schools", "restaurants", "law firms", "city councils",
             "construction companies"]
BENEFITS = ["gym membership", "training course", "home office equipment", "bicycle", "language lessons",
            "childcare", "commuting", "mobile phone", "book", "wellbeing"]
LEAVES = ["annual", "sick", "study", "volunteering", "bereavement", "moving", "wedding", "jury service",
          "caregiver", "sabbatical"]
SYSTEMS = ["VPN", "payroll system", "CRM", "build server", "internal wiki", "HR portal", "finance ledger",
           "customer database"]
CODENAMES = ["Heron", "Basalt", "Kingfisher", "Tamarind", "Obsidian", "Marigold", "Peregrine", "Sandpiper",
             "Quokka", "Larch", "Cormorant", "Saffron", "Tern", "Galena", "Wren", "Moraine", "Pumice", "Alder",
             "Fjord", "Ibis", "Sorrel", "Vireo", "Osprey", "Lichen"]
EVENTS = ["Summer Offsite", "Winter Party", "Hackathon", "Customer Summit", "Leadership Retreat", "Charity Run"]
N_PEOPLE = 60


def _date(rng: random.Random, first_year: int, last_year: int) -> str:
    d = dt.date(first_year, 1, 1) + dt.timedelta(days=rng.randrange((last_year - first_year + 1) * 365))
    return f"{d.day} {d:%B} {d.year}"


class _Corpus:
    """The documents and the facts each states, as the builders below add them."""

    def __init__(self) -> None:
        self.docs: list[dict] = []
        self.facts: list[dict] = []

    def add(self, doc_id: str, title: str, text: str, slots: dict, answers: dict[str, str]) -> None:
        self.docs.append({"id": doc_id, "title": title, "text": text})
        for fact, answer in answers.items():
            assert answer in text, (doc_id, answer)
            self.facts.append({"doc_id": doc_id, "fact": fact, "answer": answer, "slots": slots})


def build_corpus(seed: int = 0) -> tuple[list[dict], list[dict]]:
    """The documents ({id, title, text}) and facts ({doc_id, fact, answer, slots}) for a seed.

    One random stream feeds every builder, in this order: reordering them changes the bundled files."""
    rng = random.Random(f"{NAME}/corpus/{seed}")
    c = _Corpus()
    people = rng.sample(sorted({f"{f} {la}" for f in FIRST_NAMES for la in LAST_NAMES}), N_PEOPLE + 5)
    staff, directors = people[:N_PEOPLE], people[N_PEOPLE:]
    _people(rng, c, people, staff)
    _products(rng, c, staff)
    _offices(rng, c, staff)
    _benefits_and_leave(rng, c, directors)
    _systems(rng, c, staff)
    _projects_and_events(rng, c, staff, directors)
    return c.docs, c.facts


def _people(rng: random.Random, c: _Corpus, people: list[str], staff: list[str]) -> None:
    exts = rng.sample(range(2000, 9999), N_PEOPLE)
    for i, name in enumerate(staff):
        start, role, city = _date(rng, 2012, 2024), rng.choice(ROLES), rng.choice(CITIES)
        manager = rng.choice([p for p in people if p != name])
        first = name.split()[0]
        text = rng.choice([
            f"{name} joined Quillmark Systems on {start} as a {role} in the {rng.choice(DEPARTMENTS)} department. "
            f"{first} works from the {city} office, reports to {manager} and can be reached on extension {exts[i]}.",
            f"{name} ({role}) is based in our {city} office. Start date: {start}. Manager: {manager}. "
            f"Internal phone extension: {exts[i]}. Ask {first} about {rng.choice(PRODUCTS)}.",
        ])
        c.add(f"person-{i:03d}", f"People directory: {name}", text, {"name": name},
              {"person.start_date": start, "person.role": role, "person.office": city,
               "person.extension": str(exts[i]), "person.manager": manager})


def _products(rng: random.Random, c: _Corpus, staff: list[str]) -> None:
    for i, product in enumerate(PRODUCTS):
        launch, price = _date(rng, 2014, 2024), str(rng.choice(range(9, 400, 5)))
        version = f"{rng.randint(1, 9)}.{rng.randint(0, 12)}"
        owner = rng.choice(staff)
        text = (f"{product} is Quillmark's {rng.choice(PRODUCT_KINDS)} for {rng.choice(AUDIENCES)}. It launched on "
                f"{launch} at a list price of {price} euros per seat. The current version is {version}, and the "
                f"product owner is {owner}. Support tickets go to the {product} queue.")
        c.add(f"product-{i:03d}", f"Product sheet: {product}", text, {"product": product},
              {"product.launch_date": launch, "product.price": price, "product.version": version,
               "product.owner": owner})


def _offices(rng: random.Random, c: _Corpus, staff: list[str]) -> None:
    for i, city in enumerate(CITIES):
        opened, desks, manager = str(rng.randint(2008, 2023)), str(rng.randint(12, 260)), rng.choice(staff)
        address = f"{rng.randint(2, 180)} {rng.choice(STREETS)}"
        text = (f"The {city} office opened in {opened} and is located at {address}, {city}. It has {desks} desks, "
                f"{rng.randint(2, 9)} meeting rooms and bike storage. The office manager is {manager}; "
                f"visitors sign in at reception on the ground floor.")
        c.add(f"office-{i:03d}", f"Office guide: {city}", text, {"city": city},
              {"office.opened": opened, "office.desks": desks, "office.manager": manager, "office.address": address})


def _benefits_and_leave(rng: random.Random, c: _Corpus, directors: list[str]) -> None:
    for i, benefit in enumerate(BENEFITS):
        amount, approver = str(rng.choice(range(100, 2600, 50))), rng.choice(directors)
        reset = f"1 {rng.choice(['January', 'April', 'July', 'October'])}"
        text = (f"{benefit.capitalize()} allowance: every employee may claim up to {amount} euros per year for "
                f"{benefit} costs. Claims need a receipt and are approved by {approver}. "
                f"The allowance resets on {reset} each year; unused money does not roll over.")
        c.add(f"benefit-{i:03d}", f"Benefits: {benefit} allowance", text, {"benefit": benefit},
              {"benefit.amount": amount, "benefit.approver": approver, "benefit.reset": reset})
    for i, leave in enumerate(LEAVES):
        days, notice = rng.randint(2, 30), rng.randint(3, 45)
        carry = rng.randint(0, max(1, days // 3))
        while carry in (days, notice):
            carry += 1
        text = (f"{leave.capitalize()} leave: staff receive {days} days of {leave} leave per year. Requests must be "
                f"made at least {notice} days in advance through the HR portal, and up to {carry} unused days "
                f"can be carried over to the next year.")
        c.add(f"leave-{i:03d}", f"Leave policy: {leave} leave", text, {"leave": leave},
              {"leave.days": str(days), "leave.notice": str(notice), "leave.carry": str(carry)})


def _systems(rng: random.Random, c: _Corpus, staff: list[str]) -> None:
    for i, system in enumerate(SYSTEMS):
        length, rotation, owner = rng.randint(10, 24), rng.choice([30, 45, 60, 90, 120, 180]), rng.choice(staff)
        text = (f"Access to the {system}: passwords must be at least {length} characters long and are rotated "
                f"every {rotation} days. Two-factor login is required. The system owner is {owner}, who grants "
                f"and reviews access.")
        c.add(f"system-{i:03d}", f"Security policy: {system}", text, {"system": system},
              {"system.min_length": str(length), "system.rotation": str(rotation), "system.owner": owner})


def _projects_and_events(rng: random.Random, c: _Corpus, staff: list[str], directors: list[str]) -> None:
    for i, codename in enumerate(CODENAMES):
        start, due = _date(rng, 2019, 2022), _date(rng, 2023, 2026)
        budget, lead = f"{rng.randint(4, 95) * 10000:,}", rng.choice(staff)
        text = (f"Project {codename} started on {start} with a budget of {budget} euros. It is led by {lead} and "
                f"is due on {due}. Status updates are posted every second Friday.")
        c.add(f"project-{i:03d}", f"Project {codename}", text, {"codename": codename},
              {"project.start": start, "project.budget": budget, "project.lead": lead, "project.due": due})
    events = rng.sample([f"{y} {e}" for y in range(2018, 2025) for e in EVENTS], 12)
    for i, event in enumerate(events):
        year = int(event[:4])
        date, city, attendees = _date(rng, year, year), rng.choice(CITIES), str(rng.randint(25, 480))
        text = (f"The {event} took place on {date} in {city}. {attendees} employees attended, and the opening talk "
                f"was given by {rng.choice(directors)}.")
        c.add(f"event-{i:03d}", event, text, {"event": event},
              {"event.date": date, "event.city": city, "event.attendees": attendees})


def write_assets(out: Path, seed: int = 0) -> None:
    """Write corpus.jsonl into `out`."""
    write_jsonl(out / "corpus.jsonl", build_corpus(seed)[0])


def held_out_facts(facts: list[dict]) -> set[tuple[str, str]]:
    """The (doc_id, fact) keys train never asks about: a seed-free fifth of them (partition's held-out parts)."""
    keys = [(f["doc_id"], f["fact"]) for f in facts]
    parts = partition(keys, f"{NAME}/held-out-fact", weights=(8, 1, 1))
    return set(parts["validation"]) | set(parts["test"])


def examples(sizes: dict[str, int], seed: int = 0) -> dict[str, list[dict]]:
    """The splits: {split: [{id, question, answer, doc_id, meta}]}, held-out splits with `fact_in_train`.

    Train first asks about every fact not held out once (in a seeded order), then about random ones of
    them; so with at least that many train examples (the bundled 1000), `fact_in_train` is exact.
    """
    _, facts = build_corpus(seed)
    held = held_out_facts(facts)
    taught = [f for f in facts if (f["doc_id"], f["fact"]) not in held]
    phrasings = {k: partition(list(range(len(v))), f"{NAME}/phrasing/{k}") for k, v in PHRASINGS.items()}
    first_pass = random.Random(f"{NAME}/first-pass/{seed}").sample(taught, len(taught))

    calls = {split: itertools.count() for split in sizes}

    def make(rng: random.Random, split: str) -> dict:
        i = next(calls[split])
        if split == "train":
            fact = first_pass[i] if i < len(first_pass) else rng.choice(taught)
        else:
            fact = rng.choice(facts)
        idx = rng.choice(phrasings[fact["fact"]][split])
        question = PHRASINGS[fact["fact"]][idx].format(**fact["slots"])
        row = {"question": question, "answer": fact["answer"], "doc_id": fact["doc_id"]}
        if split != "train":
            row["fact_in_train"] = (fact["doc_id"], fact["fact"]) not in held
        return {**row, "meta": {"fact": fact["fact"], "phrasing": idx}}

    return {
        split: with_ids(NAME, split, unique(lambda r, s=split: make(r, s), n, split_rng(NAME, split, seed), "question"))
        for split, n in sizes.items()
    }
