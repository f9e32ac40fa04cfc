"""Shared helpers of the bench/ scripts: the bundled model folder, child processes, peak RSS, matmul peak, tables."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console
from rich.table import Table

BUNDLED = "smollm2-135m-instruct"
console = Console(width=None if sys.stdout.isatty() else 160)  # tables go to stdout
log = Console(stderr=True)  # progress notes go to stderr


def bundled_model_dir() -> Path:
    """The converted (safetensors) folder of the bundled SmolLM2 model; converts the GGUF on first use."""
    from tunelab.models import local_dir, resolve

    return Path(local_dir(resolve(BUNDLED)))


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far, MiB (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def offline_env(**extra: str) -> dict[str, str]:
    """This process's environment with the Hugging Face hub switched off (nothing may download), plus `extra`."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false", **extra}


# torch's own allocator settings for a child that is not tunelab: importing tunelab sets nothing, but a tunelab
# CPU training run in this process (tunelab.fast.start_cpu_run) sets THP_MEM_ALLOC_ENABLE=1, and a child that
# inherited it would run with tunelab's choice.
TORCH_DEFAULT_ALLOCATOR = {"THP_MEM_ALLOC_ENABLE": "0"}


def run_child(argv: Sequence[str], result: Path, timeout: float | None = None,
              env: dict[str, str] | None = None) -> dict:
    """Run `python argv...` in a fresh process (its own peak RSS) and return the JSON it wrote to `result`.

    The child's stdout and stderr both go to our stderr, so stdout keeps only the tables; `env` adds to or
    overrides its environment."""
    result.unlink(missing_ok=True)
    cmd = [sys.executable, *argv]
    t0 = time.time()
    proc = subprocess.run(cmd, env=offline_env(**(env or {})), stdout=sys.stderr, stderr=sys.stderr, timeout=timeout)
    if proc.returncode != 0 or not result.is_file():
        raise RuntimeError(f"child {' '.join(cmd)} failed with exit code {proc.returncode} "
                           f"after {time.time() - t0:.0f}s (its output is above)")
    return json.loads(result.read_text())


def write_result(path: str | Path, data: dict) -> None:
    """Write a child's result JSON atomically (the parent reads it after the child exits)."""
    path = Path(path)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    tmp.replace(path)


def matmul_peak_flops(sizes: Sequence[int] = (1024, 2048, 3072, 4096), repeats: int = 5,
                      dtype: str = "bf16") -> dict:
    """The matmul peak on this process's torch threads: the best (n x n) @ (n x n) over `sizes` x `repeats`.

    One size and one try gave 399 GFLOP/s in one run and 716 in another on the same kind of machine, so every
    size's best is kept (`by_size`, printed by the benches) and the peak is the best of all. FLOPs = 2 n^3."""
    import torch

    dt = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    g = torch.Generator().manual_seed(0)
    by_size = {}
    for n in sizes:
        a = torch.randn(n, n, generator=g).to(dt)  # (n, n)
        b = torch.randn(n, n, generator=g).to(dt)  # (n, n)
        a @ b  # warm up (thread pool, kernels)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - t0)
        by_size[n] = 2.0 * n ** 3 / min(times)
    best = max(by_size, key=by_size.get)
    return {"flops_per_s": by_size[best], "n": best, "by_size": by_size, "repeats": repeats, "dtype": dtype,
            "threads": torch.get_num_threads()}


def peak_line(peak: dict) -> str:
    """One line naming the measured peak and every size's best, for a table caption."""
    sizes = ", ".join(f"{n}: {f / 1e9:.0f}" for n, f in peak["by_size"].items())
    return (f"{peak['dtype']} matmul peak {peak['flops_per_s'] / 1e9:.1f} GFLOP/s on {peak['threads']} threads "
            f"(best of {peak['repeats']} per size; GFLOP/s by size {sizes})")


def make_adapters(folder: Path, n: int = 2, r: int = 16, std: float = 0.02, seed: int = 0,
                  targets: Sequence[str] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                            "down_proj")) -> list[Path]:
    """`n` PEFT LoRA adapters for the bundled model with random (small) lora_B, saved under `folder`."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    paths = []
    for i in range(n):
        model = AutoModelForCausalLM.from_pretrained(bundled_model_dir(), dtype=torch.float32)
        peft_model = get_peft_model(model, LoraConfig(r=r, lora_alpha=r, target_modules=list(targets),
                                                      task_type="CAUSAL_LM"))
        g = torch.Generator().manual_seed(seed + i)
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * std)
        path = folder / f"random-{i + 1}"
        peft_model.save_pretrained(path)
        paths.append(path)
    return paths


def print_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[object]],
                caption: str | None = None) -> None:
    """A rich table on stdout; cells are str()-ed, None prints as '-'."""
    table = Table(title=title, caption=caption, caption_justify="left")
    for i, c in enumerate(columns):
        table.add_column(c, justify="left" if i == 0 else "right")
    for r in rows:
        table.add_row(*("-" if v is None else str(v) for v in r))
    console.print(table)


def markdown(columns: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """The same table as GitHub markdown (for the README); None prints as '-'."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return "\n".join(lines + ["| " + " | ".join("-" if v is None else str(v) for v in r) + " |" for r in rows])


def save_json(path: str | Path | None, data: dict) -> None:
    """Write the benchmark's results as JSON when `--out` was given."""
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(data, indent=2, default=str))
        log.print(f"results written to {path}")


def fmt(x: float | None, digits: int = 1) -> str | None:
    return None if x is None else f"{x:,.{digits}f}"


def check(ok: bool | None) -> str:
    """A pass/fail mark for a target column."""
    return "-" if ok is None else ("[green]PASS[/]" if ok else "[red]MISS[/]")
