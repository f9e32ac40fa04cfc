"""Generator for orders-json: customer order messages in many styles -> JSON that fits schema.json.

Frames (message templates), line-item phrasings, currency statements, shipping phrasings, notes,
customer names, email domains, products and distractors are partitioned train/validation/test
independently of the seed, so test messages use templates and entities train never shows. The
rules the model must apply (date formats -> ISO 8601, currency marks -> ISO 4217, shipping words ->
one of three values) are shared by all splits and spelled out in the system prompt.
"""

from __future__ import annotations

import datetime as dt
import json
import random
import re

from tunelab.tasks._gen._common import (
    FIRST_NAMES,
    LAST_NAMES,
    SPLITS,
    fill,
    partition,
    split_rng,
    unique,
    with_ids,
)

NAME = "orders-json"
SIZES = {"train": 1000, "validation": 200, "test": 200}
STATIC_FILES = ("task.yaml", "schema.json")
MAX_CHARS = 640  # message + reference JSON; with the system prompt a chat stays under 512 tokens

MODIFIERS = """Blue Red Green Black White Grey Steel Bamboo Oak Walnut Ceramic Glass Cotton Linen Wool Leather
Copper Brass Canvas Cork Marble Slate Nordic Classic Compact Travel Mini Deluxe Pro Eco Vintage Solar Urban
Alpine Coastal Velvet Granite Maple Cedar Indigo""".split()
ITEM_NOUNS = ["Water Bottle", "Desk Lamp", "Tea Kettle", "Cutting Board", "Phone Stand", "Wall Clock",
              "Throw Blanket", "Coffee Grinder", "Pillow Cover", "Plant Pot", "Lunch Box", "Picnic Basket",
              "Candle Set", "Bath Towel", "Serving Tray", "Bookend Pair", "Key Holder", "Wine Rack",
              "Spice Jar Set", "Yoga Mat", "Travel Pouch", "Desk Organizer", "Photo Frame", "Salad Bowl",
              "Tote Bag", "Pencil Case", "Bird Feeder", "Laptop Sleeve", "Table Runner", "Coaster Set",
              "Pepper Mill", "Hand Mirror", "Shoe Rack", "Jewelry Box", "Wireless Charger", "Bike Light",
              "Cheese Knife", "Herb Planter"]
ITEM_NOUNS += ["Mug", "Notebook", "Backpack", "Umbrella", "Scarf", "Doormat", "Flask", "Apron", "Sketchbook", "Trivet"]
PRODUCTS = [f"{m} {n}" for m in MODIFIERS for n in ITEM_NOUNS if m not in n.split()]  # no "Travel Travel Pouch"

DOMAINS = """gmail.com outlook.com yahoo.com proton.me fastmail.com icloud.com mailbox.org hey.com gmx.de
web.de posteo.net zoho.com aol.com live.com yandex.com tutanota.com example.org me.com hotmail.co.uk
orange.fr libero.it seznam.cz btinternet.com bigpond.com""".split()

CURRENCIES = {  # code -> (symbol prefixes, words)
    "USD": (["$", "US$"], "US dollars"),
    "EUR": (["€"], "euros"),
    "GBP": (["£"], "pounds"),
    "JPY": (["¥"], "yen"),
    "CHF": ([], "Swiss francs"),
    "CAD": (["C$"], "Canadian dollars"),
    "AUD": (["A$"], "Australian dollars"),
}
CURRENCY_NOTES = ["(prices in {words})", "(all amounts in {code})", "(currency: {code})",
                  "(amounts are in {words})", "(all in {words})", "(in {code})", "(all prices are {code})",
                  "(prices quoted in {words})", "(figures in {code})", "(everything in {words})"]

