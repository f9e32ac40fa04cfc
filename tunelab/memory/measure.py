"""Measure a real training step's memory, component by component, by exact tensor accounting.

Protocol (the one the estimate describes): optimizer states exist (as after the first step) and
gradients exist (as left by an earlier micro-batch under gradient accumulation, zero-filled), then
`micro_batches` forward/backward passes accumulate into them and `optimizer.step()` runs.
- weights: storages of parameters, buffers and 4-bit quantization states;
- gradients: storages of `.grad` of the trainable parameters;
- optimizer: storages in `optimizer.state` (moments, step counters);
- activations: storages created by the forward pass and still alive when it ends (what autograd saved,
  found with `saved_tensors_hooks`, plus tensors held by checkpointing), logits excluded;
- logits: the peak of vocab-wide tensors (logits, fp32 upcast, log-softmax, their gradients);
- total: the peak of all live storages at any moment of the step.
On CUDA the total is also read from `torch.cuda.max_memory_allocated` (reported as `cuda_peak`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from tunelab.config.recipe import Recipe
from tunelab.memory._tracker import LiveTensors
from tunelab.models.build import apply_recipe_method, build_model
from tunelab.models.optim import make_optimizer

COMPONENTS = ("weights", "gradients", "optimizer", "activations", "logits", "kv_cache", "overhead", "total")


@dataclass
class Measurement:
    """Measured bytes per component for one configuration (kv_cache and overhead are not measured: 0)."""

    model: str
    device: str
    batch: int
    seq: int
    params_total: int
    params_trainable: int
    bytes: dict[str, int]
    saved_for_backward: int  # subset of activations + logits that autograd saved (hooks)
    seconds: float
    cuda_peak: int | None = None
    extra: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"model": self.model, "device": self.device, "batch": self.batch, "seq": self.seq,
                "params_total": self.params_total, "params_trainable": self.params_trainable,
                "bytes": dict(self.bytes), "saved_for_backward": self.saved_for_backward,
                "cuda_peak": self.cuda_peak, "seconds": round(self.seconds, 2)}


def _weight_tensors(model) -> list[torch.Tensor]:
    out = list(model.parameters()) + list(model.buffers())
    for m in model.modules():
        qs = getattr(getattr(m, "weight", None), "quant_state", None)
        while qs is not None:  # bitsandbytes 4-bit: block scales, code book (and nested ones)
            out += [t for t in (qs.absmax, qs.code, getattr(qs, "offset", None)) if isinstance(t, torch.Tensor)]
            qs = getattr(qs, "state2", None)
    return out


def _state_tensors(opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [v for st in opt.state.values() for v in st.values() if isinstance(v, torch.Tensor)]


def _init_states(opt: torch.optim.Optimizer, params: list[torch.nn.Parameter]) -> None:
    """Create optimizer states as the first real step would, and leave (zero) gradients in place."""
    for p in params:
        p.grad = torch.zeros_like(p)
    opt.step()
    for p in params:
        p.grad.zero_()


def _forward_loss(model, ids: torch.Tensor, weights: torch.Tensor | None, head=None, flat_len: int = 0):
    """HF's loss (`labels=`: fp32 upcast + log-softmax), or tunelab's chunked `weighted_loss` (through the
    fast paths' fused head when given). flat_len: ids is one padding-free row of examples this long."""
    if weights is None:
        out = model(input_ids=ids, labels=ids, use_cache=False)
        return out, out.loss
    from tunelab.data import model_inputs
    from tunelab.models.losses import linear_weighted_loss, weighted_loss

    batch = {"input_ids": ids}
    if flat_len:  # (1, B * T): B examples back to back, as packed training runs them
        n = ids.shape[1]
        batch["position_ids"] = torch.arange(flat_len, device=ids.device).repeat(n // flat_len)[None]
        batch["cu_seq_lens"] = torch.arange(0, n + 1, flat_len, device=ids.device)
    if head is not None:
        out = model(**model_inputs(batch), logits_to_keep=head.no_positions(ids.device))
        hidden = head.pop()[:, -ids.shape[1]:]  # (B, T, d)
        return out, linear_weighted_loss(hidden, head.head.weight, ids, weights)[0]
    out = model(**model_inputs(batch))
    logits = out.logits[:, -ids.shape[1]:]  # soft prompts prepend virtual positions
    return out, weighted_loss(logits, ids, weights)[0]


def measure_model(model, *, batch: int, seq: int, optimizer: str = "adamw", micro_batches: int = 1,
                  loss: str = "hf", autocast: torch.dtype | None = None, name: str = "model",
                  seed: int = 0, paths=None, flat: bool = False) -> Measurement:
    """Run `micro_batches` micro-batches of random tokens and an optimizer step, accounting every tensor.

    model: a causal LM already prepared for training (requires_grad set on what trains).
    batch, seq: micro-batch shape in tokens. optimizer: a `train.optimizer` name (tunelab.models.optim).
    loss: hf (transformers' loss from `labels`) or chunked (tunelab.models.losses.weighted_loss, what
    `tunelab train` uses). autocast: run forward and loss under torch.autocast in this dtype.
    paths: the `tunelab.fast.FastPaths` swapped into `model` (its fused head computes the chunked loss).
    flat: run each micro-batch as one padding-free (1, batch x seq) row of `batch` examples (packed training).
    """
    import contextlib
    device = next(model.parameters()).device
    vocab = model.get_input_embeddings().num_embeddings
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(trainable, optimizer)
    _init_states(opt, trainable)
    model.train()
    gen = torch.Generator().manual_seed(seed)
    shape = (1, batch * seq) if flat else (batch, seq)
    batches = [torch.randint(0, vocab, shape, generator=gen).to(device) for _ in range(micro_batches)]
    weights = torch.ones(*shape, device=device) if loss == "chunked" else None
    head = paths.head if paths is not None and loss == "chunked" else None
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    live = LiveTensors(vocab_size=vocab)
    acts = saved = 0
    with live:
        for t in _weight_tensors(model):
            live.add(t, "weights")
        for t in _state_tensors(opt):
            live.add(t, "optimizer")
        for p in trainable:
            live.add(p.grad, "gradients")
        for t in batches + [weights]:
            live.add(t, "input")
        live.reset_peaks()
        for ids in batches:
            live.phase = "activations"
            mixed = torch.autocast(device.type, dtype=autocast) if autocast else contextlib.nullcontext()
            with live.saved_hooks(), mixed:
                out, loss_value = _forward_loss(model, ids, weights, head, seq if flat else 0)
            acts, saved = live.live(("activations",)), live.saved_bytes()
            live.phase = "backward"
            loss_value.backward()
            del out, loss_value
            for p in trainable:
                live.add(p.grad, "gradients")
        grads = live.live(("gradients",))
        live.phase = "step"
        opt.step()
        opt.zero_grad(set_to_none=True)
    cuda_peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
    n_total = sum(p.numel() for p in model.parameters())
    measured = {
        "weights": live.peak_by_role["weights"], "gradients": grads,
        "optimizer": live.peak_by_role["optimizer"], "activations": acts,
        "logits": live.peak_by_role["logits"], "kv_cache": 0, "overhead": 0, "total": live.peak,
    }
    return Measurement(model=name, device=device.type, batch=batch, seq=seq, params_total=n_total,
                       params_trainable=sum(p.numel() for p in trainable), bytes=measured,
                       saved_for_backward=saved, seconds=time.time() - t0, cuda_peak=cuda_peak,
                       extra={"at_peak": dict(live.at_peak), "fast_paths": paths is not None, "flat": flat})


def prepare_model(model, recipe: Recipe, tokenizer=None):
    """Apply the recipe's method with the trainer's own code (`apply_recipe_method`: PEFT's and transformers'
    modules, not the fused ones of `tunelab.fast.enable`, which keep less), but for LoRA's dropout, which keeps
    a 1-byte mask as CUDA's dropout does: torch's CPU dropout keeps a 4-byte one."""
    from tunelab.fast.dropout import use_fast_dropout

    model = apply_recipe_method(model, recipe, tokenizer)
    use_fast_dropout(model)
    return model


def load_for_recipe(recipe: Recipe, device: str = "cpu"):
    """The recipe's model as `tunelab train` builds it (`tunelab.models.build`), with `prepare_model`'s
    dropout; -> (model, compute dtype)."""
    from tunelab.fast.dropout import use_fast_dropout

    model, _, compute = build_model(recipe, device)
    use_fast_dropout(model)
    return model, compute


def train_device() -> str:
    """The device `tunelab train` runs on in this process: CUDA when present, else the CPU."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def measure(recipe: Recipe, *, device: str | None = None, micro_batches: int = 1,
            loss: str = "chunked") -> Measurement:
    """Measure one optimizer step of a recipe as `tunelab train` runs it (model, method, dtype and
    autocast, batch, max_length, optimizer, and the CPU fast paths when `train.fast_paths` turns them on).

    device: cpu or cuda (default: the one `tunelab train` would use). Runs `micro_batches` micro-batches of
    random tokens at `train.batch_size` x `train.max_length` (one padding-free row of them when packing runs
    flat through the fast paths) and one optimizer step. loss: chunked (tunelab train's) or hf. The fast
    paths' activation arena is left out: it holds the same saved tensors, in one reused block.
    """
    from tunelab import fast
    from tunelab.models.methods import method_spec

    device = device or train_device()
    model, compute = load_for_recipe(recipe, device)
    t = recipe.train
    on = fast.resolve(t.fast_paths, device)
    packing = t.packing and method_spec(recipe.method).supports_packing
    paths = fast.enable(model, on=on, packing=packing, max_length=t.max_length) if on else None
    if paths is not None:
        paths.arena = None
    return measure_model(model, batch=t.batch_size, seq=t.max_length,
                         optimizer=t.optimizer, micro_batches=micro_batches,
                         loss=loss, autocast=compute if compute != torch.float32 else None,
                         name=recipe.model.spec, paths=paths, flat=bool(paths and paths.flat_batches(packing)))


def check_recipe(recipe: Recipe, *, micro_batches: int = 1) -> Comparison:
    """`tunelab memory --measure`: the estimate for the device `tunelab train` would use, against a measured
    step of the code path it would run there (`measure`)."""
    from tunelab.memory.estimate import estimate_recipe

    device = train_device()
    m = measure(recipe, device=device, micro_batches=micro_batches)
    cmp = compare(estimate_recipe(recipe, device=device), m)
    cmp.device, cmp.fast_paths, cmp.flat = device, m.extra["fast_paths"], m.extra["flat"]
    return cmp


COMPARED = ("weights", "gradients", "optimizer", "activations", "logits", "total")


@dataclass
class Comparison:
    """Estimate vs measurement per component; `error` is (estimate - measured) / measured."""

    estimate: dict[str, int]
    measured: dict[str, int]
    device: str | None = None  # where the measurement ran
    fast_paths: bool | None = None  # whether it ran tunelab's CPU fast paths (the estimate models PEFT's ops)
    flat: bool = False  # padding-free packed rows

    def error(self, component: str) -> float:
        e, m = self.estimate[component], self.measured[component]
        if m == 0:
            return 0.0 if e == 0 else float("inf")
        return (e - m) / m

    def within(self, component_tol: float = 0.10, total_tol: float = 0.05) -> bool:
        """Every component within `component_tol` and the total within `total_tol`."""
        return all(abs(self.error(c)) <= (total_tol if c == "total" else component_tol) for c in COMPARED)

    def to_json(self) -> dict:
        out = {c: {"estimate": self.estimate[c], "measured": self.measured[c],
                   "error": round(self.error(c), 4)} for c in COMPARED}
        if self.device is not None:
            out["measured_on"] = {"device": self.device, "fast_paths": self.fast_paths, "flat": self.flat}
        return out


def compare(estimate, measurement: Measurement) -> Comparison:
    """Pair a `MemoryEstimate` with a `Measurement` of the same configuration."""
    return Comparison(estimate=dict(estimate.bytes), measured=dict(measurement.bytes))


__all__ = ["COMPONENTS", "Comparison", "Measurement", "check_recipe", "compare", "load_for_recipe", "measure",
           "measure_model", "prepare_model", "train_device"]
