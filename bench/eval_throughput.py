"""Evaluation throughput on the bundled model: batched vs one at a time, mixed-adapter vs one adapter per batch.

Examples/s of greedy generation for orders-json test examples through tunelab.evaluate.run.generate_all:

  batching   the base model alone, batch 1 (one at a time) against batch 8 and 16
  adapters   base + 2 LoRA adapters: one generate_all call with 3 Variants (PEFT mixed-adapter batches, every
             batch holds the same prompts for all three) against three generate_all calls, one per Variant

The two adapters are made on the fly (PEFT LoRA r 8 on q/k/v/o with lora_B drawn small and random, saved with
save_pretrained into a temp folder), so nothing needs training. Generated tokens are counted by re-tokenising
the outputs. Agreement columns say how many outputs equal the reference row's (greedy decoding: batching
and mixing should not change them, up to bf16 rounding with padding).

    python bench/eval_throughput.py --out runs/bench/eval.json     # 24 examples: ~10 minutes, quiet 2-core CPU
    python bench/eval_throughput.py --limit 2 --batch-sizes 2 --adapter-batch 3 --max-new-tokens 4   # smoke run
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from _common import BUNDLED, bundled_model_dir, fmt, log, print_table, save_json


def make_adapters(folder: Path, n: int = 2, r: int = 8, std: float = 0.02, seed: int = 0) -> list[Path]:
    """`n` PEFT LoRA adapters for the bundled model with random (small) lora_B, saved under `folder`."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    paths = []
    for i in range(n):
        model = AutoModelForCausalLM.from_pretrained(bundled_model_dir(), dtype=torch.float32)
        peft_model = get_peft_model(model, LoraConfig(r=r, lora_alpha=r, target_modules=["q_proj", "k_proj",
                                                      "v_proj", "o_proj"], task_type="CAUSAL_LM"))
        g = torch.Generator().manual_seed(seed + i)
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * std)
        path = folder / f"random-{i + 1}"
        peft_model.save_pretrained(path)
        paths.append(path)
    return paths


def timed(fn) -> tuple[object, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def agreement(a: list[str], b: list[str]) -> str:
    return f"{sum(x == y for x, y in zip(a, b))}/{len(a)}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--limit", type=int, default=24, help="orders-json test examples (default 24)")
    p.add_argument("--batch-sizes", default="8,16", help="batched sizes to compare with batch 1")
    p.add_argument("--adapter-batch", type=int, default=12, help="batch size of the adapter comparison")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: the task's (200)")
    p.add_argument("--dtype", default="auto", help="engine dtype (auto: bf16 where the CPU runs it fast)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument("--skip", default="", help="comma-separated parts to skip: batching, adapters")
    p.add_argument("--out", help="also write the results as JSON here")
    a = p.parse_args()

    import torch

    from tunelab.evaluate.run import Variant, generate_all
    from tunelab.infer.hf import load_engine
    from tunelab.tasks import load_task

    if a.threads:
        torch.set_num_threads(a.threads)
    task = load_task("orders-json")
    examples = task.examples("test", limit=a.limit)
    max_new = a.max_new_tokens or task.spec.max_new_tokens
    skip = {s.strip() for s in a.skip.split(",") if s.strip()}
    summary: dict = {"args": vars(a), "n": len(examples), "threads": torch.get_num_threads()}

    def run(engine, variants, batch):
        return timed(lambda: generate_all(engine, task, examples, variants, [], batch, max_new, show_progress=False))

    def n_tokens(engine, texts: list[str]) -> int:
        return sum(len(ids) for ids in engine.tokenizer(texts, add_special_tokens=False)["input_ids"])

    if "batching" not in skip:
        engine = load_engine(BUNDLED, dtype=a.dtype)
        base = [Variant("base")]
        generate_all(engine, task, examples[:1], base, [], 1, 8, show_progress=False)  # warm up
        rows, res = [], {}
        ref = None
        for b in [1] + [int(x) for x in a.batch_sizes.split(",") if x.strip()]:
            log.print(f"batching: batch {b}")
            out, secs = run(engine, base, b)
            texts = out["base"]
            ref = ref or texts
            res[b] = {"seconds": secs, "examples_per_s": len(texts) / secs,
                      "tokens_per_s": n_tokens(engine, texts) / secs}
            rows.append([f"batch {b}", len(texts), fmt(secs), fmt(res[b]["examples_per_s"], 2),
                         fmt(res[b]["tokens_per_s"]), fmt(res[b]["examples_per_s"] / res[1]["examples_per_s"], 2),
                         agreement(texts, ref)])
        summary["batching"] = res
        print_table(f"Batched generation, base model, {len(examples)} orders-json test examples, max {max_new} new",
                    ["mode", "examples", "seconds", "examples/s", "out tokens/s*", "speed-up vs batch 1",
                     "same as batch 1"], rows, caption="*outputs re-tokenised")
        del engine

    if "adapters" not in skip:
        with tempfile.TemporaryDirectory(prefix="tunelab-bench-adapters-") as tmp:
            paths = make_adapters(Path(tmp))
            engine = load_engine(BUNDLED, [str(x) for x in paths], dtype=a.dtype)
            variants = [Variant("base"), Variant("random-1", "adapter-1", str(paths[0])),
                        Variant("random-2", "adapter-2", str(paths[1]))]
            generate_all(engine, task, examples[:1], variants, [], 3, 8, show_progress=False)  # warm up
            b = a.adapter_batch
            log.print(f"adapters: one mixed call, batch {b}")
            mixed, mixed_s = run(engine, variants, b)
            separate, sep_s = {}, 0.0
            for v in variants:
                log.print(f"adapters: {v.label} alone, batch {b}")
                out, secs = run(engine, [v], b)
                separate[v.label], sep_s = out[v.label], sep_s + secs
        n = len(examples) * len(variants)
        toks_mixed = sum(n_tokens(engine, t) for t in mixed.values())
        toks_sep = sum(n_tokens(engine, t) for t in separate.values())
        same = sum(x == y for v in variants for x, y in zip(mixed[v.label], separate[v.label]))
        speed = sep_s / mixed_s
        summary["adapters"] = {"batch_size": b, "mixed_seconds": mixed_s, "separate_seconds": sep_s,
                               "mixed_examples_per_s": n / mixed_s, "separate_examples_per_s": n / sep_s,
                               "speedup": speed, "identical_outputs": same, "outputs": n}
        print_table(f"Base + 2 adapters, {len(examples)} examples x 3 variants, batch {b}",
                    ["mode", "generations", "seconds", "examples/s", "out tokens/s*", "speed-up", "identical"],
                    [["one adapter per batch (3 calls)", n, fmt(sep_s), fmt(n / sep_s, 2), fmt(toks_sep / sep_s),
                      "1.00", "-"],
                     ["mixed-adapter batches (1 call)", n, fmt(mixed_s), fmt(n / mixed_s, 2),
                      fmt(toks_mixed / mixed_s), f"{speed:.2f}", f"{same}/{n}"]],
                    caption="mixed batches hold batch // 3 prompts for each of the 3 variants; *outputs re-tokenised")
    save_json(a.out, summary)


if __name__ == "__main__":
    sys.exit(main())