ITEM_STYLES = [
    "{q} x {p} @ {price}", "{p}, qty {q}, {price} each", "{p} x{q} - {price}/unit",
    "{p} (qty {qw}) for {price} each", "{q} pcs {p}, unit price {price}", "{p}: {q} @ {price} ea.",
    "{q} units of {p} ({price} each)", "{p} - quantity {q}, price {price} each", "{q} × {p} at {price}",
    "{q} x {p} @ {price} = {total}", "{p} (x{q}) {price} apiece", "{qw} x {p}, {price} per item",
    "{p}, amount {q}, {price} a piece", "qty {q}: {p} @ {price}", "{p} ×{q}, {price}/ea, line total {total}",
    "{qw} {p} at {price} each",
]
QUANTITY_WORDS = "zero one two three four five six seven eight nine ten eleven twelve".split()

SHIPPING = {
    "express": ["Express shipping please.", "Please ship it express.", "I need this overnight.",
                "Next-day delivery please.", "Can you send it expedited?", "Overnight shipping if you can.",
                "Send by express courier.", "I'd like next-day delivery.", "Expedited shipping, please.",
                "Express delivery would be great."],
    "standard": ["Standard shipping is fine.", "Regular shipping please.", "Ground shipping is OK.",
                 "Normal post is fine.", "No rush, standard delivery.", "Send it by regular mail.",
                 "Standard delivery is fine.", "Ground shipping works for me.", "Regular post is fine.",
                 "Just use standard shipping."],
    "pickup": ["I'll pick it up in store.", "I will collect it myself.", "I'll come by to pick it up.",
               "Store pickup please.", "I can collect it from your shop.", "No delivery needed, I'll pick it up.",
               "Please hold it for collection.", "I'll collect it on Saturday.", "Pickup at the counter please.",
               "I will pick up the order."],
}
NOTES = [
    "Please gift wrap the order.", "Leave the parcel at the back door.", "Ring the bell twice, the buzzer is broken.",
    "Do not leave it with the neighbours.", "Please use recyclable packaging.", "Deliver after 5pm if possible.",
    "Please include a gift receipt.", "Fragile, handle with care.", "Send the invoice to my work address.",
    "No plastic bags please.", "Leave it with the concierge.", "Call before delivery.",
    "Please pack the items separately.", "It is a birthday present, no prices on the slip.",
    "Deliver to the side entrance.", "The gate code is 4471.", "Put it in the mailbox if it fits.",
    "Please combine with my previous order.", "Deliver on a weekday only.", "Leave it in the garage.",
    "Knock loudly, the doorbell is broken.", "Please add a card saying Happy Anniversary.",
    "Use the service entrance at the rear.", "Please remove the price tags.", "Deliver to reception on floor 3.",
    "Do not ring the bell, the baby is asleep.", "Pack the glass items in bubble wrap.",
    "Leave it under the porch bench.", "Text me when the driver is close.", "Please double box the order.",
    "Write the order number on the box.", "Hand it only to me, not to a neighbour.", "Deliver before noon please.",
    "Avoid Mondays, the office is closed.", "Please include assembly instructions.",
    "Put a fragile sticker on the box.", "Leave it at the front desk.", "No signature needed.",
    "Please wrap each item in paper.", "The dog is friendly, just come in the gate.",
    "Ship everything in one parcel.", "Please send a tracking link.", "Mark the parcel as a gift.",
    "Deliver to the neighbour at number 12 if I am out.", "Put the receipt inside the box.",
]
DISTRACTORS = [
    "tel. {phone}", "phone {phone}", "mobile: {phone}", "ref #{ref}", "re: order {ref}", "invoice INV-{ref}",
    "customer no. {acct}", "account {acct}", "PO box {box}", "Flat {flat}, {house} Harbour Road",
    "ext. {ext}", "my last order was #{ref}", "ticket {ref}", "call me on {phone}", "postcode {post}",
    "{house} Elm Street, apt {flat}",
]

