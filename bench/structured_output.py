"""Structured output that always finishes: real-world JSON Schemas at budgets of 64, 128 and 256 new tokens.

Schemas: bench/schemas/schemastore/*.json (60 SchemaStore schemas, see bench/schemas/README.md) plus the
bundled orders-json task schema. Each is compiled with tunelab.infer.grammar.compile_grammar (which refuses
keywords xgrammar would not enforce); the compiled ones are answered by the bundled model, greedy, with a
short prompt ("Produce an example JSON document for this schema: ..."), one GrammarState per row in the
batched engine (tunelab.infer), rows of different schemas batched together. Per budget it prints:
share compiled, share fitting (the closer's path from the start fits the budget), share finished and valid
(json.loads + jsonschema with the schema's own draft), share closed early (finish_reason "length_closed"),
mean generated tokens per answer, and the closer's cost per generated token.
Target: every compiled schema whose shortest document fits gives valid JSON at every budget.

    python bench/structured_output.py --out runs/bench/structured.json --threads 1 --dtype fp32
    python bench/structured_output.py --plain --threads 1 --dtype fp32      # the peer: plain xgrammar
    python bench/structured_output.py --limit 6 --budgets 64               # smoke run
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

from _common import BUNDLED, check, fmt, log, print_table, save_json

SCHEMAS = Path(__file__).parent / "schemas" / "schemastore"
PROMPT_CHARS = 800  # schema text shown in the prompt (the model's context is short and the CPU slow)


def load_schemas(limit: int | None) -> list[tuple[str, dict]]:
    from tunelab.tasks import load_task

    found = [(p.stem, json.loads(p.read_text(encoding="utf-8"))) for p in sorted(SCHEMAS.glob("*.json"))]
    found.append(("orders-json (bundled task)", load_task("orders-json").schema()))
    return found[:limit] if limit else found


def validate(text: str, schema: dict) -> bool:
    import jsonschema

    try:
        doc = json.loads(text)
    except ValueError:
        return False
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    return cls(schema).is_valid(doc)


def prompt(schema: dict) -> list[dict]:
    text = json.dumps(schema, separators=(",", ":"))[:PROMPT_CHARS]
    return [{"role": "user", "content": f"Produce an example JSON document for this schema: {text}"}]


def answer(engine, convs: list, budget: int, grammars: list) -> tuple[list[dict], float]:
    """One row per schema through the engine: the finish reason and tokens of each; the closer's seconds."""
    from tunelab.infer import Request, SamplingParams
    from tunelab.infer.structured import closer_seconds

    before = closer_seconds()
    done = engine.generate([Request(c, params=SamplingParams(max_new_tokens=budget, grammar=g))
                            for c, g in zip(convs, grammars)])
    return ([{"text": c.text, "finish_reason": c.finish_reason, "tokens": len(c.token_ids)} for c in done],
            closer_seconds() - before)


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--limit", type=int, default=None, help="first N schemas only (quick runs)")
    p.add_argument("--budgets", type=int, nargs="+", default=[64, 128, 256])
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (on a loaded shared machine 1 ran 5x faster than 2)")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--plain", action="store_true",
                   help="the peer instead: xgrammar's own HF logits processor (valid so far, not finished)")
    p.add_argument("--out", help="also write the results as JSON here")
    return p.parse_args()


