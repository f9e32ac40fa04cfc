"""GPU check: 20 LoRA and 20 QLoRA steps, then the engine against `generate`, on one CUDA device, in minutes.

Sizes are fixed so a run on one GPU stays well under 8 minutes (the bundled SmolLM2-135M, bf16):

  train        tunelab.train on the bundled model, one run per method (lora, qlora): 20 optimizer steps of 8
               packed 1024-token rows of orders-json train examples, LoRA r 16 on attention + MLP, bf16,
               fast paths off (plain transformers + PEFT), the model's attention implementation reported (SDPA
               expected); steps/s and tokens/s over the loop (first step excluded: it pays for warm-up), peak
               memory (torch.cuda.max_memory_allocated), first and final loss
  batched      32 orders-json test prompts submitted at once, up to 128 new tokens, greedy, every row under
               the task's JSON Schema, row i on adapter i % 2 (the two adapters trained above): the batched
               engine against transformers `generate` (the generate-based engine, batches of 16); tokens/s,
               the ratio, and how many rows' greedy answers are identical (bf16 rounding may flip a few)
  single       8 of those requests one at a time through each engine: tokens/s, the ratio, engine TTFT p50

Sanity checks (printed, in the JSON): every loss finite, the loss falling (mean of the last quarter of steps
below the first quarter's), engine answers equal to generate's for at least half the rows, SDPA attention.
A section that raises is reported and the run goes on; the exit code is 1 when any section failed.
`--device cpu --tiny` runs the same code on a tiny random Llama built here, a few steps and tokens (the smoke
test, tests/test_gpu_check.py); its numbers say nothing about speed. How to run it on the device machine:
docs/benchmarks.md, "GPU check".

    python bench/gpu_check.py --out runs/bench/gpu.json                  # CUDA
    python bench/gpu_check.py --device cpu --tiny --out /tmp/gpu.json    # seconds, anywhere
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

from _common import BUNDLED, fmt, log, peak_rss_mib, print_table, save_json


@dataclass(frozen=True)
class Sizes:
    """The fixed work of one run (what keeps a CUDA run under 8 minutes)."""

    steps: int = 20
    effective_batch: int = 8
    batch_size: int = 8
    max_length: int = 1024
    lr: float = 2e-4
    prompts: int = 32
    new_tokens: int = 128
    single_prompts: int = 8
    generate_batch: int = 16


TINY = Sizes(steps=2, effective_batch=1, batch_size=1, max_length=512, lr=2e-3, prompts=4, new_tokens=8,
             single_prompts=2, generate_batch=4)
METHODS = ("lora", "qlora")


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--tiny", action="store_true", help="a tiny random Llama and a few steps (the CPU smoke test)")
    p.add_argument("--out", default=None, help="write the numbers as JSON here")
    p.add_argument("--workdir", default=None, help="keep the run folders here (default: a temp folder)")
    return p.parse_args()


def _tiny_model(work: Path) -> str:
    """A tiny random Llama (bundled tokenizer, own output head) saved as an HF folder; -> its path."""
    from tunelab.models import tiny_model

    folder = work / "tiny-llama"
    model, tok = tiny_model("llama", tie_word_embeddings=False)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


def _device_info(device: str) -> dict:
    import torch

    info = {"device": device, "torch": torch.__version__}
    if device == "cuda":
        info.update(name=torch.cuda.get_device_name(0), capability=".".join(map(str, torch.cuda.get_device_capability(0))),
                    memory_gib=round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1))
    return info


def _reset_memory(device: str) -> None:
    import torch

    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak_memory_mib(device: str) -> float:
    import torch

    return torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else peak_rss_mib()


# ---- train ---------------------------------------------------------------------------------------------------

def _skip_qlora() -> str | None:
    """Why QLoRA cannot run here (None: it can)."""
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as e:
        return f"bitsandbytes is not importable: {e}"
    return None


def train_method(method: str, spec: str, work: Path, s: Sizes, device: str) -> dict:
    """`method` on `spec` for s.steps optimizer steps, bf16, fast paths off; the loop's numbers."""
    from tunelab.config.recipe import load_recipe
    from tunelab.runs.layout import read_train_log
    from tunelab.train.loop import train_loop
    from tunelab.train.sft import prepare_run, save

    out = work / method
    recipe = load_recipe(None, [
        f"model.spec={spec}", f"method={method}", "data.task=null", f"data.train={work / 'train.jsonl'}",
        "data.validation_fraction=0", "lora.r=16", "lora.alpha=16", "lora.targets=attention+mlp",
        f"train.max_length={s.max_length}", f"train.effective_batch={s.effective_batch}",
        f"train.batch_size={s.batch_size}", f"train.max_steps={s.steps}", f"train.lr={s.lr}",
        "train.precision=bf16", "train.fast_paths=off", "train.seed=0", "validation.every=null",
        "checkpoint_every=null", f"output_dir={out}"])
    _reset_memory(device)
    t0 = time.perf_counter()
    run = prepare_run(recipe)
    base = run.accelerator.unwrap_model(run.model)
    attention = getattr(base.config, "_attn_implementation", None)
    setup_s = time.perf_counter() - t0
    train_loop(run, show_progress=False)
    peak = _peak_memory_mib(device)
    save(run)
    on = str(next(p for p in run.model.parameters() if p.requires_grad).device)
    del run, base
    rows = read_train_log(out)
    step_s = [r["tokens_per_s"] and (r["tokens"] - (rows[i - 1]["tokens"] if i else 0)) / r["tokens_per_s"]
              for i, r in enumerate(rows)]  # each row: its own step's tokens over its own seconds
    later = step_s[1:] or step_s
    tokens_later = rows[-1]["tokens"] - (rows[0]["tokens"] if len(rows) > 1 else 0)
    return {"method": method, "steps": len(rows), "device": on, "attention": attention, "setup_s": setup_s,
            "first_step_s": step_s[0], "steps_per_s": len(later) / sum(later),
            "tokens_per_s": tokens_later / sum(later), "tokens": rows[-1]["tokens"],
            "peak_memory_mib": peak, "memory_kind": "cuda max_memory_allocated" if device == "cuda" else
            "process peak RSS so far", "losses": [r["loss"] for r in rows], "first_loss": rows[0]["loss"],
            "final_loss": rows[-1]["loss"], "adapter": str(out)}