FRAMES = {
    "email": [
        "From: {name}[[ <{email}>]]\nSubject: Order\nDate: {date}\n\nHi,\n\nI'd like to order:\n{items}\n[[{ship}\n]][[Note: {note}\n]][[{extra}\n]]\nThanks,\n{first}",
        "Hello team,\n\nPlease process the following order placed on {date}:\n{items}\n\n[[{ship} ]][[{note}]]\n\nBest regards,\n{name}[[\n{email}]][[\n{extra}]]",
        "Dear Sir or Madam,\n\nI would like to place an order dated {date}.\n{items}\n[[{ship}\n]][[P.S. {note}\n]]Kind regards,\n{name}[[ ({email})]][[\n{extra}]]",
        "Subject: purchase {date}\n\nHi there, {name} here[[ ({email})]]. Could you send me\n{items}\n[[{ship} ]][[{extra}]]\n[[Note: {note}]]\nCheers",
        "Good morning,\n\nOrder for {name}, dated {date}.\n{items}\n[[Contact: {email}\n]][[{extra}\n]][[{ship}\n]][[Special instructions: {note}]]",
        "Hi!\nIt's {first} again. I placed this order on {date} but want to confirm it:\n{items}\n[[{ship}\n]][[Also: {note}\n]]Thanks a lot,\n{name}[[ | {email}]][[ | {extra}]]",
        "Re: my order\n\n{name}[[ <{email}>]] wrote on {date}:\n> Please send {items_inline}.\n[[> {ship}\n]][[> {note}\n]][[{extra}]]",
        "Hello,\nOn {date} I ordered the items below.\n{items}\n[[{ship}\n]][[{note}\n]]Regards, {name}[[\nReply to: {email}]][[\n{extra}]]",
    ],
    "chat": [
        "hi its {name_lc}[[ ({email})]], want to order {items_inline}. date {date}.[[ {ship}]][[ {note}]][[ {extra}]]",
        "hey! {items_inline} please :)[[ {ship}]] order date {date}[[, {extra}]]. - {name_lc}[[, {email}]][[\nps {note}]]",
        "[{date}] {name_lc}: can i get {items_inline}?[[ {ship}]][[ {note}]][[ {email}]][[ {extra}]]",
        "yo this is {name} - need {items_inline}. ordered {date}.[[ {ship}]][[ my email is {email}]][[ {extra}]][[ {note}]]",
        "{name_lc} here. order from {date}:\n{items}\n[[{ship}\n]][[{note}\n]][[{email}\n]][[{extra}]]",
        "quick order pls: {items_inline}.[[ {ship}]] name {name}, date {date}[[, email {email}]][[, {extra}]].[[ {note}]]",
    ],
    "form": [
        "Name: {name}\n[[Email: {email}\n]]Order date: {date}\nItems:\n{items}\n[[Shipping: {ship}\n]][[Notes: {note}\n]][[{extra}]]",
        "ORDER FORM\nCustomer: {name_rev}\n[[E-mail: {email}\n]]Date: {date}\n{items}\n[[Delivery: {ship}\n]][[Remarks: {note}\n]][[{extra}]]",
        "customer={name} | date={date}[[ | email={email}]] | items: {items_inline}[[ | {ship}]][[ | note: {note}]][[ | {extra}]]",
        "Order request\n- Date: {date}\n- Name: {name_rev}\n[[- Email: {email}\n]]- Products:\n{items}\n[[- Shipping: {ship}\n]][[- Note: {note}\n]][[- {extra}]]",
        "Web form submission ({date})\nfull_name: {name}\n[[email_address: {email}\n]]message: Please send {items_inline}.[[ {ship}]][[ {note}]]\n[[{extra}]]",
    ],
    "memo": [
        "Phone order taken {date}. Caller: {name}[[, {extra}]]. Wants {items_inline}.[[ {ship}]][[ Email for receipt: {email}.]][[ Note: {note}]]",
        "Memo - {date}\n{name_rev} called[[ ({extra})]] and ordered:\n{items}\n[[{ship}\n]][[{email}\n]][[Instructions: {note}]]",
        "Voicemail from {name} on {date}: \"Hi, I'd like {items_inline}.[[ {ship}]][[ {note}]]\"[[ Callback {extra}.]][[ Email on file: {email}]]",
        "Walk-in order {date}: {name}[[ <{email}>]] bought {items_inline}.[[ {ship}]][[ {note}]][[ {extra}]]",
        "Fax received {date}\nFROM: {name}\n[[{extra}\n]]PLEASE SUPPLY:\n{items}\n[[{ship}\n]][[{note}\n]][[{email}]]",
    ],
    "sms": [
        "{date} - {items_inline}[[ - {ship}]] - {name}[[ - {email}]][[ - {extra}]][[ - {note}]]",
        "Order: {items_inline}. For: {name}. When: {date}.[[ Contact: {email}.]][[ {ship}]][[ {note}]][[ {extra}]]",
        "{name} / {date}\n{items}[[\n{ship}]][[\n{email}]][[\n{note}]][[\n{extra}]]",
        "txt from {name_lc}[[ {extra}]]: send {items_inline} asap? date {date}[[. {email}]][[. {ship}]][[. {note}]]",
        "New order ({date}) by {name}: {items_inline}[[ / {ship}]][[ / notes: {note}]][[ / {email}]][[ / {extra}]]",
    ],
}
FRAME_IDS = [f"{style}-{i}" for style, frames in FRAMES.items() for i in range(len(frames))]
BULLETS = ["- ", "* ", "• ", "", "{n}) ", "{n}. "]
TYPO_RATE = {"email": 0.01, "chat": 0.05, "form": 0.0, "memo": 0.02, "sms": 0.04}


