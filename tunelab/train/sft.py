"""The SFT recipe, top to bottom: setup -> loop -> save. LoRA, QLoRA, prompt tuning and full finetuning.

Runs on one process or under `accelerate launch` (DDP/FSDP/DeepSpeed). Loss is the weighted mean over
every target token of the optimizer step: response tokens weigh 1.0, prompt tokens
`train.prompt_loss_weight` (0 masks them).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import random
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import torch
from rich.markup import escape

from tunelab.config.recipe import Recipe, save_recipe
from tunelab.data import Batches, collate, linear_weighted_loss, model_inputs, weighted_loss
from tunelab.errors import TunelabError
from tunelab.memory import preflight
from tunelab.models import load_model, resolve_dtype
from tunelab.models.attention import use_packed_attention
from tunelab.models.methods import apply_method, bnb_config, trainable_parameters
from tunelab.runs import register_training_run
from tunelab.runs.layout import open_train_log
from tunelab.train.arena import ActivationArena
from tunelab.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from tunelab.train.cpu import keep_freed_memory
from tunelab.train.dataset import prepare_splits
from tunelab.train.monitor import Monitor, console, plot_losses, progress_bar
from tunelab.train.optim import build_optimizer, build_scheduler
from tunelab.train.runinfo import peak_rss_bytes, write_run_json


def recipe_hash(recipe: Recipe) -> str:
    """Hash of the fields that change what is trained (not where it is written or how often saved)."""
    d = recipe.model_dump(mode="json")
    for k in ("output_dir", "checkpoint_every", "keep_last", "report_to", "mlflow_tracking_uri"):
        d.pop(k, None)
    d["eval"].pop("every", None)
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def _precision(recipe: Recipe, device: str) -> torch.dtype:
    p = recipe.train.precision
    return resolve_dtype("auto" if p == "auto" else p, device=device)


def setup_model(recipe: Recipe, device: str):
    """Load the base model in the right dtype and wrap it for the recipe's method."""
    compute = _precision(recipe, device)
    quant = bnb_config(recipe.qlora) if recipe.method == "qlora" else None
    # PEFT methods keep frozen base weights in the compute dtype (adapters stay fp32);
    # full finetuning keeps fp32 master weights and computes under autocast.
    dtype = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[compute]
    if recipe.method == "full":
        dtype = "fp32"
    if recipe.method == "qlora":
        dtype = recipe.qlora.compute_dtype
    model, tok = load_model(recipe.model.spec, dtype=dtype, quantization_config=quant)
    model = apply_method(model, recipe.method, recipe.lora, recipe.prompt, tok,
                         recipe.train.grad_checkpointing, recipe.train.freeze_embeddings)
    if compute != torch.float32:  # training runs under autocast: no need for PEFT to upcast LoRA inputs to
        for m in model.modules():  # the fp32 adapter dtype (a copy of every adapter input, forward and back)
            if hasattr(m, "lora_A"):
                m.cast_input_dtype_enabled = False
    if recipe.train.compile:
        compile_layers(model)
    return model, tok, compute


def compile_layers(model) -> int:
    """Regional compilation: torch.compile every decoder layer (one graph, reused by all of them).

    Inductor fuses the elementwise work around the matmuls (RMSNorm, rotary, SiLU, LoRA scale/add)
    that dominates a small model's step on a CPU. Batches are padded to max_length so shapes are static.
    """
    layers = [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]
    for layer in layers:
        layer.compile(dynamic=False)
    return len(layers)


