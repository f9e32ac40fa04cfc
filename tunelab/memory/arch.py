"""A model's shape for memory math: dims from its config, parameter counts from a meta-device model.

Counting on the meta device builds the real transformers module tree without allocating weights, so
tied embeddings, grouped-query attention, biases and norms are counted exactly as the model has them.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class Arch:
    """What the estimator needs to know about an architecture (all counts, no weights)."""

    name: str
    model_type: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    context: int  # max_position_embeddings
    rope: bool
    params_total: int
    params_embed: int  # input embedding (shared with the output head when tied)
    params_head: int  # output head when not tied, else 0
    params_layer_linear: int  # nn.Linear weights+biases in one decoder layer (what 4-bit quantizes)
    linear_tensors_per_layer: int  # how many nn.Linear modules one decoder layer holds
    largest_tensor: int  # elements of the biggest parameter tensor
    norms_per_layer: int
    linears: dict[str, tuple[int, int]] = field(default_factory=dict)  # name -> (in, out) in one layer
    tensors_total: int = 0  # number of parameter tensors (optimizer keeps a step counter for each)
    license: str | None = None
    dtype: str | None = None  # the checkpoint's dtype as its config states it (bfloat16, float16, ...)
    use_cache: bool = True  # config.use_cache (the KV cache during forward)

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    def lora_params(self, targets: list[str], r: int) -> tuple[int, int]:
        """(trainable LoRA parameters, adapted modules) for targets matched by name suffix, as PEFT does."""
        total, modules = 0, 0
        for name, (n_in, n_out) in self.linears.items():
            if any(name == t or name.endswith("." + t) or name.split(".")[-1] == t for t in targets):
                total += r * (n_in + n_out)
                modules += 1
        return total * self.layers, modules * self.layers

    def module_names(self) -> set[str]:
        """Short names of the linear modules inside a decoder layer (what LoRA targets name)."""
        return {n.split(".")[-1] for n in self.linears}

    def largest_lora_tensor(self, r: int) -> int:
        return max((r * max(i, o) for i, o in self.linears.values()), default=0)


def _config_key(config) -> str:
    d = config.to_dict()
    for k in ("_name_or_path", "transformers_version", "architectures", "dtype", "torch_dtype"):
        d.pop(k, None)
    return json.dumps(d, sort_keys=True, default=str)


@functools.lru_cache(maxsize=64)
def _meta_counts(model_type: str, key: str) -> dict:
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg_dict = json.loads(key)
    cfg_dict.pop("model_type", None)
    config = AutoConfig.for_model(model_type, **cfg_dict)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    params = list(model.parameters())  # unique Parameter objects: a tied head is listed once
    total = sum(p.numel() for p in params)
    embed = model.get_input_embeddings().weight.numel()
    out = model.get_output_embeddings()
    tied = out is not None and out.weight is model.get_input_embeddings().weight
    head = 0 if tied or out is None else out.weight.numel()
    layers = _decoder_layers(model)
    layer = layers[0]
    linears = {n: (m.in_features, m.out_features) for n, m in layer.named_modules()
               if isinstance(m, torch.nn.Linear)}
    lin_params = sum(p.numel() for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)
                     for p in m.parameters(recurse=False))
    norms = sum(1 for _, m in layer.named_modules() if "norm" in type(m).__name__.lower())
    return {"total": total, "embed": embed, "head": head, "tied": tied, "linears": linears,
            "lin_params": lin_params, "norms": norms, "largest": max(p.numel() for p in params),
            "tensors": len(params)}


def _decoder_layers(model) -> torch.nn.ModuleList:
    for m in model.modules():
        if isinstance(m, torch.nn.ModuleList) and len(m) > 0 and any(
            isinstance(c, torch.nn.Linear) for c in m[0].modules()
        ):
            return m
    raise ValueError(f"{type(model).__name__}: no decoder layer list found")


def arch_from_config(config, name: str | None = None, license: str | None = None) -> Arch:
    """Build an `Arch` from a transformers config (counting parameters on the meta device)."""
    text = getattr(config, "text_config", None) or config
    counts = _meta_counts(text.model_type, _config_key(text))
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    context = getattr(text, "max_position_embeddings", None) or 2048
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    rope = getattr(text, "rope_theta", None) is not None or getattr(text, "rope_parameters", None) is not None
    return Arch(
        name=name or getattr(text, "_name_or_path", "") or text.model_type,
        model_type=text.model_type,
        hidden=text.hidden_size,
        intermediate=text.intermediate_size,
        layers=text.num_hidden_layers,
        heads=heads,
        kv_heads=getattr(text, "num_key_value_heads", None) or heads,
        head_dim=head_dim,
        vocab=text.vocab_size,
        tied=counts["tied"],
        context=context,
        rope=rope,
        params_total=counts["total"],
        params_embed=counts["embed"],
        params_head=counts["head"],
        params_layer_linear=counts["lin_params"],
        linear_tensors_per_layer=len(counts["linears"]),
        largest_tensor=counts["largest"],
        norms_per_layer=counts["norms"],
        linears=dict(counts["linears"]),
        tensors_total=counts["tensors"],
        license=license,
        dtype=str(dtype).removeprefix("torch.") if dtype is not None else None,
        use_cache=bool(getattr(text, "use_cache", True)),
    )
