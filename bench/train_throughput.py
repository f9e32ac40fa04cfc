"""LoRA training throughput, peak memory and loss: tunelab against TRL's SFTTrainer on the same data and model.

Three systems train in one run, each in its own process (so peak RSS is per system), on the same text (the
first N orders-json train examples as chat messages), the same weights (the bundled SmolLM2-135M-Instruct,
bf16), the same LoRA (r 16, alpha 16, q/k/v/o/gate/up/down), max length 1024, effective batch 8 sequences,
AdamW lr 2e-4 cosine, and the same number of optimizer steps:

  tunelab    tunelab.train.train with a default Recipe plus the overrides above: padding-free packing with
             per-example attention, the shared system prompt computed once per micro-batch (train.share_prefix;
             exact same loss and gradients), fused lm_head + loss, fused LoRA / SwiGLU / norm functions that keep
             little for backward, the activation arena; micro-batch `--tunelab-batch` packed rows (default 2)
  trl-guide  TRL SFTTrainer + PEFT as the guide's example does it: gradient checkpointing on, packing on
             (TRL's default strategy, bfd, which turns padding-free on), per-device batch 2 x accumulation 4,
             loss on the whole sequence
  trl-fast   TRL in its fastest configuration (`--trl-fast`, or `--probe` to measure the candidates first):
             gradient checkpointing off, packing "wrapped" (fixed 1024-token rows, no padding, no mask),
             per-device batch 4 x accumulation 2 (batch 8 may need ~20 GiB without checkpointing; `--probe`
             times all candidates); prompt-completion rows so the loss is on the response only

Each TRL child runs with torch's default allocator settings (THP_MEM_ALLOC_ENABLE=0); tunelab's child with
its own (huge pages, freed memory kept by glibc: see docs/cpu-training.md). Tokens/s counts the dataset's real
(non-pad) tokens over the training loop only (model loading, tokenising and saving are
in the wall column). Each adapter's response-only loss on the same 32 validation examples is measured by one
shared function afterwards; each system's own last train loss is shown too (tunelab weighs prompt tokens
0.1, trl-guide 1.0, trl-fast 0, so those are not comparable). tunelab's FLOP/s is compared with a bf16
matmul measured on the spot.

By default N = 2 x effective batch x steps: two examples (346-499 tokens each) fill one 1024-token row, so
every system sees each example exactly once and the losses are compared after the same tokens.

    python bench/train_throughput.py --out runs/bench/train.json     # 4 steps: ~20 minutes on a quiet 2-core CPU
    python bench/train_throughput.py --probe --out runs/bench/train.json   # all trl-fast candidates first, ~45 min
    python bench/train_throughput.py --steps 1 --effective-batch 2 --val 4          # smoke run
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from _common import (
    TORCH_DEFAULT_ALLOCATOR,
    bundled_model_dir,
    check,
    fmt,
    log,
    matmul_peak_flops,
    peak_line,
    peak_rss_mib,
    print_table,
    run_child,
    save_json,
    write_result,
)

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# trl-fast candidates: packing strategy, padding_free, per-device batch (accumulation fills the effective batch)
FAST = {
    "wrapped-b8": ("wrapped", False, 8),
    "wrapped-b4": ("wrapped", False, 4),
    "wrapped-b2": ("wrapped", False, 2),
    "bfd-b1": ("bfd", True, 1),
    "bfd-b2": ("bfd", True, 2),
}


def task_rows(split: str, n: int) -> list[list[dict]]:
    """Chat messages (system, user, assistant) of the first `n` orders-json examples of a split."""
    from tunelab.tasks import load_task

    task = load_task("orders-json")
    return [task.messages(ex, with_answer=True) for ex in task.examples(split, limit=n)]


def read_rows(path: Path) -> list[list[dict]]:
    return [json.loads(line)["messages"] for line in path.read_text().splitlines() if line]


# ---- children: one system each -----------------------------------------------------------------------------

def _rate(marks: list[tuple[float, int]]) -> float:
    """Tokens/s between the first and last (time, tokens) mark: steps 2.. when marks start after step 1."""
    (t0, n0), (t1, n1) = marks[0], marks[-1]
    return (n1 - n0) / max(t1 - t0, 1e-9)


def child_tunelab(a: argparse.Namespace, work: Path, name: str = "tunelab") -> dict:
    from tunelab.config.recipe import load_recipe
    from tunelab.runs.layout import read_train_log
    from tunelab.train import train

    out = work / name
    overrides = [
        "data.task=null", f"data.train={work / 'train.jsonl'}", "data.validation_fraction=0",
        f"lora.r={a.r}", f"lora.alpha={a.alpha}", f"lora.dropout={a.dropout}", "lora.targets=attention+mlp",
        f"train.max_length={a.max_length}", f"train.effective_batch={a.effective_batch}",
        f"train.batch_size={min(a.tunelab_batch, a.effective_batch)}",
        f"train.max_steps={a.steps}", f"train.lr={a.lr}", "train.precision=bf16", f"train.seed={a.seed}",
        "validation.every=null", "checkpoint_every=null", f"output_dir={out}", *a.tunelab_override,
        *(["train.grad_checkpointing=true"] if name == "tunelab-ckpt" else []),
    ]
    recipe = load_recipe(None, overrides)
    train(recipe, show_progress=True)
    rows = read_train_log(out)
    # each row covers the window since the previous one: tokens_per_s = window tokens / window seconds
    prev, loop_s, marks = 0, 0.0, [(0.0, 0)]
    for r in rows:
        loop_s += (r["tokens"] - prev) / max(r["tokens_per_s"], 1e-9)
        prev = r["tokens"]
        marks.append((loop_s, r["tokens"]))
    return {"adapter": str(out), "tokens": rows[-1]["tokens"], "train_seconds": loop_s, "steps": rows[-1]["step"],
            "computed_tokens": rows[-1].get("computed_tokens", rows[-1]["tokens"]),
            "later_steps_tokens_per_s": _rate(marks[1:]) if len(marks) > 2 else None,
            "train_loss": rows[-1]["loss"], "config": {"batch_size": recipe.train.batch_size,
                                                        "grad_accum": recipe.accumulation(),
                                                        "prompt_loss_weight": recipe.train.prompt_loss_weight}}


def child_trl(a: argparse.Namespace, work: Path, name: str) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    if name == "trl-guide":
        strategy, padding_free, per_device, ckpt, completion = "bfd", False, 2, True, False
    else:
        strategy, padding_free, per_device = FAST[a.trl_fast]
        ckpt, completion = False, a.trl_fast_loss == "completion"
    per_device = min(per_device, a.effective_batch)
    torch.manual_seed(a.seed)
    model_dir = bundled_model_dir()
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    model = get_peft_model(model, LoraConfig(r=a.r, lora_alpha=a.alpha, lora_dropout=a.dropout,
                                             target_modules=TARGETS, bias="none", task_type="CAUSAL_LM"))
    if ckpt:
        model.gradient_checkpointing_enable()
    rows = read_rows(work / "train.jsonl")
    if completion:  # conversational prompt-completion: TRL computes the loss on the completion only
        ds = Dataset.from_list([{"prompt": m[:-1], "completion": m[-1:]} for m in rows])
    else:
        ds = Dataset.from_list([{"messages": m} for m in rows])
    cfg = SFTConfig(
        output_dir=str(work / f"{name}-trainer"), max_steps=a.steps, per_device_train_batch_size=per_device,
        gradient_accumulation_steps=max(1, a.effective_batch // per_device), learning_rate=a.lr,
        lr_scheduler_type="cosine", warmup_steps=int(round(0.03 * a.steps)), weight_decay=0.01,
        max_grad_norm=1.0, logging_steps=1, save_strategy="no", report_to="none", bf16=True,
        gradient_checkpointing=ckpt, max_length=a.max_length, packing=True, packing_strategy=strategy,
        padding_free=padding_free, seed=a.seed, data_seed=a.seed, dataloader_num_workers=0,
        use_cpu=not torch.cuda.is_available(),
    )
    trainer = SFTTrainer(model=model, processing_class=tok, train_dataset=ds, args=cfg)
    marks: list[tuple[float, int]] = []  # (time, tokens so far) at the start and after every step

    class Clock(TrainerCallback):
        def on_train_begin(self, *args, **kwargs):
            marks.append((time.perf_counter(), 0))

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "num_tokens" in logs:
                marks.append((time.perf_counter(), int(logs["num_tokens"])))

    trainer.add_callback(Clock())
    out = trainer.train()
    adapter = work / name
    trainer.save_model(str(adapter))
    logs = trainer.state.log_history
    tokens = [h["num_tokens"] for h in logs if "num_tokens" in h]
    losses = [h["loss"] for h in logs if "loss" in h]
    return {"adapter": str(adapter), "tokens": int(tokens[-1]), "train_seconds": out.metrics["train_runtime"],
            "steps": trainer.state.global_step, "train_loss": losses[-1] if losses else None,
            "later_steps_tokens_per_s": _rate(marks[1:]) if len(marks) > 2 else None,
            "config": {"packing_strategy": strategy, "padding_free": trainer.padding_free,
                       "per_device_batch": per_device, "grad_accum": cfg.gradient_accumulation_steps,
                       "gradient_checkpointing": ckpt, "loss": "completion" if completion else "full sequence"}}


def child_val(a: argparse.Namespace, work: Path) -> dict:
    """Response-only loss of the base model and every adapter on the same validation examples."""
    import torch

    from tunelab.data import Batches, model_inputs, tokenize_dataset
    from tunelab.models import load_model
    from tunelab.models.losses import weighted_loss

    adapters = json.loads((work / "adapters.json").read_text())
    rows = task_rows("validation", a.val)
    out = {}
    for label, path in adapters.items():
        model, tok = load_model(str(bundled_model_dir()), dtype="bf16")
        if path:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, path)
        model.eval()
        examples, _ = tokenize_dataset(tok, rows, prompt_loss_weight=0.0, max_length=1024)
        total, weight = 0.0, 0.0
        for batch in Batches(examples, 8, 1024, tok.pad_token_id, packing=False):
            with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
                logits = model(**model_inputs(batch)).logits  # (B, T, V)
            loss, w = weighted_loss(logits, batch["input_ids"], batch["weights"])
            total += loss.item() * w.item()
            weight += w.item()
        out[label] = total / weight
        log.print(f"validation loss {label}: {out[label]:.4f}")
    return out


def run_as_child(a: argparse.Namespace) -> None:
    t0 = time.time()
    work = Path(a.workdir)
    if a.child == "val":
        res = child_val(a, work)
    else:
        res = child_tunelab(a, work, a.child) if a.child.startswith("tunelab") else child_trl(a, work, a.child)
        res["tokens_per_s"] = res["tokens"] / max(res["train_seconds"], 1e-9)
        res["wall_seconds"] = time.time() - t0
        res["peak_rss_mib"] = peak_rss_mib()
    write_result(work / f"result-{a.child}.json", res)


# ---- FLOPs ------------------------------------------------------------------------------------------------

def flops_per_token(config, r: int, mean_ctx: float) -> dict:
    """Useful training FLOPs per token position for LoRA on a Llama-style model (no recomputation counted).

    Frozen linear layers: forward 2N + input-gradient 2N (no weight gradient) = 4N. LoRA A/B: forward,
    input-gradient and weight-gradient = 6 r (d_in + d_out) per target. lm_head: 4 d V (its input gradient is
    needed; the tied embedding is frozen). Attention scores and values: forward 4 d_attn c per layer (QK^T and
    AV, c = keys a position attends to: `mean_context`), backward twice that: 12 d_attn c per layer."""
    d, n_layers, inter = config.hidden_size, config.num_hidden_layers, config.intermediate_size
    heads, kv = config.num_attention_heads, config.num_key_value_heads
    dh = getattr(config, "head_dim", None) or d // heads
    shapes = {"q_proj": (d, heads * dh), "k_proj": (d, kv * dh), "v_proj": (d, kv * dh), "o_proj": (heads * dh, d),
              "gate_proj": (d, inter), "up_proj": (d, inter), "down_proj": (inter, d)}
    n_lin = n_layers * sum(i * o for i, o in shapes.values())
    n_lora = n_layers * sum(r * (i + o) for t, (i, o) in shapes.items() if t in TARGETS)
    lm_head = d * config.vocab_size
    attn = n_layers * 12 * heads * dh * mean_ctx
    total = 4 * n_lin + 6 * n_lora + 4 * lm_head + attn
    recompute = 2 * n_lin + 2 * n_lora + attn / 3  # gradient checkpointing runs the decoder's forward again
    return {"per_token": total, "recompute_per_token": recompute, "linear": 4 * n_lin, "lora": 6 * n_lora,
            "lm_head": 4 * lm_head,
            "attention": attn, "mean_context": mean_ctx, "frozen_linear_params": n_lin, "lora_params": n_lora}


def mean_context(max_length: int, rows: list[list[dict]], computed_tokens: int | None = None) -> float:
    """Average keys attended per token position the model ran; every example attends causally only to itself.

    With `computed_tokens` (tunelab's shared prefix): each micro-batch held the examples' common prefix once
    and each example's own tokens attend to all of it, so the n_micro = (computed - own tokens) / p
    micro-batches ran p (p + 1) / 2 prefix keys each, and an example of u own tokens u p + u (u + 1) / 2.
    Without, each example of n tokens runs n (n + 1) / 2."""
    from tunelab.data import tokenize_dataset
    from tunelab.data.pack import common_prefix
    from tunelab.models import load_tokenizer

    examples, _ = tokenize_dataset(load_tokenizer(str(bundled_model_dir())), rows, 0.1, max_length)
    lengths = [len(e) for e in examples]
    p = common_prefix(examples) if computed_tokens else 0
    n_micro = (computed_tokens - sum(n - p for n in lengths)) / p if p else 0
    if p and not (n_micro >= 1 and abs(n_micro - round(n_micro)) < 1e-6):  # not one prefix per micro-batch
        return sum(n * (n + 1) / 2 for n in lengths) / sum(lengths)
    keys = round(n_micro) * p * (p + 1) / 2 + sum((n - p) * p + (n - p) * (n - p + 1) / 2 for n in lengths)
    return keys / (computed_tokens or sum(lengths))


# ---- parent ------------------------------------------------------------------------------------------------

def child_argv(a: argparse.Namespace, child: str, work: Path, **extra) -> list[str]:
    argv = [__file__, "--child", child, "--workdir", str(work)]
    for k in ("steps", "max_length", "effective_batch", "r", "alpha", "dropout", "lr", "seed", "val",
              "trl_fast", "trl_fast_loss",
              "tunelab_batch"):
        argv += [f"--{k.replace('_', '-')}", str(extra.get(k, getattr(a, k)))]
    for o in a.tunelab_override:
        argv += ["--tunelab-override", o]
    return argv


def probe(a: argparse.Namespace, work: Path) -> tuple[str, dict]:
    """One optimizer step of every trl-fast candidate; the fastest (tokens/s) wins."""
    rates: dict[str, float | None] = {}
    for name in FAST:
        log.print(f"[bold]probe {name}")
        try:
            res = run_child(child_argv(a, "trl-fast", work, trl_fast=name, steps=a.probe_steps),
                            work / "result-trl-fast.json", env=TORCH_DEFAULT_ALLOCATOR)
            rates[name] = res["tokens_per_s"]
        except RuntimeError as e:  # e.g. killed for memory at a large per-device batch
            log.print(f"[yellow]probe {name} failed: {e}")
            rates[name] = None
    ok = {k: v for k, v in rates.items() if v is not None}
    if not ok:
        raise SystemExit("every trl-fast candidate failed; see the output above")
    return max(ok, key=ok.get), rates


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # the first step of a process pays for first touching its memory (~5-7 s for tunelab on a 2-core VM):
    # 4 steps show a run's rate better than 1, where that is half the time
    p.add_argument("--steps", type=int, default=4, help="optimizer steps per system (default 4)")
    p.add_argument("--examples", type=int, default=None,
                   help="first N train examples (default 2 x effective batch x steps: one epoch, as two examples "
                        "fill one 1024-token row)")
    p.add_argument("--val", type=int, default=32, help="validation examples for the shared loss (default 32)")
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--effective-batch", type=int, default=8, help="sequences per optimizer step")
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--alpha", type=float, default=16)
    p.add_argument("--dropout", type=float, default=0.05)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--systems", default="tunelab,tunelab-ckpt,trl-guide,trl-fast",
                   help="comma-separated subset (tunelab-ckpt: tunelab with gradient checkpointing)")
    p.add_argument("--trl-fast", choices=sorted(FAST), default="wrapped-b4",
                   help="trl-fast configuration (default wrapped-b4; b8 needs ~20 GiB at 1024 tokens)")
    p.add_argument("--trl-fast-loss", choices=["completion", "full"], default="completion")
    p.add_argument("--probe", action="store_true", help="time every trl-fast candidate first and use the fastest")
    p.add_argument("--probe-steps", type=int, default=1)
    p.add_argument("--matmul-sizes", default="1024,2048,3072,4096", help="matrix sizes of the bf16 matmul peak")
    # 2 rows: ~1.7 GB peak RSS, ~456-489 tokens/s, 41-44% of the matmul peak; 4 rows: 2.1 GB, 513 tokens/s (fewer
    # shared-prefix recomputations, more activations at once) but 40.9% (a bigger first micro-batch to warm up)
    p.add_argument("--tunelab-batch", type=int, default=2, help="tunelab's micro-batch in packed rows (default 2)")
    p.add_argument("--tunelab-override", action="append", default=[], help="extra recipe key=value for tunelab")
    p.add_argument("--out", help="also write the results as JSON here")
    p.add_argument("--workdir", help="keep adapters and logs here (default: a temp folder, removed at the end)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        return run_as_child(a)

    work = Path(a.workdir or tempfile.mkdtemp(prefix="tunelab-bench-train-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        compare(a, work)
    finally:
        if not a.workdir:  # a temp folder of adapters and trainer checkpoints: ~25 MB a run
            shutil.rmtree(work, ignore_errors=True)


def compare(a, work: Path) -> None:
    """Train every system in `work`, score them on the same validation set, print and save the report."""
    n = a.examples or 2 * a.effective_batch * a.steps
    rows = task_rows("train", n)
    (work / "train.jsonl").write_text("".join(json.dumps({"messages": m}) + "\n" for m in rows))
    systems = [s.strip() for s in a.systems.split(",") if s.strip()]
    probe_rates = None
    if a.probe and "trl-fast" in systems:
        a.trl_fast, probe_rates = probe(a, work)
        log.print(f"trl-fast: {a.trl_fast} was fastest ({probe_rates})")
    results = {}
    for s in systems:
        log.print(f"[bold]training {s}")
        results[s] = run_child(child_argv(a, s, work), work / f"result-{s}.json",
                               env=None if s.startswith("tunelab") else TORCH_DEFAULT_ALLOCATOR)
    (work / "adapters.json").write_text(json.dumps({"base": None, **{s: r["adapter"] for s, r in results.items()}}))
    log.print("[bold]validation loss")
    val = run_child(child_argv(a, "val", work), work / "result-val.json")
    peak = matmul_peak_flops([int(x) for x in a.matmul_sizes.split(",")])

    from transformers import AutoConfig

    computed = next((r["computed_tokens"] for s, r in results.items() if s.startswith("tunelab")), None)
    fl = flops_per_token(AutoConfig.from_pretrained(bundled_model_dir()), a.r,
                         mean_context(a.max_length, rows, computed))
    report(a, n, work, results, val, peak, fl, probe_rates)


def report(a, n, work, results, val, peak, fl, probe_rates) -> None:
    rows = []
    for s, r in results.items():
        rows.append([s, f"{r['tokens']:,}", fmt(r["tokens_per_s"]), fmt(r.get("later_steps_tokens_per_s")),
                     fmt(r["peak_rss_mib"], 0),
                     f"{val[s]:.4f}", None if r["train_loss"] is None else f"{r['train_loss']:.4f}",
                     fmt(r["train_seconds"]), fmt(r["wall_seconds"]), r["steps"]])
    print_table(f"LoRA SFT, SmolLM2-135M bf16, {n} orders-json examples, {a.steps} steps x {a.effective_batch} "
                f"sequences of <= {a.max_length} tokens",
                ["system", "tokens", "tokens/s", "tokens/s steps 2+", "peak RSS MiB", "val loss (resp.)", "own train loss",
                 "train s", "wall s", "steps"], rows,
                caption=f"base model val loss {val['base']:.4f} on {a.val} validation examples; trl-fast = "
                        f"{a.trl_fast}, loss on {a.trl_fast_loss}; tokens/s over the training loop only")
    summary: dict = {"args": vars(a), "examples": n, "workdir": str(work) if a.workdir else None, "systems": results,
                     "val_loss": val, "matmul_peak": peak, "flops": fl, "probe_tokens_per_s": probe_rates}
    trl = {s: r for s, r in results.items() if s.startswith("trl")}
    for name in [s for s in results if s.startswith("tunelab")]:
        tl = results[name]
        # FLOPs the model really ran: per computed position (a shared prompt prefix runs once per micro-batch)
        achieved = fl["per_token"] * tl.get("computed_tokens", tl["tokens"]) / max(tl["train_seconds"], 1e-9)
        share = achieved / peak["flops_per_s"]
        summary[f"{name}_flops_per_s"], summary[f"{name}_peak_share"] = achieved, share
        out_rows = [[f"{name} FLOP/s / bf16 matmul peak", f"{achieved / 1e9:.1f} / {peak['flops_per_s'] / 1e9:.1f} G",
                     f"{share:.1%}", ">= 40%", check(share >= 0.40)]]
        later = tl.get("later_steps_tokens_per_s")
        if later:  # steady state: the first step also pays first-touch page faults (and a few of them)
            later_fl = fl["per_token"] * later * tl.get("computed_tokens", tl["tokens"]) / tl["tokens"]
            summary[f"{name}_peak_share_steps_2plus"] = later_fl / peak["flops_per_s"]
            out_rows.append(["  the same, steps 2+", f"{later_fl / 1e9:.1f} / {peak['flops_per_s'] / 1e9:.1f} G",
                             f"{later_fl / peak['flops_per_s']:.1%}", "(info)", ""])
        if name == "tunelab-ckpt":  # what the CPU executed: the checkpointed forward runs twice
            done = achieved * (1 + fl["recompute_per_token"] / fl["per_token"])
            summary[f"{name}_executed_peak_share"] = done / peak["flops_per_s"]
            out_rows.append(["  executed FLOP/s (forward recomputed)", f"{done / 1e9:.1f} / "
                             f"{peak['flops_per_s'] / 1e9:.1f} G", f"{done / peak['flops_per_s']:.1%}", "(info)", ""])
        if trl:
            best = max(trl, key=lambda s: trl[s]["tokens_per_s"])
            speed = tl["tokens_per_s"] / trl[best]["tokens_per_s"]
            rss = tl["peak_rss_mib"] / trl[best]["peak_rss_mib"]
            loss_gap = val[name] - val[best]
            summary["ratios" if name == "tunelab" else f"ratios_{name}"] = {
                "best_trl": best, "tokens_per_s": speed, "peak_rss": rss, "val_loss_delta": loss_gap,
                "val_loss_delta_vs_lowest_trl": val[name] - min(val[s] for s in trl),
                "peak_rss_vs_lowest_trl": tl["peak_rss_mib"] / min(r["peak_rss_mib"] for r in trl.values())}
            out_rows = [[f"tokens/s vs {best}", fmt(tl["tokens_per_s"]) + " / " + fmt(trl[best]["tokens_per_s"]),
                         f"{speed:.2f}x", ">= 4x", check(speed >= 4)],
                        *([[f"  tokens/s steps 2+ vs {best}", fmt(later) + " / " + fmt(trl[best]["later_steps_tokens_per_s"]),
                            f"{later / trl[best]['later_steps_tokens_per_s']:.2f}x", "(info)", ""]]
                          if later and trl[best].get("later_steps_tokens_per_s") else []),
                        [f"peak RSS vs {best}", f"{tl['peak_rss_mib']:.0f} / {trl[best]['peak_rss_mib']:.0f} MiB",
                         f"{rss:.2f}x", "<= 0.5x", check(rss <= 0.5)],
                        [f"val loss vs {best}", f"{val[name]:.4f} / {val[best]:.4f}", f"{loss_gap:+.4f}",
                         "<= 0", check(loss_gap <= 0)]] + out_rows
            low_rss = min(trl, key=lambda s: trl[s]["peak_rss_mib"])
            low_val = min(trl, key=lambda s: val[s])
            if low_rss != best:  # the strictest comparison, for information
                out_rows.append([f"peak RSS vs {low_rss}", f"{tl['peak_rss_mib']:.0f} / "
                                 f"{trl[low_rss]['peak_rss_mib']:.0f} MiB",
                                 f"{tl['peak_rss_mib'] / trl[low_rss]['peak_rss_mib']:.2f}x", "(info)", ""])
            if low_val != best:
                out_rows.append([f"val loss vs {low_val}", f"{val[name]:.4f} / {val[low_val]:.4f}",
                                 f"{val[name] - val[low_val]:+.4f}", "(info)", ""])
        print_table(f"{name} against the fastest TRL configuration", ["measure", "values", "ratio", "target", ""],
                    out_rows, caption=(
                        f"{name} ran {tl.get('computed_tokens', tl['tokens']):,} token positions for "
                        f"{tl['tokens']:,} dataset tokens (shared prompt prefix); "
                        f"FLOPs/token {fl['per_token'] / 1e6:.0f} M = 4 x {fl['frozen_linear_params'] / 1e6:.1f} M "
                        f"frozen linear + 6 x {fl['lora_params'] / 1e6:.2f} M LoRA + 4 x d x V lm_head + 12 x d_attn "
                        f"x {fl['mean_context']:.0f} keys x layers attention; {peak_line(peak)}"))
    save_json(a.out, summary)


if __name__ == "__main__":
    sys.exit(main())
