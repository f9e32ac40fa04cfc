"""Structured output on real-world JSON Schemas, per subset: xgrammar alone beside xgrammar + llguidance.

Schemas (vendored, nothing downloads): bench/schemas/schemastore/*.json (60 SchemaStore schemas) plus the
bundled orders-json task schema, and 64 from each of JSONSchemaBench's Github_easy, Github_hard, Kubernetes
and Snowplow subsets (bench/schemas/jsonschemabench/; bench/schemas/README.md says how they were chosen).
Each schema is compiled twice: by xgrammar alone (`compile_grammar(..., backends=("xgrammar",))`: refuses a
keyword xgrammar would not enforce) and as the product does (xgrammar where it enforces everything, else
llguidance, whose grammar leaves what neither enforces to a check on the finished answer: the engine then
draws that row again). The compiled ones are answered by the bundled model, greedy, in the batched engine,
the xgrammar rows' batches first (they are xgrammar alone's answers too: the same grammar), then the
llguidance rows'. Per subset and mode: schemas compiled, answers valid (json.loads + jsonschema with the
schema's own draft; a share of ALL the subset's schemas), refusals by the keyword they name, rows re-sampled,
crashes (an exception that is not a refusal), answers whose report claims "valid" wrongly (must be 0), mean
generated tokens per answer, and the grammar's cost per generated token (constrain + settle + advance:
masks, closer, checks; ms, this machine, this load).
Target: >= 95% of every subset valid within the budget, 0 crashes, every refusal names a keyword.

    python bench/structured_output.py --subsets Snowplow --out runs/bench/so-snowplow.json --threads 1
    python bench/structured_output.py --merge runs/bench/so-*.json            # one table from several runs
    python bench/structured_output.py --subsets schemastore --limit 6         # smoke run
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
import warnings
from pathlib import Path

from _common import BUNDLED, check, fmt, log, print_table, save_json

ROOT = Path(__file__).parent / "schemas"
SUBSETS = ("schemastore", "Github_easy", "Github_hard", "Kubernetes", "Snowplow")
PROMPT_CHARS = 800  # schema text shown in the prompt (the model's context is short and the CPU slow)
TARGET = 0.95


def load_schemas(subset: str, limit: int | None) -> list[tuple[str, dict]]:
    folder = ROOT / ("schemastore" if subset == "schemastore" else f"jsonschemabench/{subset}")
    found = [(p.stem, json.loads(p.read_text(encoding="utf-8"))) for p in sorted(folder.glob("*.json"))]
    if subset == "schemastore":
        from tunelab.tasks import load_task

        found.append(("orders-json (bundled task)", load_task("orders-json").schema()))
    return found[:limit] if limit else found


def validate(text: str, schema) -> bool:
    import jsonschema

    try:
        doc = json.loads(text)
    except ValueError:
        return False
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    return cls(schema).is_valid(doc)


def prompt(schema) -> list[dict]:
    text = json.dumps(schema, separators=(",", ":"))[:PROMPT_CHARS]
    return [{"role": "user", "content": f"Produce an example JSON document for this schema: {text}"}]


def reason(message: str) -> str:
    """The keyword a refusal names ("keyword 'X'"), else the start of the message."""
    m = re.search(r"keyword '([^']*)'", message)
    return m.group(1) if m else message[:60]


def compile_all(engine, schemas: list, backends: tuple) -> tuple[dict, dict, dict]:
    """({name: grammar}, {name: refusal}, {name: crash}) for one mode."""
    from tunelab.errors import TunelabError
    from tunelab.infer.grammar import compile_grammar

    grammars, refused, crashed = {}, {}, {}
    for name, schema in schemas:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                grammars[name] = compile_grammar(engine.tokenizer, schema=schema, vocab_size=engine.vocab_size,
                                                 backends=backends)
        except TunelabError as e:
            refused[name] = str(e)
        except Exception as e:  # a crash: counted, reported, never hidden
            crashed[name] = f"{type(e).__name__}: {e}"
    return grammars, refused, crashed


def fitted(grammar, budget: int) -> int:
    """The row's token budget: `budget`, or the schema's shortest document (the closer's path from the start)
    plus budget / 2 where that is more (a schema whose every document is long gets room for one)."""
    from tunelab.infer.structured import GrammarState

    shortest = GrammarState(grammar, 4096).shortest
    return budget if shortest is None else max(budget, shortest + budget // 2)


def random_cost(grammar, budget: int, seeds: int) -> tuple[float, int]:
    """(grammar seconds, tokens) of `seeds` answers by a random "model" (uniform over the allowed tokens, every
    pick vetted, as the engine does): the per-step cost of a grammar without the model's time around it."""
    import numpy as np
    import xgrammar as xgr

    from tunelab.infer.structured import GrammarState

    size = grammar.tokenizer_info.vocab_size
    bitmask, spent, tokens = xgr.allocate_token_bitmask(1, size), 0.0, 0
    for seed in range(seeds):
        rng = np.random.default_rng(seed)
        t0 = time.perf_counter()
        st = GrammarState(grammar, budget, slack=0)
        while st.steps < budget and not st.is_terminated():
            tok = st.forced_token(budget - st.steps)
            if tok is None:
                st.fill_mask(bitmask, 0)
                t1 = time.perf_counter()  # the model's stand-in is not the grammar's time
                allowed = np.flatnonzero(np.unpackbits(bitmask[0].numpy().view(np.uint8), bitorder="little")[:size])
                tok = int(rng.choice(allowed))
                t0 += time.perf_counter() - t1
                tok = st.vet(tok, budget - st.steps)
            st.accept(tok)
        spent, tokens = spent + time.perf_counter() - t0, tokens + st.steps
    return spent, tokens


def same_schema_cost(engine, schemas: list, names, budget: int, seeds: int = 2) -> dict:
    """Grammar ms per token on the schemas xgrammar compiles, once on xgrammar and once on llguidance alone."""
    from tunelab.errors import TunelabError
    from tunelab.infer.grammar import compile_grammar

    totals = {"xgrammar": [0.0, 0], "llguidance": [0.0, 0]}
    for name, schema in schemas:
        if name not in names:
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                pair = {b: compile_grammar(engine.tokenizer, schema=schema, vocab_size=engine.vocab_size,
                                           backends=(b,)) for b in totals}
        except TunelabError:
            continue  # llguidance refuses (an unknown format it will not ignore): not a same-schema pair
        for b, g in pair.items():
            s, n = random_cost(g, budget, seeds)
            totals[b][0] += s
            totals[b][1] += n
    return {b: 1000 * s / max(1, n) for b, (s, n) in totals.items()} | {"tokens": totals["xgrammar"][1]}


def answer(engine, rows: list, budget: int, batch: int) -> tuple[list[dict], float]:
    """Answers for [(name, schema, grammar)], `batch` rows per generate call; the grammar's seconds."""
    from tunelab.infer import Request, SamplingParams
    from tunelab.infer.structured import grammar_seconds

    out, spent = [], 0.0
    for start in range(0, len(rows), batch):
        chunk = rows[start:start + batch]
        log.print(f"  rows {start + 1}-{start + len(chunk)} of {len(rows)}")
        before = grammar_seconds()
        budgets = [fitted(g, budget) for _, _, g in chunk]
        try:
            done = engine.generate([Request(prompt(s), params=SamplingParams(max_new_tokens=b, grammar=g))
                                    for (_, s, g), b in zip(chunk, budgets)])
        except Exception as e:  # a crash: these rows count as crashed, the run goes on
            out += [{"schema": n, "crash": f"{type(e).__name__}: {e}", "valid": False, "tokens": 0}
                    for n, _, _ in chunk]
            continue
        finally:
            spent += grammar_seconds() - before
        for (name, schema, grammar), c, b in zip(chunk, done, budgets):
            rep = c.grammar or {}
            out.append({"schema": name, "backend": getattr(grammar, "backend", "xgrammar"), "budget": b,
                        "valid": validate(c.text, schema), "claims_valid": rep.get("valid"),
                        "resampled": rep.get("resampled", 0), "finish_reason": c.finish_reason,
                        "tokens": len(c.token_ids), "text": c.text})
    return out, spent


def run_subset(engine, subset: str, a) -> dict:
    schemas = load_schemas(subset, a.limit)
    xg, xg_refused, xg_crashed = compile_all(engine, schemas, ("xgrammar",))
    both, refused, crashed = compile_all(engine, schemas, ("xgrammar", "llguidance"))
    log.print(f"{subset}: {len(xg)}/{len(schemas)} compiled by xgrammar alone, {len(both)} with llguidance")
    by_name = dict(schemas)
    xg_rows = [(n, by_name[n], g) for n, g in both.items() if n in xg]
    ll_rows = [(n, by_name[n], g) for n, g in both.items() if n not in xg]
    cost = same_schema_cost(engine, schemas, set(xg), a.max_tokens)
    log.print(f"  same schemas, random model: grammar ms/token {cost}")
    t0 = time.perf_counter()
    xg_answers, xg_s = answer(engine, xg_rows, a.max_tokens, a.batch_size)
    ll_answers, ll_s = answer(engine, ll_rows, a.max_tokens, a.batch_size)
    return {"subset": subset, "n": len(schemas), "seconds": time.perf_counter() - t0,
            "modes": {"xgrammar only": _summary(xg_answers, xg_refused, xg_crashed, xg_s, len(schemas)),
                      "xgrammar + llguidance": _summary(xg_answers + ll_answers, refused, crashed, xg_s + ll_s,
                                                        len(schemas))},
            "llguidance rows": _summary(ll_answers, {}, {}, ll_s, len(ll_answers)),
            "same_schema_cost": cost, "answers": xg_answers + ll_answers, "refused": refused, "refused_xgrammar_only": xg_refused}


def _summary(answers: list, refused: dict, crashed: dict, seconds: float, n: int) -> dict:
    tokens = sum(x["tokens"] for x in answers)
    reasons: dict[str, int] = {}
    for msg in refused.values():
        reasons[reason(msg)] = reasons.get(reason(msg), 0) + 1
    return {"n": n, "compiled": len(answers),
            "valid": sum(x["valid"] for x in answers), "refused": len(refused), "reasons": reasons,
            "resampled": sum(bool(x.get("resampled")) for x in answers),
            "crashes": len(crashed) + sum("crash" in x for x in answers),
            "false_valid": sum(x.get("claims_valid") is True and not x["valid"] for x in answers),
            "tokens_per_answer": tokens / max(1, len(answers)),
            "budget_per_answer": sum(x.get("budget", 0) for x in answers) / max(1, len(answers)),
            "grammar_ms_per_token": 1000 * seconds / max(1, tokens)}


def report(results: list[dict], a) -> bool:
    rows, refusals, ok = [], [], True
    for r in results:
        for mode, s in r["modes"].items():
            share = s["valid"] / max(1, s["n"])
            if mode != "xgrammar only":
                ok = ok and share >= TARGET and s["crashes"] == 0 and s["false_valid"] == 0
            rows.append([r["subset"], mode, s["n"], s["compiled"], f"{s['valid']} ({100 * share:.0f}%)", s["refused"],
                         s["resampled"], s["crashes"], s["false_valid"], fmt(s["budget_per_answer"]), fmt(s["tokens_per_answer"]),
                         fmt(s["grammar_ms_per_token"], 2)])
            refusals += [[r["subset"], mode, k, v] for k, v in sorted(s["reasons"].items(), key=lambda kv: -kv[1])]
        ll = r["llguidance rows"]
        rows += [] if not ll["n"] else [[r["subset"], "  its llguidance rows", ll["n"], ll["compiled"], ll["valid"], "", ll["resampled"],
                     ll["crashes"], ll["false_valid"], fmt(ll["budget_per_answer"]), fmt(ll["tokens_per_answer"]), fmt(ll["grammar_ms_per_token"], 2)]]
    print_table(f"Structured output on real-world JSON Schemas, bundled model ({BUNDLED}), greedy, "
                f"budget {a.max_tokens} new tokens (or shortest document + {a.max_tokens // 2}), batch {a.batch_size}",
                ["subset", "mode", "schemas", "compiled", "valid", "refused", "re-sampled", "crashes",
                 "false valid", "budget / answer", "tokens / answer", "grammar ms / token"], rows,
                caption=f"target: >= {TARGET:.0%} of every subset valid, 0 crashes, no invalid answer reported "
                        f"valid (xgrammar + llguidance); false valid: the completion's report says valid, jsonschema does not: "
                        f"{check(ok)}")
    print_table("Refusals, by the keyword they name", ["subset", "mode", "keyword", "schemas"], refusals)
    costs = [[r["subset"], r["same_schema_cost"]["tokens"], fmt(r["same_schema_cost"]["xgrammar"], 3),
              fmt(r["same_schema_cost"]["llguidance"], 3),
              fmt(r["same_schema_cost"]["llguidance"] / max(1e-9, r["same_schema_cost"]["xgrammar"]), 2)]
             for r in results if "same_schema_cost" in r]
    print_table("Grammar cost per step on the same schemas (those xgrammar compiles), each backend alone, random "
                "model (every pick vetted)", ["subset", "tokens", "xgrammar ms / token", "llguidance ms / token",
                                              "ratio"], costs,
                caption="target: llguidance within 1.10x of xgrammar")
    return ok


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--subsets", nargs="+", default=list(SUBSETS), choices=SUBSETS)
    p.add_argument("--limit", type=int, default=None, help="first N schemas of each subset only (quick runs)")
    p.add_argument("--max-tokens", type=int, default=128,
                   help="the token budget of an answer (raised to the schema's shortest document + half of it)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=None, help="torch threads (1 on a loaded shared machine)")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--out", help="also write the results as JSON here")
    p.add_argument("--merge", nargs="+", help="print one table from the JSON of earlier runs (no model run)")
    return p.parse_args()


def main() -> int:
    a = _args()
    if a.merge:
        runs = [json.loads(Path(f).read_text()) for f in a.merge]
        a.max_tokens, a.batch_size = runs[0]["args"]["max_tokens"], runs[0]["args"]["batch_size"]
        return 0 if report([r for run in runs for r in run["subsets"]], a) else 1

    import torch

    from tunelab.infer import load_engine

    if a.threads:
        torch.set_num_threads(a.threads)
    engine = load_engine(BUNDLED, dtype=a.dtype, kind="batched", max_batch=a.batch_size)
    results = []
    for subset in a.subsets:
        results.append(run_subset(engine, subset, a))
        save_json(a.out, {"args": vars(a), "subsets": results})  # after each subset: a long run keeps its part
    return 0 if report(results, a) else 1


if __name__ == "__main__":
    sys.exit(main())