def train_section(spec: str, work: Path, s: Sizes, device: str, errors: dict[str, str]) -> dict:
    """Both methods; QLoRA is skipped (with its reason) where bitsandbytes cannot run. A method that raises
    goes into `errors` (its traceback) and the other one still runs."""
    from tunelab.tasks import load_task

    task = load_task("orders-json")
    n = s.steps * s.effective_batch * 2  # two examples fill a 1024-token row: each seen once
    rows = [task.messages(e, with_answer=True) for e in task.examples("train", limit=n)]
    (work / "train.jsonl").write_text("".join(json.dumps({"messages": m}) + "\n" for m in rows))
    res: dict = {}
    for method in METHODS:
        why = _skip_qlora() if method == "qlora" else None
        if why:
            log.print(f"[yellow]qlora skipped: {why}")
            res[method] = {"method": method, "skipped": why}
            continue
        log.print(f"[bold]train {method}: {s.steps} steps ...")
        try:
            res[method] = train_method(method, spec, work, s, device)
        except Exception:
            errors[f"train {method}"] = traceback.format_exc()
            res[method] = {"method": method, "failed": errors[f"train {method}"].strip().splitlines()[-1]}
    rows_ = [[m, r.get("attention"), r.get("steps"), fmt(r.get("steps_per_s"), 2), fmt(r.get("tokens_per_s"), 0),
              fmt(r.get("first_step_s"), 2), fmt(r.get("peak_memory_mib"), 0),
              fmt(r.get("first_loss"), 4), fmt(r.get("final_loss"), 4), r.get("skipped") or r.get("failed")]
             for m, r in res.items()]
    print_table(f"train: {s.steps} steps x {s.effective_batch} packed rows of <= {s.max_length} tokens, bf16, "
                f"fast paths off", ["method", "attention", "steps", "steps/s (2+)", "tokens/s (2+)", "step 1 s",
                                    "peak MiB", "first loss", "final loss", "skipped / failed"], rows_)
    return res


# ---- inference -----------------------------------------------------------------------------------------------

def _engines(spec: str, adapters: dict[str, str], device: str, s: Sizes):
    from tunelab.infer import load_engine

    eng = load_engine(spec, adapters, dtype="bf16", device=device, kind="batched", max_batch=s.prompts)
    gen = load_engine(spec, adapters, dtype="bf16", device=device, kind="generate", batch_size=s.generate_batch)
    return eng, gen


