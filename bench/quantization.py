"""The quantization trade-off on the bundled model, measured: memory, tokens/s and task metrics per precision.

Rows (each in its own process, so each has its own peak RSS):

  fp32        the bundled model as tunelab loads it: its Q4_1 GGUF dequantized to fp32 (so every row below
              starts from weights that were rounded to 4 bits once already)
  bf16        the same weights in bf16
  int8        `--load-in 8bit`: bitsandbytes LLM.int8() linear layers (outlier threshold 6.0), fp32 elsewhere
  nf4         `--load-in 4bit`: bitsandbytes NF4 linear layers computing in fp32 (on an AVX512-BF16 CPU
              bitsandbytes repacks them and computes in bf16), fp32 elsewhere
  gguf q8_0   `tunelab export --format gguf --quant q8_0` (q5_0, q4_1, q4_0 alike) of the same model, loaded
  gguf ...    back through transformers' GGUF reader: dequantized to fp32 on load, so its memory is fp32's; the
              rounding (and so the metrics) is the GGUF type's, the on-disk size is the file's. The export keeps
              the tied token_embd/head at q8_0 for the 4/5-bit types, as llama.cpp's quantizer does.

The bundled model scores 0 on orders-json and shop-sql (it never answers in JSON / runnable SQL), so a table
of the base alone says nothing about quantization on those tasks. `--adapter DIR` (a LoRA of the bundled
model, e.g. the one `make demo` trains on orders-json) is merged into the base first (`tunelab export
--format hf`), and every row quantizes that finetuned model: what you would serve.

Every row runs the first `--limit` test examples of each task (`--row-limit int8=8` gives a row fewer)
through tunelab's batched engine (greedy, the task's own max_new_tokens), scored by tunelab.evaluate: the
task's primary metric with its 95% bootstrap CI, and its paired change against the fp32 row on the same
examples (points, paired-bootstrap 95% CI). "same as fp32" = share of answers identical to fp32's text.
Columns: weights = parameters + buffers as loaded (`get_memory_footprint`, the KV cache not included); RSS
after load and peak RSS of the row's process (tokenizer, Python and torch included; loading reads the fp32
checkpoint first, so the quantized rows' peaks hold it once); tokens/s = generated tokens / generation wall
time, prefill included; tokens/CPU-s = the same over the process's CPU time, which on a CPU shared with other
jobs moves less than wall time (with `--threads 1` it is the row's own compute). Compare them within a run.

    python bench/quantization.py --adapter runs/demo/orders-json/adapter --threads 1 --limit 32 \\
        --row-limit int8=8 --out runs/bench/quantization.json       # the README's table
    python bench/quantization.py --task general --limit 64              # the base on a task it can do
    python bench/quantization.py --limit 2 --rows fp32,nf4              # smoke run
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from _common import BUNDLED, fmt, log, markdown, peak_rss_mib, print_table, run_child, save_json, write_result

# row -> (dtype, load_in, GGUF quant)
ROWS = {
    "fp32": ("fp32", None, None),
    "bf16": ("bf16", None, None),
    "int8": ("fp32", "8bit", None),
    "nf4": ("fp32", "4bit", None),
    "gguf q8_0": ("fp32", None, "q8_0"),
    "gguf q5_0": ("fp32", None, "q5_0"),
    "gguf q4_1": ("fp32", None, "q4_1"),
    "gguf q4_0": ("fp32", None, "q4_0"),
}
COLUMNS = ["row", "n", "weights MiB", "GGUF file MiB", "RSS loaded MiB", "peak RSS MiB", "tokens/s",
           "tokens/CPU-s", "vs fp32"]


def rss_mib() -> float:
    """Resident memory of this process now, MiB (VmRSS)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def machine() -> dict:
    """What the numbers were measured on: CPU model, cores, load average, date (UTC)."""
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "unknown")
    return {"cpu": cpu, "cores": os.cpu_count(), "loadavg": os.getloadavg(),
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def row_spec(row: str, source: str, work: Path) -> tuple[str, int | None]:
    """The model the row's process loads (made under `work`), and its GGUF file's size in bytes (GGUF rows).

    source: the bundled model's spec, or an adapter folder (merged into the base first)."""
    from tunelab.export import export
    from tunelab.models import convert_gguf

    quant = ROWS[row][2]
    if quant is None:
        if source == BUNDLED:
            return BUNDLED, None
        merged = work / "merged"
        if not merged.is_dir():
            log.print(f"merging {source} into its base -> {merged}")
            export(source, merged, "hf")
        return str(merged), None
    folder = work / f"gguf-{quant}"  # exported afresh each run: a cached file would outlive exporter fixes
    log.print(f"exporting {source} as GGUF {quant} -> {folder}")
    export(source, folder, "gguf", quant)
    path = next(folder.glob("*.gguf"))
    # dequantized once here into the bench's folder, so the row's process only loads it
    return str(convert_gguf(path, folder / "dequantized")), path.stat().st_size


def child(row: str, spec: str, tasks: list[str], limit: int, threads: int | None, result: Path) -> None:
    """Load the row's model, evaluate it on every task, write what was measured to `result`."""
    import torch

    from tunelab.evaluate.harness import Variant, run_variants
    from tunelab.infer import load_engine
    from tunelab.tasks import load_task

    if threads:
        torch.set_num_threads(threads)
    dtype, load_in, _ = ROWS[row]
    t0 = time.perf_counter()
    engine = load_engine(spec, dtype=dtype, load_in=load_in)
    out = {"row": row, "spec": spec, "engine": type(engine).__name__, "threads": torch.get_num_threads(),
           "load_seconds": time.perf_counter() - t0, "weights_mib": engine.model.get_memory_footprint() / 2**20,
           "rss_after_load_mib": rss_mib(), "tasks": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name in tasks:
            task = load_task(name)
            cpu0 = time.process_time()
            res = run_variants(engine, task, [Variant("base")], Path(tmp) / name, limit=limit, write_html=False,
                               model_label=spec)
            cpu = time.process_time() - cpu0  # generation and scoring; scoring is a small share
            meta, rows = res.metrics["base"], res.predictions["base"]
            tokens = sum(r["new_tokens"] for r in rows)
            primary = meta["primary_metric"]
            out["tasks"][name] = {"primary": primary, **meta["metrics"][primary], "n": meta["n"],
                                  "metrics": meta["metrics"], "quantization": meta["quantization"],
                                  "tokens": tokens, "seconds": meta["generation_seconds"], "cpu_seconds": cpu,
                                  "tokens_per_s": tokens / meta["generation_seconds"],
                                  "tokens_per_cpu_s": tokens / cpu,
                                  "examples": [{"id": r["id"], "output": r["output"], "score": r["scores"][primary],
                                                "finish_reason": r["finish_reason"]} for r in rows]}
    out["peak_rss_mib"] = peak_rss_mib()
    write_result(result, out)


def compare(base: dict | None, t: dict) -> tuple[str | None, str | None]:
    """(paired change vs fp32 in points with its CI, share of answers identical to fp32's) on shared examples."""
    from tunelab.evaluate.regression import paired_change

    if base is None:
        return None, None
    ref = {e["id"]: e for e in base["examples"]}
    pairs = [(ref[e["id"]], e) for e in t["examples"] if e["id"] in ref]
    if not pairs:
        return None, None
    c = paired_change([b["score"] for b, _ in pairs], [e["score"] for _, e in pairs], threshold=0.0)
    lo, hi = c["ci95_points"]
    same = sum(b["output"] == e["output"] for b, e in pairs)
    return f"{c['delta_points']:+.1f} [{lo:+.1f}, {hi:+.1f}]", f"{same}/{len(pairs)}"


def table_rows(results: dict, name: str, gguf_bytes: dict) -> list[list]:
    """One table row per bench row for task `name`."""
    base = results.get("fp32", {}).get("tasks", {}).get(name)
    table = []
    for row, r in results.items():
        t = r["tasks"][name]
        lo, hi = t["ci95"]
        speed = f"{t['tokens_per_cpu_s'] / base['tokens_per_cpu_s']:.2f}x" if base else None
        gguf = fmt(gguf_bytes[row] / 2**20) if gguf_bytes.get(row) else None
        table.append([row, t["n"], fmt(r["weights_mib"]), gguf, fmt(r["rss_after_load_mib"], 0),
                      fmt(r["peak_rss_mib"], 0), fmt(t["tokens_per_s"]), fmt(t["tokens_per_cpu_s"]), speed,
                      f"{t['score']:.3f} [{lo:.3f}, {hi:.3f}]", *compare(None if row == "fp32" else base, t)])
    return table


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", action="append", help="bundled task (repeatable; default orders-json)")
    p.add_argument("--limit", type=int, default=64, help="test examples per task")
    p.add_argument("--row-limit", action="append", default=[], metavar="ROW=N",
                   help="fewer examples for one row, e.g. int8=8 (repeatable); the table's n column shows it")
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of: {', '.join(ROWS)}")
    p.add_argument("--adapter", default=None, help="a LoRA of the bundled model, merged in before quantizing")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads per row (default torch's; on a CPU shared with other jobs 1 avoids stalls)")
    p.add_argument("--out", default=None, help="results JSON (a markdown table per task is written beside it)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--spec", default=None, help=argparse.SUPPRESS)
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    tasks = a.task or ["orders-json"]
    if a.child:
        child(a.child, a.spec, tasks, a.limit, a.threads, Path(a.result))
        return 0
    rows = [r.strip() for r in a.rows.split(",")]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        p.error(f"unknown rows {unknown}; choose from {', '.join(ROWS)}")
    limits = dict(x.split("=", 1) for x in a.row_limit if "=" in x)
    if len(limits) != len(a.row_limit) or set(limits) - set(ROWS) or not all(v.isdigit() for v in limits.values()):
        p.error(f"--row-limit takes ROW=N with ROW one of {', '.join(ROWS)}; got {a.row_limit}")
    source = a.adapter or BUNDLED
    results, gguf_bytes, started = {}, {}, machine()
    data = {"tasks": tasks, "limit": a.limit, "row_limits": limits, "adapter": a.adapter, "threads": a.threads,
            "machine": started, "rows": results, "gguf_bytes": gguf_bytes}
    with tempfile.TemporaryDirectory(prefix="tunelab-quant-bench-") as tmp:
        work = Path(tmp)
        os.environ["TUNELAB_REGISTRY"] = str(work / "registry.sqlite")  # the bench's exports and evals stay out of yours
        for row in rows:
            spec, gguf_bytes[row] = row_spec(row, source, work)
            limit = int(limits.get(row, a.limit))
            log.print(f"[bold]{row}[/bold]: {len(tasks)} task(s) x {limit} examples")
            argv = [__file__, "--child", row, "--spec", spec, "--limit", str(limit), "--result",
                    str(work / "row.json"), *[x for t in tasks for x in ("--task", t)],
                    *(["--threads", str(a.threads)] if a.threads else [])]
            results[row] = run_child(argv, work / "row.json")
            if ROWS[row][2]:
                shutil.rmtree(Path(spec).parent)  # the dequantized copy is fp32-sized; only the file size stays
            save_json(a.out, data)
    if source == BUNDLED:
        from tunelab.models import bundled_gguf_path

        gguf_bytes["fp32"] = bundled_gguf_path().stat().st_size
    data["machine_at_end"] = machine()
    what = f"{BUNDLED} + {a.adapter} merged" if a.adapter else BUNDLED
    caption = ((f"fp32: {BUNDLED}'s Q4_1 GGUF dequantized" + (" (its GGUF file MiB is that file)" if not a.adapter
                else "") + "; GGUF rows load dequantized (fp32 in memory). ")
               + f"threads {a.threads or 'torch default'}; {started['cpu']}, {started['cores']} cores, "
               f"load average {started['loadavg'][0]:.1f} at start, {data['machine_at_end']['loadavg'][0]:.1f} at "
               f"end; {started['date']}.")
    markdowns = []
    for name in tasks:
        primary = next(iter(results.values()))["tasks"][name]["primary"]
        columns = [*COLUMNS, f"{primary} [95% CI]", "change vs fp32, points [95% CI]", "same as fp32"]
        table = table_rows(results, name, gguf_bytes)
        print_table(f"quantization: {name}, {what}", columns, table, caption=caption)
        markdowns.append(f"{name}, {what}:\n\n{markdown(columns, table)}\n")
    save_json(a.out, data)
    if a.out:
        Path(a.out).with_suffix(".md").write_text("\n".join(markdowns) + f"\n{caption}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
