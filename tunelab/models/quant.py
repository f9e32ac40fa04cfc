"""Quantized loading for inference: bitsandbytes int8 (LLM.int8()) or NF4 linear layers, and what a model holds."""

from __future__ import annotations

import torch

from tunelab.errors import TunelabError
from tunelab.models.dtypes import NAMES

LOAD_IN = ("8bit", "4bit")


def check_load_in(load_in: str | None) -> str | None:
    """`load_in` as given when it is None, 8bit or 4bit; a clear error otherwise."""
    if load_in is not None and load_in not in LOAD_IN:
        raise TunelabError(f"--load-in {load_in!r}: use 8bit (bitsandbytes int8) or 4bit (bitsandbytes NF4), "
                           "or leave it out for unquantized weights.")
    return load_in


def bnb_inference_config(load_in: str, compute_dtype: torch.dtype):
    """The BitsAndBytesConfig for `load_in`: 8bit = LLM.int8() with its default outlier threshold (6.0);
    4bit = NF4 without double quantization, computing in `compute_dtype`. The output head and embeddings
    stay in `compute_dtype` (transformers keeps the head unquantized)."""
    check_load_in(load_in)
    try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig
    except ImportError:
        raise TunelabError(f"--load-in {load_in} needs bitsandbytes: `pip install bitsandbytes`.") from None
    if load_in == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype)


def quantization_info(model) -> dict | None:
    """What quantization a loaded model's linear layers hold, for artifacts' resolved config (None: none).

    {"method": "bitsandbytes", "load_in": "8bit"|"4bit", "quant_type": "int8"|"nf4"|"fp4", "compute_dtype",
    "quantized_layers": N}. A GGUF model is dequantized on load (tunelab.models.load), so it reports None."""
    import bitsandbytes as bnb

    layers = [m for m in model.modules() if isinstance(m, (bnb.nn.Linear8bitLt, bnb.nn.Linear4bit))]
    if not layers:
        return None
    first = layers[0]
    if isinstance(first, bnb.nn.Linear4bit):
        quant_type = getattr(first.weight, "quant_type", None) or "nf4"
        compute = first.compute_dtype or next(model.parameters()).dtype
        load_in = "4bit"
    else:
        quant_type, compute, load_in = "int8", next(model.parameters()).dtype, "8bit"
    return {"method": "bitsandbytes", "load_in": load_in, "quant_type": quant_type,
            "compute_dtype": NAMES.get(compute, str(compute)), "quantized_layers": len(layers)}