def _pools() -> dict[str, dict[str, list]]:
    """Every partitioned pool, keyed by pool name, then split."""
    pools = {
        "first": partition(FIRST_NAMES, f"{NAME}/first"),
        "last": partition(LAST_NAMES, f"{NAME}/last"),
        "product": partition(PRODUCTS, f"{NAME}/product"),
        "domain": partition(DOMAINS, f"{NAME}/domain"),
        "item_style": partition(list(range(len(ITEM_STYLES))), f"{NAME}/item_style"),
        "currency_note": partition(list(range(len(CURRENCY_NOTES))), f"{NAME}/currency_note"),
        "note": partition(NOTES, f"{NAME}/note"),
        "distractor": partition(DISTRACTORS, f"{NAME}/distractor"),
        "frame": {s: [] for s in SPLITS},
    }
    for style, frames in FRAMES.items():
        for split, ids in partition([f"{style}-{i}" for i in range(len(frames))], f"{NAME}/frame/{style}").items():
            pools["frame"][split] += ids
    for value, phrases in SHIPPING.items():
        pools[f"ship_{value}"] = partition(phrases, f"{NAME}/ship/{value}")
    return pools


# ---- surface forms ---------------------------------------------------------------------------------

_ORD = {1: "st", 2: "nd", 3: "rd", 21: "st", 22: "nd", 23: "rd", 31: "st"}
DATE_FORMATS = [
    lambda d: d.isoformat(), lambda d: d.strftime("%Y/%m/%d"),
    lambda d: f"{d:%B} {d.day}, {d.year}", lambda d: f"{d:%b} {d.day}, {d.year}",
    lambda d: f"{d.day} {d:%B} {d.year}", lambda d: f"{d.day} {d:%b} {d.year}",
    lambda d: f"{d:%B} {d.day}{_ORD.get(d.day, 'th')}, {d.year}", lambda d: f"{d.day}{_ORD.get(d.day, 'th')} of {d:%B} {d.year}",
    lambda d: f"{d:%A}, {d:%B} {d.day}, {d.year}", lambda d: f"{d:%a} {d.day} {d:%b} {d.year}",
    lambda d: d.strftime("%m/%d/%Y"), lambda d: f"{d.month}/{d.day}/{d:%y}", lambda d: d.strftime("%d.%m.%Y"),
]


