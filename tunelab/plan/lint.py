"""`tunelab lint`: check a recipe against the guide, each finding with its reason and the fix.

`preflight` is what `tunelab train` runs first: the lint plus the memory estimate against the device's
memory (GPU memory, or available RAM on CPU), so a run that cannot fit is refused before it starts.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from tunelab.config.recipe import Recipe
from tunelab.errors import TunelabError
from tunelab.memory.arch import Arch
from tunelab.memory.catalog import model_arch
from tunelab.memory.units import gib
from tunelab.models.methods import method_spec

PERMISSIVE = {"apache-2.0", "mit", "bsd-2-clause", "bsd-3-clause", "cc-by-4.0", "cc-by-sa-4.0", "cc0-1.0",
              "unlicense", "openrail", "openrail++", "bigscience-openrail-m", "creativeml-openrail-m"}
CONDITIONAL = re.compile(r"^(llama\d(\.\d)?|gemma|qwen|deepseek|other|mistral-ai-.*)$")
RECOMMENDED_BATCH = 64  # the guide: accumulate to an effective batch of 64 or more
RESTRICTIVE = re.compile(r"(^|-)nc(-|$)|research|non-?commercial|noncommercial")


@dataclass(frozen=True)
class Finding:
    """One lint result: `level` error (train refuses), warning, or allowed (a warning the recipe's
    `lint.allow` accepts, with its reason), with the guide's reason and a fix."""

    level: Literal["error", "warning", "allowed"]
    code: str
    message: str
    reason: str
    fix: str

    def to_json(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        return f"{self.level}: [{self.code}] {self.message}\n  why: {self.reason}\n  fix: {self.fix}"


def _f(level, code, message, reason, fix) -> Finding:
    return Finding(level, code, message, reason, fix)


def _count_examples(recipe: Recipe) -> int | None:
    d = recipe.data
    n = None
    if d.train and Path(d.train).is_file():
        with open(d.train, encoding="utf-8", errors="replace") as f:
            n = sum(1 for line in f if line.strip())
    elif d.task:
        try:
            from tunelab.tasks import load_task

            n = load_task(d.task).split_sizes().get("train")
        except (TunelabError, OSError):
            return None
    if n is not None and d.limit_train:
        n = min(n, d.limit_train)
    return n


def _sample_tokens(recipe: Recipe, limit: int = 200) -> list[int] | None:
    """Rough token lengths (characters / 4) of up to `limit` training examples, or None if unreadable."""
    d = recipe.data
    try:
        if d.train:
            from tunelab.data import read_chat_file

            rows = read_chat_file(d.train).rows[:limit]
        elif d.task:
            from tunelab.tasks import load_task

            task = load_task(d.task)
            from tunelab.data import read_jsonl

            rows = [task.messages(ex, with_answer=True) for ex in read_jsonl(task.split_path("train"))[:limit]]
        else:
            return None
    except (TunelabError, OSError, KeyError, ValueError):
        return None
    return [sum(len(str(m.get("content", ""))) for m in row) // 4 + 4 * len(row) for row in rows]


def _license(lic: str | None) -> Finding | None:
    why = "Licensing: finetuning and merging may be restricted by the base license; review it."
    if not lic:
        return _f("warning", "license-unknown", "the base model's license is unknown (no GGUF general.license, "
                  "config or model card license)", why, "check the model card's license before training and "
                  "before sharing the finetuned model or adapters.")
    key = str(lic).strip().lower()
    if key in PERMISSIVE:
        return None
    if RESTRICTIVE.search(key):
        return _f("warning", "license-restrictive", f"the base model's license is {lic!r}, which restricts use "
                  "(non-commercial / research only)", why, "use it for research only, or pick a base model "
                  "under a permissive license (e.g. Apache-2.0: Qwen2.5-7B, Mistral-7B, SmolLM2).")
    if CONDITIONAL.match(key):
        return _f("warning", "license-conditional", f"the base model's license is {lic!r}: finetuning is "
                  "allowed under conditions (acceptable-use policy, naming/attribution, user thresholds)",
                  why, "read the license terms for derivatives before shipping the finetuned model.")
    return _f("warning", "license-unknown", f"the base model's license {lic!r} is not one tunelab knows", why,
              "check whether it allows finetuning and redistribution of derivatives.")


def _batch(r: Recipe, rows: int | None) -> list[Finding]:
    """The effective-batch rules, for data large enough to follow them: with fewer training rows than the
    recommended batch of 64, `tunelab train` fits the batch to the data and says so (`Recipe.fit_to_data`)."""
    t = r.train
    if rows is not None and r.data.train and not r.data.validation:
        rows -= r.data.held_out(rows)
    if rows is not None and rows < RECOMMENDED_BATCH:
        return []
    out = []
    eff = t.batch_size * r.accumulation()
    if eff < 8:
        out.append(_f("warning", "batch-unstable", f"effective batch {eff} (batch_size {t.batch_size} x "
                      f"accumulation {r.accumulation()}) is below 8", "Very small batch (<8) can be unstable; "
                      "smooth with accumulation.", "raise train.effective_batch (or grad_accum) to 64."))
    elif eff < RECOMMENDED_BATCH:
        out.append(_f("warning", "batch-small", f"effective batch {eff} is below the recommended 64",
                      "Per device 1-8; use gradient accumulation to reach effective 64-256 if possible.",
                      f"set train.effective_batch=64 (grad_accum {max(1, 64 // t.batch_size)})."))
    return out


def _hyper(r: Recipe) -> list[Finding]:
    out = []
    t, lora, spec = r.train, r.lora, method_spec(r.method)
    if spec.lr_range and not spec.lr_range[0] <= t.lr <= spec.lr_range[1]:
        lo, hi = spec.lr_range
        out.append(_f("warning", "lr-range", f"train.lr={t.lr:g} is outside {lo:g}..{hi:g} for {spec.label}",
                      spec.lr_advice, f"set train.lr={spec.default_lr:g}."))
    out += _batch(r, _count_examples(r))
    if spec.lora:
        if lora.r > 64:
            out.append(_f("warning", "lora-rank", f"lora.r={lora.r} is above 64", "LoRA rank too high -> "
                          "overfit/minimal gains; r 8-64 is typically sufficient, start with 16 or 32.",
                          "set lora.r=32."))
        ratio = lora.alpha / lora.r
        if not 1 / 8 <= ratio <= 8:
            out.append(_f("warning", "lora-alpha", f"lora.alpha:r = {lora.alpha:g}:{lora.r} is outside 1:8..8:1",
                          "Tune the ratio alpha:r in [1:8, 1:1, 8:1]; start with alpha = r.",
                          f"set lora.alpha={lora.r}."))
        if lora.dropout > 0.1:
            out.append(_f("warning", "lora-dropout", f"lora.dropout={lora.dropout:g} is above 0.1",
                          "LoRA dropout 0.0-0.1.", "set lora.dropout=0.05."))
    if not 0.01 <= t.warmup_ratio <= 0.05:
        out.append(_f("warning", "warmup", f"train.warmup_ratio={t.warmup_ratio:g} is outside 1-5%",
                      "Use cosine or linear schedule; warmup 1-5% of steps.", "set train.warmup_ratio=0.03."))
    if spec.quantized and r.qlora.compute_dtype != "bf16":
        out.append(_f("warning", "qlora-compute", f"4-bit weights compute in {r.qlora.compute_dtype}, not bf16",
                      "QLoRA: prefer BF16 compute dtype when available.", "set qlora.compute_dtype=bf16 "
                      "(fp16 only on GPUs without bf16)."))
    return out


def _data(r: Recipe, a: Arch) -> list[Finding]:
    out = []
    d, t = r.data, r.train
    if d.train and not d.validation and d.validation_fraction == 0:
        out.append(_f("warning", "no-validation", "no validation data: data.validation is unset and "
                      "data.validation_fraction is 0", "Monitor train/val loss; early stop if overfitting "
                      "(training loss down, val loss up).", "give data.validation or set "
                      "data.validation_fraction=0.05."))
    n = _count_examples(r)
    if t.epochs > 5 and (n is None or n < 50_000):
        size = f"{n:,} examples" if n is not None else "a dataset of unknown size"
        out.append(_f("warning", "epochs", f"train.epochs={t.epochs:g} on {size}", "2-5 epochs for 10k-50k "
                      "examples; more epochs on small data overfit.", "set train.epochs=3 and use early "
                      "stopping (validation.patience)."))
    rope = r.model.rope_scaling  # a scaled RoPE stretches the context by its factor
    context = int(a.context * rope.factor) if rope else a.context
    if t.max_length > context:
        level = "warning" if a.rope else "error"
        out.append(_f(level, "max-length", f"train.max_length={t.max_length} exceeds the model's context "
                      f"({context} positions)", "Long-context finetuning requires position-embedding changes "
                      "(RoPE scaling / NTK-aware scaling) and risks regression on short sequences.",
                      f"set train.max_length<={context}, or use a long-context base model "
                      "(or a RoPE-scaling recipe, verifying short-context quality)."))
    if not t.packing:
        lengths = _sample_tokens(r)
        if lengths:
            median = sorted(lengths)[len(lengths) // 2]
            if median < t.max_length / 4:
                out.append(_f("warning", "packing-off", f"packing is off and samples are short (median ~{median} "
                              f"tokens vs max_length {t.max_length})", "Pack short samples to improve "
                              "throughput.", "set train.packing=true."))
    return out


def _model(r: Recipe, a: Arch) -> list[Finding]:
    out = []
    wants_fp16 = r.model.dtype == "fp16" or r.train.precision == "fp16"
    if a.dtype == "bfloat16" and wants_fp16:
        out.append(_f("error", "precision-mismatch", "the checkpoint stores bf16 weights but the recipe loads or "
                      "trains them in fp16", "Precision mismatch (BF16 vs FP16) degrades quality: always load "
                      "models in the intended dtype; BF16 has the larger range.",
                      "set model.dtype=checkpoint and train.precision=bf16 (or auto)."))
    if method_spec(r.method).lora:
        try:
            targets = r.lora.target_modules()
        except TunelabError as e:
            return [*out, _f("error", "lora-targets", str(e), "Target modules must name the model's linear "
                             "layers.", "use a preset or the model's module names.")]
        missing = [t for t in targets if t not in a.module_names()]
        if missing:
            have = ", ".join(sorted(a.module_names()))
            out.append(_f("error", "lora-targets", f"lora.targets names modules this model does not have: "
                          f"{', '.join(missing)}", "LoRA applies to the model's attention/MLP projections; "
                          "PEFT fails on names it cannot find.", f"use names from: {have}."))
    lic = _license(a.license)
    if lic:
        out.append(lic)
    return out


def lint(recipe: Recipe, budget_bytes: int | None = None, *, device: Literal["cuda", "cpu"] = "cuda",
         processes: int = 1, zero: int = 0) -> list[Finding]:
    """Check a recipe: hyperparameters, data, model compatibility, license, and memory vs `budget_bytes`.

    budget_bytes: the memory available for training (per device); None skips the memory check.
    device: what to estimate for (cuda, or cpu for CPU training). processes, zero: data-parallel processes
    and the ZeRO stage their states are sharded at (FSDP full sharding = 3). Errors first, then warnings.
    """
    a = model_arch(recipe.model.spec)
    findings = _model(recipe, a) + _hyper(recipe) + _data(recipe, a)
    if budget_bytes is not None:
        from tunelab.memory.estimate import estimate_recipe

        e = estimate_recipe(recipe, device=device, gpus=processes, zero=zero)
        if e.bytes["total"] > budget_bytes:
            per = f" per process of {processes} (ZeRO-{zero} sharding)" if processes > 1 else ""
            findings.append(_f("error", "memory", f"estimated peak memory{per} {gib(e.bytes['total'])} exceeds the "
                               f"{gib(budget_bytes)} available (weights {gib(e.bytes['weights'])}, activations "
                               f"{gib(e.bytes['activations'])}, logits {gib(e.bytes['logits'])}; peak at {e.peak})",
                               "Underestimating activation memory is a common pitfall; reduce trainable params "
                               "(LoRA), quantize (QLoRA), checkpoint gradients, shorten sequences.",
                               _memory_fix(recipe)))
    return sorted(_allow(recipe, findings), key=lambda f: ("error", "warning", "allowed").index(f.level))


CODES = ("precision-mismatch", "lora-targets", "license-unknown", "license-restrictive", "license-conditional",
         "lr-range", "batch-unstable", "batch-small", "lora-rank", "lora-alpha", "lora-dropout", "warmup",
         "qlora-compute", "no-validation", "epochs", "max-length", "packing-off", "memory")


def _allow(recipe: Recipe, findings: list[Finding]) -> list[Finding]:
    """Mark the warnings the recipe's `lint.allow` accepts as `allowed`, with the recipe's reason."""
    allow = recipe.lint.allow
    unknown = sorted(set(allow) - set(CODES))
    if unknown:
        raise TunelabError(f"lint.allow names unknown finding code(s) {unknown}; the codes are {', '.join(CODES)}.")
    out = []
    for f in findings:
        if f.level == "warning" and f.code in allow:
            why = allow[f.code] or "see the recipe"
            f = Finding("allowed", f.code, f"{f.message} (allowed by lint.allow: {why})", f.reason, f.fix)
        out.append(f)
    return out


def _memory_fix(r: Recipe) -> str:
    steps = []
    if not r.train.grad_checkpointing:
        steps.append("train.grad_checkpointing=true")
    if r.train.batch_size > 1:
        steps.append(f"train.batch_size={max(1, r.train.batch_size // 2)} (accumulation keeps the effective batch)")
    if method_spec(r.method).smaller:
        steps.append(f"method={method_spec(r.method).smaller}")
    steps.append(f"a shorter train.max_length (now {r.train.max_length})")
    return "try " + ", then ".join(steps) + "; or pass --force to train anyway."


def available_memory(device: str | None = None) -> tuple[str, int]:
    """(device, bytes available for training): GPU 0's total memory, or available RAM on CPU."""
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda"):
        return "cuda", torch.cuda.get_device_properties(0).total_memory
    try:
        import psutil

        return "cpu", int(psutil.virtual_memory().available)
    except ImportError:
        text = Path("/proc/meminfo").read_text()
        kb = int(re.search(r"^MemAvailable:\s+(\d+) kB", text, re.M).group(1))
        return "cpu", kb * 1024


def preflight(recipe: Recipe, device_memory_bytes: int | None = None, device: str | None = None,
              processes: int = 1, zero: int = 0) -> list[Finding]:
    """What `tunelab train` runs before training: `lint` with the estimate checked against the device.

    device_memory_bytes: memory to check against (default: the GPU's total memory, or available RAM).
    processes, zero: the launch's data-parallel processes and ZeRO-equivalent sharding stage; the estimate is
    per process with the sharded states divided among them. On a CPU the processes share the machine's RAM,
    so each gets its share of it. A `memory` error means the run would not fit; train refuses it unless --force.
    """
    if device_memory_bytes:
        import torch

        dev = "cuda" if (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda") else "cpu"
        budget = device_memory_bytes
    else:
        dev, budget = available_memory(device)
    if dev == "cpu":
        budget //= max(1, processes)
    return lint(recipe, budget_bytes=budget, device=dev, processes=processes, zero=zero)
