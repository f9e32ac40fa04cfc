"""Estimate training or inference memory per component, and which GPUs it fits on.

Components (bytes): weights (by precision, or NF4/FP4 with its block scales for QLoRA), gradients and
optimizer states of the trainable parameters, activations kept for backward (derived per layer in
`activations.py`), logits and loss (vocab x tokens, fp32 upcast), KV cache (inference), a fixed
framework overhead, with ZeRO sharding across GPUs. `total` is the peak of a training step: weights +
gradients + optimizer states + the largest of what a step adds at its candidate peaks (start of
backward: activations + logits; the output head's backward; the last layer's backward or recompute;
the embedding's backward; the optimizer step's temporaries). Gradients are counted as alive during the
forward pass, as they are under gradient accumulation. Checked against measurement on CPU
(bench/memory_accuracy.py); on GPU the same tensors are allocated, with a 1-byte dropout mask.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from tunelab.config.recipe import LoraConfig, PromptConfig, QLoraConfig, TrainConfig
from tunelab.errors import TunelabError
from tunelab.memory.activations import FP32, Activations, Setup, activation_memory
from tunelab.memory.arch import Arch
from tunelab.memory.units import GPUS, GiB, gpu_bytes
from tunelab.models.dtypes import compute_dtype
from tunelab.models.methods import MethodSpec, method_spec
from tunelab.models.optim import STATES

BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
CUDA_OVERHEAD = GiB  # CUDA context (~0.3-0.5 GiB), cuBLAS workspaces and allocator slack
BNB_MIN_8BIT = 4096  # bitsandbytes keeps 32-bit states for tensors smaller than this


@dataclass
class MemoryEstimate:
    """An estimate: bytes per component, total, and GPUs it fits on (see `to_json`)."""

    model: str
    params_total: int
    params_trainable: int
    bytes: dict[str, int]
    fits: dict[str, bool]
    settings: dict = field(default_factory=dict)
    peak: str = ""  # the phase that sets the total
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        """`{"model", "params_total", "params_trainable", "bytes": {...}, "fits": {...}}`."""
        return {"model": self.model, "params_total": self.params_total,
                "params_trainable": self.params_trainable, "bytes": dict(self.bytes), "fits": dict(self.fits)}


def kv_cache_bytes(a: Arch, tokens: int, batch: int = 1, bytes_per_value: int = 2) -> int:
    """KV cache: 2 (K and V) x layers x kv_heads x head_dim x bytes x tokens x batch (GQA: kv_heads)."""
    return 2 * a.layers * a.kv_heads * a.head_dim * bytes_per_value * tokens * batch


def nf4_bytes(n: int, double_quant: bool = True, blocksize: int = 64) -> int:
    """Bytes of one bitsandbytes 4-bit weight of `n` elements, with its quantization state.

    4 bits per weight + one absmax per 64-weight block (fp32, or 8-bit with double quantization plus
    one fp32 scale per 256 blocks and a 256-entry code book) + the 16-value NF4/FP4 code book.
    """
    blocks = math.ceil(n / blocksize)
    packed = math.ceil(n / 2)
    if double_quant:
        scales = blocks + 4 * math.ceil(blocks / 256) + 4 * 256 + 4  # uint8 absmax, fp32 scales, code, offset
    else:
        scales = 4 * blocks
    return packed + scales + 4 * 16


def _weights(a: Arch, spec: MethodSpec, w: int, quant_double: bool, adapter_params: int) -> int:
    if not spec.quantized:
        return a.params_total * w + adapter_params * FP32
    quantized = sum(nf4_bytes(i * o, quant_double) for i, o in a.linears.values()) * a.layers
    lin_weights = sum(i * o for i, o in a.linears.values()) * a.layers
    # prepare_model_for_kbit_training keeps everything not quantized (embeddings, head, norms, biases) in fp32
    return quantized + (a.params_total - lin_weights) * FP32 + adapter_params * FP32


def _optimizer(name: str, trainable: int, tensors: int, largest: int, gbytes: int, device: str):
    """(state bytes, step temporaries) for a `train.optimizer` over `trainable` params in `gbytes` dtype."""
    if name in ("adamw", "paged_adamw"):
        states = STATES[name] * trainable * gbytes + (FP32 * tensors if name == "adamw" else 0)  # + step counters
        # foreach AdamW (CUDA) builds sqrt(v) for all params at once; the CPU loop two per tensor
        temp = trainable * gbytes if device == "cuda" else 2 * largest * gbytes
        return states, temp
    if name == "adamw_8bit":
        big = trainable if largest >= BNB_MIN_8BIT else 0
        return 2 * big + 2 * FP32 * math.ceil(big / 256) + 2 * (trainable - big) * FP32, 0
    if name == "sgd":  # with momentum: one buffer per parameter
        return STATES[name] * trainable * gbytes, (trainable if device == "cuda" else largest) * gbytes
    raise TunelabError(f"unknown optimizer {name!r}: use one of {', '.join(STATES)} (train.optimizer).")


def estimate(
    model: str | Arch,
    method: str = "lora",
    train: TrainConfig | None = None,
    lora: LoraConfig | None = None,
    prompt: PromptConfig | None = None,
    qlora: QLoraConfig | None = None,
    *,
    gpus: int = 1,
    zero: Literal[0, 1, 2, 3] = 0,
    inference: bool = False,
    context: int | None = None,
    attention: Literal["sdpa", "eager"] = "sdpa",
    device: Literal["cuda", "cpu"] = "cuda",
    overhead: int | None = None,
    loss: Literal["hf", "chunked"] = "hf",
    autocast: bool = False,
) -> MemoryEstimate:
    """Estimate the memory of finetuning (or, with `inference`, serving) a model.

    model: catalog HF id (e.g. meta-llama/Llama-3.1-8B), bundled alias, config.json/folder, GGUF file,
      or an `Arch`. method: a `tunelab.models.methods.METHODS` name (DoRA is estimated as LoRA).
    train, lora, prompt, qlora: the recipe's sections (tunelab.config.recipe; defaults when None). From train:
      max_length (tokens per sequence), batch_size (sequences per device), precision (weights and
      activations; auto resolved for `device`; QLoRA: its compute dtype, with 4-bit base weights), optimizer,
      grad_checkpointing, freeze_embeddings. From lora: r, targets, dropout; prompt: num_virtual_tokens;
      qlora: double_quant.
    gpus, zero: data-parallel GPUs and ZeRO stage (1 shards optimizer states, 2 also gradients, 3 also
      weights). inference, context: serve with a KV cache of `context` tokens per sequence (default
      train.max_length). attention: sdpa (flash / memory-efficient) or eager. device: cuda (GPU planning) or
      cpu (what tunelab measures here). overhead: fixed bytes for the CUDA context etc. (default 1 GiB on
      cuda, 0 on cpu). loss: hf (transformers' loss from labels, as HF Trainer / TRL compute it: fp32
      log-softmax of all logits) or chunked (tunelab train's weighted_loss: fp32 softmax 256 positions at a
      time). autocast: mixed precision: compute in the precision under torch.autocast; full finetuning then
      keeps fp32 master weights (and their gradients and states), as tunelab train and HF Trainer do for a
      model loaded in fp32; PEFT methods keep their frozen base in the precision.
    """
    if isinstance(model, str):
        from tunelab.memory.catalog import model_arch

        model = model_arch(model)
    a, spec = model, method_spec(method)
    t, lora, qlora = train or TrainConfig(), lora or LoraConfig(), qlora or QLoraConfig()
    prompt = prompt or PromptConfig()
    precision = compute_dtype(t.precision, device)
    p = BYTES[precision]
    compute = p if autocast and p < FP32 else 0  # autocast's compute dtype (0: off)
    if compute and spec.load_dtype == "fp32":
        p = FP32  # fp32 master weights; the compute dtype applies to activations
    overhead = (CUDA_OVERHEAD if device == "cuda" else 0) if overhead is None else overhead
    settings = dict(method=method, seq=t.max_length, batch=t.batch_size, precision=precision,
                    optimizer=t.optimizer, grad_ckpt=t.grad_checkpointing, gpus=gpus, zero=zero,
                    inference=inference, device=device, loss=loss, autocast=bool(compute))
    targets = lora.target_modules()
    adapter, adapted = a.lora_params(targets, lora.r) if spec.lora else (0, 0)
    if spec.prompt:
        adapter = prompt.num_virtual_tokens * a.hidden
    if inference:
        return _inference(a, spec, p, t.max_length if context is None else context, t.batch_size,
                          qlora.double_quant, adapter, overhead, settings)
    stream = FP32 if spec.quantized else p
    setup = Setup(
        stream=stream, base_trainable=spec.trains_base,
        lora_targets=frozenset(targets) if spec.lora else frozenset(), lora_r=lora.r,
        lora_dropout=lora.dropout > 0, input_grad=spec.trains_base or spec.prompt or t.grad_checkpointing,
        embed_trainable=spec.trains_base and not t.freeze_embeddings, head_bytes=compute or stream,
        attention=attention, device=device, grad_ckpt=t.grad_checkpointing,
        extra_tokens=prompt.num_virtual_tokens if spec.prompt else 0, quantized=spec.quantized, loss=loss,
        autocast=compute,
    )
    comp, peak_name, trainable = _training(a, spec, t, setup, p, adapter, adapted, qlora.double_quant,
                                           gpus, zero, overhead)
    notes = []
    if spec.quantized:
        notes.append("QLoRA: base linears in 4-bit; embeddings, head and norms in fp32 "
                     "(prepare_model_for_kbit_training), so activations are fp32.")
    return MemoryEstimate(model=a.name, params_total=a.params_total + adapter, params_trainable=trainable,
                          bytes=comp, fits=_fits(comp["total"]), settings=settings, peak=peak_name, notes=notes)


def _training(a: Arch, spec: MethodSpec, t: TrainConfig, setup: Setup, p: int, adapter: int, adapted: int,
              double_quant: bool, gpus: int, zero: int, overhead: int) -> tuple[dict[str, int], str, int]:
    """(bytes per component, the phase of the peak, trainable parameters) of a training step."""
    if spec.trains_base:
        trainable = a.params_total - (a.params_embed if t.freeze_embeddings else 0)
        tensors, largest, gbytes = a.tensors_total, a.largest_tensor, p
    else:
        trainable, gbytes = adapter, FP32  # PEFT keeps adapters (and their states) in fp32
        tensors = 1 if spec.prompt else 2 * adapted  # lora_A and lora_B per adapted module
        largest = adapter if spec.prompt else a.largest_lora_tensor(setup.lora_r)
    weights = _weights(a, spec, p, double_quant, adapter)
    grads = trainable * gbytes
    opt, step_temp = _optimizer(t.optimizer, trainable, tensors, largest, gbytes, setup.device)
    copies, head_copy = _autocast_copies(a, spec, setup, adapter)
    acts = activation_memory(a, setup, t.batch_size, t.max_length, copies, head_copy)

    # ZeRO: stage 1 shards optimizer states, 2 also gradients, 3 also weights (plus one gathered layer)
    if gpus > 1 and zero >= 1:
        opt = math.ceil(opt / gpus)
    if gpus > 1 and zero >= 2:
        grads = math.ceil(grads / gpus)
    if gpus > 1 and zero >= 3:
        layer = (a.params_total - a.params_embed - a.params_head) // a.layers * p
        weights = math.ceil(weights / gpus) + 2 * layer

    head_grad = (a.params_embed if a.tied else a.params_head) * p if spec.trains_base else 0
    # embedding backward: a tied weight's head gradient waits for the embedding's, then they are summed
    embed_grad = (3 if a.tied else 1) * a.params_embed * p if setup.embed_trainable else 0
    phases = _phases(acts, step_temp, head_grad, embed_grad)
    peak_name, peak = max(phases.items(), key=lambda kv: kv[1])
    base = weights + grads + opt + overhead
    comp = {"weights": weights, "gradients": grads, "optimizer": opt, "activations": acts.kept,
            "logits": acts.logits, "kv_cache": 0, "overhead": overhead, "total": base + peak}
    return comp, peak_name, trainable


def _autocast_copies(a: Arch, spec: MethodSpec, setup: Setup, adapter: int) -> tuple[int, int]:
    """autocast's compute-dtype copies of weights, kept for backward: trainable ones (cached once per forward)
    and, when the head is frozen in another dtype, the head's (its input needs a gradient); -> (copies, head)."""
    compute = setup.autocast
    if not compute:
        return 0, 0
    head_params = a.params_embed if a.tied else a.params_head
    if spec.trains_base:
        return compute * sum(i * o for i, o in a.linears.values()) * a.layers, compute * head_params
    copies = compute * adapter if spec.lora else 0
    return copies, compute * head_params if setup.stream != compute else 0


