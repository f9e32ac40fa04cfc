"""Memory: estimator, catalog of architectures, measurement (the advisor and linter are in tunelab.plan).

    estimate("meta-llama/Llama-3.1-8B", "lora", TrainConfig(max_length=2048, grad_checkpointing=True)).to_json()
"""

from tunelab.memory.arch import Arch
from tunelab.memory.catalog import catalog_rows, model_arch
from tunelab.memory.estimate import MemoryEstimate, estimate, estimate_recipe, kv_cache_bytes
from tunelab.memory.measure import Comparison, Measurement, check_recipe, compare, measure, measure_model
from tunelab.memory.quick import QuickMath, accelerate_training_bytes, adapter_serving, quick_math
from tunelab.memory.units import GPUS, parse_bytes, parse_count

__all__ = [
    "GPUS", "Arch", "Comparison", "Measurement", "MemoryEstimate", "QuickMath",
    "accelerate_training_bytes", "adapter_serving", "catalog_rows", "check_recipe", "compare",
    "estimate", "estimate_recipe", "kv_cache_bytes", "measure", "measure_model", "model_arch",
    "parse_bytes", "parse_count", "quick_math",
]
