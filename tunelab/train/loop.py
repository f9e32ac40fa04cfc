"""The training loop: micro-batches, the weighted loss, one optimizer step, validation, checkpoints.

Loss is the weighted mean over every target token of the optimizer step: response tokens weigh 1.0,
prompt tokens `train.prompt_loss_weight` (0 masks them). Under DDP each process sums its share and the
gradients are scaled so their average over processes is that mean.
"""

from __future__ import annotations

import contextlib
import logging
import random
import time
from typing import TYPE_CHECKING

import torch

from tunelab.data import collate, model_inputs
from tunelab.models.losses import linear_weighted_loss, weighted_loss
from tunelab.progress import progress
from tunelab.train.checkpoint import save_checkpoint
from tunelab.train.prepare import TrainingRun, recipe_hash

if TYPE_CHECKING:
    from tunelab.fast import FusedHead

log = logging.getLogger(__name__)


def batch_loss(model, batch: dict, n_virtual: int, head: FusedHead | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of weighted token losses, sum of weights) for one micro-batch; through the fused head when given."""
    kwargs = model_inputs(batch)
    if n_virtual:  # PEFT prepends the virtual tokens; positions come from the attention mask
        kwargs.pop("position_ids", None)
    if head is not None:
        model(**kwargs, logits_to_keep=head.no_positions(batch["input_ids"].device))
        hidden = head.pop()[:, n_virtual:]  # (B, T, d)
        loss, wsum = linear_weighted_loss(hidden, head.head.weight, batch["input_ids"], batch["weights"],
                                          sources=batch.get("sources"))
        return loss * wsum, wsum
    logits = model(**kwargs).logits  # (B, n_virtual + T, V)
    loss, wsum = weighted_loss(logits[:, n_virtual:], batch["input_ids"], batch["weights"],
                               sources=batch.get("sources"))
    return loss * wsum, wsum


@torch.no_grad()
def validation_loss(run: TrainingRun) -> float:
    """Weighted mean loss over the validation batches (summed across processes)."""
    acc = run.accelerator
    model = acc.unwrap_model(run.model)  # no DDP collectives: ranks may hold different batch counts (FSDP: the
    # same count, plan_data pads; its forwards gather the shards)
    model.eval()
    total = torch.zeros(2)
    for b in run.val_batches:
        with run.autocast():
            s, w = batch_loss(model, {k: v.to(acc.device) for k, v in b.items()}, run.n_virtual, run.fast.head)
        total += torch.stack([s.float().cpu(), w.float().cpu()])
    total = acc.reduce(total.to(acc.device), "sum").cpu()
    model.train()
    return (total[0] / total[1].clamp_min(1e-8)).item()


def validate(run: TrainingRun) -> None:
    """Validate at the current step: log it, and decide (on every process alike) whether it is the best so
    far and whether to stop early."""
    val = validation_loss(run)
    run.position.last_val = (run.position.step, val)
    stop, best = False, False
    if run.main:
        stop = run.monitor.validation(run.position.step, val)
        best = run.monitor.best_step == run.position.step
    acc = run.accelerator
    stop_best = acc.reduce(torch.tensor([float(stop), float(best)], device=acc.device), "sum")
    if stop_best[1] > 0:
        run.position.best_step = run.position.step
    if run.position.step == 0:  # the "before" point of the curve
        return
    run.position.stopped_early = bool(stop_best[0] > 0)
    if run.position.stopped_early and run.main:
        log.info(f"early stopping at step {run.position.step}: no validation improvement in "
                 f"{run.recipe.validation.patience} evaluations")


def micro_batches(run: TrainingRun, order: list[int]) -> list[dict]:
    """The next `accum` micro-batches of this rank, on the device."""
    t, b, world, rank = run.recipe.train, run.recipe.train.batch_size, run.world, run.rank
    pad = run.tok.pad_token_id
    micro = []
    for m in range(run.position.index, run.position.index + run.accum):
        rows = [run.sequences[i] for i in order[m * b * world + rank * b: m * b * world + (rank + 1) * b]]
        mb = collate(run.splits.train, rows, pad, run.packing, flat=run.flat, share_prefix=run.share_prefix)
        if t.compile:  # static shapes: one compiled graph
            mb = pad_to(mb, b * t.max_length if run.flat else t.max_length, pad)
        mb = {k: v.to(run.device) for k, v in mb.items()}
        mb["real_tokens"] = sum(len(run.splits.train[i]) for row in rows for i in row)
        run.position.computed_seen += mb["input_ids"].numel()
        micro.append(mb)
    run.position.index += run.accum
    return micro


def optimizer_step(run: TrainingRun, micro: list[dict], t_start: float) -> dict:
    """Forward and backward every micro-batch, then one optimizer step; -> the log row (speed since t_start)."""
    acc, world = run.accelerator, run.world
    global_w = acc.reduce(sum(mb["weights"].sum() for mb in micro).float().to(acc.device), "sum")
    step_loss = torch.zeros((), device=acc.device)
    tokens = 0
    for j, mb in enumerate(micro):
        sync = j == len(micro) - 1
        with (contextlib.nullcontext() if sync else acc.no_sync(run.model)), run.autocast(), run.fast.saving():
            s, _ = batch_loss(run.model, mb, run.n_virtual, run.fast.head)
            loss = s * world / global_w  # DDP averages gradients over processes: sum / global weight
        acc.backward(loss)
        run.fast.release()
        step_loss += s.detach().float()
        tokens += int(mb["real_tokens"])
    if run.recipe.train.grad_clip:
        acc.clip_grad_norm_(run.params, run.recipe.train.grad_clip)
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.position.step += 1
    step_loss = acc.reduce(step_loss, "sum") / global_w
    tokens = int(acc.reduce(torch.tensor(tokens, device=acc.device), "sum"))
    run.position.tokens_seen += tokens
    return {"step": run.position.step, "epoch": run.position.epoch, "loss": round(step_loss.item(), 5),
            "lr": run.scheduler.get_last_lr()[0], "tokens": run.position.tokens_seen,
            "tokens_per_s": round(tokens / max(time.time() - t_start, 1e-9), 1),
            "computed_tokens": run.position.computed_seen, "elapsed": round(time.time() - run.t0, 2)}


def after_step(run: TrainingRun) -> None:
    """Validate and checkpoint when the recipe says so; with early stopping on, also checkpoint every new best
    validation step (kept through pruning), so the end of the run can restore it."""
    r = run.recipe
    validated = bool(r.validation.every and run.position.step % r.validation.every == 0 and run.splits.validation)
    if validated:
        validate(run)
    new_best = validated and r.validation.patience is not None and run.position.best_step == run.position.step
    if (r.checkpoint_every and run.position.step % r.checkpoint_every == 0) or new_best:
        keep = (run.position.best_step,) if r.validation.patience is not None and run.position.best_step else ()
        save_checkpoint(run.accelerator, run.out, run.position.step, run.model, run.optimizer, run.scheduler,
                        {"epoch": run.position.epoch, "index": run.position.index, "tokens": run.position.tokens_seen,
                         "computed_tokens": run.position.computed_seen}, recipe_hash(r), r.keep_last, protect=keep)


def train_loop(run: TrainingRun, show_progress: bool, stop_after_steps: int | None = None) -> bool:
    """Optimizer steps until total_steps or early stopping; False when stopped by `stop_after_steps`."""
    run.model.train()
    b, world = run.recipe.train.batch_size, run.world
    # the progress line of each step carries its loss: "step 3/80 loss 1.2345 lr 2.00e-03 950 tok/s ..."
    with progress("step", run.total_steps, show_progress and run.main, done=run.position.step) as update:
        while run.position.step < run.total_steps and not run.position.stopped_early:
            order = list(range(len(run.sequences)))
            random.Random(run.recipe.train.seed + run.position.epoch).shuffle(order)
            n_batches = len(order) // (b * world)
            while run.position.index + run.accum <= n_batches and run.position.step < run.total_steps:
                t_start = time.time()
                row = optimizer_step(run, micro_batches(run, order), t_start)
                if run.main:
                    run.monitor.log(row)
                update(run.position.step, f"loss {row['loss']:.4f} lr {row['lr']:.2e} {row['tokens_per_s']:.0f} tok/s")
                after_step(run)
                if stop_after_steps and run.position.step >= stop_after_steps:
                    return False
                if run.position.stopped_early:
                    break
            if run.position.index + run.accum > n_batches:
                run.position.epoch, run.position.index = run.position.epoch + 1, 0
    return True


def pad_to(batch: dict, length: int, pad_id: int) -> dict:
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