def _requests(engine, prompts: list, adapters: list[str], schema: dict, new_tokens: int) -> list:
    from tunelab.infer import Request, SamplingParams

    params = SamplingParams(max_new_tokens=new_tokens, grammar=engine.compile_grammar(schema=schema))
    return [Request(q, adapter=adapters[i % len(adapters)], params=params) for i, q in enumerate(prompts)]


def _sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def _timed(engine, requests: list, device: str, one_at_a_time: bool) -> dict:
    """All requests at once (or one at a time): tokens/s over wall time, token ids, TTFTs."""
    _sync(device)
    t0 = time.perf_counter()
    done, ttfts = [], []
    for group in ([[q] for q in requests] if one_at_a_time else [requests]):
        start = time.perf_counter()
        handles = [engine.add_request(q) for q in group]
        while engine.has_unfinished():
            engine.step()
        _sync(device)
        for h in handles:
            c = h.completion()
            done.append(c)
            if c.first_token_time is not None:
                ttfts.append(c.first_token_time - start)
    wall = time.perf_counter() - t0
    tokens = sum(len(c.token_ids) for c in done)
    return {"tokens": tokens, "seconds": wall, "tokens_per_s": tokens / wall,
            "ttft_p50_s": statistics.median(ttfts) if ttfts else None,
            "valid": sum(bool((c.grammar or {}).get("valid")) for c in done),
            "ids": [list(c.token_ids) for c in done]}


def _agreement(a: list[list[int]], b: list[list[int]]) -> dict:
    """Rows with identical greedy token ids, and the mean share of the common prefix."""
    same = sum(x == y for x, y in zip(a, b))
    shares = []
    for x, y in zip(a, b):
        k = next((i for i, (u, v) in enumerate(zip(x, y)) if u != v), min(len(x), len(y)))
        shares.append(k / max(len(x), len(y), 1))
    return {"identical": same, "rows": len(a), "common_prefix": sum(shares) / max(len(shares), 1)}


def inference_section(spec: str, adapters: dict[str, str], device: str, s: Sizes) -> dict:
    """The batched engine against `generate`: all prompts at once, then some one at a time."""
    from tunelab.tasks import load_task

    task = load_task("orders-json")
    prompts = [task.messages(e) for e in task.examples("test", limit=s.prompts)]
    eng, gen = _engines(spec, adapters, device, s)
    names = list(adapters)
    out: dict = {"adapters": adapters}
    for label, n, one in (("batched", s.prompts, False), ("single", s.single_prompts, True)):
        res = {}
        for name, engine in (("engine", eng), ("generate", gen)):
            reqs = _requests(engine, prompts[:n], names, task.schema(), s.new_tokens)
            _timed(engine, reqs[:2], device, one)  # warm-up: kernels, the grammar's first masks
            log.print(f"{label}: {name}, {n} prompts ...")
            res[name] = _timed(engine, reqs, device, one)
        res["ratio"] = res["engine"]["tokens_per_s"] / res["generate"]["tokens_per_s"]
        res["agreement"] = _agreement(res["engine"]["ids"], res["generate"]["ids"])
        out[label] = res
    _inference_tables(out, s)
    for label in ("batched", "single"):
        for name in ("engine", "generate"):
            out[label][name].pop("ids")
    return out


def _inference_tables(out: dict, s: Sizes) -> None:
    for label, title in (("batched", f"{s.prompts} orders-json prompts at once"),
                         ("single", f"{s.single_prompts} prompts one at a time")):
        res = out[label]
        rows = [[name, f"{r['tokens']:,}", fmt(r["seconds"], 2), fmt(r["tokens_per_s"]),
                 f"{r['tokens_per_s'] / res['generate']['tokens_per_s']:.2f}x",
                 fmt(r["ttft_p50_s"] * 1000 if r["ttft_p50_s"] is not None and name == "engine" else None),
                 f"{r['valid']}/{len(r['ids'])}"] for name, r in (("engine", res["engine"]),
                                                                  ("generate", res["generate"]))]
        ag = res["agreement"]
        print_table(f"{label}: {title}, <= {s.new_tokens} new tokens, greedy, JSON Schema, 2 adapters",
                    ["system", "tokens", "seconds", "tokens/s", "vs generate", "TTFT p50 ms", "schema-valid"],
                    rows, caption=f"identical greedy answers: {ag['identical']}/{ag['rows']} "
                                  f"(mean common prefix {ag['common_prefix']:.0%})")