def _phases(acts: Activations, step_temp: int, head_grad: int, embed_grad: int) -> dict[str, int]:
    """Bytes on top of weights + gradients + optimizer at each candidate peak of a step."""
    return {
        "start of backward": acts.kept + acts.logits,
        "output head backward": acts.kept + acts.logits_after_softmax + head_grad,
        # the last layer's backward (after its recompute, with checkpointing)
        "last layer backward": (acts.kept_by_layers + acts.recompute + acts.layer_backward + acts.logits_held
                                + head_grad),
        "embedding backward": acts.logits_held + embed_grad,
        "optimizer step": step_temp,
    }


def _fits(total: int) -> dict[str, bool]:
    return {label: total <= gpu_bytes(label) for label in GPUS}


def _inference(a: Arch, spec: MethodSpec, p: int, context: int, batch: int, double_quant: bool, adapter: int,
               overhead: int, settings: dict) -> MemoryEstimate:
    weights = _weights(a, spec, p, double_quant, adapter) if spec.quantized else a.params_total * p
    kv = kv_cache_bytes(a, context, batch, p)
    # prefill working set: one layer's MLP intermediates and hidden states; logits of the last position
    acts = context * batch * (3 * a.intermediate + 4 * a.hidden) * p
    logits = batch * a.vocab * (p + FP32)
    total = weights + kv + acts + logits + overhead
    comp = {"weights": weights, "gradients": 0, "optimizer": 0, "activations": acts, "logits": logits,
            "kv_cache": kv, "overhead": overhead, "total": total}
    return MemoryEstimate(model=a.name, params_total=a.params_total, params_trainable=0, bytes=comp,
                          fits=_fits(total), settings={**settings, "context": context}, peak="prefill")


def estimate_recipe(recipe, device: Literal["cuda", "cpu"] = "cuda", gpus: int = 1, zero: int = 0,
                    loss: Literal["hf", "chunked"] = "chunked") -> MemoryEstimate:
    """Estimate a recipe's memory as `tunelab train` runs it on `device`: precision `auto` resolved for
    that device, autocast when it is 16-bit (fp32 master weights for full finetuning), its optimizer.

    loss: chunked (what `tunelab train` computes) or hf (what HF Trainer / TRL compute).
    """
    return estimate(recipe.model.spec, recipe.method, recipe.train, recipe.lora, recipe.prompt, recipe.qlora,
                    gpus=gpus, zero=zero, device=device, loss=loss,
                    autocast=compute_dtype(recipe.train.precision, device) != "fp32")