class FusedHead:
    """Run the lm_head inside the loss (`linear_weighted_loss`) so the (B, T, V) logits are never built.

    A forward hook keeps the decoder's last hidden state and the model is asked for no logits
    (`logits_to_keep` = no position). `None` from `attach` when the model's head is not a plain bias-free
    linear layer (logit scaling, softcapping): the loss then runs on the model's own logits.
    """

    NO_POSITIONS = torch.zeros(0, dtype=torch.long)

    def __init__(self, decoder: torch.nn.Module, head: torch.nn.Linear):
        self.head, self.hidden = head, None
        decoder.register_forward_hook(self._keep)

    def _keep(self, module, args, output) -> None:
        self.hidden = output[0] if isinstance(output, tuple) else output.last_hidden_state

    @classmethod
    def attach(cls, model) -> FusedHead | None:
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        head, cfg = base.get_output_embeddings(), base.config
        plain = type(head) is torch.nn.Linear and head.bias is None and not any(
            getattr(cfg, k, None) for k in ("final_logit_softcapping", "logit_scale", "logits_scaling"))
        if not plain or "logits_to_keep" not in inspect.signature(base.forward).parameters:
            return None
        return cls(base.get_decoder(), head)

    def pop(self) -> torch.Tensor:
        hidden, self.hidden = self.hidden, None
        return hidden