def _amount(value: float, code: str, rng: random.Random, bare: bool) -> str:
    """A price as a customer writes it: symbol or code, decimal comma for some euro prices."""
    if code == "JPY":
        num = f"{int(value):,}" if rng.random() < 0.5 else str(int(value))
    elif value == int(value) and rng.random() < 0.4:
        num = str(int(value))
    else:
        num = f"{value:.2f}"
    if bare:
        return num
    symbols, words = CURRENCIES[code]
    if code == "EUR" and "." in num and rng.random() < 0.4:
        return f"{num.replace('.', ',')} €"
    forms = [f"{s}{num}" for s in symbols] * 2 + [f"{num} {code}", f"{code} {num}"]
    if code != "CHF" and rng.random() < 0.15:
        forms.append(f"{num} {words}")
    return rng.choice(forms)


def _price(code: str, rng: random.Random) -> float:
    if code == "JPY":
        return float(rng.choice([300, 450, 800, 980, 1200, 1500, 2400, 3200, 4800, 6500, 9800, 12000, 15800]))
    whole = rng.choice([2, 3, 4, 5, 6, 7, 8, 9, 12, 14, 15, 18, 19, 22, 24, 25, 29, 34, 39, 45, 49, 59, 65, 79, 89, 120, 149, 249])
    cents = rng.choice([0, 0, 0.5, 0.99, 0.95, 0.25, 0.75, rng.randint(1, 98) / 100])
    return round(whole + cents, 2)


def _typos(template: str, rng: random.Random, rate: float) -> str:
    """Swap, drop or double a letter in some words of a frame's literal text (never inside {slots})."""

    def mutate(m: re.Match) -> str:
        w = m.group(0)
        if rng.random() >= rate:
            return w
        i = rng.randrange(1, len(w) - 1)
        op = rng.choice(["swap", "drop", "double"])
        if op == "swap":
            return w[:i] + w[i + 1] + w[i] + w[i + 2:]
        return w[:i] + w[i + 1:] if op == "drop" else w[:i] + w[i] + w[i:]

    return re.sub(r"(?<![{\w])[A-Za-z]{4,}(?![}\w])", mutate, template)


def _tidy(text: str) -> str:
    """Drop the frame's full stop where a slot already ended with one ("ea.." -> "ea.")."""
    return re.sub(r"([.?!])\.", r"\1", text)


def _distractor(template: str, rng: random.Random) -> str:
    """A number that is not part of the order: phone, reference, account, address..."""
    return template.format(
        phone=rng.choice([f"+1 {rng.randint(200, 989)}-555-{rng.randint(1000, 9999)}",
                          f"0{rng.randint(1000, 1999)} {rng.randint(100000, 999999)}",
                          f"+44 7700 {rng.randint(100000, 999999)}", f"({rng.randint(100, 999)}) 555-{rng.randint(1000, 9999)}"]),
        ref=rng.choice([str(rng.randint(10000, 99999)), f"A-{rng.randint(1000, 99999)}", f"{rng.randint(2019, 2025)}-{rng.randint(100, 9999)}"]),
        acct=rng.randint(100000, 999999), box=rng.randint(100, 9999), flat=rng.randint(1, 40),
        house=rng.randint(2, 250), ext=rng.randint(100, 999), post=rng.choice(["SW1A 2AA", "10115", "75011", "M5V 2T6", "2000"]),
    )


# ---- one example -----------------------------------------------------------------------------------

