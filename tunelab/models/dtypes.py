"""dtype rules: load in the checkpoint's own dtype; `auto` picks bf16 where the hardware runs it fast."""

from __future__ import annotations

import functools
import warnings
from pathlib import Path

import torch

from tunelab.errors import TunelabError

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
NAMES = {v: k for k, v in DTYPES.items()}


@functools.cache
def cpu_has_fast_bf16() -> bool:
    """True when the CPU advertises AVX-512 BF16 or AMX (bf16 matmul runs natively)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(f in flags for f in (" avx512_bf16", " amx_bf16"))


def bf16_supported(device: str | None = None) -> bool:
    """Whether bf16 compute is fast on this device (CUDA with bf16 support, or a bf16-capable CPU)."""
    if (device or "").startswith("cuda") or (device is None and torch.cuda.is_available()):
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return cpu_has_fast_bf16()


def compute_dtype(precision: str, device: str = "cpu") -> str:
    """`train.precision` (auto | bf16 | fp16 | fp32) resolved for `device`: auto is bf16 where it runs fast, else
    fp32; a CUDA device planned from a machine without one counts as bf16 (current GPUs run it)."""
    if precision != "auto":
        return precision
    if device.startswith("cuda") and not torch.cuda.is_available():
        return "bf16"
    return "bf16" if bf16_supported(device) else "fp32"


def checkpoint_dtype(config) -> torch.dtype:
    """The dtype a checkpoint's config says its weights are stored in (fp32 when it says nothing)."""
    d = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(d, str):
        d = getattr(torch, d, None)
    return d if isinstance(d, torch.dtype) else torch.float32


def resolve_dtype(name: str, config=None, device: str | None = None) -> torch.dtype:
    """Map checkpoint|auto|bf16|fp16|fp32 to a torch dtype, warning on the bf16-as-fp16 pitfall."""
    ckpt = checkpoint_dtype(config) if config is not None else torch.float32
    if name == "checkpoint":
        return ckpt
    if name == "auto":
        return torch.bfloat16 if bf16_supported(device) else torch.float32
    if name not in DTYPES:
        raise TunelabError(f"dtype {name!r} is not one of checkpoint, auto, bf16, fp16, fp32.")
    chosen = DTYPES[name]
    if chosen == torch.float16 and ckpt == torch.bfloat16:
        warnings.warn(
            "PRECISION MISMATCH: this checkpoint stores bf16 weights and you asked for fp16. fp16's "
            "smaller range can overflow and degrade quality (the guide's precision pitfall); use "
            "--dtype bf16 or auto.",
            stacklevel=2,
        )
    return chosen
