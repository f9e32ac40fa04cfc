"""The one switch for the CPU fast paths: `enable(model, ...)` swaps them in and returns what the loop needs.

`train.fast_paths` (auto | on | off) decides; `auto` is on for a CPU and off elsewhere until the paths are
measured on a GPU. Off, training is plain transformers + PEFT: the model's own modules, attention, logits
and loss. On, `enable` swaps in (same parameters, same function, tested against the plain modules):

- fused LoRA linear layers and a cheaper LoRA dropout mask (`lora.py`, `dropout.py`),
- fused RMSNorm and SwiGLU MLP for the Llama-style classes they know (`norm.py`, `mlp.py`),
- per-example packed attention for padding-free batches (`attention.py`), unless the model's attention has
  a feature that kernel does not implement (then transformers' attention, with packed rows it masks itself),
- the lm_head run inside the loss (`head.py`), and on a CPU the activation arena (`arena.py`).

`begin(setting)` resolves the switch at the start of a run and, on a CPU, `start_cpu_run()` applies the process
settings (allocator environment, glibc malloc) before any tensor exists; the trainer calls `begin` and then
`enable`, from its set-up only. Nothing here changes the process at import.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field

import torch

from tunelab.fast.arena import ActivationArena
from tunelab.fast.attention import unsupported_features, use_packed_attention
from tunelab.fast.cpu import keep_freed_memory
from tunelab.fast.dropout import use_fast_dropout
from tunelab.fast.head import FusedHead
from tunelab.fast.lora import use_fused_lora
from tunelab.fast.mlp import use_fused_mlp
from tunelab.fast.norm import use_fused_norm

# torch's CPU allocator aligns blocks of 2 MiB and more to huge pages and advises the kernel to back them
# with huge pages: 512x fewer page faults on the large, short-lived activations of a training step.
# oneDNN (bf16 matmuls on a CPU) caches a compiled primitive per shape, 1024 by default; packed training
# makes new shapes every micro-batch, so the cache only grows (measured on the bundled model: ~600 MB more
# resident memory over a 16-step run, peak 2,244 MiB; with 64 entries 1,918 MiB, and no slower).
ALLOCATOR_ENV = {"THP_MEM_ALLOC_ENABLE": "1", "ONEDNN_PRIMITIVE_CACHE_CAPACITY": "64"}


def resolve(setting: str, device: str) -> bool:
    """Whether `train.fast_paths` = setting means on, for a run on `device` (cpu, cuda:0, ...)."""
    if setting not in ("auto", "on", "off"):
        raise ValueError(f"fast_paths={setting!r}: use auto, on or off")
    return setting == "on" or (setting == "auto" and torch.device(device).type == "cpu")


def begin(setting: str) -> bool:
    """Resolve `train.fast_paths` for this machine (CUDA when available, else the CPU) at the start of a run;
    on a CPU with the paths on, apply the process settings (`start_cpu_run`) before any tensor exists."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    on = resolve(setting, device)
    if on and device == "cpu":
        start_cpu_run()
    return on


def start_cpu_run() -> dict[str, str]:
    """Process settings for a CPU training run with the fast paths; returns the variables it set.

    Each variable is set only if the user has not set it. Setting them here, not at import, has a cost to
    know: torch reads THP_MEM_ALLOC_ENABLE once, at its first CPU allocation of the process, and oneDNN reads
    its cache capacity at its first primitive (the first bf16 matmul). A process that allocated tensors or ran
    a bf16 matmul before the run starts (a notebook that built a model first) keeps the defaults for the rest
    of its life; `tunelab train`, and `train()` called first thing, get them. Measured here: after a run
    started this way a 64 MiB block carries the huge-page advice (tests/test_fast_switch.py); 1,500 bf16
    matmuls of distinct shapes grew resident memory by 475 MiB with the capacity set after `import torch`,
    485 MiB with it set before, 895 MiB unset or set after the first matmul. Then glibc keeps freed memory
    mapped (cpu.py).
    """
    set_now = {k: v for k, v in ALLOCATOR_ENV.items() if k not in os.environ}
    os.environ.update(set_now)
    keep_freed_memory()
    return set_now


@dataclass
class FastPaths:
    """What the training loop needs from the fast paths: how to batch, the fused head, the arena."""

    on: bool
    packed_attention: bool = False  # padding-free (1, N) batches through the per-example kernel
    head: FusedHead | None = None
    arena: ActivationArena | None = None
    notes: list[str] = field(default_factory=list)

    def flat_batches(self, packing: bool) -> bool:
        """Padding-free (1, N) batches: only with packing and the packed kernel."""
        return packing and self.packed_attention

    def saving(self):
        """Around a micro-batch's forward: where autograd keeps what backward needs."""
        return self.arena.saving() if self.arena else contextlib.nullcontext()

    def release(self) -> None:
        """After a micro-batch's backward."""
        if self.arena:
            self.arena.release()


def enable(model: torch.nn.Module, *, on: bool, packing: bool, max_length: int | None = None) -> FastPaths:
    """Swap the fast paths into a (PEFT-wrapped) model when `on`; the returned `FastPaths` says how to run it.

    The arena is made for a model whose parameters are on the CPU."""
    if not on:
        return FastPaths(on=False)
    use_fast_dropout(model)  # also for the cases the fused LoRA leaves to PEFT's forward (DoRA, ...)
    use_fused_lora(model)
    use_fused_norm(model)  # training-only: no-grad forwards run the model's own code
    use_fused_mlp(model)
    paths = FastPaths(on=True, head=FusedHead.attach(model))
    if packing:
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        missing = unsupported_features(base.config, max_length)
        if missing:
            paths.notes.append(f"packed attention off for this model ({', '.join(missing)}): transformers' "
                               "own attention on packed rows")
        else:
            use_packed_attention(model)
            paths.packed_attention = True
    if next(model.parameters()).device.type == "cpu":
        paths.arena = ActivationArena(model)  # see arena.py: a heap that does not fragment
    return paths