# ---- checks and summary --------------------------------------------------------------------------------------

def sanity(sections: dict) -> list[dict]:
    """The checks a CUDA run must pass to be believed (printed everywhere; the tiny model's are not meant to)."""
    checks = []
    for method, r in sections.get("train", {}).items():
        if "losses" not in r:
            continue
        losses = r["losses"]
        q = max(1, len(losses) // 4)
        checks += [{"check": f"{method}: every loss finite", "ok": all(math.isfinite(x) for x in losses)},
                   {"check": f"{method}: loss falling (last quarter {statistics.mean(losses[-q:]):.4f} < first "
                             f"quarter {statistics.mean(losses[:q]):.4f})",
                    "ok": statistics.mean(losses[-q:]) < statistics.mean(losses[:q])},
                   {"check": f"{method}: attention is sdpa ({r['attention']})", "ok": r["attention"] == "sdpa"}]
    inf = sections.get("inference", {})
    for label in ("batched", "single"):
        if label in inf:
            ag = inf[label]["agreement"]
            checks.append({"check": f"{label}: engine = generate on >= half the rows ({ag['identical']}/"
                                    f"{ag['rows']}, bf16 rounding allowed)", "ok": 2 * ag["identical"] >= ag["rows"]})
    return checks


def summary(sections: dict, checks: list[dict], errors: dict, info: dict, seconds: float) -> None:
    rows = []
    for method, r in sections.get("train", {}).items():
        if "steps_per_s" in r:
            rows.append([f"{method}: steps/s, tokens/s, peak MiB", f"{r['steps_per_s']:.2f}, "
                         f"{r['tokens_per_s']:,.0f}, {r['peak_memory_mib']:,.0f}"])
    inf = sections.get("inference", {})
    for label in ("batched", "single"):
        if label in inf:
            r = inf[label]
            rows.append([f"{label}: engine / generate tokens/s", f"{r['engine']['tokens_per_s']:,.1f} / "
                         f"{r['generate']['tokens_per_s']:,.1f} = {r['ratio']:.2f}x"])
    rows += [[c["check"], "ok" if c["ok"] else "[red]NO[/]"] for c in checks]
    rows += [[f"section {k} failed", v.splitlines()[-1]] for k, v in errors.items()]
    print_table(f"summary: {info.get('name', info['device'])}, torch {info['torch']}, {seconds:.0f} s in all",
                ["measure", "value"], rows)


def main() -> int:
    a = _args()
    if a.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before torch is imported: the CPU path, even on a GPU host
    work = Path(a.workdir or tempfile.mkdtemp(prefix="tunelab-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TUNELAB_REGISTRY", str(work / "registry.sqlite"))  # keep these runs out of yours
    import torch

    if a.device == "cuda" and not torch.cuda.is_available():
        log.print("[red]no CUDA device is visible here; use --device cpu --tiny for the smoke run")
        return 2
    t0 = time.perf_counter()
    s = TINY if a.tiny else Sizes()
    info = _device_info(a.device)
    spec = _tiny_model(work) if a.tiny else BUNDLED
    sections: dict = {}
    errors: dict[str, str] = {}
    sections["train"] = train_section(spec, work, s, a.device, errors)
    trained = [r["adapter"] for r in sections.get("train", {}).values() if "adapter" in r]
    try:
        if not trained:
            raise RuntimeError("no adapter was trained, so the inference section has none to serve")
        # two adapters: the LoRA and the QLoRA run's (the LoRA one twice, under two names, if QLoRA was skipped)
        adapters = {"lora": trained[0], "qlora" if len(trained) > 1 else "lora-2": trained[-1]}
        _reset_memory(a.device)
        sections["inference"] = inference_section(spec, adapters, a.device, s)
    except Exception:
        errors["inference"] = traceback.format_exc()
    for k, v in errors.items():
        log.print(f"[red]section {k} failed:[/]\n{v}")
    checks = sanity(sections)
    seconds = time.perf_counter() - t0
    summary(sections, checks, errors, info, seconds)
    save_json(a.out, {"info": info, "sizes": asdict(s), "tiny": a.tiny, "sections": sections, "checks": checks,
                      "errors": errors, "seconds": seconds})
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
