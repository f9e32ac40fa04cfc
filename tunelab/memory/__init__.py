"""Memory planning: estimator, catalog of architectures, measurement, advisor and linter.

    estimate("meta-llama/Llama-3.1-8B", method="lora", seq=2048, grad_ckpt=True).to_json()
    plan("meta-llama/Llama-3.1-8B", "24GB", examples=5000).table()
    preflight(recipe)  # lint + memory vs this device, before `tunelab train`
"""

from tunelab.memory.advisor import Plan, plan
from tunelab.memory.arch import Arch
from tunelab.memory.catalog import catalog_rows, model_arch
from tunelab.memory.estimate import MemoryEstimate, estimate, estimate_recipe, kv_cache_bytes
from tunelab.memory.lint import Finding, available_memory, lint, preflight
from tunelab.memory.measure import Comparison, Measurement, compare, measure, measure_model
from tunelab.memory.quick import QuickMath, accelerate_training_bytes, adapter_serving, quick_math
from tunelab.memory.units import GPUS, parse_bytes, parse_count

__all__ = [
    "GPUS", "Arch", "Comparison", "Finding", "Measurement", "MemoryEstimate", "Plan", "QuickMath",
    "accelerate_training_bytes", "adapter_serving", "available_memory", "catalog_rows", "compare",
    "estimate", "estimate_recipe", "kv_cache_bytes", "lint", "measure", "measure_model", "model_arch",
    "parse_bytes", "parse_count", "plan", "preflight", "quick_math",
]
