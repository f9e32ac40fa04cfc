"""Turn a loaded base model into a trainable one: LoRA / DoRA / QLoRA / prompt tuning (PEFT) or full."""

from __future__ import annotations

import torch

from tunelab.config.recipe import LoraConfig, PromptConfig, QLoraConfig
from tunelab.errors import TunelabError
from tunelab.models.dropout import use_fast_dropout
from tunelab.models.dtypes import DTYPES
from tunelab.models.fused_lora import use_fused_lora
from tunelab.models.fused_mlp import use_fused_mlp
from tunelab.models.fused_norm import use_fused_norm


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
    fused: bool = True,
):
    """Wrap `model` for training with `method` (lora | qlora | prompt | full) and return it.

    `fused` swaps in tunelab's training fast paths (fused LoRA linear and RMSNorm, same parameters and
    results); `fused=False` keeps PEFT's and transformers' own modules (what the memory estimator models).

    For qlora, `model` must already be loaded in 4-bit (see `bnb_config`).
    """
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model, prepare_model_for_kbit_training

    model.config.use_cache = False
    if method in ("lora", "qlora"):
        lora = lora or LoraConfig()
        targets = lora.target_modules()
        check_targets(model, targets)
        if method == "qlora":
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=grad_checkpointing)
        cfg = PeftLoraConfig(
            r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets,
            use_dora=lora.use_dora, bias="none", task_type="CAUSAL_LM",
            layers_to_transform=lora.layer_indices(model.config.num_hidden_layers),
        )
        model = get_peft_model(model, cfg)
        use_fast_dropout(model)  # also for the cases the fused path leaves to PEFT's forward
        if fused:
            use_fused_lora(model)
    elif method == "prompt":
        prompt = prompt or PromptConfig()
        if prompt.init_text and tokenizer is None:
            raise TunelabError("prompt tuning with prompt.init_text needs the tokenizer")
        model = _prompt_model(model, prompt, tokenizer)
    elif method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        if freeze_embeddings:
            model.get_input_embeddings().weight.requires_grad_(False)
    else:
        raise TunelabError(f"method {method!r} is not one of lora, qlora, prompt, full")
    if fused:
        use_fused_norm(model)  # training-only fast paths; no-grad forwards run the model's own code
        use_fused_mlp(model)
    if grad_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if method != "full":
            model.enable_input_require_grads()
    return model


def _prompt_model(model, prompt: PromptConfig, tokenizer):
    """get_peft_model for prompt tuning, initialising the virtual tokens from our tokenizer's embedding of
    `prompt.init_text` (PEFT's TEXT init re-loads the tokenizer by name, which may exist only in memory)."""
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
        saved = peft_model.peft_config[peft_model.active_adapter]
        saved.prompt_tuning_init, saved.prompt_tuning_init_text = PromptTuningInit.TEXT, text
    return peft_model


def trainable_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total
