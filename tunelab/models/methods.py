"""Turn a loaded base model into a trainable one: LoRA / DoRA / QLoRA / prompt tuning (PEFT) or full."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from tunelab.config.recipe import LoraConfig, PromptConfig, QLoraConfig
from tunelab.errors import TunelabError
from tunelab.models.dtypes import DTYPES


@dataclass(frozen=True)
class MethodSpec:
    """What a finetuning method is, read by the trainer, the memory estimator, the linter and the advisor.

    load_dtype: the dtype base weights are loaded in: "compute" (train.precision; the frozen base of a PEFT
      method, adapters stay fp32), "fp32" (fp32 master weights, compute under autocast: full finetuning) or
      "qlora" (qlora.compute_dtype, with 4-bit linear layers).
    adapter: what PEFT wraps the model with ("lora", "prompt") or None (the base model's own weights train).
    """

    name: str
    load_dtype: Literal["compute", "fp32", "qlora"]
    adapter: Literal["lora", "prompt"] | None
    quantized: bool = False  # 4-bit base linear layers (bitsandbytes), prepared with k-bit preparation
    dora: bool = False  # LoRA with weight decomposition (PEFT use_dora)
    supports_packing: bool = True  # prompt tuning: the virtual tokens would sit only at a row's start
    lr_range: tuple[float, float] | None = None  # the guide's usual learning rates (lint)
    plan_optimizer: str = "adamw"  # what `tunelab plan` suggests
    speed: float = 1.0  # relative training throughput (`tunelab plan`: 4-bit dequantization is slower)
    smaller: str | None = None  # the method to suggest when this one does not fit in memory
    label: str = ""  # how the guide names it
    default_lr: float = 2e-4  # what `tunelab plan` writes and the linter's fix suggests
    lr_advice: str = ""  # the guide's word on its learning rate
    advice: str = ""  # why `tunelab plan` picks it ({examples}: the user's example count)

    @property
    def trains_base(self) -> bool:
        """Every base weight is trainable (gradients and optimizer states for the whole model)."""
        return self.adapter is None

    @property
    def lora(self) -> bool:
        return self.adapter == "lora"

    @property
    def prompt(self) -> bool:
        return self.adapter == "prompt"


_LORA = dict(lr_range=(1e-4, 3e-4), default_lr=2e-4, lr_advice="LoRA: 1e-4-3e-4 often works; reduce if unstable.")
_LORA_ADVICE = ("Start with LoRA: near full-finetuning quality on many tasks with <<1-3% trainable params and 1k-50k "
                "examples (you have {examples:,}); merge for zero-overhead inference.")
METHODS: dict[str, MethodSpec] = {
    "lora": MethodSpec("lora", "compute", "lora", smaller="qlora", label="LoRA", advice=_LORA_ADVICE, **_LORA),
    "dora": MethodSpec("dora", "compute", "lora", dora=True, smaller="qlora", label="DoRA",
                       advice="DoRA: LoRA with weight decomposition; " + _LORA_ADVICE, **_LORA),
    "qlora": MethodSpec("qlora", "qlora", "lora", quantized=True, plan_optimizer="paged_adamw", speed=0.7,
                        label="QLoRA", advice="QLoRA: 16-bit LoRA does not fit this GPU; keep base weights in 4-bit "
                        "(NF4) to fit on a single GPU, at some speed cost from dequantization.", **_LORA),
    "prompt": MethodSpec("prompt", "compute", "prompt", supports_packing=False, label="prompt tuning",
                         default_lr=3e-2, lr_advice="Soft prompts train a few K parameters; they take much higher "
                         "learning rates than LoRA (PEFT's prompt-tuning examples).",
                         advice="Soft prompts: little data (<=10k), low hardware, for quick lightweight steering and "
                         "minor behaviour tweaks; no model change."),
    "full": MethodSpec("full", "fp32", None, lr_range=(1e-5, 5e-5), smaller="lora", label="full finetuning",
                       default_lr=2e-5, lr_advice="Full FT: start near pretraining LR x (0.1-1.0); often 1e-5-5e-5.",
                       advice="Full finetuning: highest ceiling for major behaviour changes, with enough data "
                       "(10k-1M+; you have {examples:,}) and hardware that fits it."),
}


def method_spec(name: str) -> MethodSpec:
    """The `MethodSpec` of a method name, or a TunelabError listing the known ones."""
    if name not in METHODS:
        raise TunelabError(f"method {name!r} is not one of {', '.join(METHODS)}; set method= to one of them.")
    return METHODS[name]


def load_dtype(spec: MethodSpec, compute: str, qlora: QLoraConfig | None = None) -> str:
    """The dtype (bf16 | fp16 | fp32) base weights are loaded in for a compute dtype (see `MethodSpec`)."""
    if spec.load_dtype == "fp32":
        return "fp32"
    if spec.load_dtype == "qlora":
        return (qlora or QLoraConfig()).compute_dtype
    return compute


def linear_module_names(model) -> list[str]:
    """Short names of the nn.Linear-like modules a LoRA could target (e.g. q_proj, up_proj)."""
    names = set()
    for full, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) or type(mod).__name__ in ("Linear4bit", "Linear8bitLt"):
            short = full.rsplit(".", 1)[-1]
            if short != "lm_head":
                names.add(short)
    return sorted(names)


def check_targets(model, targets: list[str]) -> None:
    """Raise a clear error when LoRA targets name modules the model does not have."""
    have = linear_module_names(model)
    missing = [t for t in targets if t not in have]
    if missing:
        raise TunelabError(
            f"lora.targets names modules this model does not have: {missing}. "
            f"Its linear modules are: {have}."
        )


def bnb_config(q: QLoraConfig):
    """The BitsAndBytesConfig for QLoRA (4-bit NF4/FP4, optional double quant, compute dtype)."""
    try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig
    except ImportError:
        raise TunelabError(
            "method=qlora needs bitsandbytes for 4-bit weights: `pip install bitsandbytes` "
            "(or use method=lora)."
        ) from None
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=q.quant_type,
        bnb_4bit_use_double_quant=q.double_quant,
        bnb_4bit_compute_dtype=DTYPES[q.compute_dtype],
    )


def apply_method(
    model,
    method: str,
    lora: LoraConfig | None = None,
    prompt: PromptConfig | None = None,
    tokenizer=None,
    grad_checkpointing: bool = False,
    freeze_embeddings: bool = False,
):
    """Wrap `model` for training with `method` (a `METHODS` name) and return it: plain PEFT and transformers
    modules (the CPU fast paths are swapped in by `tunelab.fast.enable`, when on).

    For qlora, `model` must already be loaded in 4-bit (see `bnb_config`).
    """
    spec = method_spec(method)
    model.config.use_cache = False
    if spec.lora:
        model = _lora_model(model, spec, lora or LoraConfig(), grad_checkpointing)
    elif spec.prompt:
        prompt = prompt or PromptConfig()
        if prompt.init_text and tokenizer is None:
            raise TunelabError("prompt tuning with prompt.init_text needs the tokenizer")
        model = _prompt_model(model, prompt, tokenizer)
    else:
        for p in model.parameters():
            p.requires_grad_(True)
        if freeze_embeddings:
            model.get_input_embeddings().weight.requires_grad_(False)
    if grad_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if not spec.trains_base:
            model.enable_input_require_grads()
    return model


def _lora_model(model, spec: MethodSpec, lora: LoraConfig, grad_checkpointing: bool):
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model, prepare_model_for_kbit_training

    targets = lora.target_modules()
    check_targets(model, targets)
    if spec.quantized:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=grad_checkpointing)
        keep_4bit_differentiable(model)
    cfg = PeftLoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets,
        use_dora=lora.use_dora or spec.dora, bias="none", task_type="CAUSAL_LM",
        layers_to_transform=lora.layer_indices(model.config.num_hidden_layers),
    )
    return get_peft_model(model, cfg)


def keep_4bit_differentiable(model) -> int:
    """Keep bitsandbytes' 4-bit linear layers on their differentiable matmul; -> how many layers.

    On a CPU with AVX512-BF16, a `Linear4bit` that runs once in eval mode without gradients (validation)
    repacks its weight into an inference layout for good, and from then on every forward, training ones too,
    goes through `gemv_4bit`, which has no backward: the gradient through the frozen base weight is dropped
    and every LoRA matrix below the last layer gets a wrong gradient (bitsandbytes 0.50; torch warns
    "an autograd kernel was not registered"). Training models never use that layout (a weight already
    repacked is unpacked again).
    """
    n = 0
    for module in model.modules():
        if not hasattr(module, "support_avx512bf16_for_cpu"):
            continue
        module.support_avx512bf16_for_cpu = False
        if getattr(module.weight.quant_state, "packing_format_for_cpu", False):
            from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

            module.weight.data, module.weight.quant_state = _convert_weight_packed_for_cpu_inverse(
                module.weight.data, module.weight.quant_state)
        n += 1
    return n


def _prompt_model(model, prompt: PromptConfig, tokenizer):
    """get_peft_model for prompt tuning, initialising the virtual tokens from our tokenizer's embedding of
    `prompt.init_text` (PEFT's TEXT init re-loads the tokenizer by name, which may exist only in memory).

    The saved adapter_config.json keeps PEFT's RANDOM init, with the text recorded: a TEXT config needs a
    tokenizer_name_or_path, and PEFT refuses to load one without it (eval, serve); the init is spent once the
    embedding is trained, and the loaded weights replace whatever init runs at load time."""
    from peft import PromptTuningConfig, PromptTuningInit, get_peft_model

    n, text = prompt.num_virtual_tokens, prompt.init_text
    cfg = PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=n,
                             prompt_tuning_init=PromptTuningInit.RANDOM)
    peft_model = get_peft_model(model, cfg)
    if text:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids = (ids * (n // max(1, len(ids)) + 1))[:n]  # repeat the text to fill n virtual tokens
        emb = model.get_input_embeddings()(torch.tensor(ids, device=model.device)).detach()
        encoder = peft_model.prompt_encoder[peft_model.active_adapter]
        encoder.embedding.weight.data.copy_(emb.to(encoder.embedding.weight.dtype))
        peft_model.peft_config[peft_model.active_adapter].prompt_tuning_init_text = text
    return peft_model


def trainable_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total
