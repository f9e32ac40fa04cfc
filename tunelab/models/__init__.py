"""Resolve model specs, load / convert (GGUF -> HF), dtype rules, tiny test models, PEFT methods."""

from tunelab.models.dtypes import bf16_supported, cpu_has_fast_bf16, resolve_dtype
from tunelab.models.load import (
    convert_gguf,
    gguf_metadata,
    load_config,
    load_model,
    load_tokenizer,
    local_dir,
)
from tunelab.models.quant import LOAD_IN, check_load_in, quantization_info
from tunelab.models.resolve import BUNDLED, ModelSource, bundled_gguf_path, identity, resolve, same_model
from tunelab.models.tiny import tiny_config, tiny_model

__all__ = [
    "BUNDLED", "LOAD_IN", "ModelSource", "bf16_supported", "bundled_gguf_path", "check_load_in", "convert_gguf", "cpu_has_fast_bf16",
    "gguf_metadata", "identity", "load_config", "load_model", "load_tokenizer", "local_dir", "quantization_info", "resolve",
    "resolve_dtype", "same_model", "tiny_config", "tiny_model",
]
