"""The quantization trade-off on the bundled model, measured: memory, tokens/s and task metrics per precision.

Rows (each in its own process, so each has its own peak RSS):

  fp32        the bundled model as tunelab loads it: its Q4_1 GGUF dequantized to fp32 (so every row below
              starts from weights that were rounded to 4 bits once already)
  bf16        the same weights in bf16
  int8        `--load-in 8bit`: bitsandbytes LLM.int8() linear layers (outlier threshold 6.0), fp32 elsewhere
  nf4         `--load-in 4bit`: bitsandbytes NF4 linear layers computing in fp32 (on an AVX512-BF16 CPU
              bitsandbytes repacks them and computes in bf16), fp32 elsewhere
  gguf q8_0   `tunelab export --format gguf --quant q8_0` of the bundled model, loaded back through
  gguf q4_0   transformers' GGUF reader: dequantized to fp32 on load, so its memory is fp32's; the rounding
              (and so the metrics) is the GGUF type's, the on-disk size is the file's

Every row runs the same `--limit` test examples of each task through tunelab's batched engine (greedy, the
task's own max_new_tokens) and is scored by tunelab.evaluate: the task's primary metric with its 95%
bootstrap CI. Columns: weights = parameters + buffers as loaded (`get_memory_footprint`, the KV cache not
included); RSS after load and peak RSS of the row's process (tokenizer, Python and torch included; loading
reads the fp32 checkpoint first, so the quantized rows' peaks hold it once); tokens/s = generated tokens /
generation wall time, prefill included. Tokens/s on a shared machine is noisy: compare it within one run.

    python bench/quantization.py --out runs/bench/quantization.json          # 64 orders-json examples
    python bench/quantization.py --task orders-json --task shop-sql --limit 32
    python bench/quantization.py --limit 2 --rows fp32,nf4                    # smoke run
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from _common import BUNDLED, fmt, log, peak_rss_mib, print_table, run_child, save_json, write_result

# row -> (dtype, load_in, GGUF quant)
ROWS = {
    "fp32": ("fp32", None, None),
    "bf16": ("bf16", None, None),
    "int8": ("fp32", "8bit", None),
    "nf4": ("fp32", "4bit", None),
    "gguf q8_0": ("fp32", None, "q8_0"),
    "gguf q4_0": ("fp32", None, "q4_0"),
}


def rss_mib() -> float:
    """Resident memory of this process now, MiB (VmRSS)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def gguf_file(quant: str, cache: Path) -> Path:
    """The bundled model exported as a GGUF of type `quant` (made once into `cache`), converted for loading."""
    from tunelab.export import export
    from tunelab.models import convert_gguf

    folder = cache / f"smollm2-{quant}"
    if not folder.is_dir():
        log.print(f"exporting the bundled model as GGUF {quant} -> {folder}")
        export(BUNDLED, folder, "gguf", quant)
    path = next(folder.glob("*.gguf"))
    convert_gguf(path)  # dequantized once here, so the row's process only loads the converted folder
    return path


def child(row: str, spec: str, tasks: list[str], limit: int, result: Path) -> None:
    """Load the row's model, evaluate it on every task, write what was measured to `result`."""
    from tunelab.evaluate.run import Variant, run_variants
    from tunelab.infer import load_engine
    from tunelab.tasks import load_task

    dtype, load_in, _ = ROWS[row]
    t0 = time.perf_counter()
    engine = load_engine(spec, dtype=dtype, load_in=load_in)
    out = {"row": row, "spec": spec, "engine": type(engine).__name__, "load_seconds": time.perf_counter() - t0,
           "weights_mib": engine.model.get_memory_footprint() / 2**20, "rss_after_load_mib": rss_mib(),
           "tasks": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name in tasks:
            task = load_task(name)
            res = run_variants(engine, task, [Variant("base")], Path(tmp) / name, limit=limit, write_html=False,
                               model_label=spec)
            meta, rows = res.metrics["base"], res.predictions["base"]
            tokens = sum(r["new_tokens"] for r in rows)
            primary = meta["primary_metric"]
            out["tasks"][name] = {"primary": primary, **meta["metrics"][primary], "n": meta["n"],
                                  "metrics": meta["metrics"], "quantization": meta["quantization"],
                                  "tokens": tokens, "seconds": meta["generation_seconds"],
                                  "tokens_per_s": tokens / meta["generation_seconds"]}
    out["peak_rss_mib"] = peak_rss_mib()
    write_result(result, out)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", action="append", help="bundled task (repeatable; default orders-json)")
    p.add_argument("--limit", type=int, default=64, help="test examples per task")
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of: {', '.join(ROWS)}")
    p.add_argument("--cache", default=None, help="where the GGUF exports are kept (default $TUNELAB_HOME/bench-gguf)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--spec", default=None, help=argparse.SUPPRESS)
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    tasks = a.task or ["orders-json"]
    if a.child:
        child(a.child, a.spec, tasks, a.limit, Path(a.result))
        return 0
    rows = [r.strip() for r in a.rows.split(",")]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        p.error(f"unknown rows {unknown}; choose from {', '.join(ROWS)}")
    results, gguf_bytes = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        from tunelab.config.paths import tunelab_home

        cache = Path(a.cache) if a.cache else tunelab_home() / "bench-gguf"
        registry = {"TUNELAB_REGISTRY": str(Path(tmp) / "registry.sqlite")}  # the rows' evals stay out of yours
        for row in rows:
            spec, quant = BUNDLED, ROWS[row][2]
            if quant:
                path = gguf_file(quant, cache)
                spec, gguf_bytes[row] = str(path), path.stat().st_size
            log.print(f"[bold]{row}[/bold]: {len(tasks)} task(s) x {a.limit} examples")
            argv = [__file__, "--child", row, "--spec", spec, "--limit", str(a.limit), "--result",
                    str(Path(tmp) / "row.json"), *[x for t in tasks for x in ("--task", t)]]
            results[row] = run_child(argv, Path(tmp) / "row.json", env=registry)
            save_json(a.out, {"tasks": tasks, "limit": a.limit, "rows": results, "gguf_bytes": gguf_bytes})
    from tunelab.models import bundled_gguf_path

    gguf_bytes["fp32"] = bundled_gguf_path().stat().st_size
    for name in tasks:
        base = results.get("fp32", {}).get("tasks", {}).get(name)
        table = []
        for row, r in results.items():
            t = r["tasks"][name]
            lo, hi = t["ci95"]
            speed = f"{t['tokens_per_s'] / base['tokens_per_s']:.2f}x" if base else None
            table.append([row, fmt(r["weights_mib"]), fmt(gguf_bytes.get(row, 0) / 2**20) if row in gguf_bytes
                          else None, fmt(r["rss_after_load_mib"], 0), fmt(r["peak_rss_mib"], 0),
                          fmt(t["tokens_per_s"]), speed, f"{t['score']:.3f} [{lo:.3f}, {hi:.3f}]"])
        primary = next(iter(results.values()))["tasks"][name]["primary"]
        print_table(f"quantization: {name}, {a.limit} test examples, bundled SmolLM2-135M",
                    ["row", "weights MiB", "GGUF file MiB", "RSS loaded MiB", "peak RSS MiB", "tokens/s",
                     "vs fp32", f"{primary} [95% CI]"], table,
                    caption="fp32 row's GGUF file: the bundled Q4_1 it is dequantized from. GGUF rows load "
                            "dequantized (fp32 in memory).")
    save_json(a.out, {"tasks": tasks, "limit": a.limit, "rows": results, "gguf_bytes": gguf_bytes})
    return 0


if __name__ == "__main__":
    sys.exit(main())
