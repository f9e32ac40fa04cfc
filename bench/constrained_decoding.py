"""Grammar-constrained decoding overhead: tokens/s with and without the orders-json JSON Schema (xgrammar).

The same prompts (orders-json test examples) in the same batches are decoded greedily on the bundled model
twice, once plain and once with `tunelab.infer.grammar.grammar_processor` (xgrammar, the task's
schema.json); the two runs alternate batch by batch so machine load hits both alike. Generated tokens are
counted per row from the output ids: every token up to and including the first EOS (rows that stop early
are not charged for the padding that follows). Target: constrained tokens/s within 10% of plain.

Also times grammar compilation: the first compile (tokenizer info + compiler + schema), the same schema again
(xgrammar's cache), and a different schema with the compiler already built.

    python bench/constrained_decoding.py --out runs/bench/constrained.json   # 96 examples: <= 10 min, quiet 2-core
    python bench/constrained_decoding.py --limit 4 --batch-size 2 --max-new-tokens 32      # smoke run
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time

from _common import BUNDLED, check, fmt, log, print_table, save_json


def generate_ids(engine, conversations: list[list[dict]], max_new_tokens: int, processor=None):
    """Greedy generation exactly as tunelab.infer.hf.generate_batch does it, returning token ids.

    Returns (new token ids (B, T_new), seconds)."""
    import torch

    from tunelab.infer.hf import chat_prompts

    tok, model = engine.tokenizer, engine.model
    enc = tok(chat_prompts(tok, conversations), return_tensors="pt", padding=True, add_special_tokens=False)
    kwargs = dict(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id,
                  eos_token_id=tok.eos_token_id)
    if processor is not None:
        kwargs["logits_processor"] = processor
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(**enc.to(model.device), **kwargs)  # (B, T_prompt + T_new)
    return out[:, enc["input_ids"].shape[1]:], time.perf_counter() - t0


def count_tokens(new_ids, eos_id: int) -> list[int]:
    """Generated tokens per row: up to and including the first EOS (all of them when none)."""
    counts = []
    for row in new_ids.tolist():
        counts.append(row.index(eos_id) + 1 if eos_id in row else len(row))
    return counts


def compile_times(engine, schema: dict) -> dict:
    """Seconds for: first compile, the same schema again, a different schema on the warm compiler.

    Call it before anything else compiles a grammar in this process, so the first compile is cold."""
    from tunelab.infer.grammar import compile_grammar

    vocab = engine.model.config.vocab_size
    out = {}
    for label, s in (("first (tokenizer info + compiler + schema)", schema), ("same schema again (cached)", schema)):
        t0 = time.perf_counter()
        compile_grammar(engine.tokenizer, schema=s, vocab_size=vocab)
        out[label] = time.perf_counter() - t0
    other = copy.deepcopy(schema)
    other.setdefault("properties", {})["bench_note"] = {"type": ["string", "null"]}
    t0 = time.perf_counter()
    compile_grammar(engine.tokenizer, schema=other, vocab_size=vocab)
    out["different schema, warm compiler"] = time.perf_counter() - t0
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--limit", type=int, default=96, help="orders-json test examples (default 96)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: the task's (200)")
    p.add_argument("--dtype", default="auto", help="engine dtype (auto: bf16 where the CPU runs it fast)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument("--out", help="also write the results as JSON here")
    a = p.parse_args()

    import torch

    from tunelab.infer.grammar import compile_grammar, grammar_processor
    from tunelab.infer.hf import load_engine
    from tunelab.tasks import load_task

    if a.threads:
        torch.set_num_threads(a.threads)
    task = load_task("orders-json")
    schema = task.schema()
    examples = task.examples("test", limit=a.limit)
    max_new = a.max_new_tokens or task.spec.max_new_tokens
    engine = load_engine(BUNDLED, dtype=a.dtype)
    eos = engine.tokenizer.eos_token_id

    comp = compile_times(engine, schema)
    grammar = compile_grammar(engine.tokenizer, schema=schema, vocab_size=engine.model.config.vocab_size)
    convs = [task.messages(ex) for ex in examples]
    generate_ids(engine, convs[:1], 8)  # warm up both paths
    generate_ids(engine, convs[:1], 8, grammar_processor(grammar))

    stats = {m: {"tokens": 0, "seconds": 0.0, "steps": 0, "valid": 0} for m in ("plain", "grammar")}
    for start in range(0, len(convs), a.batch_size):
        batch = convs[start:start + a.batch_size]
        log.print(f"batch {start // a.batch_size + 1}/{-(-len(convs) // a.batch_size)}")
        for mode in ("plain", "grammar"):
            ids, secs = generate_ids(engine, batch, max_new, grammar_processor(grammar) if mode == "grammar" else None)
            st = stats[mode]
            st["tokens"] += sum(count_tokens(ids, eos))
            st["seconds"] += secs
            st["steps"] += ids.shape[1]
            for text in engine.tokenizer.batch_decode(ids, skip_special_tokens=True):
                try:
                    json.loads(text.strip())
                    st["valid"] += 1
                except ValueError:
                    pass
    for st in stats.values():
        st["tokens_per_s"] = st["tokens"] / st["seconds"]
        st["ms_per_step"] = 1000 * st["seconds"] / max(1, st["steps"])
    overhead = 1 - stats["grammar"]["tokens_per_s"] / stats["plain"]["tokens_per_s"]
    step_overhead = stats["grammar"]["ms_per_step"] / stats["plain"]["ms_per_step"] - 1
    n = len(convs)
    print_table(f"Constrained decoding, {n} orders-json test examples, batch {a.batch_size}, max {max_new} new, "
                f"{torch.get_num_threads()} threads",
                ["mode", "generated tokens", "seconds", "tokens/s", "ms / step (prefill incl.)", "valid JSON"],
                [[m, st["tokens"], fmt(st["seconds"]), fmt(st["tokens_per_s"]), fmt(st["ms_per_step"]),
                  f"{st['valid']}/{n}"] for m, st in stats.items()],
                caption=f"overhead: tokens/s {overhead:+.1%} (target <= 10%: {check(overhead <= 0.10)}), "
                        f"per step (prefill included) {step_overhead:+.1%}")
    print_table("Grammar compilation (xgrammar, orders-json schema.json)", ["compile", "ms"],
                [[k, fmt(1000 * v)] for k, v in comp.items()])
    save_json(a.out, {"args": vars(a), "n": n, "threads": torch.get_num_threads(), "stats": stats,
                      "overhead_tokens_per_s": overhead, "overhead_per_step": step_overhead,
                      "compile_seconds": comp})


if __name__ == "__main__":
    sys.exit(main())