def main() -> None:
    a = _args()

    import torch

    from tunelab.errors import TunelabError
    from tunelab.infer import load_engine
    from tunelab.infer.structured import GrammarState
    from tunelab.infer.testing import MaskOnly

    if a.threads:
        torch.set_num_threads(a.threads)
    engine = load_engine(BUNDLED, dtype=a.dtype, kind="batched", max_batch=a.batch_size)
    schemas = load_schemas(a.limit)
    compiled, refused = [], {}
    for name, schema in schemas:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                grammar = engine.compile_grammar(schema=schema)
            compiled.append((name, schema, grammar))
        except TunelabError as e:
            refused[name] = str(e)
    log.print(f"{len(compiled)}/{len(schemas)} schemas compiled")
    results: dict = {"args": vars(a), "n_schemas": len(schemas), "refused": refused, "budgets": {}}
    rows = []
    for budget in a.budgets:
        answers, closer_s = [], 0.0
        t0 = time.perf_counter()
        for start in range(0, len(compiled), a.batch_size):
            chunk = compiled[start:start + a.batch_size]
            log.print(f"budget {budget}: schemas {start + 1}-{start + len(chunk)} of {len(compiled)}")
            convs = [prompt(s) for _, s, _ in chunk]
            grams = [MaskOnly(g) if a.plain else g for _, _, g in chunk]
            got, seconds = answer(engine, convs, budget, grams)
            closer_s += seconds
            for (name, schema, grammar), ans in zip(chunk, got):
                fits = GrammarState(grammar, budget).fits
                answers.append({"schema": name, "fits": fits, "valid": validate(ans["text"], schema),
                                "finish_reason": ans["finish_reason"], "tokens": ans["tokens"], "text": ans["text"]})
        secs = time.perf_counter() - t0
        n = len(answers)
        fit = [x for x in answers if x["fits"]]
        fit_valid = sum(x["valid"] for x in fit)
        tokens = sum(x["tokens"] for x in answers)
        closer_ms = 1000 * closer_s
        summary = {"compiled": len(compiled) / len(schemas), "fits": len(fit) / max(1, n),
                   "valid": sum(x["valid"] for x in answers) / max(1, n),
                   "valid_when_fits": fit_valid / max(1, len(fit)),
                   "closed_early": sum(x["finish_reason"] == "length_closed" for x in answers) / max(1, n),
                   "cut_unfinished": sum(x["finish_reason"] == "length" for x in answers) / max(1, n),
                   "tokens_per_answer": tokens / max(1, n), "closer_ms_per_token": closer_ms / max(1, tokens),
                   "seconds": secs}
        results["budgets"][budget] = {"summary": summary, "answers": answers}
        rows.append([budget, f"{len(compiled)}/{len(schemas)}", f"{len(fit)}/{n}", f"{fit_valid}/{len(fit)}",
                     f"{sum(x['valid'] for x in answers)}/{n}",
                     f"{sum(x['finish_reason'] == 'length_closed' for x in answers)}/{n}",
                     f"{sum(x['finish_reason'] == 'length' for x in answers)}/{n}",
                     fmt(summary["tokens_per_answer"]), fmt(summary["closer_ms_per_token"], 2), fmt(secs)])
    all_ok = all(r["summary"]["valid_when_fits"] == 1.0 for r in results["budgets"].values())
    print_table(f"Structured output on {len(schemas)} real-world JSON Schemas, bundled model, greedy, "
                f"batch {a.batch_size}, {torch.get_num_threads()} threads"
                + (", PLAIN xgrammar processor (the peer)" if a.plain else ""),
                ["budget", "compiled", "fits", "valid | fits", "valid (all)", "closed early", "cut unfinished",
                 "tokens / answer", "closer ms / token", "seconds"], rows,
                caption=f"target: every compiled schema that fits gives valid JSON at every budget: {check(all_ok)}")
    _refusals_table(refused)
    save_json(a.out, results)


def _refusals_table(refused: dict[str, str]) -> None:
    reasons: dict[str, int] = {}
    for msg in refused.values():
        key = msg.split("keyword ", 1)[1].split(" ", 1)[0] if "keyword " in msg else "compile error"
        reasons[key] = reasons.get(key, 0) + 1
    print_table("Refused schemas, by the first keyword xgrammar would not enforce", ["keyword", "schemas"],
                sorted(reasons.items(), key=lambda kv: -kv[1]))


if __name__ == "__main__":
    sys.exit(main())
