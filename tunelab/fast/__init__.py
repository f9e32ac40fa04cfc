"""CPU training fast paths (fused LoRA/MLP/norm, fast dropout, packed attention, arena, fused head), one switch."""

from tunelab.fast.head import FusedHead
from tunelab.fast.paths import ALLOCATOR_ENV, FastPaths, begin, enable, resolve, start_cpu_run

__all__ = ["ALLOCATOR_ENV", "FastPaths", "FusedHead", "begin", "enable", "resolve", "start_cpu_run"]