def make_example(pools: dict[str, dict[str, list]], split: str, rng: random.Random) -> dict:
    """One message and its JSON, drawing every template and entity from `split`'s pools."""
    pick = lambda pool: rng.choice(pools[pool][split])  # noqa: E731
    first, last = pick("first"), pick("last")
    email = None
    if rng.random() < 0.6:
        local = rng.choice([f"{first}.{last}", f"{first[0]}{last}", f"{first}_{last}", f"{first}{rng.randint(1, 99)}",
                            f"{last}.{first[0]}", f"{first}{last}{rng.randint(70, 99)}"]).lower()
        email = f"{local}@{pick('domain')}"
    date = dt.date(2022, 1, 1) + dt.timedelta(days=rng.randrange(365 * 4))
    code = rng.choice(list(CURRENCIES))
    bare = rng.random() < 0.2
    n_items = rng.choices([1, 2, 3], weights=[0.4, 0.4, 0.2])[0]
    products = rng.sample(pools["product"][split], n_items)
    style = ITEM_STYLES[pick("item_style")]
    items, lines = [], []
    for p in products:
        q = rng.choices(range(1, 13), weights=[30, 25, 12, 8, 6, 5, 3, 3, 2, 3, 1, 2])[0]
        price = _price(code, rng)
        items.append({"product": p, "quantity": q, "unit_price": int(price) if price == int(price) else price})
        lines.append(style.format(q=q, qw=QUANTITY_WORDS[q], p=p, price=_amount(price, code, rng, bare),
                                  total=_amount(round(q * price, 2), code, rng, bare)).replace("1 units of", "1 unit of"))
    bullet = rng.choice(BULLETS)
    block = "\n".join(bullet.format(n=i + 1) + line for i, line in enumerate(lines))
    sep = "; " if "," in style else ", "
    inline = lines[0] if len(lines) == 1 else sep.join(lines[:-1]) + " and " + lines[-1]
    if bare:
        words = CURRENCIES[code][1]
        cnote = CURRENCY_NOTES[pick("currency_note")].format(code=code, words=words)
        block, inline = f"{block}\n{cnote}", f"{inline} {cnote}"
    shipping = rng.choice([None, None, "express", "standard", "pickup"])
    note = pick("note") if rng.random() < 0.35 else None
    n_extra = rng.choices([0, 1, 2], weights=[0.35, 0.45, 0.2])[0]
    extra = ", ".join(_distractor(d, rng) for d in rng.sample(pools["distractor"][split], n_extra)) or None
    frame_id = pick("frame")
    fstyle, idx = frame_id.split("-")
    template = _typos(FRAMES[fstyle][int(idx)], rng, TYPO_RATE[fstyle])
    date_format = rng.randrange(len(DATE_FORMATS))
    message = _tidy(fill(template, {
        "name": f"{first} {last}", "name_lc": f"{first} {last}".lower(), "name_rev": f"{last}, {first}",
        "first": first, "email": email, "date": DATE_FORMATS[date_format](date), "items": block,
        "items_inline": inline, "ship": pick(f"ship_{shipping}") if shipping else None, "note": note, "extra": extra,
    }))
    output = {"customer": f"{first} {last}", "email": email, "order_date": date.isoformat(), "currency": code,
              "items": items, "shipping": shipping, "notes": note}
    meta = {"frame": frame_id, "item_style": ITEM_STYLES.index(style), "date_format": date_format,
            "currency_stated": bare}
    return {"message": message, "output": output, "meta": meta}


def make_short_example(pools: dict[str, dict[str, list]], split: str, rng: random.Random) -> dict:
    """make_example, redrawn while message + JSON exceed MAX_CHARS (so a chat fits 512 SmolLM2 tokens)."""
    while True:
        ex = make_example(pools, split, rng)
        if len(ex["message"]) + len(json.dumps(ex["output"], ensure_ascii=False, separators=(",", ":"))) <= MAX_CHARS:
            return ex


def examples(sizes: dict[str, int], seed: int = 0) -> dict[str, list[dict]]:
    """The splits: {split: [{id, message, output, meta}]}, each example's id stable for a given seed."""
    pools = _pools()
    return {
        split: with_ids(NAME, split, unique(lambda r, s=split: make_short_example(pools, s, r), n,
                                            split_rng(NAME, split, seed), "message"))
        for split, n in sizes.items()
    }
