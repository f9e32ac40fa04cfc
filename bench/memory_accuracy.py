"""How close is `tunelab memory` to measured memory? A grid of real training steps on this machine.

For each configuration (tiny and bundled SmolLM2 models; full, LoRA, QLoRA; gradient checkpointing on
and off; two sequence lengths; batch 1 and 4) it runs a micro-batch (into existing gradients, as under
accumulation) and an optimizer step with exact tensor accounting (tunelab.memory.measure), estimates
the same configuration (device=cpu, transformers' loss from labels), and prints
the error per component next to the `accelerate estimate-memory` formula (weights + gradients + Adam
states only). Target: every component within 10%, the total within 5%.

    python bench/memory_accuracy.py [--quick] [--json results.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
import warnings
from dataclasses import dataclass

import torch
from rich.console import Console
from rich.table import Table

from tunelab.config.recipe import Recipe
from tunelab.memory.arch import arch_from_config
from tunelab.memory.estimate import estimate
from tunelab.memory.measure import COMPARED, compare, measure_model, prepare_model
from tunelab.memory.quick import accelerate_training_bytes
from tunelab.memory.units import gib
from tunelab.models.build import quantize
from tunelab.models.dtypes import DTYPES
from tunelab.models.methods import bnb_config, load_dtype, method_spec

BUNDLED = "smollm2-135m-instruct"


@dataclass(frozen=True)
class Row:
    model: str  # tiny | bundled
    method: str
    ckpt: bool
    batch: int
    seq: int
    precision: str = "fp32"
    loss: str = "hf"  # hf (transformers' loss from labels) | chunked (tunelab train's weighted_loss)
    autocast: bool = False  # as tunelab train on a bf16 GPU: autocast, fp32 master weights for full


def grid(quick: bool) -> list[Row]:
    """24 tiny configurations (full factorial), 6 tiny bf16 ones (4 as tunelab train runs them) and 5
    bundled ones, sized for a 2-core CPU."""
    rows = [Row("tiny", m, c, b, s) for m in ("full", "lora", "qlora") for c in (False, True)
            for b in (1, 4) for s in (64, 256)]
    rows += [Row("tiny", "full", False, 4, 256, "bf16"), Row("tiny", "lora", True, 4, 256, "bf16")]
    rows += [Row("tiny", m, c, 4, 256, "bf16", "chunked", True)  # how tunelab train runs on a bf16 GPU
             for m, c in (("full", False), ("full", True), ("lora", True), ("qlora", False))]
    rows += [  # bitsandbytes' CPU 4-bit path is slow: one short QLoRA row for the bundled model
        Row("bundled", "full", False, 1, 64), Row("bundled", "full", True, 1, 64),
        Row("bundled", "lora", False, 4, 256), Row("bundled", "lora", True, 1, 256),
        Row("bundled", "qlora", False, 1, 64),
    ]
    if quick:
        rows = [r for r in rows if r.model == "tiny" and r.precision == "fp32"][::3]
    return rows


def _recipe(r: Row) -> Recipe:
    return Recipe.model_validate({"model": {"spec": BUNDLED}, "method": r.method,
                                  "train": {"grad_checkpointing": r.ckpt, "batch_size": r.batch,
                                            "max_length": r.seq, "precision": r.precision}})


class Models:
    """Base models, loaded once per (model, precision, 4-bit) and copied for each row."""

    def __init__(self):
        self._cache: dict[tuple, torch.nn.Module] = {}

    def config(self, name: str):
        if name == "tiny":
            from tunelab.models import tiny_config

            return tiny_config("llama")
        return self.base(name, "fp32", False).config

    def base(self, name: str, precision: str, four_bit: bool):
        key = (name, precision, four_bit)
        if key not in self._cache:
            self._cache[key] = self._load(name, precision, four_bit)
        return self._cache[key]

    def _load(self, name: str, precision: str, four_bit: bool):
        from transformers import AutoModelForCausalLM

        rec = Recipe.model_validate({"method": "qlora"})
        if name == "tiny":
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(self.config("tiny"), dtype=DTYPES[precision])
            return quantize(model, rec.qlora) if four_bit else model
        from tunelab.models import load_model

        model, _ = load_model(BUNDLED, dtype=precision, quantization_config=bnb_config(rec.qlora) if four_bit else None)
        return model

    def prepared(self, r: Row):
        four_bit = r.method == "qlora"
        dtype = load_dtype(method_spec(r.method), r.precision) if r.autocast else r.precision
        if four_bit:  # 4-bit modules do not deep-copy; load a fresh one
            model = self._load(r.model, dtype, True)
        else:
            model = copy.deepcopy(self.base(r.model, dtype, False))
        return prepare_model(model, _recipe(r))


def run_row(models: Models, r: Row) -> dict:
    rec = _recipe(r)
    model = models.prepared(r)
    meas = measure_model(model, batch=r.batch, seq=r.seq, optimizer="adamw", loss=r.loss,
                         autocast=DTYPES[r.precision] if r.autocast else None, name=r.model)
    arch = arch_from_config(models.config(r.model), name=r.model)
    est = estimate(arch, r.method, rec.train, rec.lora, rec.prompt, rec.qlora, device="cpu", loss=r.loss,
                   autocast=r.autocast)
    cmp = compare(est, meas)
    del model
    return {"row": r.__dict__, "comparison": cmp.to_json(), "peak_phase": est.peak,
            "accelerate": accelerate_training_bytes(arch.params_total, r.precision),
            "ok": cmp.within(), "seconds": round(meas.seconds, 1)}


def render(results: list[dict]) -> Table:
    t = Table(title="tunelab memory: estimate vs measured (CPU, exact tensor accounting)")
    for col in ("model", "method", "ckpt", "B", "T", "dtype", "weights", "grads", "optim", "activ.",
                "logits", "total est", "total meas", "total err", "accelerate", "peak at"):
        t.add_column(col, justify="right")
    for res in results:
        r, c = res["row"], res["comparison"]
        errs = [f"{100 * c[k]['error']:+.1f}%" for k in COMPARED[:-1]]
        dtype = r["precision"] + (" amp" if r["autocast"] else "") + (" chunk" if r["loss"] == "chunked" else "")
        t.add_row(r["model"], r["method"], "on" if r["ckpt"] else "off", str(r["batch"]), str(r["seq"]),
                  dtype, *errs, gib(c["total"]["estimate"]), gib(c["total"]["measured"]),
                  f"{100 * c['total']['error']:+.1f}%", gib(res["accelerate"]), res["peak_phase"],
                  style=None if res["ok"] else "red")
    return t


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a third of the tiny rows only")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    t0 = time.time()
    models, results = Models(), []
    console = Console(width=200)
    for r in grid(args.quick):
        results.append(run_row(models, r))
        c = results[-1]["comparison"]["total"]
        console.print(f"{r.model} {r.method} ckpt={'on' if r.ckpt else 'off'} B={r.batch} T={r.seq} {r.precision}"
                      f"{' autocast' if r.autocast else ''} {r.loss} loss: "
                      f"total {gib(c['estimate'])} vs {gib(c['measured'])} ({100 * c['error']:+.2f}%), "
                      f"{results[-1]['seconds']}s")
    console.print(render(results))
    worst = {k: max(abs(res["comparison"][k]["error"]) for res in results) for k in COMPARED}
    console.print("largest |error|: " + ", ".join(f"{k} {100 * v:.2f}%" for k, v in worst.items()))
    ok = all(res["ok"] for res in results)
    console.print(f"{len(results)} configurations, {time.time() - t0:.0f}s: "
                  + ("all within target (components 10%, total 5%)" if ok else "SOME OUTSIDE TARGET"))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