def _loss(model, batch: dict, n_virtual: int, head: FusedHead | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of weighted token losses, sum of weights) for one micro-batch."""
    kwargs = model_inputs(batch)
    if n_virtual:  # PEFT prepends the virtual tokens; positions come from the attention mask
        kwargs.pop("position_ids", None)
    if head is not None:
        model(**kwargs, logits_to_keep=head.NO_POSITIONS.to(batch["input_ids"].device))
        hidden = head.pop()[:, n_virtual:]  # (B, T, d)
        loss, wsum = linear_weighted_loss(hidden, head.head.weight, batch["input_ids"], batch["weights"],
                                          sources=batch.get("sources"))
        return loss * wsum, wsum
    logits = model(**kwargs).logits  # (B, n_virtual + T, V)
    loss, wsum = weighted_loss(logits[:, n_virtual:], batch["input_ids"], batch["weights"],
                               sources=batch.get("sources"))
    return loss * wsum, wsum


@torch.no_grad()
def evaluate_loss(model, batches: list[dict], autocast, n_virtual: int, accelerator,
                  head: FusedHead | None = None) -> float:
    """Weighted mean loss over validation batches (summed across processes)."""
    model = accelerator.unwrap_model(model)  # no DDP collectives: ranks may hold different batch counts
    model.eval()
    total = torch.zeros(2)
    for b in batches:
        with autocast():
            s, w = _loss(model, {k: v.to(accelerator.device) for k, v in b.items()}, n_virtual, head)
        total += torch.stack([s.float().cpu(), w.float().cpu()])
    total = accelerator.reduce(total.to(accelerator.device), "sum").cpu()
    model.train()
    return (total[0] / total[1].clamp_min(1e-8)).item()


def train(recipe: Recipe, resume: bool = False, force: bool = False, show_progress: bool = True,
          stop_after_steps: int | None = None) -> Path:
    """Train per `recipe`; returns the output folder (PEFT adapter or HF model, recipe, run.json).

    resume: continue from the latest checkpoint in output_dir. force: train even when the memory
    estimate exceeds this device's memory. stop_after_steps: return early (tests, benchmarks).
    """
    from accelerate import Accelerator

    t0 = time.time()
    out = Path(recipe.output_dir)
    rhash = recipe_hash(recipe)
    if out.exists() and any(out.glob("checkpoint-*")) and not resume:
        raise TunelabError(f"{out} already holds checkpoints: pass --resume to continue, or choose another "
                           "output_dir (output_dir=runs/NAME).")
    if recipe.train.threads:
        torch.set_num_threads(recipe.train.threads)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    if accelerator.device.type == "cpu":
        keep_freed_memory()
    _preflight(recipe, force, accelerator.is_main_process)
    device = str(accelerator.device)
    rank, world = accelerator.process_index, accelerator.num_processes
    random.seed(recipe.train.seed)
    torch.manual_seed(recipe.train.seed)

    # --- setup: model, data, batches, optimizer -----------------------------------------------------------
    model, tok, compute = setup_model(recipe, device)
    trainable, total_params = trainable_parameters(model)
    packing = recipe.train.packing and recipe.method != "prompt"  # virtual tokens would sit only at the start
    n_virtual = recipe.prompt.num_virtual_tokens if recipe.method == "prompt" else 0
    if packing:  # padding-free (1, N) batches, causal attention per example
        use_packed_attention(model)
    head = FusedHead.attach(model)
    splits = prepare_splits(recipe.data, tok, recipe.train.prompt_loss_weight, recipe.train.max_length,
                            recipe.train.seed)
    for name, st in splits.stats.items():
        if accelerator.is_main_process:
            warn = st.truncated or st.dropped_too_long or st.dropped_no_response
            console.print(f"{'[yellow]' if warn else ''}{name}: {st.summary()} "
                          f"(data.too_long={recipe.data.too_long})")
    b = recipe.train.batch_size
    share = 0 if recipe.train.compile else recipe.train.share_prefix  # compiled steps need static shapes
    # rows: packed sequences (lists of example indices), planned once; shuffled per epoch below
    sequences = [plan[0] for plan in Batches(splits.train, 1, recipe.train.max_length, tok.pad_token_id,
                                             packing, seed=recipe.train.seed).plan]
    val_batches = list(Batches(splits.validation, b, recipe.train.max_length, tok.pad_token_id, packing,
                               seed=0, flat=packing, share_prefix=share))[rank::world]  # may be empty on some ranks
    has_val = bool(splits.validation)
    accum = recipe.accumulation(world)
    per_epoch = len(sequences) // (b * world * accum)
    if per_epoch == 0:
        raise TunelabError(f"only {len(sequences)} training sequences: fewer than one optimizer step of "
                           f"batch_size x grad_accum x processes = {b * accum * world}; lower train.batch_size "
                           "or train.effective_batch, or add data.")
    total_steps = recipe.train.max_steps or max(1, math.ceil(per_epoch * recipe.train.epochs))
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    plus = recipe.lora.plus_ratio if recipe.method in ("lora", "qlora") else None
    params = [p for _, p in named]
    optimizer = build_optimizer(named, recipe.train, plus)
    scheduler = build_scheduler(optimizer, recipe.train, total_steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    autocast = (lambda: torch.autocast(device.split(":")[0], dtype=compute)) \
        if compute != torch.float32 else _null_context

    step, start = 0, {"epoch": 0, "index": 0}
    out.mkdir(parents=True, exist_ok=True)
    metrics_path = open_train_log(out)  # train_log.jsonl (an old run's metrics.jsonl is renamed)
    if resume and (ckpt := latest_checkpoint(out)):
        state = load_checkpoint(ckpt, accelerator.unwrap_model(model), optimizer, scheduler, rhash)
        step, start = state["step"], state["position"]
        _truncate_metrics(metrics_path, step)
        console.print(f"resumed from {ckpt.name} at step {step}")
    elif accelerator.is_main_process:
        metrics_path.unlink(missing_ok=True)
        save_recipe(recipe, out / "recipe.yaml")
    monitor = Monitor(metrics_path, recipe.eval.patience)
    if step:
        monitor.replay()
    if accelerator.is_main_process:
        console.print(f"{recipe.method}: {trainable:,} trainable of {total_params:,} params; "
                      f"{len(splits.train)} train examples -> {len(sequences)} sequences; "
                      f"{total_steps} steps of {b}x{accum}x{world}; compute {compute}")

    # --- loop ------------------------------------------------------------------------------------------------
    if step == 0 and has_val:  # the "before" point of the validation curve
        val0 = evaluate_loss(model, val_batches, autocast, n_virtual, accelerator, head)
        if accelerator.is_main_process:
            monitor.validation(0, val0)
    model.train()
    arena = ActivationArena(model) if device == "cpu" else None  # see arena.py: a heap that does not fragment
    tokens_seen, tokens_window, t_window = 0, 0, time.time()
    computed_seen = 0  # token positions the model ran: fewer than tokens_seen when prefixes are shared
    stopped_early = False
    last_val = (-1, None)  # (step, loss) of the latest validation, reused when training ends on it
    with progress_bar(show_progress and accelerator.is_main_process) as bar:
        task_id = bar.add_task("train", total=total_steps, completed=step, info="")
        epoch, index = start["epoch"], start["index"]
        while step < total_steps and not stopped_early:
            order = list(range(len(sequences)))
            random.Random(recipe.train.seed + epoch).shuffle(order)
            n_batches = len(order) // (b * world)
            while index + accum <= n_batches and step < total_steps:
                micro = []
                for m in range(index, index + accum):
                    ids = order[m * b * world + rank * b: m * b * world + (rank + 1) * b]
                    rows = [sequences[i] for i in ids]
                    mb = collate(splits.train, rows, tok.pad_token_id, packing, flat=packing, share_prefix=share)
                    if recipe.train.compile:  # static shapes: one compiled graph
                        mb = _pad_to(mb, b * recipe.train.max_length if packing else recipe.train.max_length,
                                     tok.pad_token_id)
                    mb = {k: v.to(device) for k, v in mb.items()}
                    mb["real_tokens"] = sum(len(splits.train[i]) for row in rows for i in row)
                    computed_seen += mb["input_ids"].numel()
                    micro.append(mb)
                index += accum
                local_w = sum(mb["weights"].sum() for mb in micro).float()
                global_w = accelerator.reduce(local_w.to(accelerator.device), "sum")
                step_loss = torch.zeros((), device=accelerator.device)
                for j, mb in enumerate(micro):
                    sync = j == len(micro) - 1
                    ctx = _null_context() if sync else accelerator.no_sync(model)
                    with ctx, autocast(), arena.saving() if arena else _null_context():
                        s, _ = _loss(model, mb, n_virtual, head)
                        # DDP averages gradients over processes; scale so the result is sum / global weight
                        loss = s * world / global_w
                    accelerator.backward(loss)
                    if arena:
                        arena.release()
                    step_loss += s.detach().float()
                    tokens_window += int(mb["real_tokens"])
                if recipe.train.grad_clip:
                    accelerator.clip_grad_norm_(params, recipe.train.grad_clip)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                step_loss = accelerator.reduce(step_loss, "sum") / global_w
                tokens_window = int(accelerator.reduce(torch.tensor(tokens_window, device=accelerator.device),
                                                       "sum"))
                tokens_seen += tokens_window
                dt = time.time() - t_window
                row = {"step": step, "epoch": epoch, "loss": round(step_loss.item(), 5),
                       "lr": scheduler.get_last_lr()[0], "tokens": tokens_seen,
                       "tokens_per_s": round(tokens_window / max(dt, 1e-9), 1), "computed_tokens": computed_seen,
                       "elapsed": round(time.time() - t0, 2)}
                tokens_window, t_window = 0, time.time()
                if accelerator.is_main_process:
                    monitor.log(row)
                bar.update(task_id, completed=step, info=f"loss {row['loss']:.4f} lr {row['lr']:.2e} "
                                                         f"{row['tokens_per_s']:.0f} tok/s")
                if recipe.eval.every and step % recipe.eval.every == 0 and has_val:
                    val = evaluate_loss(model, val_batches, autocast, n_virtual, accelerator, head)
                    last_val = (step, val)
                    stopped_early = monitor.validation(step, val) if accelerator.is_main_process else False
                    stopped_early = bool(accelerator.reduce(torch.tensor(float(stopped_early),
                                                                          device=accelerator.device), "sum") > 0)
                    if stopped_early and accelerator.is_main_process:
                        console.print(f"early stopping at step {step}: no validation improvement in "
                                      f"{recipe.eval.patience} evaluations")
                if recipe.checkpoint_every and step % recipe.checkpoint_every == 0 and accelerator.is_main_process:
                    save_checkpoint(out, step, accelerator.unwrap_model(model), optimizer, scheduler,
                                    {"epoch": epoch, "index": index}, rhash, recipe.keep_last)
                if stop_after_steps and step >= stop_after_steps:
                    return out
            if index + accum > n_batches:
                epoch, index = epoch + 1, 0

    # --- save ------------------------------------------------------------------------------------------------
    final_val = last_val[1] if last_val[0] == step else \
        evaluate_loss(model, val_batches, autocast, n_virtual, accelerator, head) if has_val else None
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final_val is not None and (not monitor.val_hist or monitor.val_hist[-1][0] != step):
            monitor.validation(step, final_val)
        _save_final(accelerator.unwrap_model(model), tok, out)
        if metrics_path.exists():
            plot_losses(metrics_path, out / "loss.png")
        write_run_json(out, recipe, splits.sources, {
            "steps": step, "final_val_loss": final_val, "best_val_loss": monitor.best_val
            if math.isfinite(monitor.best_val) else None, "trainable_params": trainable,
            "total_params": total_params, "tokens": tokens_seen, "stopped_early": stopped_early,
            "data_stats": {k: asdict(v) for k, v in splits.stats.items()}, "processes": world,
        }, wall_s=time.time() - t0, peak_rss=peak_rss_bytes())
        register_training_run(out)  # registry row + lineage (and MLflow when report_to says so); never raises
    accelerator.wait_for_everyone()
    return out


def _pad_to(batch: dict, length: int, pad_id: int) -> dict:
    """Right-pad a collated batch to `length` (padding has weight 0 and its own position block)."""
    T = batch["input_ids"].shape[1]
    if T >= length:
        return batch
    n = length - T
    out = {"input_ids": torch.nn.functional.pad(batch["input_ids"], (0, n), value=pad_id),
           "weights": torch.nn.functional.pad(batch["weights"], (0, n), value=0.0)}
    if "attention_mask" in batch:
        out["attention_mask"] = torch.nn.functional.pad(batch["attention_mask"], (0, n), value=0)
    if "cu_seq_lens" in batch:  # flat: the padding is one more example
        out["cu_seq_lens"] = torch.cat([batch["cu_seq_lens"], torch.tensor([length])])
    if "position_ids" in batch:
        pos = batch["position_ids"]  # (B, T); packed padding starts its own block at 0
        tail = torch.arange(n).expand(pos.shape[0], n)
        if "attention_mask" in batch:  # unpacked: positions simply continue
            tail = tail + pos[:, -1:] + 1
        out["position_ids"] = torch.cat([pos, tail], dim=1)
    return out


def _preflight(recipe: Recipe, force: bool, verbose: bool) -> None:
    """Lint the recipe and check the memory estimate against this device before any training."""
    findings = preflight(recipe)
    errors = [f for f in findings if f.level == "error"]
    if verbose:
        for f in findings:
            if f.level == "warning" or force:
                console.print(f"[yellow]{escape(str(f))}[/yellow]", highlight=False)
    if errors and not force:
        raise TunelabError("the recipe fails its preflight checks (pass --force to train anyway):\n"
                           + "\n".join(str(f) for f in errors))


def _save_final(model, tok, out: Path) -> None:
    """Write the adapter (or full model) and tokenizer atomically into `out`."""
    tmp = out / ".final-tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    for f in tmp.iterdir():
        f.replace(out / f.name)
    tmp.rmdir()


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metrics rows logged after the checkpoint we resume from (they will be logged again)."""
    if not path.exists():
        return
    rows = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln)["step"] <= step]
    path.write_text("".join(r + "\n" for r in rows))


class _null_context:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False
